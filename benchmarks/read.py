"""Benchmark reading one NSD-layout betas session: h5py vs our hdf5_read.SessionReader.

Usage: python benchmarks/read.py [PATH] [--repeats N] [--slab PLANES]

Creates PATH (default benchmarks/data/session_real.hdf5, ~1.1 GB: 750x83x104x81 int16, chunks
(750,1,1,1), uncompressed, round(noise*300) inside an ellipsoid brain) if absent.  Each measurement
runs in its own Python process so peak RSS (VmHWM) is per measurement; measurements are
interleaved round-robin.  The page cache is warmed first and not dropped (warm-cache numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (750, 83, 104, 81)

_SETUP = """
import json, sys, time
import numpy as np
path, slab = sys.argv[1], int(sys.argv[2])
def checksum(a):  # per-trial, per-plane sums: cheap and order independent
    return a.sum(axis=(2, 3), dtype=np.int64)
"""

METHODS = {
    "imports only": """
import h5py, nsdzarr.prepare.hdf5_read
t0 = time.perf_counter(); sums = None
""",
    "h5py d[...] (baseline)": """
import h5py
t0 = time.perf_counter()
with h5py.File(path, "r") as f:
    a = f["betas"][...]
wall = time.perf_counter() - t0; sums = checksum(a)
""",
    "h5py d[:, z:z+slab] slabs": """
import h5py
t0 = time.perf_counter(); parts = []
with h5py.File(path, "r") as f:
    d = f["betas"]
    for z in range(0, d.shape[1], slab):
        parts.append(checksum(d[:, z : z + slab]))
wall = time.perf_counter() - t0; sums = np.concatenate(parts, axis=1)
""",
    "ours read_all": """
from nsdzarr.prepare.hdf5_read import SessionReader
t0 = time.perf_counter()
with SessionReader(path) as r:
    a = r.read_all(); info = (r.strategy, r.index_source)
wall = time.perf_counter() - t0; sums = checksum(a)
""",
    "ours read_planes slabs": """
from nsdzarr.prepare.hdf5_read import SessionReader
t0 = time.perf_counter(); parts = []; out = None
with SessionReader(path) as r:
    for z in range(0, r.shape[1], slab):
        n = min(slab, r.shape[1] - z)
        if out is None or out.shape[1] != n:
            out = np.empty((r.shape[0], n, *r.shape[2:]), r.dtype)
        parts.append(checksum(r.read_planes(z, z + n, out=out)))
    info = (r.strategy, r.index_source)
wall = time.perf_counter() - t0; sums = np.concatenate(parts, axis=1)
""",
}

_REPORT = """
wall = locals().get("wall", time.perf_counter() - t0)
with open("/proc/self/status") as f:  # this process's own peak; ru_maxrss can carry the parent's
    hwm = [int(line.split()[1]) for line in f if line.startswith("VmHWM:")][0]
print(json.dumps({"wall": wall, "sums": None if sums is None else sums.tolist(),
                  "info": locals().get("info"), "hwm_kib": hwm}))
"""


def generate(path: Path, seed: int = 0) -> None:
    """Write a real-size NSD-layout session in z-slabs (about 20-30 s)."""
    import h5py

    t, nz, ny, nx = SHAPE
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in (nz, ny, nx)), indexing="ij")
    brain = sum(g**2 for g in grid) <= 0.898**2  # ~38% of voxels
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.incomplete")
    with h5py.File(tmp, "w") as f:
        d = f.create_dataset("betas", shape=SHAPE, dtype="<i2", chunks=(t, 1, 1, 1))
        for z in range(0, nz, 8):
            noise = rng.standard_normal((t, min(8, nz - z), ny, nx), dtype=np.float32)
            d[:, z : z + 8] = (
                np.round(noise * 300).clip(-32768, 32767).astype(np.int16) * brain[z : z + 8]
            )
    os.replace(tmp, path)
    print(
        f"generated {path} ({path.stat().st_size / 1e9:.2f} GB, brain {brain.mean():.0%} of voxels)"
    )


def measure(code: str, path: Path, slab: int) -> dict:
    """Run ``code`` in a fresh interpreter; return its JSON result with peak RSS in MB."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", _SETUP + code + _REPORT, str(path), str(slab)],
        stdout=subprocess.PIPE,
        env=env,
    )
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"measurement failed (exit {proc.returncode})")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["rss_mb"] = result["hwm_kib"] * 1024 / 1e6
    return result


def warm(path: Path) -> None:
    """Read the whole file once so every measurement starts from a warm page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "path", nargs="?", type=Path, default=ROOT / "benchmarks/data/session_real.hdf5"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slab", type=int, default=8, help="z-planes per read_planes call")
    args = ap.parse_args()
    if not args.path.exists():
        generate(args.path)
    warm(args.path)
    raw_mb = np.prod(SHAPE) * 2 / 1e6
    print(
        f"{args.path}: {raw_mb:.0f} MB raw, {os.cpu_count()} cores, "
        f"warm page cache, {args.repeats} rounds"
    )
    runs: dict[str, list[dict]] = {name: [] for name in METHODS}
    for _ in range(args.repeats):
        for name, code in METHODS.items():
            runs[name].append(measure(code, args.path, args.slab))
    sums = {name: r[0]["sums"] for name, r in runs.items() if r[0]["sums"] is not None}
    reference = sums["h5py d[...] (baseline)"]
    base = statistics.median(r["wall"] for r in runs["h5py d[...] (baseline)"])
    print(
        f"{'method':28} {'wall s (med/min)':>17} {'MB/s':>6} {'peak RSS MB':>12} "
        f"{'speedup':>8} {'RSS/raw':>8}"
    )
    for name, results in runs.items():
        walls = [r["wall"] for r in results]
        med, rss = statistics.median(walls), max(r["rss_mb"] for r in results)
        ok = "" if name not in sums else ("" if sums[name] == reference else "  CHECKSUM MISMATCH")
        info = results[0].get("info")
        note = f"  [{'/'.join(info)}]" if info else ""
        if name == "imports only":
            print(f"{name:28} {'':>17} {'':>6} {rss:12.0f}")
            continue
        print(
            f"{name:28} {med:8.2f}/{min(walls):<8.2f} {raw_mb / med:6.0f} {rss:12.0f} "
            f"{base / med:7.2f}x {rss / raw_mb:7.2f}x{note}{ok}"
        )
    print(
        f"all checksums equal: {all(v == reference for v in sums.values())} "
        f"(finished {time.strftime('%H:%M')})"
    )


if __name__ == "__main__":
    main()
