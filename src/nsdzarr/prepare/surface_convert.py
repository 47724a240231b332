"""Convert one surface session (``lh`` and ``rh`` files) into a Zarr v3 group of two arrays."""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from nsdzarr import __version__
from nsdzarr.errors import InputError
from nsdzarr.prepare.atomic import atomic_output, remove_stale_temporaries
from nsdzarr.prepare.convert import (
    ConversionReport,
    ShardIO,
    plane_checksums,
    source_attrs,
    store_stats,
    verify_store,
)
from nsdzarr.prepare.memory import ConversionPlan, plan_surface_conversion
from nsdzarr.prepare.storage import (
    SCRATCH_COMPRESSOR,
    StorageSettings,
    create_trial_array,
    trial_blocks,
)
from nsdzarr.prepare.surface import (
    HemisphereReader,
    SessionSources,
    SurfaceSession,
    open_session,
    scale_and_units,
)
from nsdzarr.prepare.verify import crc32c

log = logging.getLogger(__name__)

AXES = ("trial", "vertex")


def surface_plan(
    meta: dict[str, Any],
    trials_per_shard: int,
    budget_bytes: int | None = None,
    force: str | None = None,
) -> ConversionPlan:
    """How a session of ``meta`` (:meth:`SurfaceSession.metadata`) is converted within
    ``budget_bytes`` (or by ``force``), and its predicted peak RSS (estimate and convert)."""
    return plan_surface_conversion(
        meta["shape"][0],
        list(meta["hemispheres"].values()),
        np.dtype(meta["dtype"]).itemsize,
        trials_per_shard,
        meta["whole_hemisphere"],
        budget_bytes,
        meta["chunk_vertices"],
        force,
    )


def _fill_scratch(
    reader: HemisphereReader, trials_per_shard: int, folder: str
) -> tuple[zarr.Array, np.ndarray]:
    """Vertex blocks into a scratch array chunked ``(trials_per_shard, vertex block)``; returns
    it and the per-trial checksums of the source, continued block by block in vertex order."""
    scratch = zarr.create_array(
        folder,
        shape=reader.shape,
        dtype=reader.dtype,
        chunks=(trials_per_shard, reader.vertex_block),
        compressors=SCRATCH_COMPRESSOR,
        fill_value=0,
    )
    sums = np.zeros((reader.n_trials, 1), np.uint32)
    for _rows, cols, block in reader.blocks(trials_per_shard):
        for t in range(len(block)):
            sums[t, 0] = crc32c(block[t], value=int(sums[t, 0]))
        scratch[:, cols] = block
        del block
    return scratch, sums


def _write_hemisphere(
    reader: HemisphereReader, io: ShardIO, strategy: str, scratch_dir: str
) -> np.ndarray:
    """Write one hemisphere shard by shard; return its per-trial checksums ``(T, 1)``."""
    n_trials, step = reader.n_trials, io.arr.shards[0]
    sums = np.empty((n_trials, 1), np.uint32)
    with ExitStack() as stack:
        if not reader.whole_hemisphere:
            shards = ((rows.start, block) for rows, _cols, block in reader.blocks(step))
        elif strategy == "scratch":  # bounded: the hemisphere is never held
            folder = stack.enter_context(
                tempfile.TemporaryDirectory(dir=scratch_dir, prefix="nsdzarr-rechunk-")
            )
            scratch, sums = _fill_scratch(reader, step, folder)
            shards = ((t0, scratch[t0:t1]) for t0, t1 in trial_blocks(n_trials, step))
        else:
            data = np.empty(reader.shape, reader.dtype)
            for rows, cols, block in reader.blocks(step):
                data[rows, cols] = block
            shards = ((t0, data[t0:t1]) for t0, t1 in trial_blocks(n_trials, step))
        for t0, block in shards:
            if block.dtype.kind == "f" and not np.isfinite(block).all():
                trial = t0 + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                raise InputError(
                    reader.path, f"betas hold NaN or inf values, first at trial {trial}"
                )
            if strategy != "scratch" or not reader.whole_hemisphere:
                sums[t0 : t0 + len(block)] = plane_checksums(block)
            io.write(t0, block)
    return sums


def convert_surface_session(
    sources: SessionSources,
    target: str | os.PathLike[str],
    settings: StorageSettings | None = None,
    memory_budget_bytes: int | None = None,
    threads: int = 1,
    scratch_dir: str | None = None,
    strategy: str | None = None,
    **_volume_only: Any,
) -> ConversionReport:
    """Convert ``[lh, rh]`` betas files into the group ``target`` with arrays ``lh`` and ``rh``
    ``(750, vertices)``, source dtype kept; built beside the target, renamed once verified.

    Files whose chunks span every trial are rechunked in memory, a hemisphere at a time, when
    that fits ``memory_budget_bytes``, else through a scratch store (inside the unfinished
    store unless ``scratch_dir``); ``strategy`` forces ``"whole-hemisphere"`` or ``"scratch"``
    for them."""
    target = Path(target)
    settings = settings or StorageSettings()
    remove_stale_temporaries(target)
    with (
        open_session(sources) as session,
        zarr.config.set({"threading.max_workers": threads}),
    ):
        meta = session.metadata()
        plan = surface_plan(meta, settings.trials_per_shard, memory_budget_bytes, strategy)
        peak = plan.peak_bytes
        log.info("converting %s with plan %s", [str(r.path) for r in session.readers], plan)
        if memory_budget_bytes is not None and peak > memory_budget_bytes:
            raise InputError(
                session.readers[0].path,
                f"converting needs ~{peak >> 20} MB, above the job's budget "
                f"{memory_budget_bytes >> 20} MB (raise memory.ceiling_mb)",
            )
        with atomic_output(target) as tmp:
            group = zarr.open_group(tmp, mode="w", zarr_format=3)
            sums = {}
            for reader in session.readers:
                arr = create_trial_array(
                    group, reader.hemisphere, reader.shape, reader.dtype, settings, AXES
                )
                io = ShardIO(arr, Path(tmp))
                # scratch inside the unfinished store: a killed job's goes with it
                scratch = scratch_dir or str(tmp)
                sums[reader.hemisphere] = _write_hemisphere(reader, io, plan.strategy, scratch)
                verify_store(Path(tmp) / reader.hemisphere, sums[reader.hemisphere], target)
            checks = np.concatenate([sums["lh"], sums["rh"]], axis=1)
            group.create_array(
                "checksums", data=checks, compressors=None, dimension_names=("trial", "hemisphere")
            )
            group.attrs.update(surface_attrs(session, settings))
    size, files = store_stats(target)
    r0 = session.readers[0]
    report = ConversionReport(
        str(r0.path),
        str(target),
        (r0.n_trials, sum(session.vertices.values())),
        r0.dtype.str,
        plan.strategy,
        0,
        peak,
        r0.n_trials * sum(session.vertices.values()) * r0.dtype.itemsize,
        size,
        files,
    )
    log.info("wrote %s", asdict(report))
    return report


def surface_attrs(session: SurfaceSession, settings: StorageSettings) -> dict[str, Any]:
    """Group attributes of a surface session store: space, vertices, units, provenance."""
    r0 = session.readers[0]
    scale, units = scale_and_units(r0.dtype)
    return {
        "nsdzarr_version": __version__,
        "space": "fsaverage" if r0.format == "mgh" else "nativesurface",
        "hemispheres": session.vertices,
        "source": {r.hemisphere: source_attrs(r.path) for r in session.readers},
        "source_format": r0.format,
        "source_dtype": r0.file_dtype.str,
        "scale": scale,
        "units": units,
        "axes": list(AXES),
        "source_relation": (
            "lh[t] == nibabel.load(lh.mgh).dataobj[:, 0, 0, t]"
            if r0.format == "mgh"
            else "lh == h5py.File(lh.hdf5)['betas'][...] (trials first)"
        ),
        "storage": asdict(settings),
        "checksums": "CRC32C of the raw little-endian bytes of each trial, per hemisphere",
    }
