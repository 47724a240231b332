"""Whole-release sizes and estimates from NSD facts alone (no files read)."""

from __future__ import annotations

import math
from typing import Any

from nsdzarr.nsd_facts import SESSIONS, TRIALS_PER_SESSION, VOLUMES_XYZ
from nsdzarr.prepare.estimate import estimate_from_metadata
from nsdzarr.prepare.storage import StorageSettings

# raw / stored of zstd-1 on a real-size synthetic session (benchmarks/README.md, convert.py)
ASSUMED_COMPRESSION_RATIO = 3.4
# Surface spaces, unsampled: every vertex is cortex (no zeros outside the brain, as in the
# volumes), so assume no saving; zstd-1 measured 1.08 on generated fsaverage float32 PSC
# (benchmarks/README.md, surface.py).
ASSUMED_SURFACE_COMPRESSION_RATIO = 1.0
# nsd_stimuli.hdf5: imgBrick, every 73k image at 425 x 425 RGB (its HDF5 chunking unknown)
STIMULI_SHAPE = (73_000, 425, 425, 3)


def stimuli_metadata() -> dict[str, Any]:
    """What the header of ``nsd_stimuli.hdf5`` says (one image per chunk assumed)."""
    return {
        "path": "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5",
        "dataset": "imgBrick",
        "shape": list(STIMULI_SHAPE),
        "dtype": "|u1",
        "chunks": None,
        "compression": None,
        "file_bytes": math.prod(STIMULI_SHAPE),
    }


def session_metadata(subject: str, space: str) -> dict[str, Any]:
    """What the HDF5 header of one of the subject's sessions says (h5py order, NSD chunking)."""
    x, y, z = VOLUMES_XYZ[space][subject]
    raw = TRIALS_PER_SESSION * x * y * z * 2
    return {
        "path": f"{subject}/{space}/betas_sessionNN.hdf5",
        "shape": [TRIALS_PER_SESSION, z, y, x],
        "dtype": "<i2",
        "chunks": [TRIALS_PER_SESSION, 1, 1, 1],
        "filters": [],
        "file_bytes": raw,
    }


def release_estimates(
    space: str,
    settings: StorageSettings | None = None,
    ceiling_mb: int | None = 16000,
    ratio: float = ASSUMED_COMPRESSION_RATIO,
) -> list[dict[str, Any]]:
    """One estimate per session of the whole release in ``space``, from metadata alone."""
    settings = settings or StorageSettings()
    rows = []
    for subject, n_sessions in SESSIONS.items():
        est = estimate_from_metadata(session_metadata(subject, space), settings, ratio, ceiling_mb)
        rows += [{"subject": subject, "session": s, **est} for s in range(1, n_sessions + 1)]
    return rows
