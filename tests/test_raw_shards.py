"""The hand-written shard writer: byte for byte zarr-python's files, read by every reader."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import zarr

from nsdzarr.prepare.convert import ShardIO
from nsdzarr.prepare.raw_shards import IOV_MAX, RawShardIO, shard_io, writes_raw
from nsdzarr.prepare.stimuli import convert_stimuli
from nsdzarr.prepare.storage import STIMULI_STORAGE, StimuliStorage, create_image_array
from nsdzarr.training.zarr_v3 import parse_layout


def files_of(store: Path) -> dict[str, bytes]:
    """Every shard file below ``store``, by relative path."""
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


def write_with(
    writer: str, root: Path, data: np.ndarray, settings: StimuliStorage
) -> tuple[ShardIO, dict[str, bytes]]:
    group = zarr.open_group(root, mode="w", zarr_format=3)
    arr = create_image_array(group, "images", data.shape, settings)
    io = shard_io(arr, root, writer)
    step = arr.shards[0]
    for t0 in range(0, len(data), step):
        io.write(t0, data[t0 : t0 + step])
    return io, files_of(root / "images")


# H != W everywhere: a swapped axis changes the bytes; 1 row per shard, a partial last shard,
# and more chunks per shard than one writev takes (IOV_MAX buffers)
@pytest.mark.parametrize(
    "n, h, w, per_shard",
    [(7, 5, 4, 3), (6, 3, 2, 3), (1, 9, 2, 5), (5, 4, 3, 1), (1300, 2, 3, 700)],
)
def test_shards_are_byte_for_byte_zarr_pythons(tmp_path: Path, n: int, h: int, w: int, per_shard):
    data = np.random.default_rng(n).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    settings = replace(STIMULI_STORAGE, images_per_shard=per_shard)
    ref_io, ref = write_with("zarr-python", tmp_path / "ref.zarr", data, settings)
    raw_io, ours = write_with(None, tmp_path / "raw.zarr", data, settings)
    assert type(ref_io) is ShardIO and type(raw_io) is RawShardIO
    assert list(ours) == list(ref) and ours == ref
    if per_shard == 700:
        assert 2 * per_shard + 1 > IOV_MAX  # the writev loop took more than one call
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "raw.zarr" / "images")[:], data)
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(raw_io.root / "images")}}
    np.testing.assert_array_equal(ts.open(spec, read=True).result().read().result(), data)


@pytest.mark.parametrize("codec", ["zstd", "blosc-lz4"])
def test_compressed_arrays_go_through_zarr_python(tmp_path: Path, codec: str):
    group = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3)
    arr = create_image_array(group, "images", (4, 3, 2, 3), StimuliStorage(codec=codec))
    assert not writes_raw(parse_layout(tmp_path / "s.zarr" / "images")[1])
    assert type(shard_io(arr, tmp_path / "s.zarr")) is ShardIO
    with pytest.raises(ValueError, match="not a layout the raw shard writer makes"):
        shard_io(arr, tmp_path / "s.zarr", "raw")
    with pytest.raises(ValueError, match="writer must be one of"):
        shard_io(arr, tmp_path / "s.zarr", "mine")


def test_a_store_is_the_same_whichever_writer(tmp_path: Path):
    """convert_stimuli by hand and through zarr-python: the same files, resized copies too."""
    import h5py

    data = np.random.default_rng(3).integers(0, 256, (23, 9, 7, 3), dtype=np.uint8)
    src = tmp_path / "stim.hdf5"
    with h5py.File(src, "w") as f:
        f.create_dataset("imgBrick", data=data, chunks=(1, 9, 7, 3))
    stores = {}
    fds = set(os.listdir("/proc/self/fd"))
    for writer in ("raw", "zarr-python"):
        store = tmp_path / f"{writer}.zarr"
        report = convert_stimuli(
            src, store, range(2, 23), sizes=(4,), settings=StimuliStorage(images_per_shard=5),
            writer=writer,
        )  # fmt: skip
        assert report["writer"] == writer
        # hand-written shards are read back by the loader's reader, which closes its files
        assert report["verified_by"] == ("nsdzarr" if writer == "raw" else "tensorstore")
        assert set(os.listdir("/proc/self/fd")) <= fds
        stores[writer] = files_of(store)
    assert stores["raw"].keys() == stores["zarr-python"].keys()
    for name in stores["raw"]:
        if "/c/" in name:  # shard files (the attributes name the writer's run)
            assert stores["raw"][name] == stores["zarr-python"][name], name
    assert any(name.startswith("images_4/c/") for name in stores["raw"])


def test_written_files_are_whole_after_a_short_write(tmp_path: Path, monkeypatch):
    """A writev that writes less than asked (signals, quotas) is continued, not dropped."""
    real = os.writev

    def short(fd: int, buffers) -> int:  # the kernel takes at most 1000 bytes per call
        total, left = 0, 1000
        for b in buffers:
            n = real(fd, [memoryview(b)[:left]])
            total, left = total + n, left - n
            if not left:
                break
        return total

    data = np.random.default_rng(1).integers(0, 256, (9, 17, 13, 3), dtype=np.uint8)
    settings = replace(STIMULI_STORAGE, images_per_shard=4)
    _, ref = write_with("zarr-python", tmp_path / "ref.zarr", data, settings)
    monkeypatch.setattr(os, "writev", short)
    _, ours = write_with("raw", tmp_path / "raw.zarr", data, settings)
    assert ours == ref


@pytest.mark.parametrize("writer, kind", [(None, RawShardIO), ("zarr-python", ShardIO)])
def test_the_layout_is_parsed_once(tmp_path: Path, monkeypatch, writer, kind):
    """Choosing the writer reads the array's zarr.json once, whichever writer it picks."""
    import nsdzarr.prepare.convert as convert

    group = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3)
    arr = create_image_array(group, "images", (4, 3, 2, 3), STIMULI_STORAGE)
    calls = []
    monkeypatch.setattr(convert, "parse_layout", lambda p: calls.append(p) or parse_layout(p))
    io = shard_io(arr, tmp_path / "s.zarr", writer)
    assert type(io) is kind and writes_raw(io.layout) and len(calls) == 1
