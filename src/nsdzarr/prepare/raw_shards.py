"""Whole shards of a raw Zarr v3 array written by hand, one ``writev`` per shard file.

An image store's default chunks are the image's bytes plus their crc32c, so a shard is the
source rows laid end to end with a checksum after each, then the index. zarr-python builds the
same file with ~4 copies of every image (benchmarks/README.md, issue #13); here the kernel copies
each image once, from the shard buffer into the file. Arrays this writer does not know (any
compressor, several rows per chunk, big-endian data) go through zarr-python
(:class:`nsdzarr.prepare.convert.ShardIO`); the files are byte for byte those zarr-python writes
(tests/test_raw_shards.py), and every shard is still read back and checked against the source's
checksums (through the loader's reader, ``verify.ReadBack("nsdzarr")``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from nsdzarr.prepare.convert import ShardIO
from nsdzarr.prepare.verify import crc32c, row_checksums
from nsdzarr.training.zarr_v3 import EMPTY, ArrayLayout

WRITERS = ("raw", "zarr-python")
IOV_MAX = 1024  # Linux's limit on buffers per writev


def writes_raw(layout: ArrayLayout | None) -> bool:
    """Whether ``layout`` is one this writer makes: sharded, one row per chunk, no compressor,
    a crc32c after each chunk and after the index, the index at the end, little-endian data."""
    return (
        layout is not None
        and layout.sharded
        and layout.codec is None
        and layout.chunk_crc
        and layout.index_crc
        and layout.index_at_end
        and layout.inner[0] == 1
        and tuple(layout.inner[1:]) == tuple(layout.grid[1:])
        and layout.dtype.byteorder in "<|="
        and (layout.dtype.byteorder != "=" or np.little_endian)
    )


def shard_index(n_rows: int, shard_rows: int, chunk_bytes: int) -> bytes:
    """The index of a shard holding ``n_rows`` of ``shard_rows`` chunks, each ``chunk_bytes``
    long and in order, with its crc32c: little-endian (offset, size) pairs, absent chunks EMPTY."""
    index = np.full((shard_rows, 2), EMPTY, dtype="<u8")
    index[:n_rows, 0] = np.arange(n_rows, dtype=np.uint64) * chunk_bytes
    index[:n_rows, 1] = chunk_bytes
    return index.tobytes() + np.uint32(crc32c(index)).astype("<u4").tobytes()


def _writev_all(fd: int, buffers: Sequence[memoryview]) -> None:
    """Write every buffer in order, however the kernel splits the writes."""
    pending = [b for b in buffers if b.nbytes]
    while pending:
        done = os.writev(fd, pending[:IOV_MAX])
        while pending and done >= pending[0].nbytes:
            done -= pending.pop(0).nbytes
        if done:
            pending[0] = pending[0][done:]


def write_shard_file(
    path: str | os.PathLike[str], rows: np.ndarray, sums: np.ndarray, shard_rows: int
) -> None:
    """Write ``rows`` (C-contiguous, one chunk each) with their crc32c ``sums`` as the shard
    file ``path`` of an array whose shards hold ``shard_rows`` chunks."""
    if not rows.flags.c_contiguous or len(sums) != len(rows) or len(rows) > shard_rows:
        raise ValueError("rows must be C-contiguous, one checksum each, at most one shard")
    flat = rows.reshape(len(rows), -1).view(np.uint8)
    crcs = np.ascontiguousarray(sums, dtype="<u4").view(np.uint8).reshape(-1, 4)
    buffers: list[memoryview] = []
    for j in range(len(rows)):
        buffers += [memoryview(flat[j]), memoryview(crcs[j])]
    chunk_bytes = flat.shape[1] + 4
    buffers.append(memoryview(shard_index(len(rows), shard_rows, chunk_bytes)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        _writev_all(fd, buffers)
    finally:
        os.close(fd)


class RawShardIO(ShardIO):
    """Whole-shard writes of one raw array by :func:`write_shard_file`."""

    def __init__(self, arr: zarr.Array, root: Path, layout: ArrayLayout | None = None) -> None:
        super().__init__(arr, root, layout)
        if not writes_raw(self.layout):
            raise ValueError(f"{arr.path}: not a layout the raw shard writer makes")

    def _store(self, t0: int, block: np.ndarray, sums: np.ndarray | None) -> None:
        if sums is None:
            sums = row_checksums(block)
        block = np.ascontiguousarray(block, dtype=self.layout.dtype)
        write_shard_file(self.shard_file(t0), block, sums, self.arr.shards[0])


def shard_io(arr: zarr.Array, root: Path, writer: str | None = None) -> ShardIO:
    """The writer of ``arr``'s shards: ``raw`` when its layout allows (the default), else
    (or when ``writer="zarr-python"``) zarr-python's."""
    if writer not in (None, *WRITERS):
        raise ValueError(f"writer must be one of {WRITERS}, got {writer!r}")
    io = ShardIO(arr, root)
    if writer != "zarr-python" and writes_raw(io.layout):
        return RawShardIO(arr, root, io.layout)  # parsed once
    if writer == "raw":
        raise ValueError(f"{arr.path}: not a layout the raw shard writer makes")
    return io
