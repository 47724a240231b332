"""The runtime model: minutes each SLURM job requests, from a session's size alone.

Light to import (Snakemake imports it to plan). Requests are minutes, SLURM's granularity.
"""

from __future__ import annotations

import math

from nsdzarr.prepare.memory import MB

# Conservative throughput of source bytes through a session job (read + encode + verify);
# 3x below it covers a shared, loaded machine (a 6 GB 1 mm session in slabs took 332 s at
# load 10 on 2 cores: ~18 MB/s, benchmarks/README.md).
SESSION_BYTES_PER_S = 40 * MB
SESSION_SLOWDOWN = 3
# Pillow LANCZOS resize: ~24 ns of CPU per source pixel here (425 x 425 -> 224: 4.4 ms), x3.
RESIZE_S_PER_PIXEL = 75e-9
# The estimate job reads a header, a chunk index and a few planes; session jobs' floor too.
MIN_RUNTIME_MIN = 5


def session_job_minutes(raw_bytes: int) -> int:
    """Minutes a convert or roi_session job of a session with ``raw_bytes`` may take."""
    seconds = SESSION_SLOWDOWN * raw_bytes / SESSION_BYTES_PER_S
    return max(MIN_RUNTIME_MIN, math.ceil(seconds / 60))


def stimuli_job_minutes(raw_bytes: int, resized_source_pixels: int) -> int:
    """Minutes the stimuli job may take: its raw image bytes like a session's, plus resizing."""
    seconds = SESSION_SLOWDOWN * raw_bytes / SESSION_BYTES_PER_S
    seconds += resized_source_pixels * RESIZE_S_PER_PIXEL
    return max(MIN_RUNTIME_MIN, math.ceil(seconds / 60))


def request_min(minutes: int, factor: float = 1.0, attempt: int = 1) -> int:
    """SLURM ``runtime`` (whole minutes, at least 1) for ``minutes`` x ``factor`` x ``attempt``."""
    return max(1, math.ceil(minutes * factor)) * attempt
