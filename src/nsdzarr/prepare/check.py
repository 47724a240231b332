"""Re-check the stores nsd-zarr writes: stored checksums, decodable chunks, consistent shapes.

Everything is read through zarr-python at most one shard (and 64 MiB) at a time, so memory
stays bounded whatever the store's size. Session stores are checked against their
``plane_checksums``, image stores against their per-image ``checksums``; every other array
must at least decode.
"""

from __future__ import annotations

import ast
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np
import zarr

from nsdzarr.errors import InputError
from nsdzarr.nsd_facts import TRIALS_PER_SESSION
from nsdzarr.prepare.convert import plane_checksums
from nsdzarr.prepare.memory import READ_BUFFER_BYTES
from nsdzarr.prepare.roi import read_split
from nsdzarr.training.zarr_v3 import read_json

MAX_ERROR_CHARS = 200
# Decoded bytes read at once: whole chunks, at most one shard.


@dataclass(frozen=True)
class Problem:
    """One finding: the file it is in (a shard file when known) and what is wrong."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def find_stores(folder: str | os.PathLike[str]) -> list[Path]:
    """Top nodes of the Zarr stores at or below ``folder``; hidden folders (unfinished
    ``.incomplete-*`` stores) are skipped and nothing inside a store is listed again."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "zarr.json" in names:
            found.append(Path(root))
            dirs[:] = []
    return found


def object_file(arr: zarr.Array, root: Path, row: int) -> Path:
    """The file (shard, or chunk when unsharded) holding ``row`` of a trial-major array."""
    outer = arr.shards or arr.chunks
    coords = (row // outer[0],) + (0,) * (arr.ndim - 1) if arr.ndim else ()
    return root / arr.path / arr.metadata.chunk_key_encoding.encode_chunk_key(coords)


def row_blocks(arr: zarr.Array, limit: int = READ_BUFFER_BYTES) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` row ranges along the first axis: whole chunks, up to one shard or
    ``limit`` bytes of decoded data per range."""
    if not arr.ndim:
        yield 0, 1
        return
    rows = arr.chunks[0]
    row_bytes = math.prod(arr.shape[1:]) * arr.dtype.itemsize
    outer = (arr.shards or arr.chunks)[0]
    step = max(rows, min(outer, limit // max(row_bytes, 1)) // rows * rows)
    for start in range(0, arr.shape[0], step):
        yield start, min(start + step, arr.shape[0])


def _missing(path: Path) -> str:
    """A note for a mismatch whose file is absent (zarr-python then reads the fill value)."""
    return "" if path.exists() else "; the file is missing, read as the fill value"


def _error(exc: Exception) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:MAX_ERROR_CHARS]


def read_rows(
    arr: zarr.Array, root: Path, start: int, stop: int, what: str
) -> tuple[np.ndarray | None, list[Problem]]:
    """Rows ``[start, stop)``, or None and a problem per chunk that cannot be read."""
    try:
        return (arr[start:stop] if arr.ndim else arr[...]), []
    except Exception:  # a codec, index or checksum error: find the chunks whose bytes are bad
        pass
    failed = []
    step = arr.chunks[0] if arr.ndim else 1
    for t0 in range(start, stop, step):
        t1 = min(t0 + step, stop)
        try:
            arr[t0:t1] if arr.ndim else arr[...]
        except Exception as exc:
            failed.append((t0, t1, exc))
    if len(failed) == len(range(start, stop, step)):  # the whole range, e.g. a broken index
        failed = [(start, stop, failed[0][2])]
    problems = []
    for t0, t1, exc in failed:
        rows = f"{what} {t0}" if t1 - t0 == 1 else f"{what}s {t0}..{t1 - 1}"
        where = str(object_file(arr, root, t0))
        problems.append(Problem(where, f"{rows} cannot be read ({_error(exc)})"))
    if not problems:  # pragma: no cover - failed as a whole yet every chunk reads
        problems.append(Problem(str(root / arr.path), f"{what}s {start}..{stop - 1} unreadable"))
    return None, problems


def check_decodes(arr: zarr.Array, root: Path, what: str = "row") -> list[Problem]:
    """Every chunk of ``arr`` decodes."""
    problems = []
    for start, stop in row_blocks(arr):
        problems += read_rows(arr, root, start, stop, what)[1]
    return problems


def check_session(
    group: zarr.Group, root: Path, name: str = "betas", column: int | None = None
) -> list[Problem]:
    """``betas`` against ``plane_checksums`` (CRC32C of each trial x z-plane of the source); a
    surface store's hemisphere ``name`` against column ``column`` of its ``checksums``."""
    betas = group[name]
    sums = group["plane_checksums" if column is None else "checksums"]
    want = betas.shape[:2] if column is None else (betas.shape[0], 2)
    if sums.shape != want:
        return [
            Problem(
                str(root / sums.path),
                f"{sums.basename} has shape {sums.shape}, {name} {betas.shape}: expected {want}",
            )
        ]
    expected = sums[...] if column is None else sums[:, column : column + 1]
    problems = []
    for t0, t1 in row_blocks(betas):
        block, unreadable = read_rows(betas, root, t0, t1, "trial")
        problems += unreadable
        if block is None:
            continue
        got = plane_checksums(block)
        for t in (np.flatnonzero(np.any(got != expected[t0:t1], axis=1)) + t0).tolist():
            planes = np.flatnonzero(got[t - t0] != expected[t]).tolist()
            where = object_file(betas, root, t)
            problems.append(
                Problem(
                    str(where),
                    f"trial {t} differs from its source (plane checksums of z-planes "
                    f"{planes[:8]}{' ...' if len(planes) > 8 else ''} do not match"
                    f"{_missing(where)})",
                )
            )
    return problems


def check_images(group: zarr.Group, root: Path, names: list[str]) -> list[Problem]:
    """``images`` against ``checksums`` (CRC32C of each image's bytes); ``nsd_id`` and every
    ``images_{S}`` hold one row per image."""
    images, sums = group["images"], group["checksums"]
    n = images.shape[0] if images.ndim else 0
    problems = []
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        problems.append(
            Problem(
                str(root / images.path),
                f"images are {images.dtype} {images.shape}: expected uint8 (N, H, W, 3)",
            )
        )
    for name in ["checksums", "nsd_id", *(m for m in names if m.startswith("images_"))]:
        if name in names and group[name].shape[:1] != (n,):
            problems.append(
                Problem(str(root / name), f"shape {group[name].shape} does not match {n} images")
            )
    if problems:
        return problems
    expected = sums[...]
    for i0, i1 in row_blocks(images):
        block, unreadable = read_rows(images, root, i0, i1, "image")
        problems += unreadable
        if block is None:
            continue
        for i in range(i0, i1):
            got = google_crc32c.value(np.ascontiguousarray(block[i - i0]).tobytes())
            if got != int(expected[i]):
                where = object_file(images, root, i)
                problems.append(
                    Problem(
                        str(where),
                        f"image {i} checksum mismatch (stored {int(expected[i]):#010x}, "
                        f"computed {got:#010x}{_missing(where)})",
                    )
                )
    return problems


def check_roi(group: zarr.Group, root: Path, names: list[str]) -> list[Problem]:
    """Shapes of an ROI store (or a per-session part) agree with each other and the attributes."""
    betas, voxels = group["betas"], group["voxels"]
    n_trials, n_vox = betas.shape
    attrs = group.attrs.asdict()
    sessions = attrs.get("sessions")
    n_sessions = len(sessions) if sessions is not None else 1  # a part holds one session
    expect = {
        "voxels": (n_vox, 3),
        "label": (n_vox,),
        "mean": (n_sessions, n_vox),
        "std": (n_sessions, n_vox),
    }
    problems = [
        Problem(str(root / name), f"shape {group[name].shape}, expected {shape}")
        for name, shape in expect.items()
        if name in names and group[name].shape != shape
    ]
    if n_trials != TRIALS_PER_SESSION * n_sessions:
        problems.append(
            Problem(str(root / "betas"), f"{n_trials} trials for {n_sessions} session(s)")
        )
    if "shape" in attrs and list(attrs["shape"]) != [n_trials, n_vox]:
        problems.append(
            Problem(str(root / "zarr.json"), f"attribute shape {attrs['shape']} != {betas.shape}")
        )
    if not problems and "shape_nifti_xyz" in attrs:
        ijk = voxels[...]
        if np.any(ijk < 0) or np.any(ijk >= np.asarray(attrs["shape_nifti_xyz"])):
            problems.append(Problem(str(root / "voxels"), "voxel coordinates outside the grid"))
    for name in ("mean", "std"):
        if name in names and not problems:
            values = group[name][...]
            if not np.all(np.isfinite(values)) or (name == "std" and np.any(values < 0)):
                problems.append(Problem(str(root / name), f"{name} holds invalid values"))
    # results/{subject}/trials.tsv, beside the subject's roi/ folder (or a part's roi/x.parts/)
    trials_tsv = next(
        (p / "trials.tsv" for p in root.parents[:3] if (p / "trials.tsv").is_file()), None
    )
    splits = _stats_splits(attrs)
    if problems or not {"mean", "std"} <= set(names) or trials_tsv is None or splits is None:
        return problems + check_decodes(betas, root, "trial")
    numbers = list(sessions) if sessions is not None else [int(attrs["session"])]
    try:
        use = np.concatenate([np.isin(read_split(trials_tsv, s), splits) for s in numbers])
    except InputError as err:  # trials.tsv of another run: the rows can still be decoded
        return [Problem(err.path, err.problem), *check_decodes(betas, root, "trial")]
    return check_roi_stats(group, root, numbers, use)


def _stats_splits(attrs: dict) -> tuple[str, ...] | None:
    """The splits the statistics were computed over (a part's are always the default)."""
    if "session" in attrs and "stats" not in attrs:
        return ("train",)
    found = re.search(r"split in (\[.*\])", str(attrs.get("stats", "")))
    return tuple(ast.literal_eval(found[1])) if found else None


def check_roi_stats(
    group: zarr.Group, root: Path, sessions: list[int], use: np.ndarray
) -> list[Problem]:
    """Decode every row of an ROI store and recompute its per-session statistics from them,
    over the rows where ``use`` is true."""
    betas = group["betas"]
    total = np.zeros((len(sessions), betas.shape[1]))
    squares = np.zeros_like(total)
    problems, unread = [], set()
    for t0, t1 in row_blocks(betas):
        block, unreadable = read_rows(betas, root, t0, t1, "trial")
        problems += unreadable
        if block is None:
            unread |= set(range(t0 // TRIALS_PER_SESSION, (t1 - 1) // TRIALS_PER_SESSION + 1))
            continue
        of_session = np.arange(t0, t1) // TRIALS_PER_SESSION
        for i in np.unique(of_session).tolist():
            rows = block[(of_session == i) & use[t0:t1]].astype(np.float64)
            total[i] += rows.sum(axis=0)
            squares[i] += np.square(rows).sum(axis=0)
    n = np.maximum(use.reshape(len(sessions), -1).sum(axis=1), 1)[:, None]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
    for name, got in (("mean", mean), ("std", std)):
        stored = group[name][...]
        for i in range(len(sessions)):
            wrong = np.flatnonzero(~np.isclose(stored[i], got[i], rtol=1e-5, atol=1e-3))
            if len(wrong) and i not in unread:
                problems.append(
                    Problem(
                        str(root / name),
                        f"session {sessions[i]}: {name} of voxels {wrong[:8].tolist()} differs "
                        f"from what its stored rows give (trials {TRIALS_PER_SESSION * i}.."
                        f"{TRIALS_PER_SESSION * (i + 1) - 1})",
                    )
                )
    return problems


def check_store(path: str | os.PathLike[str]) -> list[Problem]:
    """Every problem of the store at ``path``; an empty list when all is well."""
    root = Path(path)
    try:
        meta = read_json(root / "zarr.json")
        if meta.get("node_type") == "array":
            return check_decodes(zarr.open_array(root, mode="r"), root)
        group = zarr.open_group(root, mode="r")
        arrays = {
            name: node
            for name, node in group.members(max_depth=None)
            if isinstance(node, zarr.Array)
        }
    except InputError as err:
        return [Problem(err.path, err.problem)]
    except Exception as exc:  # metadata zarr-python refuses
        return [Problem(str(root), f"cannot be opened ({type(exc).__name__}: {exc})")]
    names = sorted(arrays)
    problems: list[Problem] = []
    covered: set[str] = set()
    kinds = []
    if {"betas", "plane_checksums"} <= arrays.keys():
        kinds.append((check_session, (group, root), {"betas", "plane_checksums"}))
    if {"lh", "rh", "checksums"} <= arrays.keys():  # a surface session store
        for column, hemi in enumerate(("lh", "rh")):
            kinds.append((check_session, (group, root, hemi, column), {hemi, "checksums"}))
    if {"images", "checksums"} <= arrays.keys():
        kinds.append((check_images, (group, root, names), {"images", "checksums"}))
    if {"betas", "voxels"} <= arrays.keys() and arrays["betas"].ndim == 2:
        kinds.append((check_roi, (group, root, names), {"betas"}))
    for check, args, checked in kinds:
        try:
            problems += check(*args)
        except Exception as exc:  # e.g. an unreadable checksum array: name the check that failed
            problems.append(Problem(str(root), f"{check.__name__} failed ({_error(exc)})"))
        covered |= checked
    for name in names:
        if name not in covered:
            problems += check_decodes(arrays[name], root, "trial" if name == "betas" else "row")
    return problems
