"""The independent read-back and the checksums of nsdzarr.prepare.verify, on real stores."""

from __future__ import annotations

from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from nsdzarr.prepare.verify import READERS, ReadBack, crc32c, file_state, read_blocks


@pytest.mark.parametrize("fast", [True, False])
def test_crc32c_is_the_crc32c_of_the_c_order_bytes(fast: bool):
    a = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    for x in (a, a[:, 1:], a[::2], a.astype(">i2"), a.astype("<i2"), a[:0]):
        assert crc32c(x, fast) == google_crc32c.value(np.ascontiguousarray(x).tobytes())


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("compressors", [None, zarr.codecs.ZstdCodec(level=1)])
def test_read_blocks_gives_every_row_in_order(tmp_path: Path, reader: str, compressors):
    data = np.random.default_rng(1).integers(-900, 900, (23, 4, 5), dtype=np.int16)
    arr = zarr.create_array(
        tmp_path / "a.zarr", shape=data.shape, dtype=data.dtype, chunks=(1, 4, 5),
        shards=(5, 4, 5), compressors=compressors,
    )  # fmt: skip
    arr[:] = data
    blocks = list(read_blocks(tmp_path / "a.zarr", 5, reader))
    assert [a for a, _ in blocks] == [0, 5, 10, 15, 20]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), data)
    np.testing.assert_array_equal(ReadBack(tmp_path / "a.zarr", reader).rows(3, 9), data[3:9])
    with pytest.raises(ValueError, match="reader must be one of"):
        ReadBack(tmp_path / "a.zarr", "h5py")


def test_file_state_changes_when_a_file_is_written_again(tmp_path: Path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    before = file_state(path)
    assert file_state(path) == before
    path.write_bytes(b"abcd")
    assert file_state(path) != before
