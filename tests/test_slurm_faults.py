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
CONVERT = re.compile(r"submitted with SLURM jobid (\d+) \(log: (\S*?/rule_convert/\S*?\.log)\)")
SHARDS = 15  # 750 trials, 50 per shard
# The test-only pause after each shard: the job writes for ~SHARDS x 1.5 s, far longer than
# SLURM's KillWait (5 s, tests/slurm/cluster.sh) between scancel's SIGTERM and its SIGKILL.
SHARD_DELAY_S = 1.5


def shard_files(folder: Path) -> list[Path]:
    """The shard files of the ``betas`` array of a store folder."""
    return [p for p in (folder / "betas" / "c").rglob("*") if p.is_file()]


def being_written(store: Path) -> Path | None:
    """The folder that has shards of ``store``: its temporary sibling (or the target itself)."""
    for folder in [*store.parent.glob(f".{store.name}.incomplete-*"), store]:
        if shard_files(folder):
            return folder
    return None


@pytest.mark.parametrize("status", ["sacct", "squeue"])
def test_scancel_mid_write_leaves_no_partial_store(
    slurm,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    status: str,
):
    """scancel once the convert job has written its first shard beside the target: the job
    dies with some but not all shards written, no store is in place, and the run goes on to
    a store byte-identical to an undisturbed run's, the scratch removed.

    With the profile's status command, sacct, the SLURM plugin (2.8.0) waits forever on a job
    whose state is ``CANCELLED by <uid>``: as the README says, Ctrl-C and the same command
    again. With ``slurm-status-command: squeue`` (state ``CANCELLED``) the plugin sees the
    failure and the same run retries the job to the end."""
    monkeypatch.setenv("NSDZARR_SHARD_DELAY_S", str(SHARD_DELAY_S))
    profile = ("--workflow-profile", str(REPO / "profiles" / "slurm"), "--jobs", "1")
    profile += ("--slurm-status-command", status)
    cmd, env = snakemake_command(tmp_path, default_config(), *profile, STORE)
    log = tmp_path / "snakemake.out"
    store = tmp_path / STORE
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        found = writing = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = found or CONVERT.search(log.read_text())
            if found and (writing := being_written(store)):
                break  # the convert job is writing shards (beside the target)
            time.sleep(0.05)
        else:
            pytest.fail(f"no convert job caught mid-write:\n{log.read_text()[-3000:]}")
        job, job_log = found[1], tmp_path / found[2]  # SLURM's log of this job: its stderr
        subprocess.run(["scancel", job], check=True)
        at_cancel = len(shard_files(writing))
        cancelled_at = time.monotonic()
        while sacct([job])[job][0]["State"] in ("PENDING", "RUNNING", "COMPLETING"):
            time.sleep(0.5)
        assert sacct([job])[job][0]["State"].startswith("CANCELLED"), sacct([job])
        # sacct says CANCELLED at once, but the job's processes live on until SLURM's SIGKILL
        # (KillWait after the SIGTERM, which the job's Snakemake outlives): squeue lists the
        # job (COMPLETING) until then
        while subprocess.run(["squeue", "-h", "-j", job], capture_output=True).stdout.strip():
            time.sleep(0.2)
        ended_after = time.monotonic() - cancelled_at
        # evidence that the kill landed mid-write: the unfinished store and the job's log
        written = len(shard_files(writing))
        time.sleep(2 * SHARD_DELAY_S)  # a writer that survived would write more shards by now
        assert not writing.exists() or len(shard_files(writing)) == written  # (or a retry's
        # job removed the stale temporary)
        text = job_log.read_text()
        logged = len(re.findall(rf"wrote shard \d+/{SHARDS}", text))
        print(f"shards at scancel {at_cancel}, when the job ended {written}/{SHARDS},", end=" ")
        print(f"logged {logged}; the job ended {ended_after:.1f} s after scancel")
        assert 0 < written < SHARDS and 0 < logged < SHARDS, (at_cancel, written, text)
        assert "CANCELLED AT" in text and "convert_session done" not in text, text
        assert not store.exists(), "a partial store in place"
        try:  # squeue: the retry writes for SHARDS x SHARD_DELAY_S
            proc.wait(timeout=30 if status == "sacct" else 300)
        except subprocess.TimeoutExpired:
            assert status == "sacct", log.read_text()[-3000:]
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
    if status == "squeue":
        assert proc.returncode == 0, log.read_text()[-3000:]
        assert len(CONVERT.findall(log.read_text())) == 2  # cancelled, then retried
    env.pop("NSDZARR_SHARD_DELAY_S")
    if proc.returncode != 0:  # the README's way on: the same command again (without the pause)
        rerun = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )
        assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert writing == store or not writing.exists()  # scratch removed
    assert not list(tmp_path.joinpath("results").rglob(".*.incomplete-*"))
    got = tree_files(store)
    # an undisturbed run of the same job, on this host, gives the same bytes
    local, _ = snakemake_command(tmp_path, default_config(), "--forcerun", "convert", STORE)
    subprocess.run(local, cwd=tmp_path, env=env, capture_output=True, timeout=600, check=True)
    assert got == tree_files(store) and len(got) > SHARDS
