"""Fast, bounded-memory reads of NSD betas HDF5 files into trial-major numpy arrays.

NSD stores ``/betas`` as ``(T, Z, Y, X)`` with one chunk per voxel (all trials), which h5py reads
slowly.  ``SessionReader`` builds the chunk index once, reads chunk bytes in file-offset order in
large blocks and transposes them into place; any other layout is read through h5py in z-slabs.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np

from nsdzarr.errors import InputError, unreadable
from nsdzarr.memory import READ_BUFFER_BYTES

DEFAULT_GAP_BYTES = 64 << 10
_IOV_MAX = 1024
_UNDEFINED = (1 << 64) - 1  # HDF5 "undefined address"
_TILE_N = 512  # voxels per transpose tile
_TILE_T = 64  # trials per transpose tile
_MAX_HOLE = 64  # voxels missing inside one transposed run
_MIN_RUN = 64  # smaller runs use fancy indexing

Strategy = Literal["chunk-index", "h5py"]


# --------------------------------------------------------------------------- opening


def _problem_opening(path: Path) -> str | None:
    """Why ``path`` cannot be an HDF5 file, or None if it looks like one."""
    if not path.exists():
        return "file not found"
    if not path.is_file():
        return "not a regular file"
    if problem := unreadable(path):
        return problem
    if not h5py.is_hdf5(str(path)):
        return "not an HDF5 file (no HDF5 signature)"
    return None


def open_hdf5(path: str | os.PathLike[str]) -> h5py.File:
    """``path`` opened read-only; InputError (one line) if missing, unreadable or not HDF5."""
    problem = _problem_opening(Path(path))
    if problem:
        raise InputError(path, problem)
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise InputError(path, f"cannot open as HDF5 (truncated or corrupt?): {e}") from None


def open_betas(
    path: str | os.PathLike[str], dataset: str = "betas"
) -> tuple[h5py.File, h5py.Dataset]:
    """Open ``path`` read-only and return ``(file, dataset)``; raise InputError if unusable."""
    path = Path(path)
    f = open_hdf5(path)
    try:
        obj = f.get(dataset)
        if not isinstance(obj, h5py.Dataset):
            names = sorted(f.keys())
            there = (
                ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") if names else "nothing"
            )
            raise InputError(path, f"no dataset named {dataset!r} (top level has: {there})")
        if obj.ndim != 4:
            raise InputError(
                path, f"dataset {dataset!r} is {obj.ndim}-D {obj.shape}, expected 4-D (T, Z, Y, X)"
            )
        if obj.dtype.kind not in "iuf":
            raise InputError(
                path, f"dataset {dataset!r} has dtype {obj.dtype}, expected integer or float"
            )
        return f, obj
    except InputError:
        f.close()
        raise
    except OSError as e:  # metadata read failures in a damaged file
        f.close()
        raise InputError(
            path, f"cannot read dataset {dataset!r} (truncated or corrupt?): {e}"
        ) from None


@contextmanager
def betas_dataset(path: str | os.PathLike[str], dataset: str = "betas") -> Iterator[h5py.Dataset]:
    """Context manager around ``open_betas`` that yields the dataset and closes the file."""
    f, d = open_betas(path, dataset)
    try:
        yield d
    finally:
        f.close()


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


# --------------------------------------------------------------------------- block plan


def plan_blocks(
    offset: np.ndarray, nbytes: int, max_block: int, max_gap: int
) -> list[tuple[int, int]]:
    """Split offset-sorted chunks of ``nbytes`` each into ``[i, j)`` runs read as one span."""
    n = len(offset)
    if n == 0:
        return []
    ends = offset + nbytes
    breaks = np.flatnonzero(offset[1:] - ends[:-1] > max_gap) + 1
    breaks = np.append(breaks, n)
    blocks = []
    i = 0
    while i < n:
        hard = int(breaks[np.searchsorted(breaks, i, side="right")])
        j = int(np.searchsorted(ends, offset[i] + max_block, side="right"))
        j = max(i + 1, min(j, hard))
        blocks.append((i, j))
        i = j
    return blocks


def _read_block(
    fd: int, offset: np.ndarray, nbytes: int, dest: memoryview, scratch: memoryview
) -> None:
    """Read chunks at sorted ``offset`` (``nbytes`` each) into ``dest`` back to back, skip gaps."""
    ends = offset + nbytes
    gaps = offset[1:] - ends[:-1]
    cut = np.flatnonzero(gaps != 0) + 1
    starts = np.concatenate(([0], cut))
    stops = np.append(cut, len(offset))
    iov: list[memoryview] = []
    for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
        iov.append(dest[a * nbytes : b * nbytes])
        if b < len(offset):
            iov.append(scratch[: int(gaps[b - 1])])  # bytes between chunks (plan caps the size)
    pos = int(offset[0])
    for k in range(0, len(iov), _IOV_MAX):
        part = iov[k : k + _IOV_MAX]
        want = sum(len(v) for v in part)
        if os.preadv(fd, part, pos) != want:  # regular files only read short at EOF
            raise EOFError(f"file ends before byte {pos + want} (truncated?)")
        pos += want


def check_finite(block: np.ndarray, source: str | os.PathLike[str], where: str = "") -> None:
    """Raise InputError naming the first trial of a float ``(T, ...)`` block with NaN or inf."""
    if block.dtype.kind != "f":
        return
    # a float64 sum per trial is finite iff every value is; no block-sized temporary
    ok = np.isfinite(block.reshape(block.shape[0], -1).sum(axis=1, dtype=np.float64))
    if not ok.all():
        trial = int(np.flatnonzero(~ok)[0])
        raise InputError(source, f"betas hold NaN or inf values, first at trial {trial}{where}")


# --------------------------------------------------------------------------- reader


class SessionReader:
    """Reads one betas dataset as trial-major ``(T, Z, Y, X)`` arrays with bounded scratch memory.

    ``strategy`` is "chunk-index" (own reads of raw chunks that span all trials) or "h5py".
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        dataset: str = "betas",
        buffer_bytes: int = READ_BUFFER_BYTES,
        gap_bytes: int = DEFAULT_GAP_BYTES,
        allow_fast: bool = True,
        index_source: Literal["auto", "chunk_iter"] = "auto",
    ) -> None:
        self.path = Path(path)
        self.buffer_bytes = int(buffer_bytes)
        self.gap_bytes = int(gap_bytes)
        self._file, self._dset = open_betas(self.path, dataset)
        d = self._dset
        self.shape: tuple[int, int, int, int] = d.shape
        self.chunks: tuple[int, ...] | None = d.chunks
        self.file_dtype: np.dtype = d.dtype
        self.dtype: np.dtype = d.dtype.newbyteorder("=")
        self.fill_value = np.array(d.fillvalue, dtype=self.dtype)
        self.index: ChunkIndex | None = None
        self.index_source = ""
        self.strategy: Strategy = "h5py"
        self._fd = -1
        if allow_fast and self._fast_layout():
            self._fd = os.open(self.path, os.O_RDONLY)
            try:
                index, self.index_source = build_chunk_index(
                    self._fd, d, fast=index_source == "auto"
                )
            except OSError as e:
                self.close()
                raise InputError(
                    self.path, f"cannot read the chunk index (truncated or corrupt?): {e}"
                ) from None
            if index is not None and self._index_usable(index):
                self.index, self.strategy = index, "chunk-index"
            else:
                os.close(self._fd)
                self._fd = -1

    def _chunk_nbytes(self) -> int:
        assert self.chunks is not None
        return int(np.prod(self.chunks)) * self.file_dtype.itemsize

    def _chunks_per_block(self) -> int:
        """Chunks per read block so that block + transpose scratch fit ``buffer_bytes``."""
        scratch = self._chunk_nbytes() + self.shape[0] * self.dtype.itemsize * 5 // 4
        return max(1, self.buffer_bytes // scratch)

    def _fast_layout(self) -> bool:
        """Chunked, unfiltered, chunks spanning every trial, and a chunk fits the buffer budget."""
        c = self.chunks
        if c is None or self._dset.id.get_create_plist().get_nfilters() != 0:
            return False
        return c[0] >= self.shape[0] and 2 * self._chunk_nbytes() <= self.buffer_bytes

    def _index_usable(self, index: ChunkIndex) -> bool:
        """Every chunk stored raw at full size, on the chunk grid, none overlapping."""
        assert self.chunks is not None
        _, cz, cy, cx = self.chunks
        nbytes = self._chunk_nbytes()
        if np.any(index.size != nbytes) or np.any(index.filter_mask != 0):
            return False
        if np.any(np.diff(index.offset) < nbytes):
            return False
        return not np.any((index.z % cz) | (index.y % cy) | (index.x % cx))

    def close(self) -> None:
        """Close the HDF5 file and the raw file descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._file.close()

    def __enter__(self) -> SessionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_all(self, out: np.ndarray | None = None) -> np.ndarray:
        """Whole dataset as a native-endian ``(T, Z, Y, X)`` array."""
        return self.read_planes(0, self.shape[1], out)

    def read_planes(self, z0: int, z1: int, out: np.ndarray | None = None) -> np.ndarray:
        """All trials of z-planes ``[z0, z1)`` as a native-endian ``(T, z1 - z0, Y, X)`` array."""
        t, nz, y, x = self.shape
        if not 0 <= z0 <= z1 <= nz:
            raise ValueError(f"plane range [{z0}, {z1}) is outside [0, {nz}]")
        shape = (t, z1 - z0, y, x)
        zeroed = False
        if out is None:
            # fresh zero pages cost nothing until written and already hold a zero fill value
            zeroed = self.strategy == "chunk-index" and not self.fill_value
            out = np.zeros(shape, self.dtype) if zeroed else np.empty(shape, self.dtype)
        elif out.shape != shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {self.dtype} array of shape {shape}")
        if z1 == z0:
            return out
        try:
            if self.strategy == "chunk-index":
                self._read_chunks(z0, z1, out, zeroed)
            else:
                self._read_h5py(z0, z1, out)
        except (EOFError, OSError) as e:
            raise InputError(
                self.path, f"cannot read planes {z0}..{z1 - 1} (truncated or corrupt?): {e}"
            ) from None
        return out

    def read_voxels(self, zyx: np.ndarray) -> np.ndarray:
        """All trials of the voxels at rows ``(z, y, x)`` as a ``(T, n)`` array, in row order.

        On the NSD layout only those voxels' chunks are read; otherwise the z-planes they span.
        """
        zyx = np.asarray(zyx, dtype=np.int64).reshape(-1, 3)
        t, *vol = self.shape
        if len(zyx) and (np.any(zyx < 0) or np.any(zyx >= np.asarray(vol))):
            raise ValueError(f"voxel coordinates outside the volume {tuple(vol)} (z, y, x)")
        out = np.empty((t, len(zyx)), self.dtype)
        if not len(zyx):
            return out
        try:
            if self.strategy == "chunk-index" and tuple(self.chunks[1:]) == (1, 1, 1):
                self._read_voxel_chunks(zyx, out)
            else:
                self._read_voxel_planes(zyx, out)
        except (EOFError, OSError) as e:
            raise InputError(
                self.path, f"cannot read voxels (truncated or corrupt?): {e}"
            ) from None
        return out

    def _read_voxel_chunks(self, zyx: np.ndarray, out: np.ndarray) -> None:
        """One-voxel chunks of the wanted voxels, in file order, each a column of ``out``."""
        assert self.index is not None and self.chunks is not None
        idx = self.index
        t, nz, ny, nx = self.shape
        lookup = np.full(nz * ny * nx, -1, np.int64)
        lookup[(idx.z.astype(np.int64) * ny + idx.y) * nx + idx.x] = np.arange(len(idx))
        want = lookup[(zyx[:, 0] * ny + zyx[:, 1]) * nx + zyx[:, 2]]
        out[:, want < 0] = self.fill_value  # unallocated chunks
        cols = np.flatnonzero(want >= 0)
        # each chunk once, in file order; duplicates of a voxel share it
        chunks, inverse = np.unique(want[cols], return_inverse=True)
        order = np.argsort(idx.offset[chunks], kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        offs = idx.offset[chunks[order]]
        vals_sorted = np.empty((len(offs), t), self.dtype)
        nbytes = self._chunk_nbytes()
        per_block = self._chunks_per_block()
        buf = np.empty(per_block * nbytes, np.uint8)
        scratch = np.empty(self.gap_bytes, np.uint8)
        for i, j in plan_blocks(offs, nbytes, per_block * nbytes, self.gap_bytes):
            _read_block(self._fd, offs[i:j], nbytes, memoryview(buf), memoryview(scratch))
            vals = buf[: (j - i) * nbytes].view(self.file_dtype).reshape(j - i, -1)
            vals_sorted[i:j] = vals[:, :t]
        out[:, cols] = vals_sorted[rank[inverse]].T

    def _read_voxel_planes(self, zyx: np.ndarray, out: np.ndarray) -> None:
        """Planes spanned by the voxels, a buffer's worth at a time, picking the voxels."""
        t, _, ny, nx = self.shape
        step = max(1, self.buffer_bytes // (t * ny * nx * self.dtype.itemsize))
        z_lo, z_hi = int(zyx[:, 0].min()), int(zyx[:, 0].max()) + 1
        for a in range(z_lo, z_hi, step):
            b = min(a + step, z_hi)
            sel = np.flatnonzero((zyx[:, 0] >= a) & (zyx[:, 0] < b))
            if len(sel):
                slab = self.read_planes(a, b)
                out[:, sel] = slab[:, zyx[sel, 0] - a, zyx[sel, 1], zyx[sel, 2]]

    def _read_h5py(self, z0: int, z1: int, out: np.ndarray) -> None:
        """h5py ``read_direct`` in z-slabs of about ``buffer_bytes``, aligned to the chunk grid."""
        t, _, y, x = self.shape
        cz = self.chunks[1] if self.chunks else 1
        step = max(1, self.buffer_bytes // (t * y * x * self.dtype.itemsize))
        step = max(cz, step - step % cz)
        a = z0
        while a < z1:
            b = min(z1, (a // step + 1) * step)
            self._dset.read_direct(out, np.s_[:, a:b], np.s_[:, a - z0 : b - z0])
            a = b

    def _read_chunks(self, z0: int, z1: int, out: np.ndarray, zeroed: bool) -> None:
        """Raw chunks overlapping planes ``[z0, z1)``, read in file order and put into ``out``."""
        assert self.index is not None and self.chunks is not None
        idx = self.index
        t, _, y, x = self.shape
        ct, cz, cy, cx = self.chunks
        sel = np.flatnonzero((idx.z < z1) & (idx.z + cz > z0))
        n_grid = (-(-z1 // cz) - z0 // cz) * -(-y // cy) * -(-x // cx)
        if len(sel) < n_grid and not zeroed:
            out[...] = self.fill_value  # unallocated chunks read as the fill value
        if not len(sel):
            return
        nbytes = self._chunk_nbytes()
        per_block = self._chunks_per_block()
        offs = idx.offset[sel]
        buf = np.empty(per_block * nbytes, np.uint8)
        scratch = np.empty(self.gap_bytes, np.uint8)
        voxel_chunks = cz == cy == cx == 1
        span = np.empty((per_block * 5 // 4, t), self.dtype) if voxel_chunks else None
        for i, j in plan_blocks(offs, nbytes, per_block * nbytes, self.gap_bytes):
            _read_block(self._fd, offs[i:j], nbytes, memoryview(buf), memoryview(scratch))
            vals = buf[: (j - i) * nbytes].view(self.file_dtype).reshape(j - i, ct, cz, cy, cx)
            rows = sel[i:j]
            zs = idx.z[rows] - z0
            if span is not None:
                flat = (zs.astype(np.int64) * y + idx.y[rows]) * x + idx.x[rows]
                _scatter_voxels(vals[:, :t, 0, 0, 0], flat, span, out.reshape(t, -1))
            else:
                _scatter_chunks(vals[:, :t], zs, idx.y[rows], idx.x[rows], out)


def _transpose_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src.T`` for 2-D arrays, in cache-sized tiles."""
    n, t = src.shape
    for a in range(0, n, _TILE_N):
        for b in range(0, t, _TILE_T):
            dst[b : b + _TILE_T, a : a + _TILE_N] = src[a : a + _TILE_N, b : b + _TILE_T].T


def _scatter_voxels(
    vals: np.ndarray, flat: np.ndarray, span: np.ndarray, out2d: np.ndarray
) -> None:
    """``out2d[:, flat] = vals.T`` for ``vals`` of shape (voxels, trials); ``span`` is scratch.

    Voxels are grouped into runs of nearby flat indices, laid out voxel-major in ``span`` with one
    row scatter (holes copied from ``out2d``), and each run is transposed into place in tiles:
    ~4x faster than numpy fancy indexing, which is kept for the few voxels far from any run.
    """
    n = len(flat)
    if n > 1 and vals.dtype.isnative and flat[-1] - flat[0] == n - 1 and np.all(np.diff(flat) == 1):
        _transpose_into(out2d[:, flat[0] : flat[-1] + 1], vals)
        return
    order = np.argsort(flat, kind="stable")
    fs = flat[order]
    cuts = np.flatnonzero(np.diff(fs) > _MAX_HOLE) + 1
    starts, stops = np.concatenate(([0], cuts)).tolist(), np.append(cuts, n).tolist()
    dest = np.empty(n, np.int64)
    runs: list[tuple[int, int, int, int]] = []  # (row in span, first flat, width, members)
    stray: list[int] = []
    spare, row = len(span) - n, 0
    for a, b in zip(starts, stops, strict=True):
        lo, width = int(fs[a]), int(fs[b - 1] - fs[a]) + 1
        if b - a < _MIN_RUN or width - (b - a) > spare:
            stray.extend(range(a, b))
            continue
        spare -= width - (b - a)
        dest[order[a:b]] = row + fs[a:b] - lo
        runs.append((row, lo, width, b - a))
        row += width
    stray_row = row
    if stray:
        dest[order[stray]] = np.arange(stray_row, stray_row + len(stray))
    span[dest] = vals
    for first, lo, width, members in runs:
        part = span[first : first + width]
        if width > members:
            present = np.zeros(width, bool)
            present[fs[np.searchsorted(fs, lo) : np.searchsorted(fs, lo + width)] - lo] = True
            holes = np.flatnonzero(~present)
            part[holes] = out2d[:, lo + holes].T  # keep what other blocks (or the fill) put there
        _transpose_into(out2d[:, lo : lo + width], part)
    if stray:
        out2d[:, fs[stray]] = span[stray_row : stray_row + len(stray)].T


def _scatter_chunks(
    vals: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray, out: np.ndarray
) -> None:
    """Copy each ``(T, cz, cy, cx)`` chunk into ``out`` at ``(z, y, x)``, clipped to its bounds."""
    _, nz, ny, nx = out.shape
    cz, cy, cx = vals.shape[2:]
    for k, (zz, yy, xx) in enumerate(zip(z.tolist(), y.tolist(), x.tolist(), strict=True)):
        za, zb = max(zz, 0), min(zz + cz, nz)
        yb, xb = min(yy + cy, ny), min(xx + cx, nx)
        out[:, za:zb, yy:yb, xx:xb] = vals[k, :, za - zz : zb - zz, : yb - yy, : xb - xx]


def read_betas(path: str | os.PathLike[str], dataset: str = "betas") -> np.ndarray:
    """Whole betas dataset of ``path`` as a trial-major native-endian array."""
    with SessionReader(path, dataset) as reader:
        return reader.read_all()
