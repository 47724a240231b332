"""Estimates of a surface session (sizes, peak memory, runtime) from headers and a sample."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from nsdzarr.errors import InputError
from nsdzarr.prepare.atomic import atomic_output
from nsdzarr.prepare.convert import store_stats
from nsdzarr.prepare.estimate import SAMPLE_TRIALS, STORE_EXTRA_FILES, job_request
from nsdzarr.prepare.layout import HEMISPHERES, SURFACE_SESSION_FILE
from nsdzarr.prepare.memory import (
    READ_BUFFER_BYTES,
    SNAKEMAKE_JOB_BYTES,
    SURFACE_SAMPLE_VERTICES,
    budget_bytes,
    estimate_request_mb,
    request_mb,
    surface_estimate_peak,
    surface_roi_peak,
)
from nsdzarr.prepare.nsd import ASSUMED_SURFACE_COMPRESSION_RATIO
from nsdzarr.prepare.runtime import MIN_RUNTIME_MIN, session_job_minutes
from nsdzarr.prepare.storage import (
    ROI_STORAGE,
    StorageSettings,
    numcodecs_compressor,
    roi_settings,
    trial_blocks,
)
from nsdzarr.prepare.surface import (
    SessionSources,
    SurfaceSession,
    open_session,
    require_same_vertices,
)
from nsdzarr.prepare.surface_convert import surface_plan
from nsdzarr.prepare.surface_roi import count_surface_columns


def sample_ratio(session: SurfaceSession, settings: StorageSettings) -> float:
    """Raw/compressed ratio of the configured codec on trials of a middle block of vertices."""
    reader = session.readers[0]
    width = min(reader.n_vertices, SURFACE_SAMPLE_VERTICES)
    v0 = (reader.n_vertices - width) // 2
    block = reader.read(0, reader.n_trials, v0, v0 + width)
    codec = numcodecs_compressor(settings, block.dtype.itemsize)
    if codec is None:
        return 1.0
    rows = np.linspace(0, reader.n_trials - 1, min(SAMPLE_TRIALS, reader.n_trials)).round()
    raw = compressed = 0
    for t in rows.astype(int):
        raw += block[t].nbytes
        compressed += len(codec.encode(np.ascontiguousarray(block[t])))
    return raw / max(compressed, 1)


def first_session_files(sources: SessionSources) -> list[Path] | None:
    """The lowest-numbered session's ``[lh, rh]`` beside ``sources`` (None if it is this one)."""
    lh = Path(sources[0])
    numbers = sorted(m[1] for p in lh.parent.iterdir() if (m := SURFACE_SESSION_FILE.match(p.name)))
    this = SURFACE_SESSION_FILE.match(lh.name)
    if not numbers or this is None or numbers[0] == this[1]:
        return None
    name = lh.name.replace(f"session{this[1]}", f"session{numbers[0]}").split(".", 1)[1]
    return [lh.parent / f"{h}.{name}" for h in HEMISPHERES]


def surface_estimate(
    meta: dict[str, Any],
    settings: StorageSettings,
    ratio: float,
    ceiling_mb: int | None = None,
    factor: float = 1.0,
    roi_columns: dict[str, int] | None = None,
    roi_storage: StorageSettings = ROI_STORAGE,
) -> dict[str, Any]:
    """Every figure of a surface session's estimate (the volume estimate's keys)."""
    n_trials = meta["shape"][0]
    vertices = list(meta["hemispheres"].values())
    itemsize = np.dtype(meta["dtype"]).itemsize
    raw = n_trials * sum(vertices) * itemsize
    plan = surface_plan(meta, settings.trials_per_shard, budget_bytes(ceiling_mb))
    if ceiling_mb and request_mb(plan.peak_bytes) > ceiling_mb:
        raise InputError(
            meta["path"],
            f"memory.ceiling_mb {ceiling_mb} is below the {request_mb(plan.peak_bytes)} MB "
            f"this surface session needs ({plan.strategy}, one hemisphere at a time, holding "
            f"one {settings.trials_per_shard}-trial shard; or lower storage.trials_per_shard)",
        )
    runtime = session_job_minutes(raw)
    est_peak = surface_estimate_peak(n_trials, itemsize)
    jobs: dict[str, dict[str, Any]] = {
        "estimate": job_request(
            est_peak, factor, MIN_RUNTIME_MIN, ceiling_mb, request=estimate_request_mb
        ),
        "convert": job_request(
            plan.peak_bytes,
            factor,
            runtime,
            strategy=plan.strategy,
            planes_per_slab=0,
            in_memory_peak_bytes=surface_plan(meta, settings.trials_per_shard).peak_bytes,
        ),
    }
    block = max(
        READ_BUFFER_BYTES // itemsize, 64 * max(vertices), n_trials * SURFACE_SAMPLE_VERTICES
    )
    for name, n_cols in (roi_columns or {}).items():
        peak = surface_roi_peak(n_trials, vertices, itemsize, n_cols, block)
        jobs[f"roi_session/{name}"] = job_request(peak, factor, runtime, voxels=n_cols)
    del roi_storage  # parts are one session's rows: their shard size does not change the peak
    n_shards = 2 * len(trial_blocks(n_trials, settings.trials_per_shard))
    return {
        "source": meta,
        "raw_bytes": raw,
        "float32_bytes": n_trials * sum(vertices) * 4,
        "compression_ratio": round(ratio, 4),
        "store_bytes": int(raw / ratio),
        "store_files": n_shards + STORE_EXTRA_FILES + 1,
        "jobs": jobs,
        "model": {
            "snakemake_job_bytes": SNAKEMAKE_JOB_BYTES,
            "factor": factor,
            "ceiling_mb": ceiling_mb,
        },
    }


def _store_meta(store: Path) -> tuple[dict[str, Any], float]:
    arrays = {h: json.loads((store / h / "zarr.json").read_text()) for h in HEMISPHERES}
    shapes = {h: a["shape"] for h, a in arrays.items()}
    dtype = np.dtype(arrays["lh"]["data_type"]).newbyteorder("<")
    size = store_stats(store)[0]
    meta = {
        "path": str(store),
        "format": "zarr",
        "shape": [shapes["lh"][0], shapes["lh"][1] + shapes["rh"][1]],
        "hemispheres": {h: s[1] for h, s in shapes.items()},
        "dtype": dtype.str,
        "whole_hemisphere": False,  # what converting it again would take: streamed
        "chunk_vertices": 1,
        "file_bytes": size,
    }
    raw = shapes["lh"][0] * (shapes["lh"][1] + shapes["rh"][1]) * dtype.itemsize
    return meta, raw / max(size, 1)


def session_meta(
    sources: SessionSources, settings: StorageSettings, sample: bool = True
) -> tuple[dict[str, Any], float]:
    """A surface session's metadata and compression ratio (sampled, else NSD's assumed), its
    vertex counts checked against the subject's first session's."""
    with open_session(sources) as session:
        require_same_vertices(session, first_session_files(sources))
        meta = session.metadata()
        ratio = sample_ratio(session, settings) if sample else ASSUMED_SURFACE_COMPRESSION_RATIO
    return meta, ratio


def write_surface_estimate(
    sources: SessionSources | str | os.PathLike[str],
    target: str | os.PathLike[str],
    settings: StorageSettings,
    ceiling_mb: int | None = None,
    factor: float = 1.0,
    rois: dict[str, tuple[Any, list[int] | None]] | None = None,
    roi_storage: StorageSettings = ROI_STORAGE,
) -> dict[str, Any]:
    """Estimate one surface session (``rois``: name -> ([lh, rh] labels, labels)) and write the
    JSON atomically; its vertex counts must equal the subject's first session's."""
    if isinstance(sources, (str, os.PathLike)):  # a converted store, its files deleted
        meta, ratio = _store_meta(Path(sources))
    else:
        meta, ratio = session_meta(sources, settings)
    columns = {name: count_surface_columns(*spec) for name, spec in (rois or {}).items()}
    estimate = surface_estimate(
        meta, settings, ratio, ceiling_mb, factor, columns, roi_settings(roi_storage)
    )
    with atomic_output(target) as tmp:
        Path(tmp).write_text(json.dumps(estimate, indent=2, sort_keys=True) + "\n")
    return estimate
