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
from test_slurm import sacct, slurm  # noqa: F401 (the fixture)

from nsdzarr.prepare.check import check_store

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STORE = "results/subj01/betas/session01.zarr"
CONVERT = re.compile(r"submitted with SLURM jobid (\d+) \(log: .*?/rule_convert/")


def test_scancel_mid_write_leaves_no_partial_store(slurm, tmp_path: Path):  # noqa: F811
    """The job is cancelled while its store is written beside the target: the target is then
    absent or complete (the job's own Snakemake lets a running script finish on SIGTERM),
    never partial. The SLURM plugin waits forever on a job whose state is ``CANCELLED by
    <uid>`` (seen here), so, as the README says, Ctrl-C and the same command again: that run
    ends with a complete, verified store and no scratch left."""
    profile = ("--workflow-profile", str(REPO / "profiles" / "slurm"), "--jobs", "1")
    cmd, env = snakemake_command(tmp_path, default_config(), *profile, STORE)
    log = tmp_path / "snakemake.out"
    store = tmp_path / STORE
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        job = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = CONVERT.search(log.read_text())
            job = job or (found and found[1])
            if job and list(store.parent.glob(f".{store.name}.incomplete-*")):
                break  # the convert job is writing its store beside the target
            time.sleep(0.01)
        else:
            pytest.fail(f"no convert job caught mid-write:\n{log.read_text()[-3000:]}")
        subprocess.run(["scancel", job], check=True)
        while sacct([job])[job][0]["State"] in ("PENDING", "RUNNING", "COMPLETING"):
            time.sleep(0.5)
        assert sacct([job])[job][0]["State"].startswith("CANCELLED"), sacct([job])
        assert not store.exists() or check_store(store) == [], "a partial store in place"
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:  # the run did not go on by itself: the README's rerun
        rerun = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )
        assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert check_store(store) == []  # complete, every checksum right
    assert not list(tmp_path.joinpath("results").rglob(".*.incomplete-*"))
