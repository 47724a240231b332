"""Convert one NSD session HDF5 into a sharded Zarr v3 store, atomically, verified lossless."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from nsdzarr import __version__
from nsdzarr.errors import VerificationError
from nsdzarr.nsd_facts import BETA_SCALE, BETA_UNITS
from nsdzarr.prepare.atomic import atomic_output, remove_stale_temporaries
from nsdzarr.prepare.hdf5_open import check_finite
from nsdzarr.prepare.hdf5_read import SessionReader
from nsdzarr.prepare.jobs import pause_after_shard
from nsdzarr.prepare.memory import ConversionPlan, limit_malloc_arenas, plan_conversion
from nsdzarr.prepare.storage import (
    SCRATCH_COMPRESSOR,
    StorageSettings,
    create_trial_array,
    trial_blocks,
)
from nsdzarr.prepare.surface import is_surface_source
from nsdzarr.prepare.verify import crc32c, default_reader, read_blocks
from nsdzarr.training.zarr_v3 import ArrayLayout, parse_layout

log = logging.getLogger(__name__)

AXES = ("trial", "z", "y", "x")


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion did: plan, sizes, files."""

    source: str
    target: str
    shape: tuple[int, ...]
    dtype: str
    strategy: str
    planes_per_slab: int
    predicted_peak_bytes: int
    raw_bytes: int
    store_bytes: int
    store_files: int


def plane_checksums(block: np.ndarray) -> np.ndarray:
    """CRC32C of every ``(trial, z-plane)`` of a ``(trials, planes, Y, X)`` block.

    Exact, sensitive to position, and the same whichever way the session was read. A 2-D
    ``(trials, vertices)`` block is one plane per trial.
    """
    if block.ndim == 2:
        block = block[:, None]
    out = np.empty(block.shape[:2], dtype=np.uint32)
    for t in range(block.shape[0]):
        for z in range(block.shape[1]):
            out[t, z] = crc32c(block[t, z])
    return out


def store_stats(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Total bytes and number of files below a store folder."""
    size = files = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            size += os.path.getsize(os.path.join(root, name))
            files += 1
    return size, files


def source_attrs(source: Path) -> dict[str, Any]:
    """Provenance of the source file: path, size and mtime (no clock time of the conversion)."""
    st = source.stat()
    return {"path": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class ShardIO:
    """Whole-shard writes of one array through zarr-python (a hand-written writer measured no
    faster on the compressed session stores; raw image stores: ``raw_shards``)."""

    def __init__(self, arr: zarr.Array, root: Path, layout: ArrayLayout | None = None) -> None:
        """``layout``: the array's, when already parsed."""
        self.arr, self.root = arr, root
        self.layout = layout or parse_layout(root / arr.path)[1]

    def write(self, t0: int, block: np.ndarray, sums: np.ndarray | None = None) -> None:
        """Write rows ``t0..`` (whole shards; ``sums``: each row's crc32c, if known)."""
        self._store(t0, block, sums)
        shard = self.arr.shards[0]
        pause_after_shard(t0 // shard + 1, -(-self.arr.shape[0] // shard))

    def _store(self, t0: int, block: np.ndarray, sums: np.ndarray | None) -> None:
        self.arr[t0 : t0 + len(block)] = block

    def shard_file(self, t0: int) -> str:
        """The file of the shard holding row ``t0``."""
        if self.layout is None:
            raise ValueError(f"{self.arr.path}: not a layout our reader knows")
        return self.layout.key((t0 // self.layout.grid[0],) + (0,) * (self.arr.ndim - 1))


def _write_in_memory(reader: SessionReader, io: ShardIO) -> np.ndarray:
    data = reader.read_all()
    check_finite(data, reader.path)
    sums = plane_checksums(data)
    for t0, t1 in trial_blocks(data.shape[0], io.arr.shards[0]):
        io.write(t0, data[t0:t1])
    return sums


def _write_by_slabs(
    reader: SessionReader,
    io: ShardIO,
    planes: int,
    scratch_dir: str,
) -> np.ndarray:
    """Rechunk voxel slabs to trial blocks through a scratch store, whole shards at a time."""
    arr = io.arr
    n_trials, n_z = arr.shape[:2]
    block = arr.shards[0]
    sums = np.empty((n_trials, n_z), dtype=np.uint32)
    with tempfile.TemporaryDirectory(dir=scratch_dir, prefix="nsdzarr-rechunk-") as tmp:
        scratch = zarr.create_array(
            tmp,
            shape=arr.shape,
            dtype=arr.dtype,
            chunks=(block, planes, *arr.shape[2:]),
            compressors=SCRATCH_COMPRESSOR,
            fill_value=0,
        )
        for z0 in range(0, n_z, planes):
            z1 = min(z0 + planes, n_z)
            slab = reader.read_planes(z0, z1)
            check_finite(slab, reader.path, f" (z-planes {z0}..{z1 - 1})")
            sums[:, z0:z1] = plane_checksums(slab)
            scratch[:, z0:z1] = slab
            del slab
        for t0, t1 in trial_blocks(n_trials, block):
            io.write(t0, scratch[t0:t1])
    return sums


def verify_store(
    array_dir: str | os.PathLike[str],
    expected: np.ndarray,
    target: str | os.PathLike[str],
    reader: str | None = None,
) -> str:
    """Re-read every shard of the finished array through an independent reader
    (``verify.read_blocks``: tensorstore, else zarr-python), compare plane checksums with the
    source's, raise on a difference; returns the reader used."""
    reader = reader or default_reader()
    meta = json.loads((Path(array_dir) / "zarr.json").read_text())
    block = meta["chunk_grid"]["configuration"]["chunk_shape"][0]  # one shard
    bad: list[int] = []
    blocks = read_blocks(array_dir, block, reader)
    t0 = 0
    while t0 < len(expected):
        try:
            t0, rows = next(blocks)
            got = plane_checksums(rows)
        except StopIteration:
            raise VerificationError(target, f"store ends before trial {t0}") from None
        except Exception as err:  # any codec or index error means the bytes on disk are bad
            raise VerificationError(
                target, f"shard of trials {t0}..{t0 + block - 1} unreadable by {reader}: {err}"
            ) from None
        bad += (np.flatnonzero(np.any(got != expected[t0 : t0 + len(rows)], axis=1)) + t0).tolist()
        t0 += len(rows)
    if bad:
        raise VerificationError(target, f"store differs from its source at trials {bad[:10]}")
    return reader


def convert_session(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    settings: StorageSettings | None = None,
    memory_budget_bytes: int | None = None,
    scratch_dir: str | None = None,
    affine: np.ndarray | None = None,
    strategy: str | None = None,
    threads: int = 1,
) -> ConversionReport:
    """Convert ``source`` (``/betas``, ``(T, Z, Y, X)``) into the Zarr group ``target``.

    The store is built beside the target and renamed only once verified; ``strategy`` forces
    ``"in-memory"`` or ``"slabs"`` (surfaces: ``"whole-hemisphere"`` or ``"scratch"``) instead
    of choosing by ``memory_budget_bytes``; ``threads`` bounds Zarr's encoding threads. A
    surface session (``[lh, rh]`` files) goes to
    :func:`nsdzarr.prepare.surface_convert.convert_surface_session`.
    """
    limit_malloc_arenas()  # else freed shard buffers stay in each thread's malloc arena
    if is_surface_source(source):
        from nsdzarr.prepare.surface_convert import convert_surface_session

        return convert_surface_session(
            source, target, settings, memory_budget_bytes, threads, scratch_dir, strategy
        )
    source, target = Path(source), Path(target)
    settings = settings or StorageSettings()
    remove_stale_temporaries(target)
    with (
        SessionReader(source) as reader,
        zarr.config.set({"threading.max_workers": threads}),
    ):
        shape, dtype = tuple(reader.shape), np.dtype(reader.dtype)
        plan = plan_conversion(
            shape, dtype.itemsize, settings.trials_per_shard, memory_budget_bytes
        )
        if strategy == "slabs" and plan.strategy != "slabs":
            plan = ConversionPlan("slabs", max(1, shape[1] // 4), plan.peak_bytes)
        elif strategy == "in-memory":
            plan = ConversionPlan("in-memory", shape[1], plan.peak_bytes)
        log.info("converting %s %s %s with plan %s", source, shape, dtype, plan)
        with atomic_output(target) as tmp:
            group = zarr.open_group(tmp, mode="w", zarr_format=3)
            arr = create_trial_array(group, "betas", shape, dtype, settings, AXES)
            io = ShardIO(arr, Path(tmp))
            if plan.strategy == "in-memory":
                sums = _write_in_memory(reader, io)
            else:
                # scratch defaults to inside the unfinished store, so a killed job's scratch
                # goes with it when the next run removes stale temporaries
                scratch = scratch_dir or str(tmp)
                sums = _write_by_slabs(reader, io, plan.planes_per_slab, scratch)
            verify_store(Path(tmp) / "betas", sums, target)
            group.create_array(
                "plane_checksums", data=sums, compressors=None, dimension_names=("trial", "z")
            )
            group.attrs.update(
                session_attrs(source, shape, dtype, settings, affine, reader.strategy)
            )
    size, files = store_stats(target)
    report = ConversionReport(
        str(source),
        str(target),
        shape,
        dtype.str,
        plan.strategy,
        plan.planes_per_slab,
        plan.peak_bytes,
        int(np.prod(shape)) * dtype.itemsize,
        size,
        files,
    )
    log.info("wrote %s", asdict(report))
    return report


def session_attrs(
    source: Path,
    shape: tuple[int, ...],
    dtype: np.dtype,
    settings: StorageSettings,
    affine: np.ndarray | None,
    read_path: str,
) -> dict[str, Any]:
    """Group attributes of a session store: provenance, units, axis order, NIfTI relation."""
    return {
        "nsdzarr_version": __version__,
        "source": source_attrs(source),
        "source_dataset": "betas",
        "read_path": read_path,
        "scale": BETA_SCALE,
        "units": BETA_UNITS,
        "axes": list(AXES),
        "shape_nifti_xyz": list(shape[:0:-1]),
        "nifti_relation": "betas[t] == nifti[..., t].T: (z, y, x) here is NIfTI (x, y, z) reversed",
        "affine": None if affine is None else np.asarray(affine, dtype=float).tolist(),
        "storage": asdict(settings),
        "plane_checksums": "CRC32C of the raw little-endian bytes of each (trial, z) plane",
    }
