"""Size, memory and runtime estimates of a session from HDF5 metadata and a compression sample."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from nsdzarr.errors import InputError
from nsdzarr.prepare.atomic import atomic_output
from nsdzarr.prepare.convert import store_stats
from nsdzarr.prepare.hdf5_open import betas_dataset
from nsdzarr.prepare.hdf5_read import SessionReader
from nsdzarr.prepare.labels import label_selection
from nsdzarr.prepare.layout import require_session_trials
from nsdzarr.prepare.memory import (
    SAMPLE_PLANES,
    SNAKEMAKE_JOB_BYTES,
    budget_bytes,
    estimate_peak,
    estimate_request_mb,
    in_memory_peak,
    plan_conversion,
    request_mb,
    roi_session_peak,
    stimuli_peak,
    stimuli_read_budget,
)
from nsdzarr.prepare.nifti import load_nifti
from nsdzarr.prepare.roi import is_session_store
from nsdzarr.prepare.runtime import MIN_RUNTIME_MIN, session_job_minutes, stimuli_job_minutes
from nsdzarr.prepare.stimuli import ids_from_trials, open_stimuli, select_ids, stimuli_metadata
from nsdzarr.prepare.storage import (
    ROI_STORAGE,
    STIMULI_STORAGE,
    StimuliStorage,
    StorageSettings,
    numcodecs_compressor,
    roi_settings,
    trial_blocks,
)
from nsdzarr.prepare.surface import is_surface_source
from nsdzarr.training.zarr_v3 import parse_layout

SAMPLE_TRIALS = 32
# Files a session store holds besides its shards: group and array metadata, the checksum array.
STORE_EXTRA_FILES = 4
# zarr.json sizes in a stimulus store: the group's (with attributes) or an image array's, and
# a 1-D array's (nsd_id, checksums), rounded up.
STIMULI_METADATA_BYTES = 1100
STIMULI_METADATA_1D_BYTES = 600
# Images sampled for the compression ratio of a compressed stimulus store.
STIMULI_SAMPLE_IMAGES = 16


def sample_compression_ratio(path: str | os.PathLike[str], settings: StorageSettings) -> float:
    """Raw/compressed ratio of the configured codec on a few evenly spaced z-planes."""
    with SessionReader(path) as reader:
        n_trials, n_z = reader.shape[:2]
        planes = np.unique(np.linspace(0, n_z - 1, SAMPLE_PLANES + 2).round().astype(int)[1:-1])
        sample = np.empty((n_trials, len(planes), *reader.shape[2:]), reader.dtype)
        for i, z in enumerate(planes.tolist()):
            sample[:, i] = reader.read_planes(z, z + 1)[:, 0]
    codec = numcodecs_compressor(settings, sample.dtype.itemsize)
    rows = np.linspace(0, n_trials - 1, min(SAMPLE_TRIALS, n_trials)).round().astype(int)
    raw = compressed = 0
    for t in rows:
        block = np.ascontiguousarray(sample[t])
        raw += block.nbytes
        compressed += len(codec.encode(block))
    return raw / max(compressed, 1)


def session_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Shape, dtype, chunking, filters and file size of a session's ``/betas``."""
    with betas_dataset(path) as dset:
        return {
            "path": str(Path(path)),
            "shape": list(dset.shape),
            "dtype": dset.dtype.str,
            "chunks": list(dset.chunks) if dset.chunks else None,
            "filters": [str(f) for f in (dset.compression, dset.shuffle and "shuffle") if f],
            "file_bytes": Path(path).stat().st_size,
        }


def store_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a converted session store's ``betas`` metadata says, in :func:`session_metadata`'s
    terms (``file_bytes``: the whole store), for estimates once the HDF5 is deleted."""
    meta, _layout = parse_layout(Path(path) / "betas")
    shards = meta["chunk_grid"]["configuration"]["chunk_shape"]
    outer = meta["codecs"][0]
    sharded = outer["name"] == "sharding_indexed"
    chunks = outer["configuration"]["chunk_shape"] if sharded else shards
    return {
        "path": str(Path(path)),
        "format": "zarr",
        "shape": list(meta["shape"]),
        "dtype": np.dtype(str(meta["data_type"])).newbyteorder("<").str,
        "chunks": list(chunks),
        "shards": list(shards),
        "filters": [c["name"] for c in (outer["configuration"]["codecs"] if sharded else [])],
        "file_bytes": store_stats(path)[0],
    }


def job_request(
    peak_bytes: int,
    factor: float,
    runtime_min: int,
    ceiling_mb: int | None = None,
    *,
    request: Callable[[int, float], int] = request_mb,
    **extra: Any,
) -> dict[str, Any]:
    """One job's entry in an estimate: ``extra`` facts, its predicted peak, its ``mem_mb``
    request (``request`` of the peak, capped at ``ceiling_mb`` when given) and its runtime."""
    mem_mb = request(peak_bytes, factor)
    if ceiling_mb:
        mem_mb = min(mem_mb, ceiling_mb)
    return {**extra, "peak_bytes": peak_bytes, "mem_mb": mem_mb, "runtime_min": runtime_min}


def estimate_from_metadata(
    meta: dict[str, Any],
    settings: StorageSettings,
    compression_ratio: float,
    ceiling_mb: int | None = None,
    factor: float = 1.0,
    roi_voxels: dict[str, int] | None = None,
    roi_storage: StorageSettings = ROI_STORAGE,
) -> dict[str, Any]:
    """Every figure of a session's estimate, from metadata, a compression ratio, ROI sizes
    (ROI part stores laid out as ``roi_storage``, the ``roi_storage`` config section)."""
    shape = tuple(meta["shape"])
    itemsize = np.dtype(meta["dtype"]).itemsize
    raw = math.prod(shape) * itemsize
    n_shards = len(trial_blocks(shape[0], settings.trials_per_shard))
    plan = plan_conversion(shape, itemsize, settings.trials_per_shard, budget_bytes(ceiling_mb))
    if ceiling_mb and request_mb(plan.peak_bytes) > ceiling_mb:
        raise InputError(
            meta["path"],
            f"memory.ceiling_mb {ceiling_mb} is below the {request_mb(plan.peak_bytes)} MB "
            "this session needs even in bounded-memory slabs, one plane at a time, holding one "
            f"{settings.trials_per_shard}-trial shard (or lower storage.trials_per_shard)",
        )
    runtime = session_job_minutes(raw)
    estimate_bytes = estimate_peak(shape, itemsize)
    jobs: dict[str, dict[str, Any]] = {
        # the estimate job's own request (resources.estimate_job_mem_mb), for the summary
        "estimate": job_request(
            estimate_bytes, factor, MIN_RUNTIME_MIN, ceiling_mb, request=estimate_request_mb
        ),
        "convert": job_request(
            plan.peak_bytes,
            factor,
            runtime,
            strategy=plan.strategy,
            planes_per_slab=plan.planes_per_slab,
            in_memory_peak_bytes=in_memory_peak(shape, itemsize, settings.trials_per_shard),
        ),
    }
    roi_shard = roi_settings(roi_storage).trials_per_shard
    store_shard = meta["shards"][0] if meta.get("format") == "zarr" else None
    for name, n_vox in (roi_voxels or {}).items():
        peak = roi_session_peak(
            shape, itemsize, n_vox, roi_shard, store_trials_per_shard=store_shard
        )
        jobs[f"roi_session/{name}"] = job_request(peak, factor, runtime, voxels=n_vox)
    return {
        "source": meta,
        "raw_bytes": raw,
        "float32_bytes": math.prod(shape) * 4,
        "compression_ratio": round(compression_ratio, 4),
        "store_bytes": int(raw / compression_ratio),
        "store_files": n_shards + STORE_EXTRA_FILES,
        "jobs": jobs,
        "model": {
            "snakemake_job_bytes": SNAKEMAKE_JOB_BYTES,
            "factor": factor,
            "ceiling_mb": ceiling_mb,
        },
    }


def write_session_estimate(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    settings: StorageSettings,
    ceiling_mb: int | None = None,
    factor: float = 1.0,
    rois: dict[str, tuple[str, list[int] | None]] | None = None,
    roi_storage: StorageSettings = ROI_STORAGE,
) -> dict[str, Any]:
    """Estimate one session (``rois``: name -> (mask, labels)) and write the JSON atomically.

    ``source`` is the session's HDF5 or, once that is deleted, its converted store (whose
    compression ratio is then measured, not sampled).
    """
    if is_surface_source(source):  # [lh, rh] files or a surface store
        from nsdzarr.prepare.surface_estimate import write_surface_estimate

        return write_surface_estimate(
            source, target, settings, ceiling_mb, factor, rois, roi_storage
        )
    if is_session_store(source):
        meta = store_metadata(source)
        ratio = math.prod(meta["shape"]) * np.dtype(meta["dtype"]).itemsize / meta["file_bytes"]
    else:
        meta = session_metadata(source)
    require_session_trials(source, meta["shape"][0])
    if not is_session_store(source):
        ratio = sample_compression_ratio(source, settings)
    roi_voxels = {name: count_roi_voxels(*spec) for name, spec in (rois or {}).items()}
    estimate = estimate_from_metadata(
        meta, settings, ratio, ceiling_mb, factor, roi_voxels, roi_storage
    )
    with atomic_output(target) as tmp:
        Path(tmp).write_text(json.dumps(estimate, indent=2, sort_keys=True) + "\n")
    return estimate


def count_roi_voxels(mask_path: str | os.PathLike[str], labels: list[int] | None) -> int:
    """Voxels an ROI selects, counted leniently: an unreadable atlas fails here, a selection the
    ROI job will refuse (shape, labels, empty) fails that job alone, not every estimate."""
    values = np.asarray(load_nifti(mask_path).dataobj)
    return int(label_selection(values, labels).sum())


def stimuli_estimate(
    meta: dict[str, Any],
    n_images: int,
    sizes: tuple[int, ...] | list[int] = (),
    settings: StimuliStorage | None = None,
    ceiling_mb: int | None = None,
    factor: float = 1.0,
    compression_ratio: float = 1.0,
) -> dict[str, Any]:
    """Size, files, peak memory and runtime of the stimulus store of ``n_images`` rows."""
    settings = settings or STIMULI_STORAGE
    shape = tuple(meta["shape"])
    chunk_rows = meta["chunks"][0] if meta.get("chunks") else 1
    sizes = sorted({int(s) for s in sizes})
    per_shard = settings.images_per_shard
    limit = budget_bytes(ceiling_mb)
    codec = settings.codec
    chunked = bool(meta.get("chunks"))
    read_budget = stimuli_read_budget(
        shape, n_images, per_shard, sizes, chunk_rows, limit, codec, chunked
    )
    peak = stimuli_peak(shape, n_images, per_shard, sizes, read_budget, chunk_rows, codec, chunked)
    if ceiling_mb and request_mb(peak) > ceiling_mb:
        raise InputError(
            meta["path"],
            f"memory.ceiling_mb {ceiling_mb} is below the {request_mb(peak)} MB "
            "the stimulus store needs even with one chunk of the file read at a time",
        )
    row = math.prod(shape[1:])
    raw = n_images * row
    raw_resized = n_images * sum(s * s * shape[-1] for s in sizes)
    n_shards = len(trial_blocks(n_images, per_shard))
    index = n_shards * (16 * min(per_shard, n_images) + 4)  # per shard, per array
    arrays = 1 + len(sizes)
    return {
        "source": meta,
        "n_images": n_images,
        "sizes": sizes,
        "storage": asdict(settings),
        "raw_bytes": raw,
        "resized_bytes": raw_resized,
        "compression_ratio": round(compression_ratio, 4),
        "store_bytes": int((raw + raw_resized) / compression_ratio)
        + arrays * index
        + n_images * 12  # nsd_id and checksums
        + (arrays + 1) * STIMULI_METADATA_BYTES
        + 2 * STIMULI_METADATA_1D_BYTES,
        # shards of each image array; group + array metadata; nsd_id and checksums chunks
        "store_files": arrays * n_shards + 1 + arrays + 4,
        "jobs": {
            "stimuli": job_request(
                peak,
                factor,
                stimuli_job_minutes(raw, n_images * len(sizes) * shape[1] * shape[2]),
                budget_bytes=read_budget,
            )
        },
        "model": {
            "snakemake_job_bytes": SNAKEMAKE_JOB_BYTES,
            "factor": factor,
            "ceiling_mb": ceiling_mb,
        },
    }


def stimuli_compression_ratio(path: str | os.PathLike[str], settings: StimuliStorage) -> float:
    """Raw/compressed ratio of the configured codec on a few evenly spaced images (1 if raw)."""
    codec = numcodecs_compressor(settings, 1)
    if codec is None:
        return 1.0
    raw = compressed = 0
    with open_stimuli(path) as dset:
        n = dset.shape[0]
        for i in np.unique(np.linspace(0, n - 1, min(STIMULI_SAMPLE_IMAGES, n)).round()):
            img = np.ascontiguousarray(dset[int(i)])
            raw += img.nbytes
            compressed += len(codec.encode(img))
    return raw / max(compressed, 1)


def write_stimuli_estimate(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    trials_tsvs: list[str | os.PathLike[str]] | None = None,
    sizes: tuple[int, ...] | list[int] = (),
    settings: StimuliStorage | None = None,
    ceiling_mb: int | None = None,
    factor: float = 1.0,
) -> dict[str, Any]:
    """Estimate the stimulus job (all rows, or the ids of ``trials_tsvs``) and write the JSON
    atomically."""
    settings = settings or STIMULI_STORAGE
    meta = stimuli_metadata(source)
    n_rows = meta["shape"][0]
    ids = None if trials_tsvs is None else ids_from_trials(trials_tsvs)
    n_images = len(select_ids(source, ids, n_rows))
    ratio = stimuli_compression_ratio(source, settings)
    estimate = stimuli_estimate(meta, n_images, sizes, settings, ceiling_mb, factor, ratio)
    estimate["subset"] = "all" if ids is None else "ids"
    with atomic_output(target) as tmp:
        Path(tmp).write_text(json.dumps(estimate, indent=2, sort_keys=True) + "\n")
    return estimate
