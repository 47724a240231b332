"""The shard row reader and zarr_v3 decoding against zarr-python, over the layouts they accept."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

from nsdzarr.errors import InputError
from nsdzarr.training.row_reader import ShardRows
from nsdzarr.training.zarr_v3 import Decoder, crc32c_value, parse_layout, read_array

LAYOUTS = {
    # name: (chunks, shards, compressor, dtype, endian)
    "sharded-zstd-1row": ((1, 37), (10, 37), ZstdCodec(level=1), "<i2", "little"),
    "sharded-blosc-3rows": ((3, 37), (12, 37), BloscCodec(cname="lz4", clevel=5), "<i2", "little"),
    "sharded-raw-1row": ((1, 37), (8, 37), None, "<f4", "little"),
    "sharded-raw-1row-bigendian": ((1, 37), (8, 37), None, ">i2", "big"),
    "unsharded-zstd-4rows": ((4, 37), None, ZstdCodec(level=3), "<i2", "little"),
    "sharded-zstd-bigendian": ((2, 37), (10, 37), ZstdCodec(level=1), ">i2", "big"),
    # each chunk followed by its crc32c (storage.chunk_codecs): raw rows are read straight
    # into the batch with their checksums beside them, the others through the buffer
    "sharded-raw-1row-crc": ((1, 37), (8, 37), (Crc32cCodec(),), "<i2", "little"),
    "sharded-raw-3rows-crc": ((3, 37), (12, 37), (Crc32cCodec(),), "<i2", "little"),
    "sharded-zstd-1row-crc": (
        (1, 37),
        (10, 37),
        (ZstdCodec(level=1), Crc32cCodec()),
        "<i2",
        "little",
    ),
    "unsharded-blosc-crc": (
        (4, 37),
        None,
        (BloscCodec(cname="lz4"), Crc32cCodec()),
        "<i2",
        "little",
    ),
}


def write(path: Path, data: np.ndarray, name: str) -> zarr.Array:
    chunks, shard, comp, dtype, endian = LAYOUTS[name]
    arr = zarr.create_array(
        str(path),
        shape=data.shape,
        chunks=chunks,
        shards=shard,
        dtype=np.dtype(dtype).newbyteorder("="),
        compressors=comp,
        serializer=BytesCodec(endian=endian),
        fill_value=-7,
        zarr_format=3,
    )
    arr[...] = data
    return arr


@pytest.fixture(params=sorted(LAYOUTS))
def array(request, tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(3)
    dtype = np.dtype(LAYOUTS[request.param][3]).newbyteorder("=")
    data = (rng.normal(size=(103, 37)) * 300).astype(dtype)
    write(tmp_path / "a", data, request.param)
    return tmp_path / "a", data


def test_random_rows_with_repeats_equal_zarr_python(array):
    path, data = array
    _, lay = parse_layout(path)
    assert lay is not None
    reader = ShardRows(lay, max_open=3)
    rng = np.random.default_rng(0)
    for n in (1, 5, 32, 200):  # 200 > rows: every batch repeats rows
        rows = rng.integers(0, len(data), n)
        out = np.empty((n, data.shape[1]), dtype=lay.dtype)
        reader.read_rows(rows, out)
        np.testing.assert_array_equal(out, data[rows])
        assert len(reader.fds) <= 3  # the LRU bound holds between batches
    strided = np.empty((4, 2 * data.shape[1]), dtype=lay.dtype)[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):  # decoded by address: refused
        reader.read_rows(np.arange(4), strided)
    everything = np.empty((len(data), data.shape[1]), dtype=lay.dtype)
    reader.read_rows(np.arange(len(data)), everything)  # coalesced whole-object reads
    np.testing.assert_array_equal(everything, data)
    with ThreadPoolExecutor(1) as pool:  # half of the runs decoded on another thread
        rows = rng.permutation(len(data))
        reader.read_rows(rows, everything, pool)
        np.testing.assert_array_equal(everything, data[rows])
    np.testing.assert_array_equal(read_array(path), data)
    reader.close()
    assert not reader.fds


@pytest.mark.parametrize(
    "name", ["sharded-raw-1row", "sharded-raw-1row-bigendian", "sharded-raw-1row-crc"]
)
def test_row_views_are_the_rows_through_bounded_mappings(tmp_path: Path, name: str):
    """Raw one-row chunks: views of the mapped files equal the rows, with repeats, in any
    byte order, after a fork's ``forget``; the open files stay bounded; rows of a missing
    shard give None (read_rows reports them)."""
    dtype = np.dtype(LAYOUTS[name][3]).newbyteorder("=")
    data = (np.random.default_rng(5).normal(size=(103, 37)) * 300).astype(dtype)
    write(tmp_path / "a", data, name)
    _, lay = parse_layout(tmp_path / "a")
    reader = ShardRows(lay, max_open=3, verify=False)
    rng = np.random.default_rng(1)
    for n in (1, 5, 32, 200):
        rows = rng.integers(0, len(data), n)
        views = reader.row_views(rows)
        assert views is not None
        np.testing.assert_array_equal(np.stack(views), data[rows])
        assert len(reader.fds) + len(reader.maps) <= 3
    reader.forget()
    rows = rng.integers(0, len(data), 32)
    np.testing.assert_array_equal(np.stack(reader.row_views(rows)), data[rows])
    if lay.chunk_crc:  # with the crc32c stored after each row
        stored = np.zeros(len(rows), np.uint32)
        np.testing.assert_array_equal(np.stack(reader.row_views(rows, stored)), data[rows])
        want = [crc32c_value(data[r].astype(lay.dtype).tobytes()) for r in rows.tolist()]
        np.testing.assert_array_equal(stored, want)
    reader.close()
    os.remove(tmp_path / "a" / "c" / "2" / "0")  # rows 16..23
    reader = ShardRows(lay, max_open=3, verify=False)
    assert reader.row_views(np.array([3, 17])) is None
    np.testing.assert_array_equal(np.stack(reader.row_views(np.array([3, 40]))), data[[3, 40]])


def test_absent_shard_and_empty_chunks_read_as_fill_value(tmp_path: Path):
    data = np.arange(40 * 37, dtype=np.int16).reshape(40, 37)
    data[10:20] = -7  # zarr-python writes no chunk equal to the fill value
    arr = write(tmp_path / "a", data, "sharded-zstd-1row")
    assert np.array_equal(arr[...], data)
    os.remove(tmp_path / "a" / "c" / "3" / "0")  # rows 30..39: the whole shard absent
    data[30:40] = -7
    _, lay = parse_layout(tmp_path / "a")
    out = np.empty((40, 37), np.int16)
    ShardRows(lay, 8).read_rows(np.arange(40)[::-1], out)
    np.testing.assert_array_equal(out, data[::-1])


def test_damaged_shard_gives_one_line_errors(tmp_path: Path):
    data = np.arange(30 * 37, dtype=np.int16).reshape(30, 37)
    write(tmp_path / "a", data, "sharded-zstd-1row")
    shard = tmp_path / "a" / "c" / "1" / "0"
    raw = bytearray(shard.read_bytes())
    _, lay = parse_layout(tmp_path / "a")
    raw[5] ^= 0xFF  # inside the first chunk's zstd frame
    shard.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="cannot be decoded") as e:
        ShardRows(lay, 8).read_rows(np.array([10]), np.empty((1, 37), np.int16))
    assert str(shard) in str(e.value) and "\n" not in str(e.value)
    raw[-1] ^= 0xFF  # the index checksum
    shard.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="checksum"):
        ShardRows(lay, 8).read_rows(np.array([10]), np.empty((1, 37), np.int16))
    shard.write_bytes(bytes(raw[:100]))
    with pytest.raises(InputError, match="truncated"):
        ShardRows(lay, 8).read_rows(np.array([10]), np.empty((1, 37), np.int16))


@pytest.mark.parametrize("direct", [True, False], ids=["numcodecs-C", "python-fallback"])
@pytest.mark.parametrize("codec", ["zstd", "blosc"])
def test_decoder_rejects_wrong_sizes(codec: str, direct: bool, monkeypatch):
    import numcodecs
    import numcodecs.blosc

    from nsdzarr.training import fallbacks

    if not direct:  # as where numcodecs does not export its C symbols
        monkeypatch.setenv(fallbacks.ENV, "decoders")
        monkeypatch.setattr(numcodecs.blosc, "use_threads", numcodecs.blosc.use_threads)
    assert Decoder(codec).direct is direct
    row = np.arange(100, dtype=np.int16)
    enc = numcodecs.Zstd(1).encode(row) if codec == "zstd" else numcodecs.Blosc("lz4").encode(row)
    src = np.frombuffer(enc, np.uint8)
    out = np.empty(100, np.int16)
    Decoder(codec).into(src, out)
    np.testing.assert_array_equal(out, row)
    with pytest.raises(ValueError):
        Decoder(codec).into(src, np.empty(99, np.int16))
    with pytest.raises(ValueError):
        Decoder(codec).into(src[:-3], out)


@pytest.mark.parametrize("name", [n for n in sorted(LAYOUTS) if n.endswith("-crc")])
def test_every_flipped_byte_of_a_checksummed_object_names_the_file_and_row(tmp_path, name):
    data = (np.arange(30 * 37) % 1000).astype(np.int16).reshape(30, 37)
    write(tmp_path / "a", data, name)
    _, lay = parse_layout(tmp_path / "a")
    assert lay.chunk_crc
    path = Path(lay.key((0, 0)))
    raw = path.read_bytes()
    rows = np.arange(lay.grid[0])
    out = np.empty((len(rows), 37), np.int16)
    for pos in range(len(raw)):  # chunk data, chunk checksums, the index and its checksum
        bad = bytearray(raw)
        bad[pos] ^= 0x01
        path.write_bytes(bytes(bad))
        with pytest.raises(InputError, match=rf"^{path}: row \d+: ") as e:
            ShardRows(lay, 4).read_rows(rows, out)
        assert "\n" not in str(e.value)
        with pytest.raises(InputError):
            read_array(tmp_path / "a")  # whole-object reads (the converter's) check too
    path.write_bytes(raw)
    ShardRows(lay, 4).read_rows(rows, out)
    np.testing.assert_array_equal(out, data[rows])
    bad = bytearray(raw)
    bad[0] ^= 0x01  # first byte of row 0's chunk
    path.write_bytes(bytes(bad))
    if lay.codec is None:  # unchecked, a raw chunk is read with its wrong value
        ShardRows(lay, 4, verify=False).read_rows(rows, out)
        assert not np.array_equal(out, data[rows])
