"""A user's own config decides, and never destroys data: the demo, defaults, mixed releases.

Runs the workflow the way users do: the checkout's Snakefile with their own ``--configfile``
(or none at all, from a copy of the checkout) on a release folder that the demo did not make.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
import zarr
from conftest import REPO, run_snakemake

from nsdzarr.prepare.demo import DemoSpec, write_demo
from nsdzarr.prepare.provenance import DEMO_MARKER, demo_marker

pytestmark = pytest.mark.slow


def _checksums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def user_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real-layout release the demo did not make (no marker): the user's only copy."""
    root = tmp_path_factory.mktemp("my_nsd")
    write_demo(root, DemoSpec(seed=7))
    demo_marker(root).unlink()
    return root


@pytest.fixture(scope="module")
def minimal_run(tmp_path_factory: pytest.TempPathFactory, user_release: Path):
    """A full run with only the two required keys; returns (workdir, checksums before)."""
    before = _checksums(user_release)
    workdir = tmp_path_factory.mktemp("minimal")
    run_snakemake(workdir, config={"nsd_root": str(user_release), "subjects": ["subj01"]})
    return workdir, before


def _one_line_error(proc: subprocess.CompletedProcess, path: Path, problem: str) -> None:
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if problem in line]
    assert lines, proc.stderr[-3000:]
    assert str(path) in lines[0], lines[0]


def test_demo_true_refuses_a_release_it_did_not_make(tmp_path: Path, user_release: Path):
    before = _checksums(user_release)
    config = {"nsd_root": str(user_release), "subjects": ["subj01"], "demo": True}
    proc = run_snakemake(tmp_path, config=config, check=False)
    _one_line_error(proc, user_release, "refusing to write the demo release")
    assert _checksums(user_release) == before
    assert not (tmp_path / "results").exists(), "jobs ran although the config was refused"


@pytest.mark.parametrize("demo", [None, False])
def test_user_release_is_never_written(tmp_path: Path, user_release: Path, demo, minimal_run):
    if demo is None:
        workdir, before = minimal_run  # demo left out: the documented default (false)
    else:
        before = _checksums(user_release)
        workdir = tmp_path
        config = {"nsd_root": str(user_release), "subjects": ["subj01"], "demo": demo}
        run_snakemake(workdir, config=config)
    assert _checksums(user_release) == before
    assert not (user_release / DEMO_MARKER).exists()
    assert (workdir / "results/subj01/betas/session03.zarr/zarr.json").is_file()


def test_minimal_config_builds_exactly_what_it_names(minimal_run):
    workdir, _before = minimal_run
    made = sorted(
        str(p.relative_to(workdir / "results"))
        for p in (workdir / "results").glob("*/*")
        if p.parent.name != "benchmarks"
    )
    assert made == [
        "stimuli/estimate.json",  # the release has nsd_stimuli.hdf5: stimuli.enabled is auto
        "stimuli/images.zarr",
        "subj01/betas",
        "subj01/estimates",
        "subj01/images.tsv",
        "subj01/trials.json",
        "subj01/trials.tsv",
        "summary/estimates.md",
        "summary/estimates.tsv",
        "summary/memory_requested_vs_measured.png",
        "summary/runtime_requested_vs_measured.png",
        "summary/subj01_store_sizes.png",
        "summary/subj01_trial_counts.png",
    ]
    stores = sorted(p.name for p in (workdir / "results/subj01/betas").iterdir())
    assert stores == ["session01.zarr", "session02.zarr", "session03.zarr"]


def _planned_rules(workdir: Path, config: dict) -> dict[str, int]:
    proc = run_snakemake(workdir, "-n", "--quiet", "rules", config=config)
    counts = {}
    for line in proc.stdout.splitlines():
        if m := re.match(r"^(\w+)\s+(\d+)$", line.strip()):
            counts[m[1]] = int(m[2])
    return counts


def test_user_rois_replace_the_shipped_ones(tmp_path: Path, user_release: Path):
    base = {"nsd_root": str(user_release), "subjects": ["subj01"]}
    none = _planned_rules(tmp_path / "a", {**base, "rois": {}})
    assert "roi_store" not in none and "roi_session" not in none
    only_v1 = {**base, "rois": {"V1": {"file": "prf-visualrois.nii.gz", "labels": [1, 2]}}}
    planned = _planned_rules(tmp_path / "b", only_v1)
    assert planned["roi_store"] == 1 and planned["roi_session"] == 3


def test_results_of_another_release_are_refused(minimal_run, tmp_path: Path):
    workdir, _before = minimal_run
    results_before = _checksums(workdir / "results")
    other = tmp_path / "other_release"
    config = {"nsd_root": str(other), "subjects": ["subj01"], "demo": True}
    proc = run_snakemake(workdir, "-n", config=config, check=False)
    _one_line_error(proc, Path("results/subj01"), "not from")
    assert str(other) in proc.stdout + proc.stderr
    assert _checksums(workdir / "results") == results_before
    assert not other.exists(), "the demo was generated although the run was refused"


def test_bare_snakemake_in_a_checkout_runs_the_demo(tmp_path: Path):
    """The quickstart: `snakemake` with no arguments from a copy of the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    checkout = tmp_path / "checkout"
    for rel in listed:
        if (REPO / rel).is_file():
            (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, checkout / rel)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--quiet"],
        cwd=checkout, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(checkout / "src")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    shipped = yaml.safe_load((REPO / "config/config.yaml").read_text())
    assert (checkout / shipped["nsd_root"] / DEMO_MARKER).is_file()
    for roi in shipped["rois"]:
        assert (checkout / f"results/subj01/roi/{roi}.zarr/zarr.json").is_file()


def test_stores_open_in_zarr_python_without_warnings(demo_run: Path):
    stores = sorted(demo_run.glob("results/*/betas/*.zarr")) + sorted(
        demo_run.glob("results/*/roi/*.zarr")
    )
    assert len(stores) >= 5
    assert not list((demo_run / "results").rglob(".snakemake_timestamp"))
    for store in stores:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            group = zarr.open_group(store, mode="r")
            assert dict(group.members())
    # the per-session ROI parts stay (documented): rebuilding one session rebuilds its part only
    assert len(list((demo_run / "results").glob("*/roi/*.parts/session*.zarr"))) == 6


def _schema_defaults() -> dict[str, object]:
    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())
    out = {}
    for key, prop in schema["properties"].items():
        if prop.get("type") == "object" and "properties" in prop:
            for sub, subprop in prop["properties"].items():
                out[f"{key}.{sub}"] = subprop.get("default", "required")
        else:
            out[key] = prop.get("default", "required")
    return out


def test_readme_key_table_matches_the_schema():
    text = (REPO / "README.md").read_text()
    table = text.split("Config keys")[1].split("\n\n")[1]
    documented = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        key = cells[0].strip("`")
        default = cells[1]
        documented[key] = (
            "required" if "required" in default else yaml.safe_load(default.strip("`"))
        )
    assert documented == _schema_defaults()
