"""Estimates: metadata arithmetic, the memory model's choices, the summary, bad inputs."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nsdzarr.errors import InputError
from nsdzarr.nsd_facts import SESSIONS, VOLUMES_XYZ
from nsdzarr.prepare import layout, memory, runtime
from nsdzarr.prepare.demo import DemoSpec, write_betas_hdf5
from nsdzarr.prepare.estimate import estimate_from_metadata, write_session_estimate
from nsdzarr.prepare.hdf5_read import SessionReader
from nsdzarr.prepare.memory import (
    MB,
    READ_BUFFER_BYTES,
    SHARD_WORK_FACTOR,
    SNAKEMAKE_JOB_BYTES,
    budget_bytes,
    plan_conversion,
)
from nsdzarr.prepare.nsd import ASSUMED_COMPRESSION_RATIO, release_estimates, session_metadata
from nsdzarr.prepare.resources import estimate_job_mem_mb, estimate_job_runtime_min, job_runtime_min
from nsdzarr.prepare.runtime import session_job_minutes
from nsdzarr.prepare.storage import StorageSettings
from nsdzarr.prepare.summary import write_summary


def test_full_release_matches_the_arithmetic():
    rows = release_estimates("func1pt8mm")
    assert len(rows) == sum(SESSIONS.values()) == 284
    subj01 = [r for r in rows if r["subject"] == "subj01"]
    assert len(subj01) == 40
    assert subj01[0]["raw_bytes"] == 750 * 81 * 104 * 83 * 2  # ~1.05 GB a session
    assert subj01[0]["float32_bytes"] == 2 * subj01[0]["raw_bytes"]
    assert subj01[0]["source"]["shape"] == [750, 83, 104, 81]  # h5py order: NIfTI reversed
    assert subj01[0]["store_files"] == 15 + 4
    total = sum(r["raw_bytes"] for r in rows)
    expected = sum(
        n * 750 * x * y * z * 2
        for s, n in SESSIONS.items()
        for x, y, z in [VOLUMES_XYZ["func1pt8mm"][s]]
    )
    assert total == expected
    one_mm = release_estimates("func1mm")
    assert one_mm[0]["raw_bytes"] == 750 * 145 * 186 * 148 * 2  # ~6 GB a session


def test_ceiling_switches_large_sessions_to_bounded_slabs():
    rows = release_estimates("func1mm", ceiling_mb=4000)
    for row in rows:
        job = row["jobs"]["convert"]
        assert job["strategy"] == "slabs"
        assert job["mem_mb"] <= 4000
        assert job["peak_bytes"] <= budget_bytes(4000)
        assert job["in_memory_peak_bytes"] > job["peak_bytes"]
    small = release_estimates("func1pt8mm", ceiling_mb=16000)
    assert {r["jobs"]["convert"]["strategy"] for r in small} == {"in-memory"}


def test_plan_fits_any_budget_above_the_fixed_costs():
    shape = (750, 83, 104, 81)
    for budget_mb in (512, 800, 1200, 2000):
        plan = plan_conversion(shape, 2, 50, budget_mb * MB)
        assert plan.peak_bytes <= budget_mb * MB, (budget_mb, plan)
    assert plan_conversion(shape, 2, 50, None).strategy == "in-memory"


def test_a_ceiling_below_the_minimum_is_a_clear_error():
    with pytest.raises(InputError, match=r"memory.ceiling_mb 600 is below the \d+ MB"):
        release_estimates("func1pt8mm", ceiling_mb=600)


def test_a_1mm_session_needs_a_ceiling_of_one_shard_or_smaller_shards():
    meta = session_metadata("subj01", "func1mm")  # 750 x 148 x 186 x 145

    def convert(ceiling_mb: int, trials_per_shard: int = 50) -> dict:
        settings = StorageSettings(trials_per_shard=trials_per_shard)
        est = estimate_from_metadata(meta, settings, ASSUMED_COMPRESSION_RATIO, ceiling_mb)
        return est["jobs"]["convert"]

    # one plane's slab and two 50-trial shards (400 MB each) read back do not fit 1000 MB at 1 mm
    with pytest.raises(InputError, match=r"1000 is below the 1741 MB .*trials_per_shard"):
        convert(1000)
    assert convert(1741)["mem_mb"] <= 1741
    assert convert(1000, trials_per_shard=10)["strategy"] == "slabs"
    assert convert(1000, trials_per_shard=10)["mem_mb"] <= 1000


def test_readme_states_the_model_as_the_code_has_it():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    figures = re.findall(r"`(memory|runtime)\.([A-Z_]+)` \((\d+)( MB| MB/s| min)?\)", readme)
    named = {name for _module, name, _n, _unit in figures}
    assert {"SNAKEMAKE_JOB_BYTES", "BASELINE_BYTES", "READ_BUFFER_BYTES"} <= named, figures
    assert {"SESSION_BYTES_PER_S", "SESSION_SLOWDOWN", "MIN_RUNTIME_MIN"} <= named, figures
    for module, name, number, unit in figures:
        value = getattr({"memory": memory, "runtime": runtime}[module], name)
        assert value == int(number) * (MB if "MB" in unit else 1), (name, number, unit)
    one_mm = memory.slab_peak((750, 148, 186, 145), 2, 50, 1)
    assert f"at least {memory.request_mb(one_mm):,} MB" in readme


def test_session_estimate_from_the_demo(demo_root: Path, tmp_path: Path):
    spec = DemoSpec()
    source = layout.betas_path(demo_root, "subj01", spec.space, spec.beta_version, 1)
    roi = layout.roi_path(demo_root, "subj01", spec.space, "nsdgeneral.nii.gz")
    out = tmp_path / "session01.json"
    est = write_session_estimate(source, out, StorageSettings(), rois={"g": (str(roi), None)})
    assert json.loads(out.read_text()) == json.loads(json.dumps(est))
    assert est["raw_bytes"] == 750 * 16 * 24 * 20 * 2
    assert est["source"]["chunks"] == [750, 1, 1, 1] and est["source"]["filters"] == []
    assert 1 < est["compression_ratio"] < 10
    assert est["jobs"]["roi_session/g"]["voxels"] == 1022
    for job in est["jobs"].values():
        assert job["mem_mb"] * MB >= job["peak_bytes"] + SNAKEMAKE_JOB_BYTES


def test_bad_source_is_one_line_and_no_json(tmp_path: Path):
    source = tmp_path / "betas_session01.hdf5"
    source.write_bytes(b"\x00" * 4096)
    with pytest.raises(InputError) as err:
        write_session_estimate(source, tmp_path / "e.json", StorageSettings())
    assert str(err.value).startswith(str(source)) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["betas_session01.hdf5"]


@pytest.mark.slow  # a whole Snakemake run
def test_summary_from_the_demo_run(demo_run: Path, tmp_path: Path):
    estimates = sorted((demo_run / "results/subj01/estimates").glob("*.json"))
    benches = sorted((demo_run / "results/benchmarks").glob("*/*/*.tsv"))
    assert len(benches) == 3 * (1 + 1 + 2)  # estimate, convert and two ROIs, three sessions
    benches += [demo_run / "results/benchmarks/stimuli/stimuli.tsv"]
    stimuli = demo_run / "results/stimuli/estimate.json"
    write_summary(
        estimates, benches, tmp_path / "e.tsv", tmp_path / "e.md", tmp_path / "m.png",
        tmp_path / "r.png", stimuli_estimate=stimuli,
    )  # fmt: skip
    text = (tmp_path / "e.md").read_text()
    assert "## Stimulus images" in text and text.count("all stimuli -") == 1
    assert "| subj01 | 3 |" in text and "| all | 3 |" in text
    assert text.count("subj01 convert session") == 3
    assert text.count("subj01 estimate session") == 3  # the estimate job's own peak
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "e.tsv").read_text().splitlines()) == 4


def test_estimate_job_requests_scale_with_attempts_under_the_ceiling(tmp_path: Path):
    source = tmp_path / "betas_session01.hdf5"
    write_betas_hdf5(source, np.zeros((750, 6, 7, 8), dtype=np.int16))
    first = estimate_job_mem_mb(source)
    assert first > 0
    assert estimate_job_mem_mb(source, attempt=3) == 3 * first
    assert estimate_job_mem_mb(source, attempt=3, ceiling_mb=first + 1) == first + 1
    assert estimate_job_mem_mb(source, factor=2.0) > first  # the safety factor applies


def test_estimate_job_request_pays_for_h5py_in_its_snakemakes(tmp_path: Path):
    """The estimate rule's mem_mb callable loads h5py into each Snakemake process that
    evaluates it, the two inside the job included; its request covers both (resident memory,
    not the high-water mark: importing Snakemake's API peaks transiently above it)."""
    source = tmp_path / "betas_session01.hdf5"
    write_betas_hdf5(source, np.zeros((750, 6, 7, 8), dtype=np.int16))
    code = (
        "import snakemake.api, snakemake.dag, snakemake.workflow\n"
        "from nsdzarr.prepare.resources import estimate_job_mem_mb\n"
        "def rss(): return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])\n"
        "before = rss()\n"
        f"estimate_job_mem_mb({str(source)!r})\n"
        "print((rss() - before) * 1024)\n"  # kB: what stays loaded in that process
    )
    env = {**os.environ, "PYTHONPATH": str(Path(memory.__file__).parents[2])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    grown = int(out.stdout.strip() or -1)
    assert 0 < 2 * grown <= memory.SNAKEMAKE_HDF5_BYTES, (grown / MB, out.stderr[-500:])
    shape = (750, 6, 7, 8)
    assert estimate_job_mem_mb(source) == memory.request_mb(
        memory.estimate_peak(shape, 2) + memory.SNAKEMAKE_HDF5_BYTES
    )


def test_roi_shards_of_the_config_set_the_roi_jobs_memory(demo_root: Path, tmp_path: Path):
    spec = DemoSpec()
    source = layout.betas_path(demo_root, "subj01", spec.space, spec.beta_version, 1)
    rois = {"g": (str(layout.roi_path(demo_root, "subj01", spec.space, "nsdgeneral.nii.gz")), None)}
    peaks = {}
    for shard in (10, 750):
        roi_storage = StorageSettings(codec="blosc-lz4", level=5, trials_per_shard=shard)
        est = write_session_estimate(
            source, tmp_path / f"{shard}.json", StorageSettings(), rois=rois,
            roi_storage=roi_storage,
        )  # fmt: skip
        peaks[shard] = est["jobs"]["roi_session/g"]["peak_bytes"]
    # each shard's encoding work grows with its rows: 740 more trials of 1022 int16 voxels
    assert peaks[750] - peaks[10] == int(SHARD_WORK_FACTOR * 750 * 1022 * 2) - int(
        SHARD_WORK_FACTOR * 10 * 1022 * 2
    )


def test_one_read_buffer_for_the_reader_and_the_model(demo_root: Path):
    spec = DemoSpec()
    source = layout.betas_path(demo_root, "subj01", spec.space, spec.beta_version, 1)
    with SessionReader(source) as reader:
        assert reader.buffer_bytes == READ_BUFFER_BYTES


def test_runtime_requests_follow_the_estimate_the_factor_and_the_attempt(
    demo_root: Path, tmp_path: Path
):
    spec = DemoSpec()
    source = layout.betas_path(demo_root, "subj01", spec.space, spec.beta_version, 1)
    out = tmp_path / "session01.json"
    est = write_session_estimate(source, out, StorageSettings())
    minutes = est["jobs"]["convert"]["runtime_min"]
    assert minutes == session_job_minutes(est["raw_bytes"]) >= 1
    assert job_runtime_min(out, "convert") == minutes
    assert job_runtime_min(out, "convert", attempt=2, factor=3.0) == 2 * math.ceil(3 * minutes)
    # SLURM counts whole minutes: a tiny factor still asks one, and a retry asks one more
    assert job_runtime_min(out, "convert", attempt=1, factor=1e-6) == 1
    assert job_runtime_min(out, "convert", attempt=2, factor=1e-6) == 2
    assert (
        estimate_job_runtime_min(2.0, attempt=2) == 2 * est["jobs"]["estimate"]["runtime_min"] * 2
    )
    one_mm = release_estimates("func1mm", ceiling_mb=4000)[0]["jobs"]["convert"]["runtime_min"]
    assert one_mm > minutes  # a 6 GB session asks for more time than the demo's 11 MB
