"""The workflow itself: the demo end to end, lint, config validation, other NSD roots."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from conftest import REPO, default_config, run_snakemake

pytestmark = pytest.mark.slow


def test_demo_produces_every_promised_output(demo_run: Path):
    for session in (1, 2, 3):
        store = demo_run / f"results/subj01/betas/session{session:02d}.zarr"
        assert (store / "zarr.json").exists()
        betas = zarr.open_group(store, mode="r")["betas"]
        assert betas.shape == (750, 16, 24, 20) and betas.dtype == np.int16
        src = demo_run / (
            "resources/demo_nsd/nsddata_betas/ppdata/subj01/func1pt8mm/"
            f"betas_fithrf_GLMdenoise_RR/betas_session{session:02d}.hdf5"
        )
        with h5py.File(src, "r") as f:
            np.testing.assert_array_equal(betas[...], f["betas"][...])
        est = json.loads(
            (demo_run / f"results/subj01/estimates/session{session:02d}.json").read_text()
        )
        assert est["raw_bytes"] == 750 * 16 * 24 * 20 * 2
    for name in ("trials.tsv", "trials.json", "images.tsv"):
        assert (demo_run / "results/subj01" / name).stat().st_size > 0
    rows = (demo_run / "results/subj01/trials.tsv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 750


def test_lint_is_clean(tmp_path: Path):
    proc = run_snakemake(tmp_path, "--lint", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Lints for" not in out, out


def _dry_run(tmp_path: Path, config: dict):
    return run_snakemake(tmp_path, "-n", "--quiet", "rules", config=config, check=False)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"colour": "blue"}, r"Additional properties are not allowed \('colour' was unexpected\)"),
        ({"subjects": "subj01"}, r"'subj01' is not of type 'array'"),
        ({"subjects": ["subject1"]}, r"'subject1' does not match"),
        ({"storage": {"trials_per_shard": 40}}, r"40 is not one of"),
        ({"rois": {"bad/name": {"file": "x.nii.gz"}}}, r"'bad/name' does not match"),
        ({"rois": {"v1": {"file": "../x.nii.gz"}}}, r"'../x.nii.gz' does not match"),
        ({"memory": {"factor": "big"}}, r"'big' is not of type 'number'"),
    ],
)
def test_schema_rejects_bad_config(tmp_path: Path, change: dict, expected: str):
    config = {**default_config(), **change}
    proc = _dry_run(tmp_path, config)
    assert proc.returncode != 0
    assert re.search(expected, proc.stdout + proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "results").exists()


def test_schema_requires_nsd_root(tmp_path: Path):
    config = default_config()
    del config["nsd_root"]
    proc = _dry_run(tmp_path, config)
    assert proc.returncode != 0
    assert "'nsd_root' is a required property" in proc.stdout + proc.stderr


def test_schema_fills_defaults(tmp_path: Path, demo_root: Path):
    config = {"nsd_root": str(demo_root), "subjects": ["subj01"]}
    proc = run_snakemake(tmp_path, "-n", config=config)
    assert "convert" in proc.stdout
    assert "trials_per_chunk" not in proc.stderr


def _planned_jobs(stdout: str) -> dict[str, int]:
    """The job-count table a dry run prints: rule -> count."""
    table = stdout[stdout.index("Job stats:") :]
    return {
        m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"
    }


def test_real_layout_root_plans_the_same_jobs(tmp_path: Path, demo_root: Path):
    demo_plan = _planned_jobs(run_snakemake(tmp_path / "demo", "-n").stdout)
    copy = tmp_path / "NSD"
    shutil.copytree(demo_root, copy)
    config = {**default_config(), "nsd_root": str(copy), "demo": False}
    other_plan = _planned_jobs(run_snakemake(tmp_path / "other", "-n", config=config).stdout)
    demo_plan.pop("demo_dataset")
    assert other_plan == demo_plan
    # `sessions: all` follows the files present
    (
        copy
        / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session03.hdf5"
    ).unlink()
    fewer = _planned_jobs(run_snakemake(tmp_path / "fewer", "-n", config=config).stdout)
    assert fewer["convert"] == demo_plan["convert"] - 1


def test_missing_root_is_one_clear_line(tmp_path: Path):
    config = {**default_config(), "nsd_root": str(tmp_path / "nowhere"), "demo": False}
    proc = run_snakemake(tmp_path, "-n", config=config, check=False)
    assert proc.returncode != 0
    folder = "nowhere/nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    assert f"{folder}: betas folder not found" in proc.stdout + proc.stderr


def test_readme_quickstart_matches_ci():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```(?:bash)?\n(.*?)```", readme, re.S)
    assert block, "README has a Quickstart code block"
    commands = [line for line in block[1].splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert commands[1] in (REPO / ".ci" / "run").read_text()


def test_report_includes_the_memory_plot(demo_run: Path):
    run_snakemake(demo_run, "--report", "report.html")
    html = (demo_run / "report.html").read_text(errors="replace")
    assert "memory_requested_vs_measured.png" in html


def test_loader_reads_the_workflow_roi_store_like_the_source(demo_run: Path):
    import nibabel as nib
    import torch

    from nsdzarr.training.loader import BetasDataset

    store = demo_run / "results/subj01/roi/nsdgeneral.zarr"
    ds = BetasDataset(store, split="all")
    assert len(ds) == 3 * 750
    atlas = np.asarray(
        nib.load(
            demo_run / "resources/demo_nsd/nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz"
        ).dataobj
    )
    src = demo_run / (
        "resources/demo_nsd/nsddata_betas/ppdata/subj01/func1pt8mm/"
        "betas_fithrf_GLMdenoise_RR/betas_session02.hdf5"
    )
    with h5py.File(src, "r") as f:
        volume = f["betas"][17]
    item = ds[750 + 17]
    assert item["session"] == 2 and item["trial"] == 750 + 17
    expected = torch.from_numpy(volume.T[atlas >= 1].astype(np.float32))  # MindEye order
    assert torch.equal(item["betas"], expected)


def test_roi_added_after_deleting_the_hdf5s_comes_from_the_session_stores(
    tmp_path: Path, demo_root: Path
):
    from nsdzarr.prepare.roi import extract_session, finish_store
    from nsdzarr.prepare.storage import StorageSettings

    release = tmp_path / "NSD"
    shutil.copytree(demo_root, release)
    rois = default_config()["rois"]
    config = {**default_config(), "nsd_root": str(release), "demo": False}
    config["rois"] = {"nsdgeneral": rois["nsdgeneral"]}
    work = tmp_path / "work"
    run_snakemake(work, config=config)
    before = {p: p.stat().st_mtime_ns for p in (work / "results").rglob("*") if p.is_file()}
    kept = tmp_path / "kept"
    betas = release / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    shutil.move(betas, kept)  # the user deletes every HDF5 and keeps the session stores
    betas.mkdir()
    config["rois"] = rois  # and adds V1
    planned = _planned_jobs(run_snakemake(work, "-n", config=config).stdout)
    # the estimates are redone from the stores (they now size V1's jobs); nothing converts
    # and the QC figures of the stores and ROIs (V1's own, and the drift over both ROIs)
    assert planned == {
        "all": 1, "estimate": 3, "roi_session": 3, "roi_store": 1, "estimate_summary": 1,
        "qc_stores": 1, "qc_drift": 1, "qc_reliability": 1,
    }, planned  # fmt: skip
    run_snakemake(work, config=config)
    after = {p: p.stat().st_mtime_ns for p in (work / "results").rglob("*") if p.is_file()}
    changed = {
        p.relative_to(work / "results").parts[:3] for p in before if after.get(p) != before[p]
    }
    assert {c for c in changed if c[1] in ("betas", "roi")} == set(), changed
    # the V1 store equals one made from the HDF5s
    v1 = rois["V1"]
    mask = release / "nsddata/ppdata/subj01/func1pt8mm/roi" / v1["file"]
    parts = []
    for s in (1, 2, 3):
        parts.append(tmp_path / f"ref/part{s}.zarr")
        extract_session(
            kept / f"betas_session{s:02d}.hdf5", mask, v1["labels"],
            work / "results/subj01/trials.tsv", s, parts[-1], StorageSettings.from_config(
                default_config()["roi_storage"]),
        )  # fmt: skip
    ref = tmp_path / "ref/V1.zarr"
    finish_store(
        parts, [1, 2, 3], mask, v1["labels"], ref,
        StorageSettings.from_config(default_config()["roi_storage"]),
    )  # fmt: skip
    got, want = (
        zarr.open_group(work / "results/subj01/roi/V1.zarr", mode="r"),
        zarr.open_group(ref, mode="r"),
    )
    for name in ("betas", "voxels", "label", "mean", "std"):
        np.testing.assert_array_equal(got[name][...], want[name][...], err_msg=name)
    assert dict(got.attrs) == dict(want.attrs)
    # and the session stores are still what the HDF5s held
    with h5py.File(kept / "betas_session02.hdf5", "r") as f:
        np.testing.assert_array_equal(
            zarr.open_group(work / "results/subj01/betas/session02.zarr")["betas"][...],
            f["betas"][...],
        )
