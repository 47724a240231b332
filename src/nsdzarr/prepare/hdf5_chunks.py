"""The chunk index of an HDF5 dataset, parsed from the file's B-tree and verified against HDF5's
own answers (chunk count, sampled chunk bytes); falls back to h5py's chunk iterator.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import h5py
import numpy as np

_UNDEFINED = (1 << 64) - 1  # HDF5 'undefined address'


# --------------------------------------------------------------------------- chunk index


@dataclass(frozen=True)
class ChunkIndex:
    """Allocated chunks sorted by file offset; coordinates are chunk starts in elements."""

    z: np.ndarray  # int32
    y: np.ndarray  # int32
    x: np.ndarray  # int32
    offset: np.ndarray  # int64, absolute byte offset in the file
    size: np.ndarray  # int64, stored bytes
    filter_mask: np.ndarray  # uint32

    def __len__(self) -> int:
        return len(self.offset)


def _pread(fd: int, n: int, offset: int) -> bytes:
    """Exactly ``n`` bytes at ``offset``; raise EOFError on a short read."""
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise EOFError(f"short read at byte {offset}")
    return data


def _header_messages(fd: int, base: int, addr: int) -> Iterator[tuple[int, bytes]]:
    """Yield ``(type, body)`` of every message in the object header at relative ``addr``."""
    first = _pread(fd, 16, base + addr)
    if first[:4] == b"OHDR":
        yield from _header_messages_v2(fd, base, addr)
        return
    if first[0] != 1:
        raise ValueError(f"object header version {first[0]}")
    nmsgs, size = struct.unpack_from("<H4xI", first, 2)
    blocks = [(addr + 16, size)]
    seen = 0
    while blocks and seen < nmsgs:
        start, length = blocks.pop(0)
        raw = _pread(fd, length, base + start)
        pos = 0
        while pos + 8 <= length and seen < nmsgs:
            mtype, msize = struct.unpack_from("<HH", raw, pos)
            body = raw[pos + 8 : pos + 8 + msize]
            seen += 1
            if mtype == 0x10:
                blocks.append(struct.unpack_from("<QQ", body))
            yield mtype, body
            pos += 8 + msize


def _header_messages_v2(fd: int, base: int, addr: int) -> Iterator[tuple[int, bytes]]:
    """Messages of a version-2 (``OHDR``) object header."""
    head = _pread(fd, 64, base + addr)
    flags = head[5]
    pos = 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
    width = 1 << (flags & 3)
    size = int.from_bytes(head[pos : pos + width], "little")
    pos += width
    blocks = [(addr + pos, size, 0)]
    while blocks:
        start, length, skip = blocks.pop(0)
        raw = _pread(fd, length, base + start)
        p = skip
        hdr = 6 if flags & 0x04 else 4
        end = length - (4 if skip else 0)  # continuation blocks end with a checksum
        while p + hdr <= end:
            mtype = raw[p]
            msize = int.from_bytes(raw[p + 1 : p + 3], "little")
            body = raw[p + hdr : p + hdr + msize]
            if mtype == 0x10:
                off, ln = struct.unpack_from("<QQ", body)
                blocks.append((off, ln, 4))  # skip "OCHK"
            yield mtype, body
            p += hdr + msize


def _object_address(dset: h5py.Dataset) -> int:
    """File address (relative to the base) of the dataset's object header."""
    parent, _, name = (dset.name or "").rpartition("/")
    try:
        group = dset.file[parent or "/"]  # keep a reference: a temporary's id closes at once
        info = group.id.links.get_info(name.encode())
        if info.type == h5py.h5l.TYPE_HARD:
            return int(info.u)
    except (KeyError, ValueError, AttributeError):
        pass
    return int(h5py.h5o.get_info(dset.id).addr)  # slow for big chunked datasets: sums the index


def _btree_root(fd: int, base: int, dset: h5py.Dataset) -> int | None:
    """Address of the v1 B-tree chunk index of ``dset``, or None for other index types."""
    for mtype, body in _header_messages(fd, base, _object_address(dset)):
        if mtype == 0x08:
            if body[0] == 3 and body[1] == 2:  # layout v3, chunked: v1 B-tree
                return int(struct.unpack_from("<Q", body, 3)[0])
            return None
    return None


def _btree_v1_records(fd: int, base: int, root: int, rank: int) -> np.ndarray:
    """All leaf records (key + chunk address) of a v1 chunk B-tree, as one structured array."""
    rec = np.dtype(
        [("size", "<u4"), ("mask", "<u4"), ("coord", "<u8", (rank + 1,)), ("addr", "<u8")]
    )
    words = rec.itemsize // 8
    guess = 24 + 64 * rec.itemsize + rec.itemsize  # default K=32: at most 64 entries per node
    leaves: list[bytes] = []
    nodes, level, visited = ([] if root == _UNDEFINED else [root]), -1, 0  # no chunks yet
    limit = os.fstat(fd).st_size // 24 + 1
    while nodes:
        children: list[int] = []
        for node in nodes:
            visited += 1
            if visited > limit:
                raise ValueError("B-tree has more nodes than the file can hold")
            raw = os.pread(fd, guess, base + node)
            if raw[:5] != b"TREE\x01":
                raise ValueError(f"no chunk B-tree node at address {node}")
            if level < 0:
                level = raw[5]
            n = int.from_bytes(raw[6:8], "little")
            if raw[5] != level:
                raise ValueError("inconsistent B-tree levels")
            need = 24 + n * rec.itemsize
            if len(raw) < need:
                raw = _pread(fd, need, base + node)
            if level == 0:
                leaves.append(raw[24:need])
            else:
                table = np.frombuffer(raw, "<u8", count=n * words, offset=24).reshape(n, words)
                children.extend(table[:, -1].tolist())
        nodes, level = children, level - 1
    return np.frombuffer(b"".join(leaves), rec)


def _index_from_btree(fd: int, base: int, dset: h5py.Dataset) -> ChunkIndex | None:
    """Chunk index parsed straight from the file's v1 B-tree; None if not that layout."""
    sizes = dset.file.id.get_create_plist().get_sizes()
    if sizes != (8, 8):
        return None
    root = _btree_root(fd, base, dset)
    if root is None:
        return None
    recs = _btree_v1_records(fd, base, root, dset.ndim)
    coord = recs["coord"]
    if len(recs) and np.any(coord[:, 0]):
        return None  # chunks that do not start at trial 0
    return _make_index(
        coord[:, 1:4], recs["addr"].astype(np.int64) + base, recs["size"], recs["mask"]
    )


def _index_from_chunk_iter(dset: h5py.Dataset) -> ChunkIndex | None:
    """Chunk index through ``H5Dchunk_iter`` (HDF5 >= 1.12.3); None if unavailable."""
    infos: list = []
    try:
        dset.id.chunk_iter(infos.append)
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if not infos:
        return _make_index(np.empty((0, 3)), np.empty(0), np.empty(0), np.empty(0))
    coords, masks, offsets, sizes = zip(*infos, strict=True)
    coord = np.array(coords, dtype=np.int64)
    if np.any(coord[:, 0]):
        return None
    return _make_index(coord[:, 1:4], np.array(offsets), np.array(sizes), np.array(masks))


def _make_index(
    zyx: np.ndarray, offset: np.ndarray, size: np.ndarray, mask: np.ndarray
) -> ChunkIndex:
    """Compact, offset-sorted ChunkIndex from raw columns."""
    offset = np.asarray(offset, dtype=np.int64)
    order = np.argsort(offset, kind="stable")
    zyx = np.asarray(zyx, dtype=np.int32)[order]
    return ChunkIndex(
        z=np.ascontiguousarray(zyx[:, 0]),
        y=np.ascontiguousarray(zyx[:, 1]),
        x=np.ascontiguousarray(zyx[:, 2]),
        offset=offset[order],
        size=np.asarray(size, dtype=np.int64)[order],
        filter_mask=np.asarray(mask, dtype=np.uint32)[order],
    )


def _index_agrees(fd: int, dset: h5py.Dataset, index: ChunkIndex, samples: int = 32) -> bool:
    """Chunk count matches HDF5's, and sampled chunks hold the bytes HDF5 reads for them."""
    if len(index) != dset.id.get_num_chunks():
        return False
    picks = np.unique(np.linspace(0, len(index) - 1, min(samples, len(index))).astype(np.int64))
    for i in picks.tolist():
        mask, stored = dset.id.read_direct_chunk(
            (0, int(index.z[i]), int(index.y[i]), int(index.x[i]))
        )
        if mask != index.filter_mask[i] or len(stored) != index.size[i]:
            return False
        if os.pread(fd, len(stored), int(index.offset[i])) != stored:
            return False
    return True


def build_chunk_index(
    fd: int, dset: h5py.Dataset, fast: bool = True
) -> tuple[ChunkIndex | None, str]:
    """Verified chunk index of ``dset`` (open as ``fd``) and its source: "btree" or "chunk_iter"."""
    base = dset.file.userblock_size
    if fast:
        try:
            index = _index_from_btree(fd, base, dset)
        except (ValueError, EOFError, OSError, OverflowError, struct.error):
            index = None
        if index is not None and _index_agrees(fd, dset, index):
            return index, "btree"
    index = _index_from_chunk_iter(dset)
    if index is None:
        return None, ""
    if _index_agrees(fd, dset, index):
        return index, "chunk_iter"
    if base:  # older HDF5 reports chunk addresses relative to the userblock
        moved = ChunkIndex(
            index.z, index.y, index.x, index.offset + base, index.size, index.filter_mask
        )
        if _index_agrees(fd, dset, moved):
            return moved, "chunk_iter"
    return None, ""
