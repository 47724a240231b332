"""Job resources read from the estimates; light to import, as Snakemake imports it to plan."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nsdzarr.nsd_facts import TRIALS_PER_SESSION
from nsdzarr.prepare.memory import (
    BASELINE_BYTES,
    estimate_peak,
    estimate_request_mb,
    surface_estimate_peak,
)
from nsdzarr.prepare.runtime import MIN_RUNTIME_MIN, request_min


def _job(estimate_json: str | os.PathLike[str], job: str) -> dict:
    """The estimate of ``job``; for a job it does not list yet (an ROI added since it was
    written, so it is being redone first, and Snakemake reads resources again before the job
    runs) the session's largest request stands in while planning."""
    jobs = json.loads(Path(estimate_json).read_text())["jobs"]
    if job in jobs:
        return jobs[job]
    return {k: max(j[k] for j in jobs.values()) for k in ("mem_mb", "runtime_min")}


def job_mem_mb(
    estimate_json: str | os.PathLike[str],
    job: str,
    attempt: int = 1,
    ceiling_mb: int | None = None,
) -> int:
    """``mem_mb`` to request for ``job`` on try ``attempt``, capped by the ceiling."""
    mem = _job(estimate_json, job)["mem_mb"] * attempt
    return min(mem, ceiling_mb) if ceiling_mb else mem


def job_runtime_min(
    estimate_json: str | os.PathLike[str], job: str, attempt: int = 1, factor: float = 1.0
) -> int:
    """``runtime`` in minutes to request for ``job`` on try ``attempt``: the estimate x the
    ``runtime.factor`` (applied here, so changing it reruns nothing) x ``attempt``."""
    minutes = _job(estimate_json, job)["runtime_min"]
    return request_min(minutes, factor, attempt)


def estimate_job_runtime_min(factor: float = 1.0, attempt: int = 1) -> int:
    """``runtime`` in minutes of the estimate job itself on try ``attempt``."""
    return request_min(MIN_RUNTIME_MIN, factor, attempt)


def estimate_job_mem_mb(
    source: str | os.PathLike[str],
    factor: float = 1.0,
    attempt: int = 1,
    ceiling_mb: int | None = None,
) -> int:
    """``mem_mb`` of the estimate job itself on try ``attempt``, from the source's HDF5 header
    (or session store's metadata) only, capped by the ceiling like every other job."""
    import h5py  # here, not at module level: the workflow imports this module to plan jobs

    try:
        if not isinstance(source, (str, os.PathLike)) or (Path(source) / "lh").is_dir():
            peak = surface_estimate_peak(TRIALS_PER_SESSION)  # headers and a sampled block
        elif Path(source).is_dir():  # a session store, once its HDF5 is deleted
            shape = json.loads((Path(source) / "betas" / "zarr.json").read_text())["shape"]
            peak = estimate_peak(tuple(shape), 2)
        else:
            with h5py.File(source, "r") as f:
                dset = f["betas"]
                peak = estimate_peak(dset.shape, dset.dtype.itemsize)
    except Exception:  # the job itself reports a bad file with a one-line error
        peak = BASELINE_BYTES
    mem = estimate_request_mb(peak, factor) * attempt
    return min(mem, ceiling_mb) if ceiling_mb else mem
