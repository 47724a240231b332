"""Whole Zarr v3 shards of zstd (or raw) chunks, encoded and decoded on every core.

zarr-python encodes a shard's chunks one at a time under the GIL; zstandard (encoding) and
``zarr_v3.Decoder`` (decoding) release it, so a thread pool uses both cores. Only the layouts
our stores use are handled here: ``bytes`` (little endian) + ``zstd`` inner codecs, or
``bytes`` alone (raw; zarr-python spends ~0.8 ms per chunk on those, ~1 min per 73,000
images), each optionally followed by ``crc32c`` (the chunk's checksum, storage.chunk_codecs),
index at the end with ``bytes`` + ``crc32c``. Tests check that zarr-python reads
these shards back.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
import zstandard

from nsdzarr.errors import InputError
from nsdzarr.training.zarr_v3 import ArrayLayout, Decoder, object_index

_local = threading.local()


def handles(arr: zarr.Array) -> bool:
    """Whether ``arr``'s shards have exactly the layout this module writes."""
    meta = arr.metadata.to_dict()
    codecs = meta.get("codecs", [])
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return False
    cfg = codecs[0]["configuration"]
    inner = [c["name"] for c in cfg["codecs"]]
    index = [c["name"] for c in cfg["index_codecs"]]
    little = all(
        c.get("configuration", {}).get("endian", "little") == "little" for c in cfg["codecs"]
    )
    return (
        inner in (["bytes", "zstd"], ["bytes"], ["bytes", "zstd", "crc32c"], ["bytes", "crc32c"])
        and little
        and index == ["bytes", "crc32c"]
        and cfg.get("index_location", "end") == "end"
        and tuple(cfg["chunk_shape"][1:]) == tuple(arr.shape[1:])
        and meta["chunk_key_encoding"]["name"] == "default"
        and arr.dtype.byteorder in "=<|"
    )


def _compressor(level: int) -> zstandard.ZstdCompressor:
    comp = getattr(_local, "compressor", None)
    if comp is None or _local.level != level:
        _local.compressor, _local.level = zstandard.ZstdCompressor(level=level), level
    return _local.compressor


def shard_path(arr: zarr.Array, store_root: str | os.PathLike[str], first_row: int) -> Path:
    """File of the shard holding ``first_row`` (default chunk key encoding, '/' separator)."""
    index = [str(first_row // arr.shards[0])] + ["0"] * (arr.ndim - 1)
    return Path(store_root) / arr.path / "c" / Path(*index)


def write_shard(
    arr: zarr.Array,
    store_root: str | os.PathLike[str],
    first_row: int,
    block: np.ndarray,
    pool: ThreadPoolExecutor,
) -> None:
    """Encode ``block`` (one whole shard of rows) and write it as the shard file."""
    inner = arr.metadata.to_dict()["codecs"][0]["configuration"]["codecs"]
    crc = inner[-1]["name"] == "crc32c"
    rows = arr.chunks[0]
    starts = range(0, len(block), rows)
    if len(inner) == 1 + crc:  # raw: the chunks are the block's own bytes, in order
        block = np.ascontiguousarray(block)
        pieces = [block[r : r + rows].reshape(-1).view(np.uint8) for r in starts]
    else:
        level = inner[1]["configuration"]["level"]
        pieces = list(
            pool.map(
                lambda r: _compressor(level).compress(
                    np.ascontiguousarray(block[r : r + rows]).data
                ),
                starts,
            )
        )
    if crc:  # each chunk followed by the crc32c of its encoded bytes (zarr's crc32c codec)
        pieces = [b for p in pieces for b in (p, google_crc32c.value(p).to_bytes(4, "little"))]
    sizes = np.array([memoryview(p).nbytes for p in pieces], dtype="<u8")
    if crc:
        sizes = sizes[0::2] + 4
    index = np.empty((arr.shards[0] // rows, 2), dtype="<u8")
    index[:] = np.iinfo(np.uint64).max  # chunks past the array's edge are empty
    index[: len(sizes), 0] = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    index[: len(sizes), 1] = sizes
    raw_index = index.tobytes()
    path = shard_path(arr, store_root, first_row)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.writelines(pieces)
        fh.write(raw_index)
        fh.write(google_crc32c.value(raw_index).to_bytes(4, "little"))


def read_shard(
    arr: zarr.Array,
    lay: ArrayLayout,
    store_root: str | os.PathLike[str],
    first_row: int,
    n_rows: int,
    pool: ThreadPoolExecutor,
) -> np.ndarray:
    """Decode the shard holding rows ``[first_row, first_row + n_rows)`` from its file.

    ``lay`` is the array's :func:`zarr_v3.parse_layout`, read once by the caller.
    """
    path = shard_path(arr, store_root, first_row)
    data = path.read_bytes()
    index = object_index(lay, data, str(path))
    buf = np.frombuffer(data, np.uint8)
    out = np.empty((n_rows, *arr.shape[1:]), dtype=arr.dtype)
    rows = arr.chunks[0]

    def decode(k: int) -> None:
        offset, size = (int(v) for v in index[k])
        dec = getattr(_local, "decoder", None)
        if dec is None or (dec.codec, dec.crc) != (lay.codec, lay.chunk_crc):
            dec = _local.decoder = Decoder(lay.codec, lay.chunk_crc)
        try:
            dec.into(buf[offset : offset + size], out[k * rows : (k + 1) * rows])
        except ValueError as exc:
            row = first_row + k * rows
            err = InputError(
                path, f"row {row} (chunk {k}) cannot be decoded ({exc}); store corrupt"
            )
            err.row = row  # for the caller's message
            raise err from exc

    list(pool.map(decode, range(-(-n_rows // rows))))
    return out
