"""A real-size 1.8 mm session through profiles/slurm on SLURM: requests vs measured peaks.

Usage: python benchmarks/slurm_real_size.py [--workdir DIR] [--jobs N]

Generates (once) an NSD-layout release with one real-size 1.8 mm session of subj01
(750 x 83 x 104 x 81 int16, 1.05 GB, its ROI masks on that grid, the demo's design and stimulus
brick), runs the workflow on it with ``--workflow-profile profiles/slurm`` and prints, per SLURM
job, its state, time limit and wall time, and its request (``mem_mb``, the estimate) against
what sacct measured (the sum of its steps' MaxRSS, as tests/test_slurm.py counts it), and the
script's predicted peak against the script's own peak (VmHWM).

sacct samples (jobacct_gather, once a second here) and misses the peaks of short jobs, so a
watcher thread also reads every job's memory cgroup every 20 ms while it runs and reports its
true peak: the most, over its samples, of the summed high-water marks (VmHWM, monotonic) of
the job's processes then alive (only a process's growth in its last 20 ms escapes; a fork not
yet exec'd is skipped, its VmHWM counts its parent's pages). The script's, Snakemake's own
processes' (both snakemakes, the shells, srun, the scheduler's solver) and slurmstepd's (in
the job's cgroup, uncounted by sacct) VmHWM are shown apart. This counts RSS as sacct does,
shared library pages once per process, so it bounds the job's charge from above. Beside it:
the highest anonymous memory the cgroup was charged (each page once), and the cgroup's own
peak charge (v1 ``memory.max_usage_in_bytes``, v2 ``memory.peak``; page cache included, so it
reaches the limit in jobs that write much). Needs a running cluster (tests/slurm/cluster.sh
start); not part of CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
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


# SLURM's job cgroups: cgroup v1 (memory controller, slurm[_<node>]/uid_<uid>/job_<id>) and v2
CGROUP_JOBS = (
    "/sys/fs/cgroup/memory/slurm*/uid_*/job_*",
    "/sys/fs/cgroup/system.slice/slurmstepd.scope/job_*",
)
PEAK_FILES = ("memory.max_usage_in_bytes", "memory.peak")
ANON_FIELDS = ("total_rss", "anon")
HWM = re.compile(rb"VmHWM:\s+(\d+) kB")
PPID = re.compile(rb"PPid:\s+(\d+)")


@dataclass
class JobMemory:
    """What the watcher saw of one SLURM job's memory cgroup."""

    hwm_kb: dict[int, int] = field(default_factory=dict)  # pid -> VmHWM
    kind: dict[int, str] = field(default_factory=dict)  # pid -> script | snakemake | slurmstepd
    cmdline: dict[int, bytes] = field(default_factory=dict)
    peak_kb: int = 0  # the most, over the samples, of the summed VmHWM of the processes alive
    cgroup_peak: int = 0
    anon_peak: int = 0

    def mb(self, *kinds: str) -> float:
        """Summed VmHWM (MiB) of the job's processes of those kinds (all if none given)."""
        return (
            sum(kb for pid, kb in self.hwm_kb.items() if not kinds or self.kind[pid] in kinds)
            / 1024
        )


def process_kind(pid: int, cmdline: bytes) -> str:
    if b"/.snakemake/scripts/" in cmdline:
        return "script"
    if Path(f"/proc/{pid}/comm").read_bytes().strip() == b"slurmstepd":
        return "slurmstepd"
    return "snakemake"  # both snakemake processes and the shells and srun around them


class CgroupWatch(threading.Thread):
    """Reads every SLURM job's memory cgroup every ``interval`` s until stopped."""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.interval, self.jobs, self.stopping = interval, {}, threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            for job_dir in (d for pattern in CGROUP_JOBS for d in Path("/").glob(pattern[1:])):
                with contextlib.suppress(OSError):  # the job ended between listing and reading
                    self.sample(job_dir, self.jobs.setdefault(job_dir.name[4:], JobMemory()))

    def sample(self, job_dir: Path, job: JobMemory) -> None:
        alive = []
        for procs in job_dir.rglob("cgroup.procs"):
            for pid in map(int, procs.read_text().split()):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    status = Path(f"/proc/{pid}/status").read_bytes()
                except OSError:  # it exited
                    continue
                if not (m := HWM.search(status)) or not cmdline:
                    continue  # a zombie: no memory, no command line
                if job.cmdline.get(int(PPID.search(status)[1])) == cmdline:
                    continue  # a fork not yet exec'd: its VmHWM counts its parent's pages
                if job.cmdline.get(pid) != cmdline:  # new, or it exec'd: count the new image
                    job.cmdline[pid], job.hwm_kb[pid] = cmdline, 0
                    job.kind[pid] = process_kind(pid, cmdline)
                job.hwm_kb[pid] = max(job.hwm_kb[pid], int(m[1]))
                alive.append(pid)
        job.peak_kb = max(job.peak_kb, sum(job.hwm_kb[pid] for pid in alive))
        for name in PEAK_FILES:
            if (job_dir / name).exists():
                job.cgroup_peak = max(job.cgroup_peak, int((job_dir / name).read_text()))
        for line in (job_dir / "memory.stat").read_text().splitlines():
            key, value = line.split()
            if key in ANON_FIELDS:
                job.anon_peak = max(job.anon_peak, int(value))
                break


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
    watch = CgroupWatch()
    watch.start()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=run, capture_output=True, text=True)
    wall = time.perf_counter() - start
    watch.stopping.set()
    watch.join()
    output = proc.stdout + proc.stderr
    (args.workdir / "snakemake.log").write_text(output)
    print(f"snakemake exit {proc.returncode} in {wall:.0f} s", flush=True)
    jobs = submitted_jobs(output)
    accounting = sacct([job_id for job_id, _rule, _wc in jobs])
    print(
        f"{'job':32} {'state':10} {'limit s':>7} {'wall s':>6} {'req MB':>6} {'sacct MB':>8} "
        f"{'peak MB':>7} {'req/sacct':>9} {'req/peak':>8} {'script':>6} {'smk':>5} "
        f"{'stepd':>5} {'cgroup':>6} {'anon':>5} {'model':>5} {'model/script':>12}"
    )
    ratios = []
    for job_id, rule, wildcards in jobs:
        rows = accounting[job_id]
        job_row = rows[0]
        measured = sum(to_mb(r["MaxRSS"]) for r in rows[1:])
        requested = to_mb(job_row["ReqMem"])
        est = estimated(run, rule, wildcards)
        model = est["peak_bytes"] / MB if est else float("nan")
        seen = watch.jobs.get(job_id, JobMemory())
        peak, script = seen.peak_kb / 1024, seen.mb("script")
        if est:
            ratios.append((requested / measured, requested / peak))
        print(
            f"{rule + ' ' + wildcards:32} {job_row['State']:10} {to_s(job_row['Timelimit']):7.0f} "
            f"{to_s(job_row['Elapsed']):6.0f} {requested:6.0f} {measured:8.0f} {peak:7.0f} "
            f"{requested / measured:9.2f} {requested / peak:8.2f} {script:6.0f} "
            f"{seen.mb('snakemake'):5.0f} {seen.mb('slurmstepd'):5.0f} "
            f"{seen.cgroup_peak / MB:6.0f} {seen.anon_peak / MB:5.0f} {model:5.0f} "
            f"{model / script if script and est else float('nan'):12.2f}"
        )
    detail = {
        job_id: {
            "processes": [
                {"kind": seen.kind[pid], "vmhwm_mb": round(kb / 1024, 1),
                 "cmd": seen.cmdline[pid].replace(b"\0", b" ").decode()[:200]}
                for pid, kb in seen.hwm_kb.items()
            ],
            "peak_mb": round(seen.peak_kb / 1024, 1),
            "cgroup_peak_mb": round(seen.cgroup_peak / MB, 1),
            "anon_peak_mb": round(seen.anon_peak / MB, 1),
        }
        for job_id, seen in watch.jobs.items()
    }  # fmt: skip
    (args.workdir / "cgroup_peaks.json").write_text(json.dumps(detail, indent=1))
    states = {accounting[j][0]["State"] for j, _r, _w in jobs}
    print(
        f"states: {sorted(states)}; request / sacct: {min(r[0] for r in ratios):.2f}-"
        f"{max(r[0] for r in ratios):.2f}; request / peak: {min(r[1] for r in ratios):.2f}-"
        f"{max(r[1] for r in ratios):.2f}"
    )


if __name__ == "__main__":
    main()
