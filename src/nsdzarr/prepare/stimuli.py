"""Convert the NSD stimulus brick (``imgBrick``, ``(N, H, W, 3)`` uint8) into a Zarr v3 store.

Rows are read in blocks aligned to the dataset's own chunking along the image axis and sized by
a memory budget (straight into the shard buffer when every row of a block is wanted), the
next rows' bytes handed to the kernel's read-ahead (``posix_fadvise``) before each read; whole
shards are checksummed and written on a small thread pool (raw ones by hand, ``raw_shards``;
compressed ones by zarr-python), and each is read back (``verify.ReadBack``) and compared with
its rows' checksums.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import resource
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import PIL
import zarr
from PIL import Image

from nsdzarr import __version__
from nsdzarr.errors import InputError, VerificationError
from nsdzarr.prepare.atomic import atomic_output, remove_stale_temporaries
from nsdzarr.prepare.convert import ShardIO, source_attrs, store_stats
from nsdzarr.prepare.hdf5_open import open_hdf5
from nsdzarr.prepare.memory import (
    DEFAULT_STIMULI_BUDGET_BYTES,
    STIMULI_SHARDS_IN_FLIGHT,
    limit_malloc_arenas,
    reuse_freed_buffers,
    stimuli_block_rows,
    stimuli_peak,
)
from nsdzarr.prepare.raw_shards import RawShardIO, shard_io
from nsdzarr.prepare.storage import (
    STIMULI_STORAGE,
    StimuliStorage,
    create_image_array,
)
from nsdzarr.prepare.verify import ReadBack, default_reader, file_state, row_checksums

log = logging.getLogger(__name__)

DATASET = "imgBrick"
LAYOUT = "(image, y, x, channel) exactly as imgBrick rows"
CHECKSUM = "crc32c of each source image's bytes (C order)"
RESIZE_FILTER = "LANCZOS"
# Gaps of unwanted rows up to this size are read through rather than skipped (contiguous only:
# a chunked file would decompress the skipped chunks for nothing).
GAP_BYTES = 4 << 20


# --------------------------------------------------------------------------- input


@contextmanager
def open_stimuli(path: str | os.PathLike[str]) -> Iterator[h5py.Dataset]:
    """Yield the checked ``imgBrick`` dataset of ``path``; InputError (one line) if unusable."""
    path = Path(path)
    # no chunk cache: every read takes whole chunks once (plan_reads), which HDF5 then reads
    # straight into the caller's buffer instead of through the cache (0.53 vs 0.88 CPU s / 2 GB)
    f = open_hdf5(path, rdcc_nbytes=0)
    try:
        try:
            obj = f.get(DATASET)
        except (OSError, KeyError) as e:
            raise InputError(
                path, f"cannot read {DATASET!r} (truncated or corrupt?): {e}"
            ) from None
        if not isinstance(obj, h5py.Dataset):
            names = ", ".join(sorted(f.keys())[:20]) or "nothing"
            raise InputError(path, f"no dataset named {DATASET!r} (top level has: {names})")
        if obj.ndim != 4 or obj.shape[3] != 3:
            raise InputError(
                path, f"dataset {DATASET!r} has shape {obj.shape}, expected (N, H, W, 3) RGB"
            )
        if obj.dtype != np.uint8:
            raise InputError(path, f"dataset {DATASET!r} has dtype {obj.dtype}, expected uint8")
        yield obj
    finally:
        f.close()


def stimuli_metadata(source: str | os.PathLike[str]) -> dict[str, Any]:
    """Shape, dtype, chunking, compression and file size of the stimulus brick."""
    with open_stimuli(source) as dset:
        return {
            "path": str(Path(source)),
            "dataset": DATASET,
            "shape": list(dset.shape),
            "dtype": dset.dtype.str,
            "chunks": list(dset.chunks) if dset.chunks else None,
            "compression": dset.compression,
            "file_bytes": Path(source).stat().st_size,
        }


def ids_from_trials(tsv_paths: Iterable[str | os.PathLike[str]]) -> np.ndarray:
    """Sorted unique ``nsd_id`` (int64) over the ``trials.tsv`` files."""
    ids: list[int] = []
    for p in tsv_paths:
        path = Path(p)
        if not path.is_file():
            raise InputError(path, "trials table not found")
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            if "nsd_id" not in (reader.fieldnames or []):
                raise InputError(path, "no 'nsd_id' column (expected a trials.tsv)")
            for line, row in enumerate(reader, start=2):
                try:
                    ids.append(int(row["nsd_id"]))
                except (TypeError, ValueError):
                    raise InputError(
                        path, f"line {line}: nsd_id {row['nsd_id']!r} is not an integer"
                    ) from None
    return np.unique(np.asarray(ids, dtype=np.int64))


def select_ids(
    path: str | os.PathLike[str], nsd_ids: Sequence[int] | np.ndarray | None, n_rows: int
) -> np.ndarray:
    """The sorted unique ids to convert (all rows for None); InputError if any is not a row."""
    if n_rows == 0:
        raise InputError(path, f"dataset {DATASET!r} holds no images")
    if nsd_ids is None:
        return np.arange(n_rows, dtype=np.int64)
    ids = np.unique(np.asarray(nsd_ids, dtype=np.int64))
    if ids.size == 0:
        raise InputError(path, "no nsd_id asked for")
    if ids[0] < 0:
        raise InputError(path, f"nsd_id {int(ids[0])} is negative")
    if ids[-1] >= n_rows:
        raise InputError(
            path,
            f"{DATASET!r} has {n_rows} images (nsd_id 0..{n_rows - 1}), "
            f"but nsd_id {int(ids[-1])} was asked for",
        )
    return ids


# --------------------------------------------------------------------------- reading


def plan_reads(
    ids: np.ndarray, n_rows: int, chunk_rows: int, max_rows: int, gap_rows: int = 0
) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` to read, ascending: whole chunk-row blocks holding ``ids``,
    runs of them merged across gaps up to ``gap_rows`` and cut at ``max_rows``."""
    units = np.unique(ids // chunk_rows)
    gap_units = gap_rows // chunk_rows
    max_units = max(1, max_rows // chunk_rows)
    reads: list[tuple[int, int]] = []
    start = prev = int(units[0]) if units.size else 0
    for u in units[1:].tolist():
        if u - prev - 1 > gap_units or u - start >= max_units:
            reads.append((start, prev + 1))
            start = u
        prev = u
    if units.size:
        reads.append((start, prev + 1))
    return [(a * chunk_rows, min(b * chunk_rows, n_rows)) for a, b in reads]


def _read_rows(dset: h5py.Dataset, r0: int, r1: int, buf: np.ndarray) -> np.ndarray:
    out = buf[: r1 - r0]
    try:
        dset.read_direct(out, np.s_[r0:r1], np.s_[0 : r1 - r0])
    except OSError as e:  # a damaged or truncated file fails only when its data is read
        raise InputError(
            dset.file.filename, f"cannot read images {r0}..{r1 - 1} (truncated or corrupt?): {e}"
        ) from None
    return out


def source_byte_range(dset: h5py.Dataset, r0: int, r1: int) -> tuple[int, int] | None:
    """File bytes ``[start, stop)`` holding rows ``[r0, r1)``: the contiguous layout's, or its
    first to last chunk's when they lie in order, about as many bytes as the rows; else None."""
    row = dset.dtype.itemsize * int(np.prod(dset.shape[1:]))
    try:
        if dset.chunks is None:
            off = dset.id.get_offset()
            return None if off is None else (off + r0 * row, off + r1 * row)
        c = dset.chunks
        first = dset.id.get_chunk_info_by_coord((r0 - r0 % c[0],) + (0,) * (dset.ndim - 1))
        end = [(d - 1) // k * k for d, k in zip(dset.shape, c, strict=True)]
        last = dset.id.get_chunk_info_by_coord((r1 - 1 - (r1 - 1) % c[0], *end[1:]))
        start, stop = first.byte_offset, last.byte_offset + last.size
    except Exception:  # unallocated chunks, an old HDF5: a read-ahead hint only
        return None
    if start is None or not 0 < stop - start <= 2 * (r1 - r0 + c[0]) * row:
        return None
    return start, stop


def _prefetch(fd: int, dset: h5py.Dataset, rows: tuple[int, int] | None) -> None:
    """Ask the kernel to start reading ``rows`` of the source from disk now (the page cache,
    not this process, holds them), so that the read after this one does not wait on the disk."""
    span = rows and source_byte_range(dset, *rows)
    if span:
        os.posix_fadvise(fd, span[0], span[1] - span[0], os.POSIX_FADV_WILLNEED)


def _rows_after(reads: list[tuple[int, int]], i: int, b: int, count: int) -> tuple[int, int] | None:
    """The next ``count`` rows the plan reads after row ``b`` of its read ``i``."""
    if b < reads[i][1]:
        return b, min(reads[i][1], b + count)
    if i + 1 < len(reads):
        r0, r1 = reads[i + 1]
        return r0, min(r1, r0 + count)
    return None


# --------------------------------------------------------------------------- writing


def image_checksums(block: np.ndarray) -> np.ndarray:
    """CRC32C of each image's bytes (C order) of an ``(n, H, W, 3)`` block."""
    return row_checksums(block)


def resize_images(block: np.ndarray, size: int) -> np.ndarray:
    """Each image resized to ``size`` x ``size`` with Pillow's antialiased LANCZOS (no crop)."""
    out = np.empty((len(block), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(block):
        out[i] = np.asarray(
            Image.fromarray(img, mode="RGB").resize((size, size), Image.Resampling.LANCZOS)
        )
    return out


class _Checked:
    """One shard of every array, written and read back: checksums of its source rows, the
    first difference found (array, row in the shard, why), and its files' states."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.bad: tuple[str, int, str] | None = None
        self.files: dict[str, tuple[int, int, int]] = {}
        self.seconds = 0.0  # reading back and comparing


def _first_unreadable(back: Any, start: int, n: int) -> int:
    """Offset in the shard of the first image that does not read back (0 if each one does)."""
    for j in range(n):
        try:
            back.rows(start + j, start + j + 1)
        except Exception:  # the damaged chunk (or the index: then the first image)
            return j
    return 0


def _write_shard(
    ios: dict[str, ShardIO],
    backs: dict[str, ReadBack],
    sizes: Sequence[int],
    start: int,
    block: np.ndarray,
) -> _Checked:
    """Write one shard's rows to ``images`` and each resized array, then read each shard back
    through the independent reader and compare it with the rows written."""
    done = _Checked()
    blocks = {"images": block}
    for s in sizes:
        blocks[f"images_{s}"] = resize_images(block, s)
    for name, rows in blocks.items():
        done.sums[name] = image_checksums(rows)
        ios[name].write(start, rows, done.sums[name])
    t0 = time.perf_counter()
    for name, rows in blocks.items():
        path = ios[name].shard_file(start)
        done.files[path] = file_state(path)  # before the read: any later write changes it
        try:  # each image's crc32c against its source row's: from the page cache if it can
            sums = backs[name].checksums(start, start + len(rows))
            if sums is None:
                got = backs[name].rows(start, start + len(rows))
                sums = image_checksums(got) if got.shape == rows.shape else None
        except Exception as err:  # any codec or index error means the bytes on disk are bad
            row = _first_unreadable(backs[name], start, len(rows))
            done.bad = (name, row, f"unreadable ({type(err).__name__}: {err})")
            return done
        if sums is None or not np.array_equal(sums, done.sums[name]):
            got = backs[name].rows(start, start + len(rows))
            diff = [j for j in range(len(rows)) if not np.array_equal(got[j], rows[j])]
            done.bad = (name, diff[0] if diff else 0, "differs from its source")
            return done
    done.seconds = time.perf_counter() - t0
    return done


def convert_stimuli(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    nsd_ids: Sequence[int] | np.ndarray | None = None,
    sizes: Sequence[int] = (),
    settings: StimuliStorage | None = None,
    budget_bytes: int | None = None,
    threads: int = 2,
    reader: str | None = None,
    writer: str | None = None,
) -> dict[str, Any]:
    """Write the images ``nsd_ids`` (all rows if None) of ``source`` and their ``sizes`` x
    ``sizes`` resized copies into the Zarr group ``target``, verified, atomically.

    Each shard is read back through ``reader`` (``verify.READERS``; None: the loader's own
    for raw shards written by hand, else tensorstore when installed, else zarr-python) once
    written and compared with its source rows; at the end
    every shard file must be as it was when checked. Shards are written by ``writer``
    (``raw_shards.WRITERS``; None: by hand when the codec allows, else zarr-python)."""
    t_start = time.perf_counter()
    source, target = Path(source), Path(target)
    settings = settings or STIMULI_STORAGE
    budget = budget_bytes or DEFAULT_STIMULI_BUDGET_BYTES
    sizes = sorted({int(s) for s in sizes})
    if any(s < 1 for s in sizes):
        raise InputError(source, f"resize sizes must be positive, got {sizes}")
    remove_stale_temporaries(target)
    limit_malloc_arenas()  # else freed shard buffers stay in each thread's malloc arena
    reuse_freed_buffers()  # else each image's buffers are fresh zeroed pages
    with open_stimuli(source) as dset:
        n_rows, h, w, c = dset.shape
        ids = select_ids(source, nsd_ids, n_rows)
        n = len(ids)
        row_bytes = h * w * c
        chunk_rows = dset.chunks[0] if dset.chunks else 1
        chunked = dset.chunks is not None
        max_rows = stimuli_block_rows(row_bytes, chunk_rows, budget)
        gap = 0 if dset.chunks else GAP_BYTES // row_bytes
        reads = plan_reads(ids, n_rows, chunk_rows, max_rows, gap)
        # rows go straight into the shard buffer when a read wants every row of its block and
        # rows are whole chunks; otherwise through this read buffer (made on first use)
        direct = chunk_rows == 1
        buf: np.ndarray | None = None
        rows: np.ndarray | None = None
        shard_rows = min(settings.images_per_shard, n)
        log.info("converting %d of %d images %dx%d from %s", n, n_rows, h, w, source)
        with (
            open(source, "rb", buffering=0) as hints,  # read-ahead hints only: h5py reads
            atomic_output(target) as tmp,
            zarr.config.set({"threading.max_workers": threads}),
            ThreadPoolExecutor(max(1, threads)) as pool,
            ExitStack() as stack,
        ):
            fd = hints.fileno()
            group = zarr.open_group(tmp, mode="w", zarr_format=3)
            arrays = {"images": create_image_array(group, "images", (n, h, w, c), settings)}
            for s in sizes:
                arrays[f"images_{s}"] = create_image_array(
                    group, f"images_{s}", (n, s, s, c), settings
                )
            ios = {name: shard_io(arr, Path(tmp), writer) for name, arr in arrays.items()}
            raw = all(isinstance(io, RawShardIO) for io in ios.values())
            verified_by = reader or ("nsdzarr" if raw else default_reader())
            backs = {name: ReadBack(Path(tmp) / name, verified_by) for name in arrays}
            stack.callback(lambda: [back.close() for back in backs.values()])
            sums = {name: np.zeros(n, np.uint32) for name in arrays}
            files: dict[str, tuple[int, int, int]] = {}
            pending: deque[tuple[int, Future[_Checked], np.ndarray]] = deque()
            spare: list[np.ndarray] = []  # shard buffers written and checked: reused
            verify_s = 0.0

            def collect(limit: int) -> None:
                nonlocal verify_s
                while len(pending) > limit:
                    start, fut, used = pending.popleft()
                    done = fut.result()
                    spare.append(used)
                    if done.bad is not None:
                        name, row, why = done.bad
                        raise VerificationError(
                            target,
                            f"array {name!r} {why} at nsd_id {int(ids[start + row])} "
                            f"(row {start + row}), read back by {verified_by}",
                        )
                    for name, got in done.sums.items():
                        sums[name][start : start + len(got)] = got
                    files.update(done.files)
                    verify_s += done.seconds

            shard = np.empty((shard_rows, h, w, c), np.uint8)
            filled = written = 0
            read_s = 0.0
            for i, (r0, r1) in enumerate(reads):
                lo, hi = np.searchsorted(ids, [r0, r1])
                wanted = ids[lo:hi] - r0
                whole = direct and len(wanted) == r1 - r0
                if not whole:
                    if buf is None:
                        most = max(b - a for a, b in reads)
                        buf = np.empty((min(max_rows, most), h, w, c), np.uint8)
                    t0 = time.perf_counter()
                    _prefetch(fd, dset, _rows_after(reads, i, r1, r1 - r0))
                    rows = _read_rows(dset, r0, r1, buf)
                    read_s += time.perf_counter() - t0
                pos = 0
                while pos < len(wanted):
                    take = min(len(wanted) - pos, shard_rows - filled)
                    sel = wanted[pos : pos + take]
                    if whole:
                        t0 = time.perf_counter()
                        a = r0 + pos
                        _prefetch(fd, dset, _rows_after(reads, i, a + take, shard_rows))
                        _read_rows(dset, a, a + take, shard[filled:])
                        read_s += time.perf_counter() - t0
                    elif take and sel[-1] - sel[0] == take - 1:  # a run: one slice copy
                        shard[filled : filled + take] = rows[sel[0] : sel[0] + take]
                    else:
                        shard[filled : filled + take] = rows[sel]
                    filled += take
                    pos += take
                    if filled == shard_rows or written + filled == n:
                        block = shard[:filled]
                        fut = pool.submit(_write_shard, ios, backs, sizes, written, block)
                        pending.append((written, fut, shard))
                        written += filled
                        filled = 0
                        collect(STIMULI_SHARDS_IN_FLIGHT)
                        shard = spare.pop() if spare else np.empty_like(shard)
            del buf, rows, shard
            collect(0)
            spare.clear()
            for path, state in files.items():  # each shard was checked once written
                if file_state(path) != state:
                    raise VerificationError(target, f"{path} was written again after its check")
            group.create_array(
                "nsd_id", data=ids, compressors=None, dimension_names=("image",), chunks=(n,)
            )
            group.create_array(
                "checksums",
                data=sums["images"],
                compressors=None,
                dimension_names=("image",),
                chunks=(n,),
            )
            group.attrs.update(
                {
                    "nsdzarr_version": __version__,
                    "source": source_attrs(source),
                    "source_dataset": DATASET,
                    "source_shape": [n_rows, h, w, c],
                    "n_images": n,
                    "subset": "all" if nsd_ids is None else "ids",
                    "layout": LAYOUT,
                    "resize": {
                        "library": f"Pillow {PIL.__version__}",
                        "filter": RESIZE_FILTER,
                        "sizes": sizes,
                    },
                    "checksum": CHECKSUM,
                    "storage": asdict(settings),
                }
            )
    size, files = store_stats(target)
    report = {
        "source": str(source),
        "target": str(target),
        "n_images": n,
        "source_shape": [n_rows, h, w, c],
        "sizes": sizes,
        "raw_bytes": n * row_bytes,
        "bytes": size,
        "files": files,
        "reads": len(reads),
        "verify_seconds": round(verify_s, 3),  # summed over the writing threads
        "read_seconds": round(read_s, 3),
        "verified_by": verified_by,
        "writer": "raw" if isinstance(ios["images"], RawShardIO) else "zarr-python",
        "seconds": round(time.perf_counter() - t_start, 3),
        "predicted_peak_bytes": stimuli_peak(
            (n_rows, h, w, c),
            n,
            settings.images_per_shard,
            sizes,
            budget,
            chunk_rows,
            settings.codec,
            chunked,
        ),
        # the process's lifetime peak (Linux reports KiB): an upper bound of this call's
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    log.info("wrote %s", report)
    return report


def build_image_store(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    estimate: str | os.PathLike[str],
    trials: Sequence[str | os.PathLike[str]] | None = None,
    sizes: Sequence[int] = (),
    settings: StimuliStorage | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    """The workflow's image store: the images of ``trials`` (every row if None), read in the
    blocks its ``estimate`` JSON sized for the job's memory."""
    job = json.loads(Path(estimate).read_text())["jobs"]["stimuli"]
    ids = None if trials is None else ids_from_trials(trials)
    return convert_stimuli(
        source, target, ids, sizes, settings, budget_bytes=job["budget_bytes"], threads=threads
    )
