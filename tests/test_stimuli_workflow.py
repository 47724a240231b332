"""The `stimuli` rule in real Snakemake runs: the demo's image store, settings, bad files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from conftest import run_snakemake
from test_reliability import (
    KEEP_GOING,
    assert_no_partial_output,
    assert_one_line_error,
    copy_release,
    output_of,
    release_config,
)

from nsdzarr.prepare import layout

pytestmark = pytest.mark.slow

STORE = "results/stimuli/images.zarr"


def _trial_ids(workdir: Path) -> np.ndarray:
    with open(workdir / "results/subj01/trials.tsv", newline="") as fh:
        return np.unique([int(r["nsd_id"]) for r in csv.DictReader(fh, delimiter="\t")])


def test_demo_builds_the_image_store_equal_to_its_source(demo_run: Path):
    group = zarr.open_group(demo_run / STORE, mode="r")
    src = layout.stimuli_path(demo_run / "resources/demo_nsd")
    with h5py.File(src, "r") as f:
        brick = f["imgBrick"][...]
    ids = group["nsd_id"][...]
    np.testing.assert_array_equal(ids, _trial_ids(demo_run))  # subset: trials
    images = group["images"][...]
    assert images.shape == (len(ids), *brick.shape[1:]) and brick.shape[1] != brick.shape[2]
    np.testing.assert_array_equal(images, brick[ids])
    assert group["images_4"].shape == (len(ids), 4, 4, 3)
    assert group.attrs["source"]["path"] == str(src.resolve())
    estimate = json.loads((demo_run / "results/stimuli/estimate.json").read_text())
    assert estimate["jobs"]["stimuli"]["mem_mb"] > 0
    assert (demo_run / "results/benchmarks/stimuli/stimuli.tsv").is_file()


def test_subset_all_and_disabled(tmp_path: Path, demo_root: Path):
    root = copy_release(demo_root, tmp_path)
    config = release_config(root, rois={}, stimuli={"subset": "all", "sizes": []})
    run_snakemake(tmp_path / "all", STORE, config=config)
    group = zarr.open_group(tmp_path / "all" / STORE, mode="r")
    with h5py.File(layout.stimuli_path(root), "r") as f:
        n = f["imgBrick"].shape[0]
        np.testing.assert_array_equal(group["images"][-5:], f["imgBrick"][n - 5 :])
    np.testing.assert_array_equal(group["nsd_id"][...], np.arange(n))
    assert sorted(group.array_keys()) == ["checksums", "images", "nsd_id"]
    off = release_config(root, rois={}, stimuli={"enabled": False})
    proc = run_snakemake(tmp_path / "off", "-n", "--quiet", "rules", config=off)
    assert "stimuli" not in proc.stdout


def _rewrite(path: Path, data: np.ndarray | None, name: str = "imgBrick") -> None:
    path.unlink()
    with h5py.File(path, "w") as f:
        if data is not None:
            f.create_dataset(name, data=data)


@pytest.mark.parametrize(
    ("break_it", "problem"),
    [
        ("missing", r"stimulus file not found"),
        ("no_brick", r"imgBrick"),
        ("ndim", r"dimensions|ndim|4-D|shape"),
        ("dtype", r"uint8"),
        ("too_few_rows", r"nsd_id \d+|rows"),
        ("not_hdf5", r"HDF5|hdf5"),
        ("truncated", r"truncated or corrupt"),
        ("corrupt_header", r"truncated or corrupt|not an HDF5 file|cannot be read"),
    ],
)
def test_bad_stimulus_file_is_one_line_and_leaves_nothing(
    tmp_path: Path, demo_root: Path, break_it: str, problem: str
):
    root = copy_release(demo_root, tmp_path)
    path = layout.stimuli_path(root)
    if break_it == "missing":
        path.unlink()
    elif break_it == "no_brick":
        _rewrite(path, np.zeros((10, 8, 6, 3), np.uint8), name="images")
    elif break_it == "ndim":
        _rewrite(path, np.zeros((10, 8, 18), np.uint8))
    elif break_it == "dtype":
        _rewrite(path, np.zeros((10, 8, 6, 3), np.float32))
    elif break_it == "too_few_rows":
        _rewrite(path, np.zeros((100, 8, 6, 3), np.uint8))
    elif break_it == "truncated":  # a copy cut short: half the images missing
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 2)
    elif break_it == "corrupt_header":  # the superblock's addresses and object headers zeroed
        raw = bytearray(path.read_bytes())
        raw[16:4096] = bytes(4096 - 16)
        path.write_bytes(bytes(raw))
    else:
        path.write_bytes(b"this is not an HDF5 file\n" * 100)
    config = release_config(root, rois={}, stimuli={"enabled": True})
    proc = run_snakemake(tmp_path / "work", *KEEP_GOING, config=config, check=False)
    out = output_of(proc)
    assert proc.returncode != 0, out[-3000:]
    assert_one_line_error(out, [path, path.resolve()], problem)
    assert_no_partial_output(tmp_path / "work", STORE)
