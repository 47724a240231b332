"""Lossless checks of finished stores, read back by a reader that is not their writer.

Session and ROI stores are written by zarr-python, and the loader reads them with
``training.zarr_v3``; the check reads every row through tensorstore when it is installed (C++,
several threads, ~2x a plain file read here), else through zarr-python, so a bug shared by our
writer and our reader cannot pass. Raw image shards are written by hand (``raw_shards``, byte
for byte zarr-python's files) and read back by the loader's reader (``nsdzarr``: 2.5x less CPU
than tensorstore), each image compared with its source's checksum. Rows are read in blocks of
whole shards (bounded memory), the next block while the current one is checksummed.

Checksums are CRC32C: through the ``crc32c`` package when installed (SSE4.2, releases the GIL,
~3x google_crc32c here), else google_crc32c; both give the same values. tensorstore and crc32c
are the ``verify`` extra.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from nsdzarr.training.zarr_v3 import fast_crc32c

READERS = ("tensorstore", "zarr-python", "nsdzarr")


def crc32c(a: np.ndarray, fast: bool = True, value: int = 0) -> int:
    """CRC32C of an array's bytes (C order), without copying a C-contiguous one, continuing
    ``value`` (the CRC of the bytes before); ``fast=False`` uses google_crc32c (which wants
    bytes: a ctypes view of the array's memory serves)."""
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    if fast and fast_crc32c is not None:
        return fast_crc32c(a, value)
    return google_crc32c.extend(value, (ctypes.c_char * a.nbytes).from_address(a.ctypes.data))


def row_checksums(rows: Any) -> np.ndarray:
    """CRC32C of each row (C order) of an array, or of each array in a sequence, as uint32."""
    return np.fromiter((crc32c(r) for r in rows), dtype=np.uint32, count=len(rows))


def default_reader() -> str:
    """tensorstore when it imports, else zarr-python."""
    try:
        import tensorstore  # noqa: F401
    except ImportError:
        return "zarr-python"
    return "tensorstore"


class ReadBack:
    """Rows of a finished Zarr v3 array through ``reader`` (one of READERS; None:
    :func:`default_reader`); ``rows`` may be called from several threads. ``nsdzarr`` is the
    loader's own reader (``training.row_reader``), each chunk's crc32c checked."""

    def __init__(self, array_dir: str | os.PathLike[str], reader: str | None = None) -> None:
        self.reader = reader or default_reader()
        if self.reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, got {self.reader!r}")
        self._own: list[Any] = []  # nsdzarr: one reader per thread (fds, index cache)
        self._local = threading.local()
        if self.reader == "nsdzarr":
            from nsdzarr.training.row_reader import whole_rows
            from nsdzarr.training.zarr_v3 import parse_layout

            self.layout = parse_layout(array_dir)[1]
            if self.layout is None or not whole_rows(self.layout):
                raise ValueError(f"{array_dir}: not a layout the nsdzarr reader reads")
            self.array = None
            self.n_rows = int(self.layout.shape[0])
            return
        if self.reader == "tensorstore":
            import tensorstore as ts

            spec: dict[str, Any] = {
                "driver": "zarr3",
                "kvstore": {"driver": "file", "path": str(array_dir)},
            }
            context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})  # nothing kept
            self.array: Any = ts.open(spec, read=True, context=context).result()
        else:
            import zarr

            self.array = zarr.open_array(Path(array_dir), mode="r", zarr_format=3)
        self.n_rows = int(self.array.shape[0])

    def start(self, a: int, b: int) -> Any:
        """Begin reading rows ``[a, b)``; :meth:`finish` gives them."""
        return self.array[a:b].read() if self.reader == "tensorstore" else (a, b)

    def finish(self, pending: Any) -> np.ndarray:
        if self.reader == "tensorstore":
            return pending.result()
        a, b = pending
        if self.reader == "nsdzarr":
            out = np.empty((b - a, *self.layout.shape[1:]), self.layout.dtype)
            self._thread_reader().read_rows(np.arange(a, b), out)
            return out
        return self.array[a:b]

    def _thread_reader(self, verify: bool = True) -> Any:
        own = getattr(self._local, f"reader{verify}", None)
        if own is None:
            from nsdzarr.training.row_reader import ShardRows

            own = ShardRows(self.layout, max_open=1, what="row", verify=verify)
            setattr(self._local, f"reader{verify}", own)
            self._own.append(own)
        return own

    def checksums(self, a: int, b: int) -> np.ndarray | None:
        """CRC32C of rows ``[a, b)`` as they are on disk, from the page cache without a copy,
        each checked against the crc32c stored after it (ValueError if one differs); None
        where only :meth:`rows` reads (other readers, compressed or damaged chunks)."""
        if self.reader != "nsdzarr" or not self.layout.chunk_crc:
            return None
        stored = np.empty(b - a, np.uint32)
        own = self._thread_reader(verify=False)
        views = own.row_views(np.arange(a, b), stored)
        if views is None:
            return None
        got = row_checksums(views)
        del views
        own.close()  # the shard's pages leave this process's memory
        if not np.array_equal(got, stored):
            row = a + int(np.flatnonzero(got != stored)[0])
            raise ValueError(f"row {row}: crc32c checksum mismatch")
        return got

    def close(self) -> None:
        """Close the files the nsdzarr reader keeps open (the others keep none)."""
        for own in self._own:
            own.close()
        self._own.clear()
        self._local = threading.local()

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)`` as numpy."""
        return self.finish(self.start(a, b))


def read_blocks(
    array_dir: str | os.PathLike[str], block_rows: int, reader: str | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """``(first_row, rows)`` over the whole array at ``array_dir``, ``block_rows`` at a time
    (the next block read ahead), through :class:`ReadBack`."""
    back = ReadBack(array_dir, reader)
    starts = list(range(0, back.n_rows, block_rows))
    pending = back.start(0, min(block_rows, back.n_rows)) if starts else None
    for i, a in enumerate(starts):
        block = back.finish(pending)
        if i + 1 < len(starts):
            b = starts[i + 1]
            pending = back.start(b, min(b + block_rows, back.n_rows))
        yield a, block


def file_state(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """(inode, size, mtime_ns) of a file, to tell later that it was not written again."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns
