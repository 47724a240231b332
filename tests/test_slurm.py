"""The demo on a real single-node SLURM cluster: memory requests come from the estimates.

Needs `bash tests/slurm/cluster.sh install && bash tests/slurm/cluster.sh start` (root); CI
does that and sets NSDZARR_REQUIRE_SLURM=1 so that these tests fail instead of skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, default_config, run_snakemake

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
# every submission; a rule without wildcards (stimuli) logs to rule_<rule>/<jobid>.log
SUBMITTED = re.compile(
    r"submitted with SLURM jobid (\d+) \(log: .*?/rule_(\w+?)/(?:([^/]*)/)?\d+\.log\)"
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _cluster_up() -> bool:
    return subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def slurm() -> None:
    """A running local cluster, started here if its packages are installed."""
    required = os.environ.get("NSDZARR_REQUIRE_SLURM") == "1"
    if not _cluster_up() and shutil.which("slurmctld") and os.geteuid() == 0:
        subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, timeout=180)
    if not _cluster_up():
        reason = "no local SLURM cluster (run: bash tests/slurm/cluster.sh install && ... start)"
        if required:
            pytest.fail(reason)
        pytest.skip(reason)


def sacct(job_ids: list[str]) -> dict[str, list[dict[str, str]]]:
    """Accounting rows per job id (the job line and its steps), polled until all are final."""
    fields = ["JobID", "State", "ReqMem", "MaxRSS", "Elapsed", "Timelimit"]
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run(
            ["sacct", "-P", "-n", "-j", ",".join(job_ids), "-o", ",".join(fields)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows: dict[str, list[dict[str, str]]] = {}
        for line in out.splitlines():
            row = dict(zip(fields, line.split("|"), strict=True))
            rows.setdefault(row["JobID"].split(".")[0], []).append(row)
        done = all(
            j in rows and not any(r["State"] in ("PENDING", "RUNNING") for r in rows[j])
            for j in job_ids
        )
        if done or time.monotonic() > deadline:
            return rows
        time.sleep(1)


def to_mb(value: str) -> float:
    """sacct memory ('1200M', '77712K', '2G') in MiB."""
    if not value:
        return 0.0
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}
    return float(value[:-1]) * units[value[-1]] if value[-1] in units else float(value) / 2**20


def to_s(value: str) -> float:
    """sacct duration ('[D-]HH:MM:SS', 'MM:SS', 'UNLIMITED') in seconds."""
    if value in ("", "UNLIMITED", "Partition_Limit"):
        return float("inf")
    days, _, clock = value.rpartition("-")
    parts = [float(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    return (float(days or 0) * 24 + parts[0]) * 3600 + parts[1] * 60 + parts[2]


def submitted_jobs(output: str) -> list[tuple[str, str, str]]:
    """(slurm job id, rule, wildcard string) of every submission in a Snakemake log."""
    return SUBMITTED.findall(output)


def estimated(workdir: Path, rule: str, wildcards: str) -> dict | None:
    """The estimate of that job (mem_mb, runtime_min) from its session's estimate file.

    ``wildcards`` is the plugin's log folder name, the values joined by "_" in the order of
    the output pattern: ``subj01_03``, or ``subj01_V1_03`` for roi_session (none for stimuli).
    """
    if rule == "stimuli":
        return json.loads((workdir / "results/stimuli/estimate.json").read_text())["jobs"][rule]
    if rule not in ("estimate", "convert", "roi_session"):
        return None
    subject, *roi, session = wildcards.split("_")
    est = json.loads((workdir / f"results/{subject}/estimates/session{session}.json").read_text())
    return est["jobs"][f"roi_session/{'_'.join(roi)}" if rule == "roi_session" else rule]


def run_on_slurm(workdir: Path, config: dict, *targets: str) -> str:
    proc = run_snakemake(
        workdir,
        "--workflow-profile",
        str(REPO / "profiles" / "slurm"),
        "--jobs",
        "2",
        *targets,
        config=config,
        timeout=1500,
    )
    return proc.stdout + proc.stderr


def test_demo_on_slurm_requests_the_estimates(slurm, tmp_path: Path):
    output = run_on_slurm(tmp_path, default_config())
    jobs = submitted_jobs(output)
    rules = {rule for _id, rule, _wc in jobs}
    assert {"estimate", "convert", "roi_session", "stimuli"} <= rules, output[-3000:]
    accounting = sacct([job_id for job_id, _rule, _wc in jobs])
    ratios = []
    for job_id, rule, wildcards in jobs:
        rows = accounting[job_id]
        job_row = rows[0]
        assert job_row["State"] == "COMPLETED", (rule, wildcards, rows)
        requested = to_mb(job_row["ReqMem"])
        expected = estimated(tmp_path, rule, wildcards)
        assert expected is not None, (rule, wildcards)  # every SLURM job has an estimate
        # the estimate job's own request, computed from the header, is the one it records
        assert requested == expected["mem_mb"], (rule, wildcards, requested, expected)
        # the time limit is the estimate's (runtime.factor 1, first attempt), and was kept
        assert to_s(job_row["Timelimit"]) == 60 * expected["runtime_min"], (rule, rows)
        assert to_s(job_row["Elapsed"]) <= to_s(job_row["Timelimit"]), (rule, rows)
        # COMPLETED, not OUT_OF_MEMORY: the cgroup, which counts each page once, stayed under the
        # request. sacct sums each step's processes' RSS, so a fork not yet exec'd counts its
        # parent twice (a stimuli batch step read 271 MB once, 150 MB usually): the sum is the
        # measure of the ratios below, not a bound
        steps_rss = [to_mb(r["MaxRSS"]) for r in rows[1:]]
        assert max(steps_rss) < requested, (rule, wildcards, rows)
        ratios.append(requested / sum(steps_rss))
    # requests close to what the jobs used: median <= 1.3x, none above 2x
    print("request / measured per job:", sorted(round(r, 2) for r in ratios))
    assert statistics.median(ratios) <= 1.3 and max(ratios) <= 2.0, ratios


def test_underestimate_is_killed_then_retried_with_more_memory(slurm, tmp_path: Path):
    config = {**default_config(), "memory": {"ceiling_mb": 16000, "factor": 0.5}}
    output = run_on_slurm(tmp_path, config, "results/subj01/betas/session01.zarr")
    jobs = [(j, w) for j, rule, w in submitted_jobs(output) if rule == "convert"]
    assert len(jobs) == 2, output[-3000:]
    accounting = sacct([j for j, _w in jobs])
    first, second = (accounting[j] for j, _w in jobs)
    assert any(r["State"] == "OUT_OF_MEMORY" for r in first), first
    assert second[0]["State"] == "COMPLETED", second
    assert to_mb(second[0]["ReqMem"]) == 2 * to_mb(first[0]["ReqMem"])
    assert (tmp_path / "results/subj01/betas/session01.zarr/zarr.json").exists()


# SLURM checks time limits every 30 s, so a 1-minute job is killed 60-90 s after it starts and
# a 2-minute one not before 120 s: a job that converts this long after its start (and takes
# ~1 s for it, then 3-8 s to end Snakemake in the job) outlives the first and fits the second.
JOB_DELAY_S = 96


def test_short_runtime_times_out_then_retried_with_more_time(
    slurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # runtime.factor 0.1: convert's 5-minute estimate becomes a 1-minute request
    config = {**default_config(), "runtime": {"factor": 0.1}}
    run_on_slurm(tmp_path, config, "results/subj01/estimates/session01.json")
    monkeypatch.setenv("NSDZARR_JOB_DELAY_S", str(JOB_DELAY_S))
    output = run_on_slurm(tmp_path, config, "results/subj01/betas/session01.zarr")
    jobs = [j for j, rule, _w in submitted_jobs(output) if rule == "convert"]
    assert len(jobs) == 2, output[-3000:]
    first, second = (sacct(jobs)[j][0] for j in jobs)
    assert first["State"] == "TIMEOUT", first
    assert to_s(first["Timelimit"]) == 60, first
    # killed at its limit or after it (sacct rounds to whole seconds: 00:01:00 is a kill)
    assert to_s(first["Elapsed"]) >= to_s(first["Timelimit"]), first
    assert second["State"] == "COMPLETED", second
    assert to_s(second["Timelimit"]) == 2 * to_s(first["Timelimit"]), second
    assert to_s(second["Elapsed"]) <= to_s(second["Timelimit"]), second
    betas = tmp_path / "results/subj01/betas"
    assert (betas / "session01.zarr/zarr.json").exists()
    assert sorted(p.name for p in betas.iterdir()) == ["session01.zarr"]  # no partial store
