"""SLURM faults on the real local cluster: a job scancelled mid-write leaves no partial store.

Needs the cluster of ``tests/test_slurm.py`` (NSDZARR_REQUIRE_SLURM=1 makes its absence a
failure).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, default_config, snakemake_command
from test_faults import tree_files
from test_slurm import sacct, slurm  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STORE = "results/subj01/betas/session01.zarr"
JOB_LOG = "logs/subj01/convert/session01.log"
CONVERT = re.compile(r"submitted with SLURM jobid (\d+) \(log: .*?/rule_convert/")
SHARDS = 15  # 750 trials, 50 per shard
# The test-only pause after each shard: the job writes for ~SHARDS x 1.5 s, far longer than
# SLURM's KillWait (5 s, tests/slurm/cluster.sh) between scancel's SIGTERM and its SIGKILL.
SHARD_DELAY_S = 1.5


def shard_files(tmp: Path) -> list[Path]:
    """The shard files of the ``betas`` array of an unfinished store."""
    return [p for p in (tmp / "betas" / "c").rglob("*") if p.is_file()]


def test_scancel_mid_write_leaves_no_partial_store(
    slurm,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    """scancel once the convert job has written its first shard beside the target: the job
    dies with some but not all shards written, no store is in place, and the same command
    again removes the scratch and builds a store byte-identical to an undisturbed run's.

    The SLURM plugin (2.8.0) waits forever on a job whose sacct state is ``CANCELLED by
    <uid>``, so, as the README says, Ctrl-C and the same command again."""
    monkeypatch.setenv("NSDZARR_SHARD_DELAY_S", str(SHARD_DELAY_S))
    profile = ("--workflow-profile", str(REPO / "profiles" / "slurm"), "--jobs", "1")
    cmd, env = snakemake_command(tmp_path, default_config(), *profile, STORE)
    log = tmp_path / "snakemake.out"
    store = tmp_path / STORE
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        job, tmp = None, []
        while time.monotonic() < deadline and proc.poll() is None:
            found = CONVERT.search(log.read_text())
            job = job or (found and found[1])
            tmp = list(store.parent.glob(f".{store.name}.incomplete-*"))
            if job and tmp and shard_files(tmp[0]):
                break  # the convert job is writing shards beside the target
            time.sleep(0.05)
        else:
            pytest.fail(f"no convert job caught mid-write:\n{log.read_text()[-3000:]}")
        subprocess.run(["scancel", job], check=True)
        at_cancel = len(shard_files(tmp[0]))
        cancelled_at = time.monotonic()
        while sacct([job])[job][0]["State"] in ("PENDING", "RUNNING", "COMPLETING"):
            time.sleep(0.5)
        assert sacct([job])[job][0]["State"].startswith("CANCELLED"), sacct([job])
        ended_after = time.monotonic() - cancelled_at
        time.sleep(2 * SHARD_DELAY_S)  # a writer that survived would write more shards by now
        # evidence that the kill landed mid-write: the job's own log and its unfinished store
        written = len(shard_files(tmp[0]))
        job_log = (tmp_path / JOB_LOG).read_text()
        logged = len(re.findall(r"wrote shard \d+/15", job_log))
        print(f"shards at scancel {at_cancel}, at the end {written}/{SHARDS}, logged {logged};")
        print(f"job ended {ended_after:.1f} s after scancel")
        assert 0 < written < SHARDS and logged < SHARDS, (at_cancel, written, job_log)
        assert "convert_session done" not in job_log, job_log
        assert not store.exists(), "a partial store in place"
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the plugin scancels its jobs
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    env.pop("NSDZARR_SHARD_DELAY_S")
    if proc.returncode != 0:  # the README's way on: the same command again (without the pause)
        rerun = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )
        assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert not tmp[0].exists() and not list(tmp_path.joinpath("results").rglob(".*.incomplete-*"))
    got = tree_files(store)
    # an undisturbed run of the same job, on this host, gives the same bytes
    local, _ = snakemake_command(tmp_path, default_config(), "--forcerun", "convert", STORE)
    subprocess.run(local, cwd=tmp_path, env=env, capture_output=True, timeout=600, check=True)
    assert got == tree_files(store) and len(got) > SHARDS
