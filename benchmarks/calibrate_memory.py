"""Calibrate the memory model (src/nsdzarr/prepare/memory.py) against measured peak RSS.

Usage: python benchmarks/calibrate_memory.py [--real PATH] [--one-mm PATH] [--workdir DIR]
       [--one-mm-only CEILING:TRIALS_PER_SHARD ... | --no-one-mm]

Runs each job's library function in a fresh process on sessions of three sizes (the demo's,
a medium one and a real-size NSD session), reads its peak RSS (ru_maxrss), and prints the
model's prediction beside it. A real-size 1 mm session (6 GB, generated at ``--one-mm`` if
absent) is converted in bounded-memory slabs under the budgets of three ``memory.ceiling_mb``
values, as the convert job's script does (``memory.budget_bytes(mem_mb)``), and at 1000 MB
also with 10-trial shards (50 do not fit it); ``--one-mm-only`` runs only those 1 mm rows,
``--no-one-mm`` all but them (run both at once to halve the wall time).
BASELINE_BYTES should be the smallest interpreter baseline under which no job is
under-predicted (the largest residual of measured minus the model's data terms); the ratio
column is what the model over-predicts by. Snakemake's own processes inside a SLURM job
(SNAKEMAKE_JOB_BYTES) are measured by tests/test_slurm.py from sacct.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))

from nsdzarr.prepare import memory  # noqa: E402
from nsdzarr.prepare.demo import make_design, write_synthetic_session  # noqa: E402
from nsdzarr.prepare.layout import design_path  # noqa: E402
from nsdzarr.prepare.storage import StorageSettings  # noqa: E402
from nsdzarr.prepare.trials import write_trial_tables  # noqa: E402

MB = memory.MB
SIZES = {"demo": (16, 24, 20), "medium": (40, 52, 40), "real": (83, 104, 81)}
ONE_MM_ZYX = (148, 186, 145)  # subj01 at 1 mm: 750 x 148 x 186 x 145 int16, 6.0 GB
# (memory.ceiling_mb, storage.trials_per_shard)
ONE_MM_CASES = ((1000, 50), (1000, 10), (2000, 50), (4000, 50))
ROI_FRACTION = 0.025  # nsdgeneral is ~15.7k of ~700k voxels


def peak_of(code: str) -> tuple[int, float]:
    """Peak RSS in bytes and wall seconds of ``code`` run in a fresh interpreter with the
    library importable."""
    prelude = f"import sys\nsys.path.insert(0, {str(SRC)!r})\n"
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec
    tail = (
        "\nfrom pathlib import Path\n"
        "print(int(Path('/proc/self/status').read_text().split('VmHWM:')[1].split()[0]) * 1024)\n"
    )
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code) + tail],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--real", type=Path, default=HERE / "data" / "nsd_session_750x83x104x81.hdf5"
    )
    parser.add_argument(
        "--one-mm", type=Path, default=HERE / "data" / "nsd_session_750x148x186x145.hdf5"
    )
    parser.add_argument("--workdir", type=Path, default=HERE / "data", help="for the stores")
    parser.add_argument("--one-mm-only", nargs="+", metavar="CEILING:SHARD", help="e.g. 1000:10")
    parser.add_argument("--no-one-mm", action="store_true", help="skip the 1 mm rows")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        if args.one_mm_only:
            cases = [tuple(int(v) for v in c.split(":")) for c in args.one_mm_only]
            print_rows(one_mm_rows(args.one_mm, tmp, cases))
            return
        design = design_path(tmp)
        design.parent.mkdir(parents=True)
        import scipy.io

        scipy.io.savemat(design, make_design(0))
        trials = tmp / "trials.tsv"
        write_trial_tables(design, "subj01", [1], trials, tmp / "t.json", tmp / "i.tsv")
        for name, zyx in SIZES.items():
            src = args.real if name == "real" else tmp / f"{name}.hdf5"
            if not src.exists():
                write_synthetic_session(src, zyx)
            shape = (750, *zyx)
            rng = np.random.default_rng(0)
            mask = (rng.random(zyx[::-1]) < ROI_FRACTION).astype(np.int16)
            mask_path = tmp / f"{name}_mask.nii.gz"
            nib.save(nib.Nifti1Image(mask, np.eye(4)), mask_path)
            n_vox = int(mask.sum())
            jobs = {
                "convert in-memory": (
                    f"from nsdzarr.prepare.convert import convert_session\n"
                    f"convert_session({str(src)!r}, {str(tmp / (name + '_a.zarr'))!r}, "
                    f"strategy='in-memory', threads=2)",
                    memory.in_memory_peak(shape, 2, 50),
                ),
                "estimate": (
                    f"from nsdzarr.prepare.estimate import write_session_estimate\n"
                    f"from nsdzarr.prepare.storage import StorageSettings\n"
                    f"write_session_estimate({str(src)!r}, {str(tmp / (name + '.json'))!r}, "
                    f"StorageSettings(), rois={{'r': ({str(mask_path)!r}, None)}})",
                    memory.estimate_peak(shape, 2),
                ),
                "roi_session": (
                    f"from nsdzarr.prepare.roi import extract_session\n"
                    f"from nsdzarr.prepare.storage import StorageSettings\n"
                    f"extract_session({str(src)!r}, {str(mask_path)!r}, None, {str(trials)!r}, 1, "
                    f"{str(tmp / (name + '_roi.zarr'))!r}, StorageSettings())",
                    memory.roi_session_peak(shape, 2, n_vox, 50),
                ),
            }
            if name == "real":
                budget = 512 * MB
                plan = memory.plan_conversion(shape, 2, 50, budget)
                jobs["convert 512 MB budget"] = (
                    f"from nsdzarr.prepare.convert import convert_session\n"
                    f"convert_session({str(src)!r}, {str(tmp / (name + '_b.zarr'))!r}, "
                    f"memory_budget_bytes={budget}, threads=2)",
                    plan.peak_bytes,
                )
            for job, (code, predicted) in jobs.items():
                measured, wall = peak_of(code)
                rows.append((name, job, measured, predicted, wall))
        if not args.no_one_mm:
            rows += one_mm_rows(args.one_mm, tmp)
    print_rows(rows)
    residuals = [m - (p - memory.BASELINE_BYTES) for _n, _j, m, p, _w in rows]
    baseline = int(max(residuals))
    print(
        f"\nBASELINE_BYTES in the model: {memory.BASELINE_BYTES / MB:.0f} MB; smallest that "
        f"covers every job: {baseline / MB:.0f} MB (median {np.median(residuals) / MB:.0f} MB)"
    )
    print(json.dumps({"fitted_baseline_mb": round(baseline / MB, 1)}))


def print_rows(rows: list[tuple[str, str, int, int, float]]) -> None:
    """The table: measured and predicted peak per job."""
    print(
        f"{'size':8} {'job':26} {'measured MB':>11} {'model MB':>9} {'model/meas':>10} "
        f"{'wall s':>7}"
    )
    for name, job, measured, predicted, wall in rows:
        print(
            f"{name:8} {job:26} {measured / MB:11.0f} {predicted / MB:9.0f} "
            f"{predicted / measured:10.2f} {wall:7.1f}"
        )


def one_mm_rows(
    src: Path, tmp: Path, cases: list[tuple[int, int]] | tuple = ONE_MM_CASES
) -> list[tuple[str, str, int, int, float]]:
    """The 1 mm session converted under each (ceiling, trials per shard) case's budget, in
    slabs; each store removed."""
    if not src.exists():
        write_synthetic_session(src, ONE_MM_ZYX)
    shape = (750, *ONE_MM_ZYX)
    rows = []
    for ceiling, shard in cases:
        budget = memory.budget_bytes(ceiling)
        plan = memory.plan_conversion(shape, 2, shard, budget)
        target = tmp / f"1mm_{ceiling}_{shard}.zarr"
        settings = StorageSettings(trials_per_shard=shard)
        code = (
            f"from nsdzarr.prepare.convert import convert_session\n"
            f"from nsdzarr.prepare.storage import StorageSettings\n"
            f"convert_session({str(src)!r}, {str(target)!r}, StorageSettings(trials_per_shard="
            f"{settings.trials_per_shard}), memory_budget_bytes={budget}, threads=2)"
        )
        measured, wall = peak_of(code)
        shutil.rmtree(target)
        fits = memory.request_mb(plan.peak_bytes) <= ceiling
        job = f"convert {ceiling} MB, {shard} tr/shard, {plan.planes_per_slab} pl"
        job += "" if fits else " (refused)"
        rows.append(("1mm", job, measured, plan.peak_bytes, wall))
    return rows


if __name__ == "__main__":
    main()
