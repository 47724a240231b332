"""The demo release has the real NSD encodings."""

from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
import scipy.io

from nsdzarr.prepare import demo, layout
from nsdzarr.prepare.demo import DemoSpec


def test_betas_have_nsd_encoding(demo_root):
    spec = DemoSpec()
    x, y, z = spec.shape_xyz
    for session in range(1, spec.sessions + 1):
        path = layout.betas_path(demo_root, "subj01", spec.space, spec.beta_version, session)
        with h5py.File(path, "r") as f:
            d = f["betas"]
            assert d.shape == (750, z, y, x)  # h5py order is NIfTI reversed
            assert d.dtype == np.int16
            assert d.chunks == (750, 1, 1, 1)
            assert d.compression is None and not d.shuffle
            betas = d[...]
        brain = demo.brain_mask(spec.shape_xyz).T
        assert not betas[:, ~brain].any(), "non-brain voxels must be zero"
        assert np.count_nonzero(betas[:, brain]) > 0.99 * betas[:, brain].size
        # PSC x 300: a spread of hundreds, not a float in [-5, 5]
        assert 100 < betas[:, brain].std() < 3000


def test_sessions_differ_by_an_offset_and_are_deterministic(demo_root, tmp_path):
    spec = DemoSpec()
    design = demo.make_design(spec.seed)
    a = demo.session_betas(design, "subj01", 1, spec)
    b = demo.session_betas(design, "subj01", 2, spec)
    brain = demo.brain_mask(spec.shape_xyz).T
    assert abs(a[:, brain].mean() - b[:, brain].mean()) > 5
    path = layout.betas_path(demo_root, "subj01", spec.space, spec.beta_version, 1)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["betas"][...], a)


def test_design_is_one_based_with_shared_images_first(demo_root):
    mat = scipy.io.loadmat(layout.design_path(demo_root))
    mo, si, shared = mat["masterordering"], mat["subjectim"], mat["sharedix"]
    assert mo.shape == (1, 30000) and si.shape == (8, 10000) and shared.shape == (1, 1000)
    assert mo.min() == 1 and mo.max() == 10000
    assert si.min() >= 1 and si.max() <= 73000
    assert np.bincount(mo[0].astype(int))[1:].tolist() == [3] * 10000
    # as in NSD, repeats come at every lag: the demo's three sessions already repeat images
    # (the QC reliability figures need an image's first and second showing)
    for sessions in (1, 3):
        shown = np.bincount(mo[0, : 750 * sessions].astype(int))
        assert (shown >= 2).sum() > 150 * sessions, sessions
    for s in range(8):
        np.testing.assert_array_equal(np.sort(si[s, :1000]), np.sort(shared[0]))
        assert len(set(si[s])) == 10000
    assert mat["stimpattern"].shape == (40, 12, 75)
    assert mat["stimpattern"].sum(axis=(1, 2)).tolist() == [750] * 40


def test_rois_are_nifti_order_with_nsd_values(demo_root):
    spec = DemoSpec()
    for name in demo.ROI_FILES:
        img = nib.load(layout.roi_path(demo_root, "subj01", spec.space, name))
        data = np.asarray(img.dataobj)
        assert data.shape == spec.shape_xyz
        assert np.allclose(np.diag(img.affine)[:3], 1.8)
        values = set(np.unique(data).tolist())
        assert {-1, 0, 1} <= values
        np.testing.assert_array_equal(data == -1, ~demo.brain_mask(spec.shape_xyz))
    visual = np.asarray(
        nib.load(layout.roi_path(demo_root, "subj01", spec.space, "prf-visualrois.nii.gz")).dataobj
    )
    assert set(np.unique(visual[visual > 0]).tolist()) == set(range(1, 8))
