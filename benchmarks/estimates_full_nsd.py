"""Estimates of the full NSD release (8 subjects, real session counts and volumes), metadata only.

Usage: python benchmarks/estimates_full_nsd.py

Prints per-subject and release totals for 1.8 mm and 1 mm and the time it took (target < 30 s),
beside the plain arithmetic of shared/notes/nsd-format.md (750 x X x Y x Z x 2 bytes a session).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nsdzarr.nsd_facts import SESSIONS, VOLUMES_XYZ
from nsdzarr.prepare.nsd import release_estimates

GB = 1024**3


def main() -> None:
    for space in ("func1pt8mm", "func1mm"):
        start = time.perf_counter()
        rows = release_estimates(space)
        took = time.perf_counter() - start
        print(f"\n{space}: {len(rows)} sessions estimated in {took:.2f} s")
        print(
            f"{'subject':8} {'sessions':>8} {'raw GB':>8} {'arith GB':>8} {'float32 GB':>10} "
            f"{'stores GB':>9} {'files':>6} {'convert mem_mb':>14} {'strategy':>9}"
        )
        for subject, n in SESSIONS.items():
            mine = [r for r in rows if r["subject"] == subject]
            x, y, z = VOLUMES_XYZ[space][subject]
            arith = n * 750 * x * y * z * 2 / GB
            conv = mine[0]["jobs"]["convert"]
            print(
                f"{subject:8} {n:8d} {sum(r['raw_bytes'] for r in mine) / GB:8.2f} {arith:8.2f} "
                f"{sum(r['float32_bytes'] for r in mine) / GB:10.2f} "
                f"{sum(r['store_bytes'] for r in mine) / GB:9.2f} "
                f"{sum(r['store_files'] for r in mine):6d} {conv['mem_mb']:14d} "
                f"{conv['strategy']:>9}"
            )
        print(
            f"{'all':8} {len(rows):8d} {sum(r['raw_bytes'] for r in rows) / GB:8.2f} "
            f"{'':8} {sum(r['float32_bytes'] for r in rows) / GB:10.2f} "
            f"{sum(r['store_bytes'] for r in rows) / GB:9.2f} "
            f"{sum(r['store_files'] for r in rows):6d}"
        )


if __name__ == "__main__":
    main()
