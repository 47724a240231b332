"""Run one workflow step: log to a file, turn a known failure into one line on stderr and exit 1.

Known failures: :class:`NsdzarrError` (bad input, failed verification, an output that cannot be
written) and an ``OSError`` of a full disk, a quota, a read-only or forbidden file outside
``atomic_output`` (named by the error's own file name).

For tests of SLURM time limits (which act in whole minutes), ``NSDZARR_JOB_DELAY_S`` in the
environment makes every job wait until that many seconds after it started (its SLURM job's start,
or now outside SLURM) before its work. For tests that kill a job mid-write,
``NSDZARR_SHARD_DELAY_S`` makes every whole-shard write (``convert.ShardIO``: session, surface and
stimulus stores) log the shard and wait that long after it. Both are for tests only.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from nsdzarr.errors import NsdzarrError, output_error
from nsdzarr.prepare.memory import limit_malloc_arenas

log = logging.getLogger("nsdzarr")


def _test_delay() -> None:
    """Wait until ``NSDZARR_JOB_DELAY_S`` seconds after the job started, if it is set."""
    delay = float(os.environ.get("NSDZARR_JOB_DELAY_S") or 0)
    if not delay:
        return
    started = time.time()
    if job_id := os.environ.get("SLURM_JOB_ID"):
        # Snakemake's own start inside the job varies with the load (5-30 s): count from SLURM's
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%S"], capture_output=True)
        started = datetime.fromisoformat(out.stdout.decode().strip()).timestamp()
    wait = max(0.0, started + delay - time.time())
    log.info("waiting %.0f s (NSDZARR_JOB_DELAY_S=%s)", wait, delay)
    time.sleep(wait)


def pause_after_shard(shard: int, shards: int) -> None:
    """Log shard ``shard`` of ``shards`` written, wait ``NSDZARR_SHARD_DELAY_S`` s (if set)."""
    delay = float(os.environ.get("NSDZARR_SHARD_DELAY_S") or 0)
    if delay:
        log.info("wrote shard %d/%d, waiting %.1f s (NSDZARR_SHARD_DELAY_S)", shard, shards, delay)
        time.sleep(delay)


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux VmHWM; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(ln.split()[1]) << 10 for ln in fh if ln.startswith("VmHWM"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10


def run_job(
    log_path: str | Path | None, func: Callable[..., Any], /, *args: Any, **kwargs: Any
) -> Any:
    """Call ``func(*args, **kwargs)`` logging to ``log_path``; exit 1 on a known failure."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    _test_delay()
    limit_malloc_arenas()  # every job's peak within its model, whatever its threads did
    start = time.perf_counter()
    try:
        result = func(*args, **kwargs)
    except NsdzarrError as err:
        log.error("%s", err)
        raise SystemExit(1) from None
    except OSError as err:
        failed = output_error(err.filename, err) if err.filename else None
        if failed is None:
            raise
        log.error("%s", failed)
        raise SystemExit(1) from None
    log.info(
        "%s done in %.2f s, peak RSS %d MB",
        getattr(func, "__name__", "job"),
        time.perf_counter() - start,
        peak_rss_bytes() >> 20,
    )
    return result
