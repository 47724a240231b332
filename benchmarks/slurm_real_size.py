"""A real-size 1.8 mm session through profiles/slurm on a SLURM cluster: requests vs sacct.

Usage: python benchmarks/slurm_real_size.py [--workdir DIR] [--jobs N]

Generates (once) an NSD-layout release with one real-size 1.8 mm session of subj01
(750 x 83 x 104 x 81 int16, 1.05 GB, its ROI masks on that grid, the demo's design and stimulus
brick), runs the workflow on it with ``--workflow-profile profiles/slurm`` and prints, per SLURM
job, its state, time limit and wall time, and its request (``mem_mb``, the estimate) against
what sacct measured (the sum of its steps' MaxRSS, as tests/test_slurm.py counts it), and the
script's predicted peak against the peak Snakemake's benchmark file recorded. Needs a running
cluster (tests/slurm/cluster.sh start); not part of CI.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

from test_slurm import estimated, sacct, submitted_jobs, to_mb, to_s  # noqa: E402

from nsdzarr.prepare.demo import write_demo  # noqa: E402
from nsdzarr.prepare.demo_spec import DemoSpec  # noqa: E402
from nsdzarr.prepare.memory import MB  # noqa: E402

SPEC = DemoSpec(sessions=1, shape_xyz=(81, 104, 83))  # NSD's func1pt8mm grid


def config(root: Path) -> dict:
    """CI's demo config on the generated release (demo off: it is a user's data now)."""
    cfg = yaml.safe_load((REPO / ".test" / "config" / "config.yaml").read_text())
    return {**cfg, "nsd_root": str(root), "demo": False, "sessions": [1]}


def benchmark_peak_mb(workdir: Path, rule: str, wildcards: str) -> float | None:
    """max_rss (MB) of a job's Snakemake benchmark file, if it has one."""
    if rule.startswith("stimuli"):
        path = workdir / "results/benchmarks/stimuli/stimuli.tsv"
    else:
        subject, *roi, session = wildcards.split("_")
        name = f"{'_'.join(roi)}_session{session}" if roi else f"session{session}"
        path = workdir / f"results/benchmarks/{subject}/{rule}/{name}.tsv"
    if rule == "stimuli_estimate" or not path.exists():
        return None
    header, values = path.read_text().splitlines()[:2]
    return float(dict(zip(header.split("\t"), values.split("\t"), strict=True))["max_rss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=HERE / "data" / "slurm_real_size")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    root, run = args.workdir / "nsd", args.workdir / "run"
    if not (root / ".nsdzarr-demo").exists():
        start = time.perf_counter()
        write_demo(root, SPEC)
        print(f"generated {root} in {time.perf_counter() - start:.0f} s", flush=True)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config(root)))
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(run),
        "--configfile", str(run / "config.yaml"),
        "--workflow-profile", str(REPO / "profiles" / "slurm"),
        "--jobs", str(args.jobs),
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=run, capture_output=True, text=True)
    wall = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    (args.workdir / "snakemake.log").write_text(output)
    print(f"snakemake exit {proc.returncode} in {wall:.0f} s", flush=True)
    jobs = submitted_jobs(output)
    accounting = sacct([job_id for job_id, _rule, _wc in jobs])
    print(
        f"{'job':32} {'state':10} {'limit s':>8} {'wall s':>7} {'req MB':>7} {'sacct MB':>8} "
        f"{'req/sacct':>9} {'model MB':>8} {'bench MB':>8} {'model/bench':>11}"
    )
    ratios = []
    for job_id, rule, wildcards in jobs:
        rows = accounting[job_id]
        job_row = rows[0]
        measured = sum(to_mb(r["MaxRSS"]) for r in rows[1:])
        requested = to_mb(job_row["ReqMem"])
        est = estimated(run, rule, wildcards)
        model = est["peak_bytes"] / MB if est else float("nan")
        bench = benchmark_peak_mb(run, rule, wildcards)
        if est:
            ratios.append(requested / measured)
        print(
            f"{rule + ' ' + wildcards:32} {job_row['State']:10} {to_s(job_row['Timelimit']):8.0f} "
            f"{to_s(job_row['Elapsed']):7.0f} {requested:7.0f} {measured:8.0f} "
            f"{requested / measured:9.2f} {model:8.0f} {bench or float('nan'):8.0f} "
            f"{model / bench if bench and est else float('nan'):11.2f}"
        )
    states = {accounting[j][0]["State"] for j, _r, _w in jobs}
    print(f"states: {sorted(states)}; request / sacct: {min(ratios):.2f}-{max(ratios):.2f}")


if __name__ == "__main__":
    main()
