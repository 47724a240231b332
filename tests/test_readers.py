"""training.readers (numpy, no torch): image and ROI rows against zarr-python and the sources.

The image store is written by the pipeline's own converter (``stimuli.convert_stimuli``) from a
real HDF5 ``imgBrick`` with H != W (10 x 7), random pixels so that rows and axis orders differ.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from nsdzarr.errors import InputError
from nsdzarr.nsd_facts import N_IMAGES_73K as N_NSD_IMAGES
from nsdzarr.prepare.stimuli import convert_stimuli
from nsdzarr.prepare.storage import StimuliStorage
from nsdzarr.training.readers import ImageReader, RoiReader
from nsdzarr.training.row_reader import ShardRows
from nsdzarr.training.zarr_v3 import parse_layout

H, W = 10, 7
SIZE = 4  # the resized copy images_4


def write_brick(path: Path, n: int = N_NSD_IMAGES, seed: int = 5) -> np.ndarray:
    """A real HDF5 stimulus file: ``imgBrick`` (n, H, W, 3) uint8, random pixels."""
    brick = np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick", data=brick)
    return brick


@pytest.fixture(scope="module")
def brick_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stimuli") / "nsd_stimuli.hdf5"
    write_brick(path)
    return path


@pytest.fixture(scope="module")
def brick(brick_file: Path) -> np.ndarray:
    with h5py.File(brick_file, "r") as f:
        return f["imgBrick"][...]


@pytest.fixture(scope="module", params=["none", "blosc-lz4", "zstd"])
def image_store(brick_file: Path, request) -> Path:
    """230 images converted by the pipeline's writer, raw or compressed, with images_4."""
    ids = np.random.default_rng(2).choice(N_NSD_IMAGES, 230, replace=False)
    target = brick_file.parent / f"some-{request.param}.zarr"
    settings = StimuliStorage(codec=request.param, level=1)
    convert_stimuli(brick_file, target, nsd_ids=ids, sizes=(SIZE,), settings=settings)
    return target


# --------------------------------------------------------------------------- row reader


ND_LAYOUTS = {
    "raw-1row": ((1, H, W, 3), (8, H, W, 3), None),
    "blosc-3rows": ((3, H, W, 3), (12, H, W, 3), BloscCodec(cname="lz4", clevel=5)),
    "zstd-unsharded-2rows": ((2, H, W, 3), None, ZstdCodec(level=1)),
}


@pytest.mark.parametrize("name", sorted(ND_LAYOUTS))
def test_shard_rows_read_nd_rows_like_zarr_python(tmp_path: Path, name: str):
    chunks, shards, comp = ND_LAYOUTS[name]
    data = np.random.default_rng(0).integers(0, 256, (41, H, W, 3), dtype=np.uint8)
    arr = zarr.create_array(
        str(tmp_path / "a"), shape=data.shape, chunks=chunks, shards=shards, dtype=np.uint8,
        compressors=comp, zarr_format=3,
    )  # fmt: skip
    arr[...] = data
    _, lay = parse_layout(tmp_path / "a")
    reader = ShardRows(lay, max_open=2)
    rows = np.random.default_rng(1).integers(0, len(data), 60)  # repeats, random order
    out = np.empty((60, H, W, 3), np.uint8)
    reader.read_rows(rows, out)
    np.testing.assert_array_equal(out, arr.oindex[rows])
    assert len(reader.fds) <= 2
    reader.close()


# --------------------------------------------------------------------------- images


def test_image_reader_equals_zarr_python_and_the_brick(image_store: Path, brick: np.ndarray):
    group = zarr.open_group(image_store, mode="r")
    ids = group["nsd_id"][...]
    reader = ImageReader(image_store)
    assert reader.info.layout is not None  # the one-read-per-batch path
    assert (
        reader.info.layout.codec
        == {"none": None, "blosc-lz4": "blosc", "zstd": "zstd"}[
            zarr.open_group(image_store, mode="r").attrs["storage"]["codec"]
        ]
    )
    np.testing.assert_array_equal(reader.nsd_id, ids)
    assert reader.shape == (len(ids), H, W, 3) and len(reader) == len(ids)
    pick = ids[np.random.default_rng(0).integers(0, len(ids), 40)]
    got = reader.read(pick)
    assert got.dtype == np.uint8 and got.shape == (40, H, W, 3)
    np.testing.assert_array_equal(got, brick[pick])
    np.testing.assert_array_equal(reader.rows([0, -1, 5]), group["images"].oindex[[0, -1, 5]])
    seen_ids, seen = zip(*reader.iter_batches(32), strict=True)
    assert [len(b) for b in seen_ids] == [32] * 7 + [6]
    np.testing.assert_array_equal(np.concatenate(seen_ids), ids)
    np.testing.assert_array_equal(np.concatenate(seen), group["images"][...])
    small = ImageReader(image_store, size=SIZE)
    assert small.shape == (len(ids), SIZE, SIZE, 3)
    np.testing.assert_array_equal(
        small.read(pick), group[f"images_{SIZE}"].oindex[np.searchsorted(ids, pick)]
    )
    with pytest.raises(IndexError):
        reader.rows([len(ids)])
    reader.close()


def test_image_reader_falls_back_to_zarr_python(brick: np.ndarray, tmp_path: Path):
    """A codec the fast path does not decode (gzip, not written by the pipeline)."""
    from zarr.codecs import GzipCodec

    ids = np.arange(3, 300, 3)
    group = zarr.open_group(tmp_path / "gz.zarr", mode="w", zarr_format=3)
    group.create_array("nsd_id", data=ids)
    group.create_array(
        "images",
        data=brick[ids],
        chunks=(1, H, W, 3),
        shards=(50, H, W, 3),
        compressors=GzipCodec(),
    )
    reader = ImageReader(tmp_path / "gz.zarr")
    assert reader.info.layout is None
    np.testing.assert_array_equal(reader.read([9, 3, 9, 297]), brick[[9, 3, 9, 297]])


def test_image_reader_errors_are_one_line(image_store: Path):
    reader = ImageReader(image_store)
    absent = int(np.setdiff1d(np.arange(100), reader.nsd_id)[0])
    with pytest.raises(InputError) as e:
        reader.read([int(reader.nsd_id[0]), absent, absent + 1])
    msg = str(e.value)
    assert "\n" not in msg and str(image_store) in msg and f"nsd_id {absent} " in msg
    with pytest.raises(InputError) as e:
        ImageReader(image_store, size=5)
    msg = str(e.value)
    assert "\n" not in msg and str(image_store) in msg and "images_5" in msg and "[4]" in msg
    with pytest.raises(InputError, match="not found"):
        ImageReader(image_store.parent / "nope.zarr")


def read_in_child(reader: ImageReader, ids: np.ndarray) -> np.ndarray:
    return reader.read(ids)


def store_fds(folder: Path) -> int:
    """This process's fds on files under ``folder``."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd, closed meanwhile
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sum(link.startswith(str(folder.resolve())) for link in links)


def test_image_reader_is_lazy_fork_safe_and_pickles(image_store: Path, brick: np.ndarray):
    before = len(os.listdir("/proc/self/fd"))
    reader = ImageReader(image_store)
    assert len(os.listdir("/proc/self/fd")) == before  # metadata read and closed
    ids = reader.nsd_id[::7]
    np.testing.assert_array_equal(reader.read(ids), brick[ids])  # the parent now holds fds
    assert store_fds(image_store) == 5  # one per shard file the rows lie in
    for context in ("fork", "spawn"):
        with multiprocessing.get_context(context).Pool(1) as pool:
            got = pool.apply(read_in_child, (reader, ids))
        np.testing.assert_array_equal(got, brick[ids])
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._rows._reader is None
    reader.close()
    assert store_fds(image_store) == 0


# --------------------------------------------------------------------------- ROI rows


@pytest.fixture(scope="module")
def roi_store(tmp_path_factory) -> Path:
    from test_loader import build_store

    return build_store(tmp_path_factory.mktemp("roi"), "subj01", [1, 14])


def test_roi_reader_equals_zarr_python(roi_store: Path):
    group = zarr.open_group(roi_store, mode="r")
    reader = RoiReader(roi_store)
    assert (reader.n_rows, reader.n_voxels) == group["betas"].shape and len(reader) == 1500
    rows = np.random.default_rng(0).integers(0, 1500, 64)
    got = reader.rows(rows)
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, group["betas"].oindex[rows])
    psc = reader.rows(rows, psc=True)
    assert psc.dtype == np.float32
    np.testing.assert_array_equal(psc, group["betas"].oindex[rows].astype(np.float32) / 300)
    np.testing.assert_array_equal(reader.voxels, group["voxels"][...])
    from test_loader import read_tsv

    tsv = read_tsv(roi_store.parent.parent / "trials.tsv")
    for key in ("trial", "session", "nsd_id", "repeat"):
        np.testing.assert_array_equal(reader.columns[key], tsv[key].astype(int))
    np.testing.assert_array_equal(reader.columns["split"], tsv["split"])
    reader.close()


def test_roi_reader_without_trials_table(roi_store: Path, tmp_path: Path):
    import shutil

    bare = tmp_path / "bare.zarr"
    shutil.copytree(roi_store, bare)
    reader = RoiReader(bare)
    assert reader.columns == {}
    np.testing.assert_array_equal(
        reader.rows([3, 1]), zarr.open_array(bare / "betas", mode="r").oindex[[3, 1]]
    )
    with pytest.raises(InputError, match="trials table not found"):
        RoiReader(bare, trials=tmp_path / "none.tsv")


def test_readers_import_without_torch_h5py_or_snakemake():
    code = (
        "import sys\n"
        "for name in ('torch', 'h5py', 'snakemake'):\n"
        "    sys.modules[name] = None  # import raises ImportError\n"
        "import nsdzarr.training.readers\n"
        "bad = [m for m in ('torch', 'h5py', 'snakemake') if sys.modules.get(m) is not None]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": src},
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
