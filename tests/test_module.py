"""The workflow included as a Snakemake module from another workflow's folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
import zarr
from conftest import REPO, default_config

pytestmark = pytest.mark.slow

CALLER = f"""
configfile: "config.yaml"


module nsdzarr:
    snakefile:
        "{REPO / "Snakefile"}"
    config:
        config


use rule * from nsdzarr as nsdzarr_*


rule all:
    default_target: True
    input:
        rules.nsdzarr_all.input,
"""


def test_demo_runs_through_the_module_from_another_folder(tmp_path: Path):
    (tmp_path / "Snakefile").write_text(CALLER)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(default_config()))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--quiet"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    store = zarr.open_group(tmp_path / "results/subj01/betas/session02.zarr", mode="r")
    src = next(tmp_path.glob("resources/demo_nsd/nsddata_betas/**/betas_session02.hdf5"))
    with h5py.File(src, "r") as f:
        np.testing.assert_array_equal(store["betas"][...], f["betas"][...])
    for roi in default_config()["rois"]:
        assert (tmp_path / f"results/subj01/roi/{roi}.zarr/zarr.json").is_file()
    assert (tmp_path / "results/summary/estimates.tsv").is_file()
