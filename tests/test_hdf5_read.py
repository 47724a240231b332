"""SessionReader returns exactly what h5py returns, for every layout; bad files fail in one line."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from nsdzarr.errors import InputError
from nsdzarr.prepare.hdf5_open import open_betas
from nsdzarr.prepare.hdf5_read import SessionReader, _scatter_voxels, plan_blocks, read_betas

T, Z, Y, X = 750, 7, 9, 11


def _brain(shape: tuple[int, int, int], seed: int = 0, dtype: str = "<i2") -> np.ndarray:
    """Random betas inside an ellipsoid, zeros outside, shaped (T, Z, Y, X)."""
    t = 750 if shape == (Z, Y, X) else 40
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    inside = sum(g**2 for g in grid) <= 0.8
    vals = np.round(rng.standard_normal((t, *shape)) * 300) * inside
    return vals.astype(dtype)


def _write(
    path: Path, data: np.ndarray, skip_last_plane: bool = True, order_seed: int | None = None, **kw
):
    """Write ``data`` as /betas; the last z-plane is never written (unallocated chunks)."""
    libver = kw.pop("libver", "earliest")
    userblock = kw.pop("userblock_size", 0)
    with h5py.File(path, "w", libver=(libver, "latest"), userblock_size=userblock) as f:
        d = f.create_dataset("betas", shape=data.shape, dtype=data.dtype, **kw)
        nz = data.shape[1] - 1 if skip_last_plane else data.shape[1]
        if order_seed is None:
            d[:, :nz] = data[:, :nz]
        else:  # one voxel at a time in random order: file order unrelated to voxel order
            rng = np.random.default_rng(order_seed)
            for v in rng.permutation(nz * data.shape[2] * data.shape[3]):
                z, y, x = np.unravel_index(v, (nz, *data.shape[2:]))
                d[:, z, y, x] = data[:, z, y, x]
        f.attrs["note"] = "test"
    return path


NSD = {"chunks": (T, 1, 1, 1)}
LAYOUTS = {
    "nsd": (NSD, "<i2", "chunk-index"),
    "contiguous": ({}, "<i2", "h5py"),
    "chunks_T234": ({"chunks": (T, 2, 3, 4)}, "<i2", "chunk-index"),
    "chunks_10444": ({"chunks": (10, 4, 4, 4)}, "<i2", "h5py"),
    "gzip_shuffle": ({**NSD, "compression": "gzip", "shuffle": True}, "<i2", "h5py"),
    "float32": (NSD, "<f4", "chunk-index"),
    "big_endian": (NSD, ">i2", "chunk-index"),
    "fill_minus_one": ({**NSD, "fillvalue": -1}, "<i2", "chunk-index"),
    "libver_v108": ({**NSD, "libver": "v108"}, "<i2", "chunk-index"),
    "libver_latest": ({**NSD, "libver": "latest"}, "<i2", "chunk-index"),
    "userblock": ({**NSD, "userblock_size": 512}, "<i2", "chunk-index"),
}
RANGES = [(0, Z), (0, 1), (Z - 1, Z), (2, 5), (3, 3), (1, Z - 1)]


@pytest.fixture(params=sorted(LAYOUTS))
def layout_file(request, tmp_path):
    kw, dtype, strategy = LAYOUTS[request.param]
    data = _brain((Z, Y, X), dtype=dtype)
    return _write(tmp_path / f"{request.param}.hdf5", data, **dict(kw)), strategy


def _expected(path: Path, z0: int | None = None, z1: int | None = None) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["betas"][...] if z0 is None else f["betas"][:, z0:z1]


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert got.dtype.isnative and got.dtype == want.dtype.newbyteorder("=")
    np.testing.assert_array_equal(got, want)


def test_read_all_and_planes_match_h5py(layout_file):
    path, strategy = layout_file
    with SessionReader(path) as r:
        assert r.strategy == strategy
        _same(r.read_all(), _expected(path))
        for z0, z1 in RANGES:
            _same(r.read_planes(z0, z1), _expected(path, z0, z1))


def test_out_argument_is_overwritten_everywhere(layout_file):
    path, _ = layout_file
    with SessionReader(path) as r:
        out = np.full((T, 3, Y, X), 123, r.dtype)
        assert r.read_planes(4, 7, out=out) is out
        _same(out, _expected(path, 4, 7))
        with pytest.raises(ValueError):
            r.read_planes(0, 2, out=out)


def test_small_buffers_give_many_blocks(tmp_path):
    path = _write(tmp_path / "s.hdf5", _brain((Z, Y, X)), chunks=(T, 1, 1, 1))
    with SessionReader(path, buffer_bytes=40 * 4000, gap_bytes=0) as r:
        assert r.strategy == "chunk-index"
        _same(r.read_all(), _expected(path))
        _same(r.read_planes(2, 6), _expected(path, 2, 6))


@pytest.mark.parametrize("seed", [None, 1])
def test_bigger_volume_scrambled_file_order(tmp_path, seed):
    """Many blocks, voxels stored out of order: exercises runs, holes and stray voxels."""
    shape = (6, 30, 40) if seed is None else (3, 20, 40)
    data = _brain(shape, seed=3)
    path = _write(tmp_path / "big.hdf5", data, order_seed=seed, chunks=(data.shape[0], 1, 1, 1))
    with SessionReader(path, buffer_bytes=90 * 500) as r:
        assert r.strategy == "chunk-index"
        _same(r.read_all(), _expected(path))
        _same(r.read_planes(1, 3), _expected(path, 1, 3))


def test_index_sources(tmp_path):
    path = _write(tmp_path / "s.hdf5", _brain((Z, Y, X)), chunks=(T, 1, 1, 1))
    with SessionReader(path) as fast, SessionReader(path, index_source="chunk_iter") as slow:
        assert (fast.index_source, slow.index_source) == ("btree", "chunk_iter")
        for name in ("z", "y", "x", "offset", "size", "filter_mask"):
            np.testing.assert_array_equal(getattr(fast.index, name), getattr(slow.index, name))
        assert len(fast.index) == (Z - 1) * Y * X  # last plane never written
        _same(slow.read_all(), _expected(path))


def test_allow_fast_false_uses_h5py(tmp_path):
    path = _write(tmp_path / "s.hdf5", _brain((Z, Y, X)), chunks=(T, 1, 1, 1))
    with SessionReader(path, allow_fast=False) as r:
        assert r.strategy == "h5py"
        _same(r.read_planes(1, 4), _expected(path, 1, 4))


def test_scatter_voxels_patterns():
    rng = np.random.default_rng(5)
    t, v = 6, 20000
    for case in range(40):
        base = rng.integers(0, v - 3000)
        flat = base + np.arange(2000)
        flat = np.delete(flat, rng.choice(2000, rng.integers(0, 300), replace=False))  # holes
        extra = rng.choice(np.setdiff1d(np.arange(v), flat), rng.integers(0, 200), replace=False)
        flat = np.concatenate([flat, extra])  # strays far away
        if case % 2:
            flat = flat[rng.permutation(len(flat))]
        vals = rng.integers(-9, 9, (len(flat), t)).astype(np.int16)
        out = rng.integers(-9, 9, (t, v)).astype(np.int16)
        want = out.copy()
        want[:, flat] = vals.T
        span = np.empty((len(flat) * 5 // 4, t), np.int16)
        _scatter_voxels(vals, flat, span, out)
        np.testing.assert_array_equal(out, want)


def test_plan_blocks():
    offs = np.array([0, 10, 20, 100, 110, 500])
    assert plan_blocks(offs, 10, 30, 0) == [(0, 3), (3, 5), (5, 6)]
    assert plan_blocks(offs, 10, 20, 100) == [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert plan_blocks(offs, 10, 1000, 1000) == [(0, 6)]
    assert plan_blocks(np.array([], np.int64), 10, 30, 0) == []


def test_read_betas_helper(tmp_path):
    path = _write(tmp_path / "s.hdf5", _brain((Z, Y, X)), chunks=(T, 1, 1, 1))
    _same(read_betas(path), _expected(path))


# --------------------------------------------------------------------------- bad inputs


def _one_line_error(path: Path, *words: str) -> None:
    with pytest.raises(InputError) as err, SessionReader(path) as r:
        r.read_all()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    for word in words:
        assert word in msg


def test_missing_file(tmp_path):
    _one_line_error(tmp_path / "nope.hdf5", "not found")


def test_text_file(tmp_path):
    path = tmp_path / "betas_session01.hdf5"
    path.write_text("not hdf5\n" * 10)
    _one_line_error(path, "not an HDF5 file")


def test_truncated_file(tmp_path):
    path = _write(tmp_path / "t.hdf5", _brain((Z, Y, X)), chunks=(T, 1, 1, 1))
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    _one_line_error(path, "truncated")


def test_no_betas_dataset(tmp_path):
    path = tmp_path / "x.hdf5"
    with h5py.File(path, "w") as f:
        f["other"] = np.zeros((2, 2, 2, 2))
        f.create_group("grp")
    _one_line_error(path, "no dataset named 'betas'", "other", "grp")


def test_three_dimensional(tmp_path):
    path = tmp_path / "x.hdf5"
    with h5py.File(path, "w") as f:
        f["betas"] = np.zeros((3, 4, 5), np.int16)
    _one_line_error(path, "3-D", "4-D")


def test_non_numeric(tmp_path):
    path = tmp_path / "x.hdf5"
    with h5py.File(path, "w") as f:
        f["betas"] = np.zeros((1, 2, 2, 2), "S4")
    _one_line_error(path, "dtype")


def test_open_betas_other_dataset_name(tmp_path):
    path = tmp_path / "x.hdf5"
    with h5py.File(path, "w") as f:
        f["g/data"] = np.ones((2, 2, 2, 2), np.float32)
    f, d = open_betas(path, "g/data")
    try:
        assert d.shape == (2, 2, 2, 2)
    finally:
        f.close()
    with SessionReader(path, dataset="g/data") as r:
        np.testing.assert_array_equal(r.read_all(), np.ones((2, 2, 2, 2), np.float32))


@pytest.mark.parametrize("libver", ["earliest", "latest"])
def test_nothing_written_reads_fill_value(tmp_path, libver):
    path = tmp_path / "empty.hdf5"
    with h5py.File(path, "w", libver=(libver, "latest")) as f:
        f.create_dataset(
            "betas", shape=(T, Z, Y, X), dtype="<i2", chunks=(T, 1, 1, 1), fillvalue=-7
        )
    with SessionReader(path) as r:
        assert r.strategy == "chunk-index" and len(r.index) == 0
        _same(r.read_all(), _expected(path))
        assert np.all(r.read_planes(2, 4) == -7)


def test_file_truncated_after_opening(tmp_path):
    path = _write(tmp_path / "t.hdf5", _brain((Z, Y, X)), chunks=(T, 1, 1, 1))
    with SessionReader(path) as r:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 5000)
        with pytest.raises(InputError, match="truncated"):
            r.read_all()


def test_chunks_longer_than_trial_axis(tmp_path):
    """Resizable trial axis: chunks hold more trials than the dataset has."""
    data = _brain((Z, Y, X))[:5]
    path = tmp_path / "r.hdf5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset("betas", data=data, chunks=(8, 1, 1, 1), maxshape=(None, Z, Y, X))
        d[:, 2] = 0
    with SessionReader(path) as r:
        assert r.strategy == "chunk-index"
        _same(r.read_all(), _expected(path))
        _same(r.read_planes(1, 4), _expected(path, 1, 4))


@pytest.mark.parametrize("layout", ["nsd", "contiguous", "gzip"])
def test_read_voxels_equals_h5py_fancy_selection(tmp_path, layout):
    rng = np.random.default_rng(3)
    data = rng.integers(-3000, 3000, size=(40, 7, 9, 11), dtype=np.int16)
    opts = {
        "nsd": {"chunks": (40, 1, 1, 1)},
        "contiguous": {},
        "gzip": {"chunks": (40, 2, 3, 4), "compression": "gzip", "shuffle": True},
    }[layout]
    path = tmp_path / "b.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("betas", data=data, **opts)
    zyx = np.stack([rng.integers(0, n, 300) for n in (7, 9, 11)], axis=1)
    with SessionReader(path) as reader:
        got = reader.read_voxels(zyx)
        assert reader.strategy == ("chunk-index" if layout == "nsd" else "h5py")
    np.testing.assert_array_equal(got, data[:, zyx[:, 0], zyx[:, 1], zyx[:, 2]])
