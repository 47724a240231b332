"""Random rows of an (N, ...) Zarr v3 array whose chunks hold whole rows, read per process.

:class:`ShardRows` reads the shard files itself: the rows' chunks are located through the
cached shard indexes, chunks close together in one file are read with one ``preadv`` into a
reused buffer and decoded straight into the caller's rows (``zarr_v3.Decoder``). About 1 µs
of Python per row besides the syscall and the decoder; zarr-python costs ~1 ms per call.
A row is everything after the first axis: (trials, voxels) betas and (N, H, W, 3) images alike.
Chunks that end with a crc32c (storage.chunk_codecs) are checked before they are used, unless
``verify=False``; a mismatch is an InputError naming the file and the row.
:class:`ZarrRows` is the fallback for any other layout.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from nsdzarr.errors import InputError
from nsdzarr.training.zarr_v3 import (
    EMPTY,
    ArrayLayout,
    Decoder,
    crc32c_value,
    index_nbytes,
    parse_shard_index,
)

COALESCE_GAP = 64 * 1024  # one read for chunks this close in one shard file
COALESCE_MAX = 16 * 2**20
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16


def whole_rows(layout: ArrayLayout) -> bool:
    """Whether every chunk of the array holds whole rows (what :class:`ShardRows` reads)."""
    return layout.inner[1:] == layout.grid[1:] == layout.shape[1:]


class ShardRows:
    """Reader of one array's rows for the process that made it (fds LRU-bounded by ``max_open``).

    Every stored object's index is cached as two rows of a (objects, chunks) table, 16 bytes
    per chunk (480 KB for a 30000-trial subject).
    """

    def __init__(
        self, layout: ArrayLayout, max_open: int, what: str = "row", verify: bool = True
    ) -> None:
        self.layout, self.what, self.verify = layout, what, verify
        self.max_open = max(1, max_open)
        n_obj = layout.n_objects()[0]
        rest = (0,) * (len(layout.shape) - 1)
        self.paths = [layout.key((s, *rest)) for s in range(n_obj)]
        self.fds: OrderedDict[int, int] = OrderedDict()
        self.offset = np.zeros((n_obj, layout.n_inner), dtype=np.int64)
        self.nbytes = np.zeros((n_obj, layout.n_inner), dtype=np.int64)  # -1: empty chunk
        self.loaded = np.zeros(n_obj, dtype=bool)
        # raw one-row chunks: where each row starts in its file, in elements (-1: not indexed,
        # or not a whole raw row at a whole element; such rows take the general path)
        raw_rows = (
            layout.codec is None and layout.inner[0] == 1 and layout.n_inner == layout.grid[0]
        )
        self.start = np.full(n_obj * layout.n_inner, -1, np.int64) if raw_rows else None
        # a raw one-row chunk: the row's bytes, then its crc32c when the codecs add one
        self.row_nbytes = layout.dtype.itemsize * math.prod(layout.shape[1:])
        self.raw_chunk_nbytes = self.row_nbytes + (4 if layout.chunk_crc else 0)
        # raw: mapped files, (mmap, its bytes, its elements)
        self.maps: OrderedDict[int, tuple[Any, np.ndarray, np.ndarray]] = OrderedDict()
        self._local = threading.local()
        self._main_decoder = Decoder(layout.codec, layout.chunk_crc, verify)

    # ---- files
    def fd(self, obj: int) -> int | None:
        """Open fd of stored object ``obj`` (None if the file does not exist)."""
        fd = self.fds.get(obj)
        if fd is not None:
            self.fds.move_to_end(obj)
            return fd
        try:
            fd = os.open(self.paths[obj], os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InputError(self.paths[obj], f"cannot open ({exc.strerror})") from exc
        self.fds[obj] = fd
        return fd

    def trim(self) -> None:
        """Close the least recently used files beyond the bound (a batch may hold more); a
        mapped file counts as one (the mapping holds its own fd)."""
        while self.maps and len(self.fds) + len(self.maps) > self.max_open:
            self._unmap(self.maps.popitem(last=False)[1])
        while len(self.fds) > self.max_open:
            os.close(self.fds.popitem(last=False)[1])

    def close(self) -> None:
        """Close every fd and mapping (in the process that opened them)."""
        while self.maps:
            self._unmap(self.maps.popitem()[1])
        while self.fds:
            with contextlib.suppress(OSError):
                os.close(self.fds.popitem()[1])

    @staticmethod
    def _unmap(entry: tuple[Any, np.ndarray, np.ndarray]) -> None:
        mm = entry[0]
        del entry
        with contextlib.suppress(BufferError):  # a view still alive: unmapped when collected
            mm.close()

    def forget(self) -> None:
        """In a forked child: close the inherited copies, drop the cached indexes."""
        self.close()
        self.loaded[:] = False
        if self.start is not None:
            self.start[:] = -1

    # ---- index
    def load_index(self, obj: int) -> None:
        """Fill the index table row of ``obj`` (all empty when its file does not exist)."""
        lay, path = self.layout, self.paths[obj]
        fd = self.fd(obj)
        if fd is None:
            self.nbytes[obj] = -1
        elif not lay.sharded:
            self.offset[obj], self.nbytes[obj] = 0, os.fstat(fd).st_size
        else:
            size = os.fstat(fd).st_size
            n = index_nbytes(lay)
            raw = os.pread(fd, n, size - n if lay.index_at_end else 0) if size >= n else b""
            idx = parse_shard_index(lay, raw, size, path)
            empty = (idx[:, 0] == EMPTY) & (idx[:, 1] == EMPTY)
            self.offset[obj] = np.where(empty, 0, idx[:, 0]).astype(np.int64)
            self.nbytes[obj] = np.where(empty, -1, idx[:, 1].astype(np.int64))
        self.loaded[obj] = True
        if self.start is not None:
            off, nb = self.offset[obj], self.nbytes[obj]
            whole = (nb == self.raw_chunk_nbytes) & (off % lay.dtype.itemsize == 0)
            rows = slice(obj * lay.n_inner, (obj + 1) * lay.n_inner)
            self.start[rows] = np.where(whole, off // lay.dtype.itemsize, -1)

    # ---- reading
    def decoder(self) -> Decoder:
        """This thread's decoder (each holds its own decompression context)."""
        if threading.current_thread() is threading.main_thread():
            return self._main_decoder
        dec = getattr(self._local, "decoder", None)
        if dec is None:
            dec = self._local.decoder = Decoder(
                self.layout.codec, self.layout.chunk_crc, self.verify
            )
        return dec

    def row_views(
        self, rows: np.ndarray, stored: np.ndarray | None = None
    ) -> list[np.ndarray] | None:
        """Read-only views of the rows in the page cache (raw one-row chunks, the ROI default),
        through mappings of the shard files kept like fds: the caller casts each row straight
        into its batch, with no syscall and no copy in between. None when the layout or a
        chunk (empty, damaged) needs :meth:`read_rows`, which reports damage.

        The views are valid until the next call; a shard file truncated in place while mapped
        would raise SIGBUS (stores are replaced by renaming, which this never sees). ``stored``
        (uint32, one per row) receives each row's crc32c as stored after it, unchecked."""
        lay = self.layout
        if lay.codec is not None or lay.inner[0] != 1 or not len(rows):
            return None
        if lay.chunk_crc and self.verify:  # checked rows go through read_rows
            return None
        rows = np.asarray(rows, dtype=np.int64)
        if stored is None and self.start is not None:
            starts = self.start[rows]  # numpy checks the range
            if starts.min() < 0:  # a shard not indexed yet (or a row this path cannot take)
                self._load_indexes(rows // lay.grid[0])
                starts = self.start[rows]
            if starts.min() >= 0:
                return self._typed_views(rows, starts)
        obj, chunk = np.divmod(rows, lay.grid[0])
        self._load_indexes(obj)
        row_shape, dtype, n = lay.shape[1:], lay.dtype, self.row_nbytes
        off, nb = self.offset[obj, chunk], self.nbytes[obj, chunk]
        if (nb != self.raw_chunk_nbytes).any():  # each raw row, then its crc32c
            return None
        views = []
        for o, f in zip(obj.tolist(), off.tolist(), strict=True):
            entry = self._mapped(o)
            if entry is None or f + n > len(entry[1]):
                return None
            m = entry[1]
            views.append(m[f : f + n].view(dtype).reshape(row_shape))
            if stored is not None:
                stored[len(views) - 1] = int.from_bytes(m[f + n : f + n + 4], "little")
        self.trim()
        return views

    def _typed_views(self, rows: np.ndarray, starts: np.ndarray) -> list[np.ndarray] | None:
        """:meth:`row_views` of rows that each start at a whole element of their file: one
        slice of the file's typed view per row (~1 µs; the general path costs ~3)."""
        per_obj, row_shape = self.layout.grid[0], self.layout.shape[1:]
        size, flat, views = math.prod(row_shape), len(row_shape) == 1, []
        for r, a in zip(rows.tolist(), starts.tolist(), strict=True):
            entry = self._mapped(r // per_obj)
            if entry is None:
                return None
            view = entry[2][a : a + size]
            if len(view) < size:
                return None
            views.append(view if flat else view.reshape(row_shape))
        self.trim()
        return views

    def _load_indexes(self, obj: np.ndarray) -> None:
        if not self.loaded[obj].all():
            for o in np.unique(obj[~self.loaded[obj]]).tolist():
                self.load_index(o)

    def _mapped(self, obj: int) -> tuple[Any, np.ndarray, np.ndarray] | None:
        """The mapping of ``obj``'s file (made on first use; None: no file, or empty)."""
        entry = self.maps.get(obj)
        if entry is None:
            return self._map(obj)
        self.maps.move_to_end(obj)
        return entry

    def _map(self, obj: int) -> tuple[Any, np.ndarray, np.ndarray] | None:
        fd = self.fd(obj)
        if fd is None or os.fstat(fd).st_size == 0:
            return None
        # mapped whole at once (one kernel call, not a page fault per 4 KiB on first touch);
        # the mapping holds its own dup of the fd
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mm = mmap.mmap(fd, 0, flags=flags, prot=mmap.PROT_READ)
        os.close(self.fds.pop(obj))
        dtype = self.layout.dtype
        typed = np.frombuffer(mm, dtype, len(mm) // dtype.itemsize)
        entry = self.maps[obj] = (mm, np.frombuffer(mm, np.uint8), typed)
        return entry

    def read_rows(self, rows: np.ndarray, out: np.ndarray, executor: Any = None) -> None:
        """``out[j] = array[rows[j]]`` (``out`` C-contiguous, the array's dtype)."""
        lay = self.layout
        if not out.flags.c_contiguous:  # rows are decoded by address
            raise ValueError("read_rows needs a C-contiguous output array")
        rows = np.asarray(rows, dtype=np.int64)
        obj, local = np.divmod(rows, lay.grid[0])
        chunk, k = np.divmod(local, lay.inner[0])
        if not self.loaded[obj].all():
            for o in np.unique(obj[~self.loaded[obj]]).tolist():
                try:
                    self.load_index(o)
                except InputError as err:  # a damaged index: name the first row asked of it
                    first = int(rows[obj == o][0])
                    raise InputError(err.path, f"{self.what} {first}: {err.problem}") from None
        off, nb = self.offset[obj, chunk], self.nbytes[obj, chunk]
        obj_l, off_l, nb_l, k_l = obj.tolist(), off.tolist(), nb.tolist(), k.tolist()
        # runs in file order: [object, start, stop, [[offset, nbytes, [(row, k), ...]], ...], fd]
        runs: list[list[Any]] = []
        fill = []
        for j in np.lexsort((off, obj)).tolist():
            o, f, n = obj_l[j], off_l[j], nb_l[j]
            if n < 0:  # absent object or empty chunk: the fill value
                fill.append(j)
                continue
            run = runs[-1] if runs and runs[-1][0] == o else None
            if run is not None and run[3][-1][0] == f:  # a chunk already planned
                run[3][-1][2].append((j, k_l[j]))
            elif (
                run is not None
                and 0 <= f - run[2] <= COALESCE_GAP
                and f + n - run[1] <= COALESCE_MAX
            ):
                run[2] = f + n
                run[3].append([f, n, [(j, k_l[j])]])
            else:
                runs.append([o, f, f + n, [[f, n, [(j, k_l[j])]]]])
        if fill:
            out[fill] = lay.fill_value
        for run in runs:  # opened here, not in the decode threads: the fd table is not shared
            fd = self.fd(run[0])
            if fd is None:
                raise InputError(self.paths[run[0]], "shard file vanished while reading")
            run.append(fd)
        try:
            if executor is not None and len(runs) > 1:
                half = len(runs) // 2
                future = executor.submit(self._decode_runs, runs[half:], out)
                self._decode_runs(runs[:half], out)
                future.result()
            else:
                self._decode_runs(runs, out)
        except _BadChunk as bad:
            raise InputError(
                self.paths[bad.obj],
                f"{self.what} {int(rows[bad.j])}: chunk at byte {bad.offset} cannot be decoded "
                f"({bad.why}); store corrupt",
            ) from None
        self.trim()

    def _decode_runs(self, runs: list[list[Any]], out: np.ndarray) -> None:
        """Read each run with one ``preadv`` and decode its chunks into ``out``."""
        dec, r = self.decoder(), self.layout.inner[0]
        buf, view, buf_addr = getattr(self._local, "buf", (None, None, 0))
        chunk_buf = np.empty((r, *out.shape[1:]), dtype=out.dtype) if r > 1 else out[:1]
        row_bytes, out_addr = out.strides[0], out.ctypes.data
        chunk_addr, n = chunk_buf.ctypes.data, chunk_buf.nbytes
        # raw chunks of one row: read straight into the rows (images: no second copy)
        raw_rows = dec.codec is None and r == 1 and len(out) > 0
        out_mv = memoryview(out.reshape(-1).view(np.uint8)) if raw_rows else None
        for o, start, stop, chunks, fd in runs:
            if buf is None or (len(view) < stop - start and not raw_rows):
                buf = np.empty(max(stop - start, 1 << 20), dtype=np.uint8)
                view, buf_addr = memoryview(buf), buf.ctypes.data
                self._local.buf = (buf, view, buf_addr)
            if raw_rows and self._read_into_rows(o, fd, start, stop, chunks, out_mv, n, view):
                continue
            if len(view) < stop - start:
                buf = np.empty(stop - start, dtype=np.uint8)
                view, buf_addr = memoryview(buf), buf.ctypes.data
                self._local.buf = (buf, view, buf_addr)
            if os.preadv(fd, [view[: stop - start]], start) != stop - start:
                raise InputError(self.paths[o], "shard file shorter than its index; corrupt")
            for f, nbytes, dests in chunks:
                j0 = dests[0][0]
                try:
                    if dec.direct:
                        dst = out_addr + j0 * row_bytes if r == 1 else chunk_addr
                        dec.at(buf, buf_addr, f - start, nbytes, dst, n)
                    else:
                        src = buf[f - start : f - start + nbytes]
                        dec.into(src, out[j0] if r == 1 else chunk_buf)
                except ValueError as exc:
                    raise _BadChunk(o, f, j0, exc) from exc
                if r > 1:
                    for j, kk in dests:
                        out[j] = chunk_buf[kk]
                elif len(dests) > 1:  # the same row asked more than once
                    for j, _ in dests[1:]:
                        out[j] = out[j0]

    def _read_into_rows(
        self, o: int, fd: int, start: int, stop: int, chunks: list, out: Any, n: int, junk: Any
    ) -> bool:
        """One ``preadv`` of a run of raw one-row chunks into their rows of ``out`` (flat
        bytes, rows of ``n``), the gaps into ``junk``; False (nothing read) when the run does
        not fit that plan."""
        crc = 4 if self.layout.chunk_crc else 0  # each row's crc32c read into sums
        if (2 + (crc > 0)) * len(chunks) > IOV_MAX:
            return False
        iov, pos = [], start
        sums = np.empty((len(chunks), crc), np.uint8) if crc else None
        for c, (f, nbytes, dests) in enumerate(chunks):
            if nbytes != n + crc or f < pos or f - pos > len(junk):
                return False  # the buffered path reports a damaged chunk
            if f > pos:
                iov.append(junk[: f - pos])
            j0 = dests[0][0]
            iov.append(out[j0 * n : (j0 + 1) * n])
            if crc:
                iov.append(sums[c])
            pos = f + nbytes
        if os.preadv(fd, iov, start) != stop - start:
            raise InputError(self.paths[o], "shard file shorter than its index; corrupt")
        if crc and self.verify:
            rows = np.frombuffer(out, np.uint8)  # out is the flat memoryview of the rows
            stored = sums.view("<u4").ravel().tolist()
            for c, (f, _, dests) in enumerate(chunks):
                j0 = dests[0][0]
                if crc32c_value(rows[j0 * n : (j0 + 1) * n]) != stored[c]:
                    raise _BadChunk(o, f, j0, "crc32c checksum mismatch")
        for _, _, dests in chunks:
            j0 = dests[0][0]
            for j, _ in dests[1:]:  # the same row asked more than once
                out[j * n : (j + 1) * n] = out[j0 * n : (j0 + 1) * n]
        return True


class _BadChunk(Exception):
    """A chunk that fails its checksum or decoding: stored object, byte offset, output row."""

    def __init__(self, obj: int, offset: int, j: int, why: object) -> None:
        super().__init__(obj, offset, j, why)
        self.obj, self.offset, self.j, self.why = obj, offset, j, why


class ZarrRows:
    """Fallback row reader through zarr-python (opened lazily in the reading process)."""

    def __init__(self, array_dir: str) -> None:
        import zarr

        try:
            self.array = zarr.open_array(array_dir, mode="r")
        except Exception as exc:  # zarr raises many types on damaged metadata
            raise InputError(array_dir, f"zarr-python cannot open it ({exc})") from exc

    def read_rows(self, rows: np.ndarray, out: np.ndarray, executor: Any = None) -> None:
        """``out[j] = array[rows[j]]``."""
        uniq, inverse = np.unique(rows, return_inverse=True)
        out[...] = self.array.oindex[uniq, :][inverse]

    def close(self) -> None:
        """Nothing to close: zarr-python holds no file open between reads."""

    forget = close
