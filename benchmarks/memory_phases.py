"""Peak RSS of each phase of one session conversion, to fit the memory model's terms.

Usage: python benchmarks/memory_phases.py SOURCE.hdf5 [--trials-per-shard N] [--planes P]
       [--budget-mb MB]

Converts SOURCE (to a temporary store beside it) in this process, resetting the peak
(VmHWM, via /proc/self/clear_refs) at each phase boundary: opening the source (the chunk index
built), reading slabs into the scratch store, rewriting shards (in memory: reading and writing
the session), the independent read-back (``convert.verify_store``). Prints each phase's peak
and the RSS it left; the largest phase peak is the conversion's peak. ``--planes`` forces the
slab strategy with that many planes; else the model's plan for ``--budget-mb`` (none: in memory).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from nsdzarr.prepare import convert, hdf5_read, memory  # noqa: E402
from nsdzarr.prepare.storage import StorageSettings  # noqa: E402

MB = memory.MB
PHASES: dict[str, tuple[float, float]] = {}


def status(key: str) -> int:
    """A /proc/self/status figure in bytes."""
    return int(Path("/proc/self/status").read_text().split(key + ":")[1].split()[0]) * 1024


def mark(phase: str) -> None:
    """End ``phase``: record its peak and the RSS it left, then reset the peak."""
    peak, left = PHASES[phase] = (status("VmHWM") / MB, status("VmRSS") / MB)
    print(f"{phase:10} peak {peak:7.0f} MB, left {left:7.0f} MB", flush=True)
    Path("/proc/self/clear_refs").write_text("5")


def wrap(owner: object, name: str, before: str | None = None, after: str | None = None) -> None:
    """Mark ``before`` when ``owner.name`` is called and ``after`` when it returns."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before:
            mark(before)
        result = original(*args, **kwargs)
        if after:
            mark(after)
        return result

    setattr(owner, name, wrapped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--trials-per-shard", type=int, default=50)
    parser.add_argument("--planes", type=int)
    parser.add_argument("--budget-mb", type=int)
    args = parser.parse_args()
    mark("import")
    wrap(hdf5_read.SessionReader, "__init__", after="index")
    wrap(convert, "trial_blocks", before="reading")  # the rewrite loop (in memory: the write)
    wrap(convert, "verify_store", before="rewriting", after="read-back")
    if args.planes:
        planes = args.planes

        def plan(shape, itemsize, per_shard, _budget):
            peak = memory.slab_peak(shape, itemsize, per_shard, planes)
            return memory.ConversionPlan("slabs", planes, peak)

        convert.plan_conversion = plan
    budget = args.budget_mb * MB if args.budget_mb else None
    with tempfile.TemporaryDirectory(dir=args.source.parent) as tmp:
        report = convert.convert_session(
            args.source,
            Path(tmp) / "out.zarr",
            StorageSettings(trials_per_shard=args.trials_per_shard),
            memory_budget_bytes=budget,
            threads=2,
        )
    mark("end")
    peak = max(p for p, _left in PHASES.values())
    print(
        f"{report.strategy}, {report.planes_per_slab} planes: peak {peak:.0f} MB, "
        f"model {report.predicted_peak_bytes / MB:.0f} MB"
    )


if __name__ == "__main__":
    main()
