"""The memory model: predicted peak RSS of each job, and the conversion strategy for a budget.

Terms are fitted to measured peak RSS (``benchmarks/calibrate_memory.py``); keep them here only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

MB = 1024**2

# Interpreter, libraries, zarr's event loop and threads: the smallest baseline under which
# benchmarks/calibrate_memory.py finds no job under-predicted (111 MB), plus a margin.
BASELINE_BYTES = 120 * MB
# Snakemake's own processes inside a SLURM allocation, beside the job's script: the batch
# step's snakemake and the job step's (~135 MB VmHWM each), srun (8 MB), shells and the two
# slurmstepd (12 MB, charged to the job's cgroup): 296-304 MB summed VmHWM at 1.8 mm real size
# (benchmarks/slurm_real_size.py's cgroup watcher, 2026-12-01); sums of RSS count shared pages
# once per process, so this is on the safe side.
SNAKEMAKE_JOB_BYTES = 300 * MB
# The estimate rule's mem_mb callable (resources.estimate_job_mem_mb) imports h5py and opens
# the source in each Snakemake process, both of the job's included: +12.5 MB each (VmHWM, as
# above), rounded up.
SNAKEMAKE_HDF5_BYTES = 2 * 16 * MB
# Chunk-index arrays per HDF5 chunk (offset, size, z, y, x, filter mask) and their parsing.
INDEX_BYTES_PER_CHUNK = 40
# The HDF5 reader's block buffer and transpose scratch (hdf5_read.SessionReader's default);
# also the most `nsdzarr verify` reads at once (check.py).
READ_BUFFER_BYTES = 64 * MB
# Planes the estimate job samples for its compression ratio (read one at a time).
SAMPLE_PLANES = 4
# Encoding one shard holds its raw block, the encoded inner chunks and the assembled shard.
SHARD_WORK_FACTOR = 2.5
# Slabs (benchmarks/calibrate_memory.py, 1 mm and 1.8 mm sessions, 2026-12-01): building the
# chunk index peaks at ~115 bytes a chunk (519 MB for 4.0M chunks) before it shrinks to the
# kept arrays; zarr-python's scratch-store I/O (its thread pool's buffers and allocator arenas)
# adds a constant; while shards are rewritten from the scratch store, each shard is held
# decoded and encoded, beside about one slab's worth of freed-but-kept pages.
INDEX_BUILD_BYTES_PER_CHUNK = 120
SLAB_OVERHEAD_BYTES = 130 * MB
SHARD_REWRITE_FACTOR = 1.5
# Reading slabs holds each slab as read and again while its chunks are encoded into the scratch
# store (2x), plus a margin: 2 fits 1 mm's 41 and 43 planes to within 2% (3,410 and 3,594 MB
# measured), too close for run-to-run noise. zarr's overhead (SLAB_OVERHEAD_BYTES) does not show
# in this phase (benchmarks/memory_phases.py, 2026-12-01: 214 / 346 / 612 MB at 1.8 mm for
# 2 / 7 / 20 planes, at most 430 MB at 1 mm for 3 planes).
SLAB_READ_FACTOR = 2.1
# The independent read-back (verify.ReadBack): the reader's library and thread arenas
# (tensorstore; zarr-python's is less), besides one read-back copy per in-flight shard.
# 32 MB fell 6 MB short on a 378 MB brick with tensorstore and crc32c installed (CI, 2026-12-01).
# Raw image shards are read back by the loader's reader, which loads no library.
VERIFY_READER_BYTES = 48 * MB
# The independent read-back after writing (convert.verify_store: verify.read_blocks through
# tensorstore, else zarr-python): each block of rows (one shard) is checksummed while the next
# is read ahead, so READ_BACK_SHARDS shards are held at once, each decoded beside its encoded
# file bytes and the decoder's chunk buffers (SESSION_READ_BACK_FACTOR per decoded byte); the
# reader's library and thread arenas grow with the shards in flight up to VERIFY_READER_BYTES
# (above; fitted on the stimulus job). Measured 2026-12-01 (benchmarks/README.md), VmHWM reset
# just before the read-back: it raised the RSS it started from by 25 MB for 0.7 MB shards
# (demo), 119 / 212 / 422 MB for 13 / 67 / 200 MB shards (1.8 mm), 258 / 929 MB for 76 / 380 MB
# shards (1 mm): the reader plus 1.9-2.8x a shard at 67 MB and up; the smaller shards' excess
# lies within the terms it starts from (kept pages, the baseline's margin).
READ_BACK_SHARDS = 2
SESSION_READ_BACK_FACTOR = 1.25
# tensorstore's import (measured 17 MB), the reader's floor for tiny shards.
READ_BACK_LIBRARY_BYTES = 16 * MB
# Rows converted to float64 at once for the ROI statistics.
STATS_ROWS = 64


@dataclass(frozen=True)
class ConversionPlan:
    """How one session is converted and what that costs at peak."""

    strategy: str  # "in-memory" | "slabs"; surfaces: "stream" | "whole-hemisphere" | "scratch"
    planes_per_slab: int
    peak_bytes: int


def _common_bytes(shape: tuple[int, ...], itemsize: int, trials_per_shard: int) -> int:
    n_trials = shape[0]
    voxels = math.prod(shape[1:])
    shard = min(trials_per_shard, n_trials) * voxels * itemsize
    return (
        BASELINE_BYTES
        + voxels * INDEX_BYTES_PER_CHUNK
        + int(SHARD_WORK_FACTOR * shard)
        + min(READ_BUFFER_BYTES, math.prod(shape) * itemsize)  # pages touched, not reserved
    )


def read_back_bytes(shard_bytes: int) -> int:
    """What the lossless read-back of a session store adds to the RSS it starts from, for
    shards of ``shard_bytes`` decoded bytes (``convert.verify_store``)."""
    reader = min(VERIFY_READER_BYTES, READ_BACK_LIBRARY_BYTES + READ_BACK_SHARDS * shard_bytes)
    return reader + int(READ_BACK_SHARDS * SESSION_READ_BACK_FACTOR * shard_bytes)


def indexed_bytes(shape: tuple[int, ...]) -> int:
    """The interpreter with a session's HDF5 chunk index loaded (every session job has both)."""
    return BASELINE_BYTES + math.prod(shape[1:]) * INDEX_BYTES_PER_CHUNK


def in_memory_peak(shape: tuple[int, ...], itemsize: int, trials_per_shard: int) -> int:
    """Peak RSS of reading the whole session, then writing it shard by shard, then reading the
    store back (after the session's array is freed)."""
    shard = min(trials_per_shard, shape[0]) * math.prod(shape[1:]) * itemsize
    # beside about a written shard's worth of kept pages (measured at 1.8 mm: 29 / 63 / 132 MB
    # left after writing 13 / 67 / 200 MB shards); below the whole session's phase but at the
    # smallest sessions
    verifying = indexed_bytes(shape) + shard + read_back_bytes(shard)
    whole = math.prod(shape) * itemsize + _common_bytes(shape, itemsize, trials_per_shard)
    return max(whole, verifying)


def slab_peak(
    shape: tuple[int, ...], itemsize: int, trials_per_shard: int, planes_per_slab: int
) -> int:
    """Peak RSS of the rechunk through a scratch store, ``planes_per_slab`` z-planes at a time:
    the largest of building the chunk index, reading slabs, rewriting shards, and reading the
    finished store back."""
    voxels = math.prod(shape[1:])
    plane = shape[0] * math.prod(shape[2:]) * itemsize
    slab = planes_per_slab * plane
    shard = min(trials_per_shard, shape[0]) * voxels * itemsize
    index = indexed_bytes(shape)
    kept = index + SLAB_OVERHEAD_BYTES
    building_index = BASELINE_BYTES + voxels * INDEX_BUILD_BYTES_PER_CHUNK
    reading = index + min(READ_BUFFER_BYTES, slab) + int(SLAB_READ_FACTOR * slab)
    rewriting = kept + int(SHARD_REWRITE_FACTOR * shard) + slab
    # beside the pages the slab reads left (as in `reading`)
    verifying = kept + min(READ_BUFFER_BYTES, slab) + read_back_bytes(shard)
    return max(building_index, reading, rewriting, verifying)


def plan_conversion(
    shape: tuple[int, ...], itemsize: int, trials_per_shard: int, budget_bytes: int | None
) -> ConversionPlan:
    """In memory when it fits the budget (or no budget), else the largest slabs that fit (one
    plane at a time if none fits: the estimate then refuses the ceiling)."""
    whole = in_memory_peak(shape, itemsize, trials_per_shard)
    n_planes = shape[1]
    if budget_bytes is None or whole <= budget_bytes:
        return ConversionPlan("in-memory", n_planes, whole)
    planes = 1
    while planes < n_planes and slab_peak(shape, itemsize, trials_per_shard, planes + 1) <= (
        budget_bytes
    ):
        planes += 1
    return ConversionPlan("slabs", planes, slab_peak(shape, itemsize, trials_per_shard, planes))


def request_mb(peak_bytes: int, factor: float = 1.0) -> int:
    """SLURM ``mem_mb`` for a script's peak: plus Snakemake's own processes, times ``factor``."""
    return math.ceil((peak_bytes + SNAKEMAKE_JOB_BYTES) / MB * factor)


def estimate_request_mb(peak_bytes: int, factor: float = 1.0) -> int:
    """SLURM ``mem_mb`` of the estimate job for its script's peak: h5py in its snakemakes too."""
    return request_mb(peak_bytes + SNAKEMAKE_HDF5_BYTES, factor)


def budget_bytes(mem_mb: int | None) -> int | None:
    """What a job's script may use of its ``mem_mb`` once Snakemake's own processes are paid."""
    return None if not mem_mb else mem_mb * MB - SNAKEMAKE_JOB_BYTES


def estimate_peak(shape: tuple[int, ...], itemsize: int) -> int:
    """Peak RSS of the estimate job: interpreter, chunk index, read buffer, sampled planes."""
    plane = shape[0] * math.prod(shape[2:]) * itemsize
    return (
        indexed_bytes(shape)
        + min(READ_BUFFER_BYTES, plane)  # the planes are read one at a time
        + (SAMPLE_PLANES + 1) * plane
    )


# Copies of an ROI's (trials, voxels) rows alive at once (roi_session_peak); fitted with
# limit_malloc_arenas at 1.8 mm real size, 100-200,000 voxels: model / VmHWM 1.04-1.30 from the
# HDF5, 1.06-1.53 from the store (benchmarks/README.md, 2026-12-01).
ROI_ROW_COPIES = 2


def roi_session_peak(
    shape: tuple[int, ...],
    itemsize: int,
    n_roi_voxels: int,
    trials_per_shard: int,
    uses_chunk_index: bool = True,
    store_trials_per_shard: int | None = None,
) -> int:
    """Peak RSS of extracting one session's ROI voxels and their statistics into a part store
    of ``trials_per_shard``-trial shards (``roi_storage.trials_per_shard``).

    From the HDF5, or with ``store_trials_per_shard`` (``storage.trials_per_shard``) from the
    converted session store, one shard file's bytes and one decoded trial chunk at a time.
    """
    n_trials = shape[0]
    voxels = math.prod(shape[1:])
    rows = n_trials * n_roi_voxels * itemsize
    if store_trials_per_shard is not None:
        # a shard's stored bytes (at most its raw size) and one decoded trial
        reading = (min(store_trials_per_shard, n_trials) + 1) * voxels * itemsize
    else:
        reading = (voxels * (INDEX_BYTES_PER_CHUNK + 8) if uses_chunk_index else 0) + min(
            READ_BUFFER_BYTES, rows
        )  # index + lookup, read buffer
    return (
        BASELINE_BYTES
        + reading
        + voxels * 10  # the atlas as loaded, as int64, and the boolean selection
        # two copies of the rows at a time: in file order and in column order while reading,
        # then the rows and their read-back while verifying (with one malloc arena: a third
        # copy counted before the arena limit was freed memory held by zarr's threads)
        + ROI_ROW_COPIES * rows
        + STATS_ROWS * n_roi_voxels * 8 * 2  # float64 blocks for the statistics
        + int(SHARD_WORK_FACTOR * min(trials_per_shard, n_trials) * n_roi_voxels * itemsize)
    )


# Vertex blocks read through h5py from HDF5 files with one chunk per vertex: HDF5 holds ~14 KB
# per chunk of a read's selection (measured: 575 MB for a 64 MB block of 42k (750, 1) chunks,
# 40 MB for 2 MB blocks; benchmarks/README.md), so blocks stay small.
SURFACE_HDF5_BLOCK_BYTES = 4 * MB
HDF5_SELECTION_BYTES_PER_CHUNK = 14 * 1024


def surface_vertex_block(
    n_trials: int, itemsize: int, chunk_vertices: int, block_bytes: int = SURFACE_HDF5_BLOCK_BYTES
) -> int:
    """Vertices per read of a file whose chunks span every trial (``chunk_vertices`` each):
    whole chunks, about ``block_bytes``."""
    return chunk_vertices * max(1, block_bytes // (n_trials * chunk_vertices * itemsize))


def surface_convert_peak(
    n_trials: int,
    vertices: tuple[int, ...] | list[int],
    itemsize: int,
    trials_per_shard: int,
    strategy: str,
    chunk_vertices: int = 1,
) -> int:
    """Peak RSS of converting a surface session one hemisphere at a time (surface_convert.py),
    the largest of writing its shards and reading the store back.

    ``stream`` (trial blocks): a shard as read (file order), transposed and encoded.
    ``whole-hemisphere`` (chunks span every trial): the hemisphere held, read in vertex blocks,
    then written by shards. ``scratch``: vertex blocks into a scratch store chunked
    ``(trials_per_shard, vertex block)``, then rewritten shard by shard, as :func:`slab_peak`.
    """
    largest = max(vertices)
    shard = min(trials_per_shard, n_trials) * largest * itemsize
    base = BASELINE_BYTES + n_trials * 8  # and the per-trial checksums
    if strategy == "stream":
        writing = base + int((2 + SHARD_WORK_FACTOR) * shard)
        return max(writing, base + shard + read_back_bytes(shard))
    step = min(largest, surface_vertex_block(n_trials, itemsize, chunk_vertices))
    block = n_trials * step * itemsize
    # one vertex block as read and HDF5's selection of its chunks
    reading = block + -(-step // chunk_vertices) * HDF5_SELECTION_BYTES_PER_CHUNK
    if strategy == "whole-hemisphere":
        writing = base + n_trials * largest * itemsize + reading
        writing += int((2 + SHARD_WORK_FACTOR) * shard)
        # after the hemisphere is freed: about a written shard's worth of kept pages
        return max(writing, base + shard + read_back_bytes(shard))
    if strategy != "scratch":
        raise ValueError(f"unknown surface strategy {strategy!r}")
    # measured at subj01's size (750 x 227,021 int16, (750, 1) chunks, 22.7 MB shards;
    # benchmarks/README.md): filling 123 MB, rewriting 200 / 266 MB (lh / rh: the second
    # hemisphere starts from the first's kept pages, as SLAB_OVERHEAD_BYTES counts for slabs),
    # reading back 219 / 226 MB
    filling = base + reading + int(SLAB_READ_FACTOR * block)
    rewriting = base + SLAB_OVERHEAD_BYTES + int(SHARD_REWRITE_FACTOR * shard) + block
    verifying = base + block + shard + read_back_bytes(shard)
    return max(filling, rewriting, verifying)


def plan_surface_conversion(
    n_trials: int,
    vertices: tuple[int, ...] | list[int],
    itemsize: int,
    trials_per_shard: int,
    whole_hemisphere: bool,
    budget_bytes: int | None,
    chunk_vertices: int = 1,
    force: str | None = None,
) -> ConversionPlan:
    """``stream`` for trial-chunked files; for chunks spanning every trial the whole hemisphere
    in memory when it fits the budget (or no budget), else ``scratch`` (its peak is then above
    the budget only when the estimate refuses the ceiling), or ``force`` (one of these two).
    ``planes_per_slab`` is 0."""
    args = (n_trials, vertices, itemsize, trials_per_shard)
    if not whole_hemisphere:
        return ConversionPlan("stream", 0, surface_convert_peak(*args, "stream"))
    if force is not None:
        return ConversionPlan(force, 0, surface_convert_peak(*args, force, chunk_vertices))
    whole = surface_convert_peak(*args, "whole-hemisphere", chunk_vertices)
    if budget_bytes is None or whole <= budget_bytes:
        return ConversionPlan("whole-hemisphere", 0, whole)
    return ConversionPlan("scratch", 0, surface_convert_peak(*args, "scratch", chunk_vertices))


def surface_roi_peak(
    n_trials: int, vertices: tuple[int, ...] | list[int], itemsize: int, n_columns: int, block: int
) -> int:
    """Peak RSS of extracting a surface ROI's columns: one source block of ``block`` values as
    read and converted, the labels, and the rows as in :func:`roi_session_peak`."""
    rows = n_trials * n_columns * itemsize
    return (
        BASELINE_BYTES
        + 2 * block * itemsize
        + sum(vertices) * 10
        + ROI_ROW_COPIES * rows
        + STATS_ROWS * n_columns * 8 * 2
        + int(SHARD_WORK_FACTOR * rows)
    )


# Vertices of one hemisphere the surface estimate job reads (all trials) to sample compression.
SURFACE_SAMPLE_VERTICES = 16384


def surface_estimate_peak(n_trials: int, itemsize: int = 4) -> int:
    """Peak RSS of a surface estimate job: headers and one sampled block, as read and encoded."""
    return BASELINE_BYTES + 3 * n_trials * SURFACE_SAMPLE_VERTICES * itemsize


# glibc gives each new thread its own malloc arena (up to 8 per core), and shard-sized blocks
# freed there stay in it: converting 425 x 425 images in 50-image (26 MB) shards peaked at
# 574-679 MB against 349 predicted (MALLOC_ARENA_MAX=1: 348). One arena for the threads made
# after this (the writers, tensorstore's) keeps freed blocks for reuse in one place; a fixed
# mmap threshold instead (freed blocks unmapped) cost 30-60% more time here in page faults
# (benchmarks/README.md, 2026-12-01).
MALLOC_ARENAS = 1
_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


@functools.cache
def _libc_mallopt() -> Any:
    """glibc's ``mallopt``, loaded once per process (None without glibc)."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def _mallopt(param: int, value: int) -> bool:
    mallopt = _libc_mallopt()
    return mallopt is not None and mallopt(param, value) == 1


def limit_malloc_arenas() -> bool:
    """Have threads started from now on share MALLOC_ARENAS malloc arenas (glibc ``mallopt``),
    so that freed large buffers are reused instead of held per thread; False elsewhere."""
    return _mallopt(_M_ARENA_MAX, MALLOC_ARENAS)


# The stimulus job allocates and frees ~5 image- or shard-sized buffers per image (zarr-python's
# chunk copies, the assembled shard, tensorstore's read-back): served by mmap each one costs
# fresh zeroed pages, half the job's system time (4000 425 x 425 images: 5.1 -> 2.6 CPU s,
# benchmarks/README.md, 2026-12-01). Served from the (one) heap and kept there after free,
# they are reused; what the heap keeps is at most the peak it already had.
MMAP_THRESHOLD_BYTES = 32 * MB  # glibc's largest allowed (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD_BYTES = 1024 * MB
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def reuse_freed_buffers() -> bool:
    """Serve buffers up to MMAP_THRESHOLD_BYTES from the heap and keep freed heap memory up
    to TRIM_THRESHOLD_BYTES for reuse (glibc ``mallopt``); False elsewhere."""
    return _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and _mallopt(
        _M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES
    )


# Stimulus conversion (stimuli.py): rows are read in blocks of at most this many bytes (at
# least one chunk of the file), and this many shards are encoded at once beside the one filling.
DEFAULT_STIMULI_BUDGET_BYTES = 256 * MB
STIMULI_SHARDS_IN_FLIGHT = 2
# Bytes held per in-flight shard byte while it is encoded and written (the stimulus analogue of
# SHARD_WORK_FACTOR). "none": written by hand from the shard buffer (raw_shards), no copy; peak
# VmHWM over 800 425 x 425 images at 25/50/100/200 images per shard grew 3.6-3.9 bytes per shard
# byte (the 4 of the filling, queued and two mapped read-back shards), from 89 MB (2026-12-01,
# benchmarks/README.md; zarr-python's writer held 2.2 more). The others: fitted on 2,000 images
# (benchmarks/stimuli.py), zstd with our old writer, Blosc with zarr-python.
STIMULI_SHARD_WORK = {"none": 0.0, "zstd": 2.0, "blosc-lz4": 3.75, "blosc-zstd": 3.75}


def stimuli_block_rows(row_bytes: int, chunk_rows: int, budget_bytes: int | None) -> int:
    """Rows per read: a multiple of the file's chunk rows within the budget (one chunk at least)."""
    budget = budget_bytes or DEFAULT_STIMULI_BUDGET_BYTES
    return max(1, budget // (row_bytes * chunk_rows)) * chunk_rows


def _stimuli_read_block(
    shape: tuple[int, ...],
    n_images: int,
    budget_bytes: int | None,
    chunk_rows: int,
    chunked: bool = False,
) -> int:
    if chunked and chunk_rows == 1:  # rows read straight into the shard: no read buffer
        return 0
    row = math.prod(shape[1:])
    rows = stimuli_block_rows(row, chunk_rows, budget_bytes)
    return min(rows, shape[0], -(-n_images // chunk_rows) * chunk_rows) * row


def stimuli_peak(
    shape: tuple[int, ...],
    n_images: int,
    images_per_shard: int,
    sizes: tuple[int, ...] | list[int] = (),
    budget_bytes: int | None = None,
    chunk_rows: int = 1,
    codec: str = "none",
    chunked: bool = False,
) -> int:
    """Peak RSS of converting ``n_images`` rows of an ``(N, H, W, 3)`` uint8 brick whose
    dataset is ``chunked`` in blocks of ``chunk_rows`` rows (else contiguous)."""
    row = math.prod(shape[1:])
    shard = min(images_per_shard, n_images) * (row + sum(s * s * shape[-1] for s in sizes))
    return (
        BASELINE_BYTES
        + n_images * 16  # ids and checksums
        + _stimuli_read_block(shape, n_images, budget_bytes, chunk_rows, chunked)
        + 2 * shard  # the shard being filled and one queued
        + int(STIMULI_SHARD_WORK[codec] * STIMULI_SHARDS_IN_FLIGHT * shard)
        + (VERIFY_READER_BYTES if codec != "none" else 0)
        + STIMULI_SHARDS_IN_FLIGHT * shard  # each in-flight shard as read back
    )


def stimuli_read_budget(
    shape: tuple[int, ...],
    n_images: int,
    images_per_shard: int,
    sizes: tuple[int, ...] | list[int] = (),
    chunk_rows: int = 1,
    limit_bytes: int | None = None,
    codec: str = "none",
    chunked: bool = False,
) -> int:
    """The read budget of the stimulus job: the default, or less so that its predicted peak
    fits ``limit_bytes`` (never below one chunk-row block of the file)."""
    if limit_bytes is None:
        return DEFAULT_STIMULI_BUDGET_BYTES
    fixed = stimuli_peak(shape, n_images, images_per_shard, sizes, 1, chunk_rows, codec, chunked)
    fixed -= _stimuli_read_block(shape, n_images, 1, chunk_rows, chunked)
    one_chunk = chunk_rows * math.prod(shape[1:])
    return max(one_chunk, min(DEFAULT_STIMULI_BUDGET_BYTES, limit_bytes - fixed))
