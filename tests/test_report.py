"""The QC report: split-half reliability on hand-made data, every figure made and embedded."""

from __future__ import annotations

import base64
import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from conftest import run_snakemake

from nsdzarr.nsd_facts import TRIALS_PER_SESSION
from nsdzarr.prepare.qc import (
    pair_correlation,
    repeat_pairs,
    roi_reliability,
    session_ranges,
    write_reliability_nifti,
)

N_IMAGES = 12


def _write_trials(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(
            fh, ["session", "trial_in_session", "nsd_id", "repeat", "split"], delimiter="\t"
        )
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def tiny_store(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A 2-session, 4-voxel ROI store whose 12 images are shown once in each session.

    Returns (store, trials.tsv, first presentations, second presentations) in PSC units
    before the session z-scoring: voxel 0 second = 2 x first + 1, voxel 1 second = -first,
    voxel 2 unrelated values, voxel 3 constant in the second presentation.
    """
    rng = np.random.default_rng(0)
    betas = rng.integers(-900, 900, (2 * TRIALS_PER_SESSION, 4)).astype(np.int16)
    first = rng.integers(-300, 300, (N_IMAGES, 4)).astype(np.int16)
    second = np.stack(
        [
            2 * first[:, 0] + 1,
            -first[:, 1],
            rng.integers(-300, 300, N_IMAGES),
            np.full(N_IMAGES, 7),
        ],
        axis=1,
    ).astype(np.int16)
    # first showings scattered in session 1, second ones in session 2 in another order
    slots1 = rng.permutation(TRIALS_PER_SESSION)[:N_IMAGES]
    slots2 = rng.permutation(TRIALS_PER_SESSION)[:N_IMAGES]
    betas[slots1] = first
    betas[TRIALS_PER_SESSION + slots2] = second
    rows = [
        {"session": s, "trial_in_session": t, "nsd_id": s * 1000 + t, "repeat": 0, "split": "train"}
        for s in (1, 2)
        for t in range(TRIALS_PER_SESSION)
    ]
    for image, (t1, t2) in enumerate(zip(slots1, slots2, strict=True)):
        rows[t1] |= {"nsd_id": image, "repeat": 0}
        rows[TRIALS_PER_SESSION + t2] |= {"nsd_id": image, "repeat": 1}
    # a third showing in session 2 and a session outside the store are never paired
    free1 = int(np.setdiff1d(np.arange(TRIALS_PER_SESSION), slots1)[0])
    free2 = int(np.setdiff1d(np.arange(TRIALS_PER_SESSION), slots2)[0])
    rows[TRIALS_PER_SESSION + free2] |= {"nsd_id": 0, "repeat": 2}
    rows.append(
        {"session": 3, "trial_in_session": 0, "nsd_id": 1000 + free1, "repeat": 1, "split": "train"}
    )
    trials = tmp_path / "trials.tsv"
    _write_trials(trials, rows)
    store = tmp_path / "roi.zarr"
    group = zarr.open_group(store, mode="w", zarr_format=3)
    group.create_array("betas", data=betas, chunks=(TRIALS_PER_SESSION, 4))
    group.create_array("mean", data=np.array([[10, -20, 0, 5], [3, 4, -5, 6]], np.float32))
    group.create_array("std", data=np.array([[100, 200, 50, 80], [90, 70, 60, 40]], np.float32))
    voxels = np.array([[1, 2, 3], [2, 2, 3], [4, 0, 1], [0, 1, 2]], np.int32)
    group.create_array("voxels", data=voxels)
    group.attrs.update(
        {
            "sessions": [1, 2],
            "scale": 300,
            "shape_nifti_xyz": [5, 3, 4],
            "affine": np.diag([1.8, 1.8, 1.8, 1.0]).tolist(),
        }
    )
    return store, trials, first.astype(float), second.astype(float)


def test_repeat_pairs_pairs_first_and_second_showing_of_each_image(tiny_store):
    store, trials, first, second = tiny_store
    rows0, rows1 = repeat_pairs(trials, [1, 2])
    assert len(rows0) == len(rows1) == N_IMAGES
    betas = zarr.open_group(store, mode="r")["betas"][...]
    np.testing.assert_array_equal(betas[rows0], first)
    np.testing.assert_array_equal(betas[rows1], second)
    # only session 2 configured: no image has both showings
    assert len(repeat_pairs(trials, [2])[0]) == 0


def test_reliability_is_the_correlation_of_first_and_second_showing(tiny_store):
    store, trials, first, second = tiny_store
    r, n = roi_reliability(store, trials)
    assert n == N_IMAGES
    assert r.shape == (4,) and r.dtype == np.float32
    assert r[0] == pytest.approx(1.0, abs=1e-6)
    assert r[1] == pytest.approx(-1.0, abs=1e-6)
    expected = np.corrcoef(first[:, 2], second[:, 2])[0, 1]
    assert abs(expected) > 0.05  # a value the test can tell apart from 0
    assert r[2] == pytest.approx(expected, abs=1e-5)
    assert np.isnan(r[3])  # constant second presentation: undefined, not 0


def test_reliability_blocks_give_the_same_value():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 6))
    y = 0.5 * x + rng.standard_normal((40, 6))
    data = np.concatenate([x, y])
    first, second = np.arange(40), np.arange(40, 80)
    whole = pair_correlation(lambda rows: data[rows], first, second, 6)
    blocked = pair_correlation(lambda rows: data[rows], first, second, 6, block=7)
    expected = [np.corrcoef(x[:, v], y[:, v])[0, 1] for v in range(6)]
    np.testing.assert_allclose(whole, expected, atol=1e-6)
    np.testing.assert_allclose(blocked, expected, atol=1e-6)


def test_reliability_memory_stays_at_a_few_blocks_whatever_the_roi(tmp_path: Path):
    # A 1 mm nsdgeneral has ~100,000 voxels: blocks are sized in bytes, not in pairs (256
    # pairs of such rows held 1.4 GB on the submitting host, where the QC rules run).
    import tracemalloc

    from nsdzarr.prepare.qc import PAIR_BLOCK_BYTES

    n_voxels, n_pairs = 100_000, 600
    rng = np.random.default_rng(0)
    row = rng.standard_normal(n_voxels)

    def read(rows: np.ndarray) -> np.ndarray:
        return row[None] * (1 + rows[:, None] % 7)  # float64, fresh each call like a store read

    tracemalloc.start()
    r = pair_correlation(read, np.arange(n_pairs), np.arange(n_pairs, 2 * n_pairs), n_voxels)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert r.shape == (n_voxels,)
    sums = 5 * n_voxels * 8
    assert peak <= sums + 12 * PAIR_BLOCK_BYTES, peak >> 20


def test_too_few_images_give_nan_not_a_number():
    data = np.arange(8.0).reshape(4, 2)
    r = pair_correlation(lambda rows: data[rows], np.array([0, 1]), np.array([2, 3]), 2)
    assert np.isnan(r).all()


def test_reliability_nifti_puts_each_value_on_its_voxel(tiny_store, tmp_path: Path):
    store, trials, _first, _second = tiny_store
    r, _n = roi_reliability(store, trials)
    out = tmp_path / "rel.nii.gz"
    write_reliability_nifti(r, store, out)
    img = nib.load(out)
    data = np.asarray(img.dataobj)
    assert data.shape == (5, 3, 4)
    np.testing.assert_allclose(img.affine, np.diag([1.8, 1.8, 1.8, 1.0]))
    voxels = zarr.open_group(store, mode="r")["voxels"][...]
    np.testing.assert_array_equal(data[tuple(voxels.T)], r)
    outside = np.ones(data.shape, bool)
    outside[tuple(voxels.T)] = False
    assert np.isnan(data[outside]).all()


FIGURES = {
    "memory_requested_vs_measured.png": "Memory per heavy job",
    "runtime_requested_vs_measured.png": "Runtime per heavy job",
    "subj01_store_sizes.png": "Session stores of subj01",
    "subj01_trial_counts.png": "Trials of subj01 per session",
    "subj01_roi_session_drift.png": "Session drift of subj01",
    "subj01_nsdgeneral_reliability_hist.png": "Split-half reliability of subj01",
    "subj01_V1_reliability_hist.png": "Split-half reliability of subj01",
    "subj01_nsdgeneral_reliability_slices.png": "The split-half reliability of subj01",
    "subj01_V1_reliability_slices.png": "The split-half reliability of subj01",
}


@pytest.mark.slow
def test_report_embeds_every_qc_figure(demo_run: Path):
    import matplotlib.image as mpimg

    run_snakemake(demo_run, "--report", "report.html")
    html = (demo_run / "report.html").read_text(errors="replace")
    summary = demo_run / "results/summary"
    assert sorted(p.name for p in summary.glob("*.png")) == sorted(FIGURES)
    for name, caption in FIGURES.items():
        png = summary / name
        pixels = mpimg.imread(png)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500, name
        assert pixels[..., :3].std() > 0.05, f"{name} is blank"
        assert base64.b64encode(png.read_bytes()).decode() in html, f"{name} not embedded"
        assert f'"name": "{name}"' in html
        assert caption in html, f"caption of {name} missing"
    for category in ("Job resources", "Stores", "ROI quality"):
        assert category in html


@pytest.mark.slow
def test_demo_reliability_figures_rest_on_repeated_images(demo_run: Path):
    """The demo's sessions repeat images: each reliability figure has pairs and voxels with r."""
    from PIL import Image

    for roi in ("nsdgeneral", "V1"):
        r, n = roi_reliability(
            demo_run / f"results/subj01/roi/{roi}.zarr", demo_run / "results/subj01/trials.tsv"
        )
        assert n > 100 and np.isfinite(r).all(), roi
        assert np.median(r) > 0.2, roi  # the demo's responses repeat with the image
        for kind in ("hist", "slices"):
            with Image.open(
                demo_run / f"results/summary/subj01_{roi}_reliability_{kind}.png"
            ) as png:
                counts = {key: int(png.text[key]) for key in ("images", "voxels", "voxels_with_r")}
            assert counts == {"images": n, "voxels": len(r), "voxels_with_r": len(r)}, kind


@pytest.mark.slow
def test_demo_reliability_nifti_matches_its_roi(demo_run: Path):
    for roi in ("nsdgeneral", "V1"):
        img = nib.load(demo_run / f"results/summary/subj01_{roi}_reliability.nii.gz")
        group = zarr.open_group(demo_run / f"results/subj01/roi/{roi}.zarr", mode="r")
        assert img.shape == tuple(group.attrs["shape_nifti_xyz"])
        np.testing.assert_allclose(img.affine, np.asarray(group.attrs["affine"]), atol=1e-6)
        r, _n = roi_reliability(
            demo_run / f"results/subj01/roi/{roi}.zarr", demo_run / "results/subj01/trials.tsv"
        )
        data = np.asarray(img.dataobj)[tuple(group["voxels"][...].T)]
        np.testing.assert_array_equal(np.isnan(data), np.isnan(r))
        np.testing.assert_allclose(data[np.isfinite(data)], r[np.isfinite(r)])


def test_session_ranges_name_the_sessions_used():
    assert session_ranges([1, 2, 3, 15, 17]) == "1-3, 15, 17"
    assert session_ranges([17, 15, 16, 1]) == "1, 15-17"
