"""ROI extraction from one real-size session: the naive ways vs ours.

Usage: python benchmarks/roi.py [--source PATH] [--naive-trials N]

Uses the real-size NSD-layout session of benchmarks/convert.py (generated if absent) and a
~15.7k-voxel mask (nsdgeneral's size in subj01). Each variant runs in a fresh process; printed:
wall time, bytes the process read through syscalls (/proc/self/io rchar), peak RSS, and ratios
to ours. The per-trial naive way (h5py `d[t]` then mask, what a per-trial loader does) takes
~17 s per trial on this layout, so it is timed on --naive-trials trials and extrapolated to 750.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))

from nsdzarr.prepare.demo import write_synthetic_session  # noqa: E402

DEFAULT_SOURCE = HERE / "data" / "nsd_session_750x83x104x81.hdf5"
MB = 1024**2
N_VOXELS = 15724

PRELUDE = """
import json, resource, sys, time
import numpy as np
sys.path.insert(0, SRC)
def rchar():
    for line in open("/proc/self/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
"""

NAIVE_PER_TRIAL = """
import h5py, nibabel as nib
mask = np.asarray(nib.load(MASK).dataobj) >= 1
t0, r0 = time.perf_counter(), rchar()
with h5py.File(SOURCE, "r") as f:
    d = f["betas"]
    rows = [d[t].T[mask] for t in range(N_TRIALS)]
"""

NAIVE_WHOLE = """
import h5py, nibabel as nib
mask = np.asarray(nib.load(MASK).dataobj) >= 1
t0, r0 = time.perf_counter(), rchar()
with h5py.File(SOURCE, "r") as f:
    a = f["betas"][...]
rows = np.stack([a[t].T[mask] for t in range(a.shape[0])])
"""

OURS = """
from nsdzarr.prepare.hdf5_read import SessionReader
from nsdzarr.prepare.roi import load_roi_mask
t0, r0 = time.perf_counter(), rchar()
with SessionReader(SOURCE) as reader:
    mask = load_roi_mask(MASK, None, reader.shape[1:])
    rows = reader.read_voxels(np.stack(mask.zyx, axis=1))
"""

EPILOGUE = """
print(json.dumps({"wall": time.perf_counter() - t0, "read": rchar() - r0,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run(body: str, **params: object) -> dict[str, float]:
    """One variant in a fresh interpreter."""
    header = "".join(f"{k} = {v!r}\n" for k, v in {"SRC": str(SRC), **params}.items())
    code = header + textwrap.dedent(PRELUDE) + textwrap.dedent(body) + textwrap.dedent(EPILOGUE)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_mask(path: Path, shape_xyz: tuple[int, int, int]) -> None:
    """An nsdgeneral-like atlas: -1 outside an ellipsoid, 1 for ~15.7k posterior voxels."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_xyz], indexing="ij")
    dist = sum(g**2 for g in grids)
    atlas = np.where(dist <= 0.5, 0, -1).astype(np.int16)
    inside = np.flatnonzero((atlas == 0).ravel() & (grids[1].ravel() < 0))
    atlas.ravel()[inside[:N_VOXELS]] = 1
    nib.save(nib.Nifti1Image(atlas, np.diag([1.8, 1.8, 1.8, 1])), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--naive-trials", type=int, default=2)
    args = parser.parse_args()
    if not args.source.exists():
        write_synthetic_session(args.source)
    with open(args.source, "rb") as fh:  # warm the page cache
        while fh.read(64 * MB):
            pass
    with tempfile.TemporaryDirectory() as tmp:
        mask = Path(tmp) / "nsdgeneral.nii.gz"
        write_mask(mask, (81, 104, 83))
        params = {"SOURCE": str(args.source), "MASK": str(mask)}
        ours = run(OURS, **params)
        whole = run(NAIVE_WHOLE, **params)
        per_trial = run(NAIVE_PER_TRIAL, N_TRIALS=args.naive_trials, **params)
    scale = 750 / args.naive_trials
    per_trial = {
        "wall": per_trial["wall"] * scale,
        "read": per_trial["read"] * scale,
        "rss": per_trial["rss"],
    }
    print(f"source: {args.source}; mask: {N_VOXELS} voxels; page cache warm")
    print(f"{'variant':44} {'wall s':>8} {'x ours':>7} {'read MB':>8} {'peak RSS MB':>11}")
    for name, fig in (
        ("ours: read_voxels (ROI chunks only)", ours),
        ("naive: h5py d[...] whole session, mask", whole),
        (f"naive: h5py d[t] per trial, mask (x{scale:.0f})", per_trial),
    ):
        print(
            f"{name:44} {fig['wall']:8.2f} {fig['wall'] / ours['wall']:7.1f} "
            f"{fig['read'] / MB:8.0f} {fig['rss'] / MB:11.0f}"
        )


if __name__ == "__main__":
    main()
