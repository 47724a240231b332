"""numpy readers of the stores training code uses: stimulus images and ROI betas, no torch.

:class:`ImageReader` reads rows of an image store (``images`` uint8 (N, H, W, 3), or a
resized copy ``images_{S}``) by NSD id or by row; :class:`RoiReader` reads rows of an ROI
store's ``betas``. Both read through :mod:`nsdzarr.training.row_reader` (one ``preadv`` per nearby
chunks, decoded straight into the output) and follow the loader's process rules: the
constructor reads small metadata and closes it, files open lazily in the process that reads,
a forked child closes its inherited copies and reopens its own, pickling carries no open file,
and :meth:`close` closes this process's files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nsdzarr.outputs import subject_of_roi_store
from nsdzarr.training.row_reader import ShardRows, ZarrRows
from nsdzarr.training.store_groups import (
    ImageStoreInfo,
    StoreInfo,
    default_max_open_files,
    load_image_info,
    load_store_info,
)
from nsdzarr.training.zarr_v3 import ArrayLayout, read_array


class LazyRows:
    """Rows of one array through a reader made by the process that reads (fork-safe)."""

    def __init__(
        self,
        array_dir: str,
        layout: ArrayLayout | None,
        max_open: int,
        what: str = "row",
        verify: bool = True,
    ) -> None:
        self.array_dir, self.layout, self.max_open = array_dir, layout, max_open
        self.what, self.verify = what, verify  # errors name the "trial"/"image"; crc32c checks
        self._reader: Any = None
        self._pid = 0

    def reader(self) -> ShardRows | ZarrRows:
        """This process's reader (made on first use, again after a fork)."""
        if self._reader is not None and self._pid == os.getpid():
            return self._reader
        if self._reader is not None:
            self._reader.forget()  # inherited through fork: close the copies
        if self.layout is not None:
            self._reader = ShardRows(self.layout, self.max_open, self.what, self.verify)
        else:
            self._reader = ZarrRows(self.array_dir)
        self._pid = os.getpid()
        return self._reader

    def read_rows(self, rows: np.ndarray, out: np.ndarray, executor: Any = None) -> None:
        """``out[j] = array[rows[j]]`` (rows in range; ``out`` C-contiguous, the disk dtype)."""
        self.reader().read_rows(rows, out, executor)

    def close(self) -> None:
        """Close this process's files (reopened on the next read)."""
        if self._reader is not None and self._pid == os.getpid():
            self._reader.close()
        self._reader = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None, "_pid": 0}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _positions(indices: Any, n: int) -> np.ndarray:
    """Row positions (negative ones count back) as int64; IndexError out of range."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"row index out of range for {n} rows")
    return idx % n if n else idx


class ImageReader:
    """Stimulus images of an image store as uint8 (B, H, W, 3) arrays, by NSD id or row.

    ``size=S`` reads the resized copy ``images_{S}`` (InputError listing the sizes present
    when it is absent). Rows are in ascending ``nsd_id`` order. ``verify_checksums=True``
    checks each chunk's crc32c (off by default, as in ``BetasDataset``).
    """

    def __init__(
        self,
        store: str | os.PathLike[str],
        size: int | None = None,
        max_open_files: int | None = None,
        verify_checksums: bool = False,
    ) -> None:
        self.info: ImageStoreInfo = load_image_info(store, size)
        self.size = size
        self._rows = LazyRows(
            self.info.array_dir,
            self.info.layout,
            max_open_files or default_max_open_files(1),
            "image",
            verify_checksums,
        )

    @property
    def path(self) -> str:
        return self.info.path

    @property
    def nsd_id(self) -> np.ndarray:
        """(N,) int64: the NSD id of each row, ascending."""
        return self.info.nsd_id

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, H, W, 3)."""
        return self.info.shape

    def __len__(self) -> int:
        return self.info.shape[0]

    def rows_of(self, nsd_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row of each NSD id (InputError naming the store and the first id it lacks)."""
        return self.info.rows_of(np.asarray(nsd_ids))

    def read_into(self, rows: np.ndarray, out: np.ndarray, executor: Any = None) -> None:
        """``out[j] = images[rows[j]]`` for in-range rows into a C-contiguous uint8 array."""
        self._rows.read_rows(rows, out, executor)

    def rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images at row positions ``indices``: (B, H, W, 3) uint8."""
        idx = _positions(indices, len(self))
        out = np.empty((len(idx), *self.shape[1:]), dtype=np.uint8)
        if len(idx):
            self._rows.read_rows(idx, out)
        return out

    def read(self, nsd_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images of NSD ids: (B, H, W, 3) uint8, ``out[j]`` = imgBrick[nsd_ids[j]]."""
        return self.rows(self.rows_of(nsd_ids))

    def iter_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(nsd_ids, images) over the whole store in row order, ``batch_size`` at a time."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield self.nsd_id[start:stop].copy(), self.rows(np.arange(start, stop))

    def close(self) -> None:
        """Close this process's open files (they reopen on the next read)."""
        self._rows.close()

    def __repr__(self) -> str:
        return f"ImageReader({self.path!r}, {self.info.array}, shape={self.shape})"


class RoiReader:
    """Rows of an ROI store's ``betas`` (trials, voxels) as int16, or float32 with ``psc``.

    ``columns`` holds the trials table beside the store (``<store>/../../trials.tsv`` or
    ``trials``) when there is one, else is empty.
    """

    def __init__(
        self,
        store: str | os.PathLike[str],
        trials: str | os.PathLike[str] | None = None,
        max_open_files: int | None = None,
    ) -> None:
        root = Path(store)
        self.info: StoreInfo = load_store_info(
            root,
            subject_of_roi_store(root),
            trials,
            need_stats=False,
            require_trials=trials is not None,
        )
        self._voxels: np.ndarray | None = None
        self._rows = LazyRows(
            str(root / "betas"),
            self.info.layout,
            max_open_files or default_max_open_files(1),
            "trial",
        )

    @property
    def path(self) -> str:
        return self.info.path

    @property
    def n_rows(self) -> int:
        return self.info.n_rows

    @property
    def n_voxels(self) -> int:
        return self.info.n_voxels

    @property
    def scale(self) -> float:
        """What betas were multiplied by before rounding to int16 (percent signal change)."""
        return self.info.scale

    @property
    def columns(self) -> dict[str, np.ndarray]:
        """Trials table columns (trial, session, nsd_id, repeat, split) or {} without one."""
        return self.info.columns

    @property
    def voxels(self) -> np.ndarray:
        """(n_voxels, 3): the NIfTI (i, j, k) of each column (read on first use)."""
        if self._voxels is None:
            self._voxels = read_array(Path(self.path) / "voxels")
        return self._voxels

    def __len__(self) -> int:
        return self.n_rows

    def rows(self, indices: Sequence[int] | np.ndarray, psc: bool = False) -> np.ndarray:
        """Betas of rows ``indices``: (B, n_voxels) int16, or float32 / ``scale`` with ``psc``."""
        idx = _positions(indices, self.n_rows)
        out = np.empty((len(idx), self.n_voxels), dtype=self.info.disk_dtype)
        if len(idx):
            self._rows.read_rows(idx, out)
        if psc:
            return np.divide(out, np.float32(self.scale), dtype=np.float32)
        return out.astype(out.dtype.newbyteorder("="), copy=False)

    def close(self) -> None:
        """Close this process's open files (they reopen on the next read)."""
        self._rows.close()

    def __repr__(self) -> str:
        return f"RoiReader({self.path!r}, {self.n_rows} x {self.n_voxels})"
