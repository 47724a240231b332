"""Job resources read from the estimates; light to import, as Snakemake imports it to plan."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nsdzarr.memory import BASELINE_BYTES, estimate_peak, request_mb
from nsdzarr.runtime import MIN_RUNTIME_MIN, request_min


def job_mem_mb(
    estimate_json: str | os.PathLike[str],
    job: str,
    attempt: int = 1,
    ceiling_mb: int | None = None,
) -> int:
    """``mem_mb`` to request for ``job`` on try ``attempt``, capped by the ceiling."""
    mem = json.loads(Path(estimate_json).read_text())["jobs"][job]["mem_mb"] * attempt
    return min(mem, ceiling_mb) if ceiling_mb else mem


def job_runtime_min(
    estimate_json: str | os.PathLike[str], job: str, attempt: int = 1, factor: float = 1.0
) -> int:
    """``runtime`` in minutes to request for ``job`` on try ``attempt``: the estimate x the
    ``runtime.factor`` (applied here, so changing it reruns nothing) x ``attempt``."""
    minutes = json.loads(Path(estimate_json).read_text())["jobs"][job]["runtime_min"]
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
    only, capped by the ceiling like every other job."""
    import h5py  # here, not at module level: the workflow imports this module to plan jobs

    try:
        with h5py.File(source, "r") as f:
            dset = f["betas"]
            peak = estimate_peak(dset.shape, dset.dtype.itemsize)
    except Exception:  # the job itself reports a bad file with a one-line error
        peak = BASELINE_BYTES
    mem = request_mb(peak, factor) * attempt
    return min(mem, ceiling_mb) if ceiling_mb else mem
