"""Opening NSD-layout HDF5 inputs with one-line errors naming the file, and value checks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from nsdzarr.errors import InputError, unreadable

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


def open_hdf5(path: str | os.PathLike[str], **options: Any) -> h5py.File:
    """``path`` opened read-only (``options``: h5py.File's); InputError (one line) if missing,
    unreadable or not HDF5."""
    problem = _problem_opening(Path(path))
    if problem:
        raise InputError(path, problem)
    try:
        return h5py.File(path, "r", **options)
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


def check_finite(block: np.ndarray, source: str | os.PathLike[str], where: str = "") -> None:
    """Raise InputError naming the first trial of a float ``(T, ...)`` block with NaN or inf."""
    if block.dtype.kind != "f":
        return
    # a float64 sum per trial is finite iff every value is; no block-sized temporary
    ok = np.isfinite(block.reshape(block.shape[0], -1).sum(axis=1, dtype=np.float64))
    if not ok.all():
        trial = int(np.flatnonzero(~ok)[0])
        raise InputError(source, f"betas hold NaN or inf values, first at trial {trial}{where}")
