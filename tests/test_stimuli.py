"""Stimulus brick (imgBrick HDF5) -> Zarr image store: exact rows, any layout, bounded memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import google_crc32c
import h5py
import numpy as np
import pytest
import zarr
from conftest import REPO
from PIL import Image

from nsdzarr.errors import InputError, VerificationError
from nsdzarr.prepare import layout
from nsdzarr.prepare.convert import ShardIO
from nsdzarr.prepare.demo import demo_stimulus_id, write_demo_stimuli
from nsdzarr.prepare.estimate import stimuli_estimate, write_stimuli_estimate
from nsdzarr.prepare.memory import DEFAULT_STIMULI_BUDGET_BYTES, request_mb, stimuli_peak
from nsdzarr.prepare.stimuli import (
    LAYOUT,
    _prefetch,
    convert_stimuli,
    ids_from_trials,
    image_checksums,
    plan_reads,
    source_byte_range,
    stimuli_metadata,
)
from nsdzarr.prepare.storage import STIMULI_STORAGE, StimuliStorage
from nsdzarr.prepare.trials import write_tsv
from nsdzarr.prepare.verify import READERS

SMALL = StimuliStorage(images_per_shard=8)
LAYOUTS = {
    "contiguous": {},
    "chunk-1-row": {"chunks": "1"},
    "chunk-10-rows": {"chunks": "10"},
    "chunk-3-rows-2-cols": {"chunks": "3x2"},
    "gzip-4-rows": {"chunks": "4", "compression": "gzip"},
    "lzf-7-rows": {"chunks": "7", "compression": "lzf"},
}


def source_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def write_brick(path: Path, data: np.ndarray, chunks: str | None = None, **kw) -> Path:
    """``imgBrick`` as ``data``; ``chunks`` "R" -> (R, H, W, 3), "RxC" -> (R, H, C, 3)."""
    if chunks:
        _, h, w, _ = data.shape
        rows, *cols = (int(v) for v in chunks.split("x"))
        kw["chunks"] = (rows, h, cols[0] if cols else w, 3)
    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick", data=data, **kw)
    return path


def open_quietly(store: Path) -> zarr.Group:
    """Open a store through zarr-python, failing on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return zarr.open_group(store, mode="r", zarr_format=3)


def lanczos(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


def check_store(store: Path, data: np.ndarray, ids: np.ndarray, sizes: tuple[int, ...]) -> None:
    """Every array of ``store`` against its source rows ``data[ids]``, read by zarr-python."""
    group = open_quietly(store)
    n, (_, h, w, _) = len(ids), data.shape
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = group["images"][:]
        np.testing.assert_array_equal(group["nsd_id"][:], ids)
        assert group["nsd_id"].dtype == np.int64
        np.testing.assert_array_equal(group["checksums"][:], image_checksums(data[ids]))
        assert group["checksums"].dtype == np.uint32
        for s in sizes:
            resized = group[f"images_{s}"]
            assert resized.shape == (n, s, s, 3) and resized.dtype == np.uint8
            assert resized.chunks == (1, s, s, 3)
            got = resized[:]
            for r, i in enumerate(ids.tolist()):
                np.testing.assert_array_equal(got[r], lanczos(data[i], s))
    assert images.shape == (n, h, w, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, data[ids])
    arr = group["images"]
    assert arr.chunks == (1, h, w, 3)
    assert arr.shards == (min(SMALL.images_per_shard, n), h, w, 3)
    assert arr.metadata.dimension_names == ("image", "y", "x", "channel")
    # the crc32c of each source row, as documented, computed here independently
    sums = [google_crc32c.value(data[i].tobytes()) for i in ids.tolist()]
    assert group["checksums"][:].tolist() == sums


@pytest.mark.parametrize("hw", [(7, 5), (12, 9)])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_stores_exactly_its_rows(tmp_path: Path, name: str, hw: tuple[int, int]):
    data = source_images(53, *hw, seed=sum(hw))
    src = write_brick(tmp_path / "stim.hdf5", data, **LAYOUTS[name])
    row = data[0].nbytes
    subset = np.array([0, 3, 4, 5, 17, 29, 30, 51, 52])
    for ids, sizes in ((None, (4,)), (subset[::-1], ())):
        store = tmp_path / f"{name}-{ids is None}.zarr"
        report = convert_stimuli(src, store, nsd_ids=ids, sizes=sizes, settings=SMALL,
                                 budget_bytes=5 * row)  # fmt: skip
        expected = np.arange(53) if ids is None else subset
        check_store(store, data, expected, sizes)
        assert report["n_images"] == len(expected)
        attrs = dict(open_quietly(store).attrs)
        assert attrs["n_images"] == len(expected)
        assert attrs["subset"] == ("all" if ids is None else "ids")
        assert attrs["source_shape"] == [53, *hw, 3]
        assert attrs["layout"] == LAYOUT
        assert attrs["resize"]["filter"] == "LANCZOS"
        assert attrs["resize"]["sizes"] == list(sizes)
        assert attrs["resize"]["library"].startswith("Pillow ")
        assert attrs["source"]["path"] == str(src.resolve())
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_subset_reads_only_the_chunk_blocks_it_needs():
    # chunks of 10 rows: ids 3 and 5 share the first block, 41 and 59 need two more
    assert plan_reads(np.array([3, 5, 41, 59]), 60, 10, 100) == [(0, 10), (40, 60)]
    assert plan_reads(np.array([3, 5, 41, 59]), 60, 10, 10) == [(0, 10), (40, 50), (50, 60)]
    # contiguous rows: small gaps are read through, not skipped
    assert plan_reads(np.array([1, 3, 40]), 45, 1, 100, gap_rows=2) == [(1, 4), (40, 41)]
    assert plan_reads(np.arange(25), 25, 10, 20) == [(0, 20), (20, 25)]


def test_swapped_height_and_width_would_not_pass(tmp_path: Path):
    src = write_demo_stimuli(tmp_path / "stim.hdf5", n=2000, shape_hw=(8, 6))
    ids = np.array([7, 999, 1000, 1998])
    store = tmp_path / "stim.zarr"
    convert_stimuli(src, store, nsd_ids=ids, settings=SMALL)
    images = open_quietly(store)["images"][:]
    assert images.shape == (4, 8, 6, 3)
    assert [demo_stimulus_id(img) for img in images] == ids.tolist()
    for img in images:
        np.testing.assert_array_equal(img[7, 5], [8, 6, 255])  # bottom right of an 8 x 6 image
        assert demo_stimulus_id(np.ascontiguousarray(img[:, :, ::-1])) != demo_stimulus_id(img)
    with h5py.File(src) as f:
        np.testing.assert_array_equal(images, f["imgBrick"][ids])


def test_resized_copies_are_deterministic_lanczos(tmp_path: Path):
    data = source_images(20, 12, 9, seed=3)
    src = write_brick(tmp_path / "stim.hdf5", data, chunks="4")
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    convert_stimuli(src, a, sizes=(16, 5), settings=SMALL)
    convert_stimuli(src, b, sizes=(5, 16), settings=SMALL, budget_bytes=1)
    ga, gb = open_quietly(a), open_quietly(b)
    assert sorted(k for k in ga.array_keys() if k.startswith("images_")) == [
        "images_16",
        "images_5",
    ]
    for s in (5, 16):
        np.testing.assert_array_equal(ga[f"images_{s}"][:], gb[f"images_{s}"][:])
        np.testing.assert_array_equal(ga[f"images_{s}"][3], lanczos(data[3], s))
    # non-square 12 x 9 sources become s x s, not a crop: the corners survive
    big = ga["images_16"][:]
    assert big.shape == (20, 16, 16, 3)
    assert not np.array_equal(big, np.zeros_like(big))


def test_default_storage_is_raw_with_many_images_per_shard(tmp_path: Path):
    data = source_images(130, 7, 5)
    src = write_brick(tmp_path / "stim.hdf5", data, chunks="10")
    store = tmp_path / "stim.zarr"
    report = convert_stimuli(src, store)
    arr = open_quietly(store)["images"]
    assert STIMULI_STORAGE.codec == "none" and STIMULI_STORAGE.images_per_shard >= 20
    assert arr.shards[0] == STIMULI_STORAGE.images_per_shard
    assert [type(c).__name__ for c in arr.compressors] == ["Crc32cCodec"]  # raw + checksum
    shard_files = list((store / "images" / "c").rglob("*"))
    assert len([p for p in shard_files if p.is_file()]) == 3
    assert report["bytes"] >= data.nbytes and report["files"] > 3


@pytest.mark.parametrize("codec", ["zstd", "blosc-lz4", "blosc-zstd"])
def test_compressed_stores_are_lossless(tmp_path: Path, codec: str):
    data = source_images(21, 7, 5)
    src = write_brick(tmp_path / "stim.hdf5", data, chunks="3x2")
    store = tmp_path / "stim.zarr"
    settings = StimuliStorage(codec=codec, level=3, images_per_shard=8)
    convert_stimuli(src, store, settings=settings, sizes=(4,))
    check_store(store, data, np.arange(21), (4,))
    names = [type(c).__name__ for c in open_quietly(store)["images"].compressors]
    assert len(names) == 2 and names[-1] == "Crc32cCodec"


def test_existing_store_is_replaced_and_stale_temporaries_removed(tmp_path: Path):
    data = source_images(12, 7, 5)
    src = write_brick(tmp_path / "stim.hdf5", data)
    store = tmp_path / "stim.zarr"
    stale = tmp_path / ".stim.zarr.incomplete-deadbeef"
    stale.mkdir()
    convert_stimuli(src, store, nsd_ids=[1, 2], settings=SMALL)
    convert_stimuli(src, store, nsd_ids=[5], settings=SMALL)
    assert not stale.exists()
    np.testing.assert_array_equal(open_quietly(store)["nsd_id"][:], [5])


def corrupt_after_write(monkeypatch, flip: Callable[[Path, int], None]) -> None:
    """Test seam: after each real shard write (first row ``t0``), ``flip(shard file, t0)``
    damages the file on disk, before the converter reads it back."""
    real = ShardIO.write

    def write(io: ShardIO, t0: int, block: np.ndarray, *sums: np.ndarray) -> None:
        real(io, t0, block, *sums)
        flip(Path(io.shard_file(t0)), t0)

    monkeypatch.setattr(ShardIO, "write", write)


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("codec", ["none", "zstd", "blosc-lz4"])
def test_verification_reads_back_independently_and_names_the_image(
    tmp_path: Path, monkeypatch, reader: str, codec: str
):
    data = source_images(20, 7, 5)
    src = write_brick(tmp_path / "stim.hdf5", data)
    store = tmp_path / "stim.zarr"
    settings = StimuliStorage(codec=codec, images_per_shard=8)
    ids = np.arange(2, 20)
    report = convert_stimuli(src, store, nsd_ids=ids, settings=settings, reader=reader)
    assert report["verified_by"] == reader
    shutil.rmtree(store)

    def pixel(path: Path, t0: int) -> None:  # row 11 of the store: nsd_id 13
        if t0 == 8 and path.parts[-6] == "images":
            flip_byte(path, 3 * (data[0].nbytes + 4) + 10)  # each image + its crc32c

    corrupt_after_write(monkeypatch, pixel if codec == "none" else lambda p, t0: None)
    if codec == "none":  # the image's crc32c no longer matches: unreadable, named exactly
        with pytest.raises(
            VerificationError, match=r"stim\.zarr: .*'images' unreadable.*nsd_id 13 \(row 11\)"
        ):
            convert_stimuli(src, store, nsd_ids=ids, settings=settings, reader=reader)
        assert not store.exists() and not list(tmp_path.glob(".stim.zarr*"))

    def index(path: Path, t0: int) -> None:  # the shard index checksum of rows 8..15
        if t0 == 8:
            flip_byte(path, path.stat().st_size - 1)

    corrupt_after_write(monkeypatch, index)
    with pytest.raises(VerificationError, match=r"'images' unreadable.*nsd_id 10 \(row 8\)"):
        convert_stimuli(src, store, nsd_ids=ids, settings=settings, reader=reader)
    assert not store.exists() and not list(tmp_path.glob(".stim.zarr*"))


@pytest.mark.parametrize("reader", READERS)
def test_a_valid_but_wrong_image_on_disk_is_named(tmp_path: Path, monkeypatch, reader: str):
    """A shard that reads back cleanly (its checksums written for the wrong bytes, as a writer
    bug would) but holds one wrong pixel fails the store at that image."""
    data = source_images(20, 7, 5)
    src = write_brick(tmp_path / "stim.hdf5", data)
    store = tmp_path / "stim.zarr"
    real = ShardIO.write

    def write(io: ShardIO, t0: int, block: np.ndarray, *sums: np.ndarray) -> None:
        if t0 == 8 and io.arr.path == "images":
            block = block.copy()
            block[3, 6, 4, 2] ^= 1  # row 11: nsd_id 13
            sums = ()  # each writer checksums the bytes it was given
        real(io, t0, block, *sums)

    monkeypatch.setattr(ShardIO, "write", write)
    settings = StimuliStorage(images_per_shard=8)
    with pytest.raises(
        VerificationError, match=r"'images' differs from its source at nsd_id 13 \(row 11\)"
    ):
        convert_stimuli(src, store, nsd_ids=np.arange(2, 20), settings=settings, reader=reader)
    assert not store.exists() and not list(tmp_path.glob(".stim.zarr*"))


def test_a_shard_written_again_after_its_check_fails_the_store(tmp_path: Path, monkeypatch):
    data = source_images(20, 7, 5)
    src = write_brick(tmp_path / "stim.hdf5", data)
    store = tmp_path / "stim.zarr"

    def later(path: Path, t0: int) -> None:  # a later shard's write also touches shard 0
        if t0 == 16:
            first = path.parents[3] / "0" / "0" / "0" / "0"
            first.write_bytes(first.read_bytes())

    corrupt_after_write(monkeypatch, later)
    with pytest.raises(VerificationError, match=r"c/0/0/0/0 was written again after its check"):
        convert_stimuli(src, store, settings=SMALL, threads=1)
    assert not store.exists()


def bad_inputs(tmp: Path) -> dict[str, tuple[Path, dict, str]]:
    good = source_images(6, 7, 5)
    cases: dict[str, tuple[Path, dict, str]] = {"missing": (tmp / "nope.hdf5", {}, "not found")}
    text = tmp / "text.hdf5"
    text.write_text("not hdf5\n")
    cases["not hdf5"] = (text, {}, "not an HDF5 file")
    full = write_brick(tmp / "full.hdf5", good)
    cut = tmp / "cut.hdf5"
    cut.write_bytes(full.read_bytes()[:1000])
    cases["truncated"] = (cut, {}, "truncated or corrupt")
    gz = write_brick(tmp / "gz.hdf5", source_images(40, 30, 20), chunks="10", compression="gzip")
    raw = bytearray(gz.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 4000] = bytes(4000)  # zeros inside gzip chunks
    damaged = tmp / "damaged.hdf5"
    damaged.write_bytes(bytes(raw))
    cases["corrupt data"] = (damaged, {}, r"cannot read images \d+\.\.\d+ \(truncated or corrupt")
    other = tmp / "other.hdf5"
    with h5py.File(other, "w") as f:
        f["betas"] = good
    cases["no imgBrick"] = (other, {}, "no dataset named 'imgBrick'")
    cases["3-D"] = (
        write_brick(tmp / "3d.hdf5", good[..., 0]),
        {},
        r"shape \(.*\), expected \(N, H, W, 3\)",
    )
    cases["RGBA"] = (
        write_brick(tmp / "rgba.hdf5", np.zeros((4, 7, 5, 4), np.uint8)),
        {},
        r"shape \(.*\), expected \(N, H, W, 3\)",
    )
    cases["empty"] = (
        write_brick(tmp / "e.hdf5", np.zeros((0, 7, 5, 3), np.uint8)),
        {},
        "no images",
    )
    cases["float"] = (write_brick(tmp / "f.hdf5", good.astype(np.float32)), {}, "expected uint8")
    cases["uint16"] = (write_brick(tmp / "u16.hdf5", good.astype(np.uint16)), {}, "uint8")
    cases["id too large"] = (full, {"nsd_ids": [0, 6]}, "6 images .* nsd_id 6 was asked")
    cases["negative id"] = (full, {"nsd_ids": [-1, 2]}, "nsd_id -1 is negative")
    cases["no ids"] = (full, {"nsd_ids": []}, "no nsd_id")
    return cases


@pytest.mark.parametrize(
    "case",
    ["missing", "not hdf5", "truncated", "corrupt data", "no imgBrick", "3-D", "RGBA", "empty",
     "float", "uint16", "id too large", "negative id", "no ids"],
)  # fmt: skip
def test_bad_input_is_one_line_naming_the_file_and_leaves_nothing(tmp_path: Path, case: str):
    inputs = tmp_path / "in"
    inputs.mkdir()
    path, kwargs, problem = bad_inputs(inputs)[case]
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=problem) as err:
        convert_stimuli(path, out / "stim.zarr", settings=SMALL, **kwargs)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"{path}: ")
    assert list(out.iterdir()) == []
    if case not in ("id too large", "negative id", "no ids", "corrupt data", "empty"):
        with pytest.raises(InputError, match=problem):
            stimuli_metadata(path)


def test_metadata_describes_the_file(tmp_path: Path):
    src = write_brick(
        tmp_path / "s.hdf5", source_images(9, 12, 9), chunks="3x2", compression="gzip"
    )
    meta = stimuli_metadata(src)
    assert meta["shape"] == [9, 12, 9, 3] and meta["chunks"] == [3, 12, 2, 3]
    assert meta["compression"] == "gzip" and meta["dtype"] == "|u1"
    assert meta["file_bytes"] == src.stat().st_size
    json.dumps(meta)
    assert (
        stimuli_metadata(write_brick(tmp_path / "c.hdf5", source_images(2, 3, 4)))["chunks"] is None
    )


def test_ids_from_trials_are_sorted_unique_over_subjects(tmp_path: Path):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    write_tsv({"trial": np.arange(4), "nsd_id": np.array([70, 3, 70, 12])}, a)
    write_tsv({"trial": np.arange(3), "nsd_id": np.array([12, 0, 72999])}, b)
    ids = ids_from_trials([a, b])
    assert ids.dtype == np.int64
    assert ids.tolist() == [0, 3, 12, 70, 72999]
    assert ids_from_trials([a]).tolist() == [3, 12, 70]
    bad = tmp_path / "bad.tsv"
    write_tsv({"trial": np.arange(2)}, bad)
    with pytest.raises(InputError, match=r"bad\.tsv: no 'nsd_id' column"):
        ids_from_trials([a, bad])
    with pytest.raises(InputError, match=r"gone\.tsv: trials table not found"):
        ids_from_trials([tmp_path / "gone.tsv"])


def test_demo_brick_is_the_full_nsd_range_and_deterministic(tmp_path: Path):
    path = layout.stimuli_path(tmp_path)
    assert path == tmp_path / "nsddata_stimuli" / "stimuli" / "nsd" / "nsd_stimuli.hdf5"
    write_demo_stimuli(path, seed=0)
    short = write_demo_stimuli(tmp_path / "short.hdf5", seed=0, n=1500)
    other = write_demo_stimuli(tmp_path / "other.hdf5", seed=1, n=1500)
    with h5py.File(path) as f, h5py.File(short) as g, h5py.File(other) as o:
        d = f["imgBrick"]
        assert d.shape == (73000, 8, 6, 3) and d.dtype == np.uint8
        assert d.chunks == (100, 8, 6, 3)
        rows = d[[0, 255, 256, 65536, 72999]]
        assert [demo_stimulus_id(r) for r in rows] == [0, 255, 256, 65536, 72999]
        np.testing.assert_array_equal(rows[:, 0, 1], rows[:, 0, 0, ::-1])
        np.testing.assert_array_equal(rows[:, 7, 5], [[8, 6, 255]] * 5)
        np.testing.assert_array_equal(g["imgBrick"][:], d[:1500])
        assert not np.array_equal(o["imgBrick"][:], d[:1500])
        assert [demo_stimulus_id(r) for r in o["imgBrick"][[5, 1499]]] == [5, 1499]


@pytest.mark.slow
def test_memory_stays_bounded_on_a_brick_bigger_than_the_budget(tmp_path: Path):
    n, h, w = 1400, 300, 300  # 378 MB
    src = tmp_path / "big.hdf5"
    with h5py.File(src, "w") as f:
        d = f.create_dataset("imgBrick", (n, h, w, 3), np.uint8, chunks=(10, h, w, 3))
        for s in range(0, n, 100):
            d[s : s + 100] = source_images(100, h, w, seed=s)
    # 64-image shards (17 MB): glibc's dynamic mmap threshold would serve them from per-thread
    # arenas that keep freed shards (peaks 100-250 MB over the model) unless
    # memory.limit_malloc_arenas has made the threads share one
    budget, per_shard = 32 << 20, 64

    def peak_converting(count: int) -> int:
        code = f"""
import json
from nsdzarr.prepare.stimuli import convert_stimuli
from nsdzarr.prepare.storage import StimuliStorage
r = convert_stimuli({str(src)!r}, {str(tmp_path / f"big{count}.zarr")!r}, range({count}),
                    sizes=(64,), settings=StimuliStorage(images_per_shard={per_shard}),
                    budget_bytes={budget})
# VmHWM, not ru_maxrss: Linux carries the forking parent's (pytest's) peak into ru_maxrss
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps([r["n_images"], int(hwm.split()[1]) * 1024]))
"""
        env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        n_done, peak = json.loads(out.stdout.splitlines()[-1])
        assert n_done == count
        assert peak <= stimuli_peak((n, h, w, 3), count, per_shard, (64,), budget, 10), peak
        return peak

    # Converting twice the images (189 MB more) costs at most ~a shard more: the peak is the
    # budget and the shards in flight, never the brick. (A fixed import baseline of ~90-130 MB
    # depending on the libraries installed makes a single peak-vs-brick ratio meaningless.)
    half, full = peak_converting(n // 2), peak_converting(n)
    assert full - half < 0.15 * (n // 2) * h * w * 3, (half, full)


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_estimate_predicts_the_store_it_describes(tmp_path: Path, codec: str):
    data = source_images(230, 12, 9)
    src = write_brick(tmp_path / "stim.hdf5", data, chunks="10", compression="gzip")
    trials = tmp_path / "trials.tsv"
    write_tsv({"trial": np.arange(5), "nsd_id": np.array([9, 3, 200, 3, 101])}, trials)
    settings = StimuliStorage(codec=codec, images_per_shard=20)
    for tsvs, n in ((None, 230), ([trials], 4)):
        target = tmp_path / "est.json"
        est = write_stimuli_estimate(src, target, tsvs, (16,), settings, None, 1.5)
        assert json.loads(target.read_text()) == json.loads(json.dumps(est))
        report = convert_stimuli(
            src, tmp_path / "s.zarr", None if tsvs is None else ids_from_trials(tsvs),
            (16,), settings,
        )  # fmt: skip
        assert est["n_images"] == report["n_images"] == n
        assert est["store_files"] == report["files"]
        assert abs(est["store_bytes"] - report["bytes"]) <= 0.02 * report["bytes"] + 1024
        job = est["jobs"]["stimuli"]
        assert job["peak_bytes"] == report["predicted_peak_bytes"]
        assert job["mem_mb"] == request_mb(job["peak_bytes"], 1.5)
        assert job["runtime_min"] >= 1
        assert est["source"]["shape"] == [230, 12, 9, 3]
        assert est["subset"] == ("all" if tsvs is None else "ids")


def test_estimate_fits_a_ceiling_by_reading_smaller_blocks():
    meta = {"path": "nsd_stimuli.hdf5", "shape": [73000, 425, 425, 3], "chunks": None}
    free = stimuli_estimate(meta, 73000, (224,))
    capped = stimuli_estimate(meta, 73000, (224,), ceiling_mb=800)
    assert free["jobs"]["stimuli"]["budget_bytes"] == DEFAULT_STIMULI_BUDGET_BYTES
    assert capped["jobs"]["stimuli"]["budget_bytes"] < DEFAULT_STIMULI_BUDGET_BYTES
    assert capped["jobs"]["stimuli"]["mem_mb"] <= 800 < free["jobs"]["stimuli"]["mem_mb"]
    assert free["raw_bytes"] == 73000 * 425 * 425 * 3
    assert free["store_files"] == 2 * 1460 + 7
    with pytest.raises(InputError, match=r"nsd_stimuli\.hdf5: memory\.ceiling_mb 400 is below"):
        stimuli_estimate(meta, 73000, (224,), ceiling_mb=400)


def test_freed_image_buffers_are_reused_not_refaulted():
    # convert_stimuli frees and allocates image- and shard-sized buffers all the time: after
    # memory.reuse_freed_buffers they come back from the heap, not as fresh zeroed pages
    code = """
import resource, sys
import numpy as np
from nsdzarr.prepare.memory import reuse_freed_buffers
if sys.argv[1] == "on":
    assert reuse_freed_buffers()
def shards():  # a few shard-sized buffers written, then freed together (as shards in flight)
    bufs = [np.ones(20 << 20, np.uint8) for _ in range(4)]
    del bufs
for _ in range(3):  # the first allocations fault their pages in
    shards()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    shards()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    faults = {}
    for mode in ("on", "off"):
        out = subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, env=env
        )
        assert out.returncode == 0, out.stderr
        faults[mode] = int(out.stdout.split()[-1])
    pages = 20 * (20 << 20) // 4096
    assert faults["off"] > pages / 20, faults  # glibc's default trims and refaults them
    assert faults["on"] < pages / 100, faults


@pytest.mark.parametrize("chunks", [None, "1", "4", "2x5"])
def test_read_ahead_names_the_bytes_of_the_rows(tmp_path: Path, chunks: str | None):
    # the source rows convert_stimuli reads next are prefetched from disk by their byte range
    data = source_images(40, 12, 9)
    src = write_brick(tmp_path / "s.hdf5", data, chunks)
    with h5py.File(src) as f:
        d = f["imgBrick"]
        for r0, r1 in ((0, 40), (8, 16), (13, 27)):
            start, stop = source_byte_range(d, r0, r1)
            raw = np.fromfile(src, np.uint8, stop - start, offset=start)
            c = d.chunks[0] if chunks else 1
            a, b = r0 - r0 % c, -(-r1 // c) * c  # whole chunks
            if chunks is None or "x" not in chunks:  # rows stored as they are, in order
                np.testing.assert_array_equal(raw, data[a:b].reshape(-1))
            else:  # 2 x 5 tiles, two per chunk row (the edge one padded), in order
                assert stop - start == (b - a) // c * 2 * d.chunks[0] * 12 * 5 * 3
    if shutil.which("fincore") is None:
        return
    # a brick bigger than the kernel's own read-ahead of its header: 200 rows of 12 KB
    big = write_brick(tmp_path / "big.hdf5", source_images(200, 64, 64), chunks)
    fd = os.open(big, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with h5py.File(big) as f:
            _prefetch(fd, f["imgBrick"], (100, 180))  # 80 rows, 983 KB
        res = subprocess.run(["fincore", "-b", "-n", "-r", "-o", "RES", str(big)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        assert int(res.stdout.split()[0]) >= 80 * 64 * 64 * 3
    finally:
        os.close(fd)


@pytest.mark.slow
def test_stimuli_job_peak_stays_within_its_model(tmp_path: Path):
    """The default store (raw, written by hand) of a brick chunked one image per chunk: the
    job's VmHWM is within its model, and the model at most 1.3x it."""
    n, h, w, per_shard = 400, 425, 425, 100  # 216 MB, 54 MB shards
    src = tmp_path / "brick.hdf5"
    with h5py.File(src, "w") as f:
        d = f.create_dataset("imgBrick", (n, h, w, 3), np.uint8, chunks=(1, h, w, 3))
        for s in range(0, n, 100):
            d[s : s + 100] = source_images(100, h, w, seed=s)
    code = f"""
import json
from nsdzarr.prepare.stimuli import convert_stimuli
from nsdzarr.prepare.storage import StimuliStorage
r = convert_stimuli({str(src)!r}, {str(tmp_path / "s.zarr")!r},
                    settings=StimuliStorage(images_per_shard={per_shard}))
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps([r["writer"], r["predicted_peak_bytes"], int(hwm.split()[1]) * 1024]))
"""
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    writer, model, peak = json.loads(out.stdout.splitlines()[-1])
    assert writer == "raw"
    assert model == stimuli_peak((n, h, w, 3), n, per_shard, chunked=True)
    assert peak <= model <= 1.3 * peak, (peak >> 20, model >> 20)
