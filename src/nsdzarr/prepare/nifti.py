"""NIfTI helpers: affines and atlas volumes in NIfTI (X, Y, Z) order."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from nsdzarr.errors import InputError, unreadable


def load_nifti(path: str | os.PathLike[str]) -> nib.Nifti1Image:
    """Load a NIfTI image, with a one-line error for a missing or unreadable file."""
    if not os.path.exists(path):
        raise InputError(path, "NIfTI file not found")
    if problem := unreadable(path):
        raise InputError(path, problem)
    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises many types for corrupt files
        raise InputError(
            path, f"not a readable NIfTI image ({type(err).__name__}: {err})"
        ) from None


def nifti_affine(path: str | os.PathLike[str] | None) -> np.ndarray | None:
    """The voxel-to-world affine of a NIfTI file, or ``None`` without a file."""
    return None if not path else np.asarray(load_nifti(path).affine, dtype=float)


def require_same_grid(
    path: str | os.PathLike[str], affine: np.ndarray, reference: str | os.PathLike[str]
) -> None:
    """Refuse an atlas whose affine differs from ``reference``'s (0.01 mm tolerance).

    The reference is the subject's first ROI atlas, whose affine the session stores record:
    an atlas on another grid (a flipped or shifted axis) would select the wrong voxels.
    """
    if os.path.samefile(path, reference):
        return
    ref = np.asarray(load_nifti(reference).affine, dtype=float)
    require_affine(path, affine, ref, f"{reference}'s")


def require_affine(
    path: str | os.PathLike[str], affine: np.ndarray, expected: np.ndarray, whose: str
) -> None:
    """Refuse an atlas whose affine is not ``expected`` (``whose``: where that one is from)."""
    expected = np.asarray(expected, dtype=float)
    if not np.allclose(affine, expected, rtol=0, atol=0.01):
        raise InputError(
            path,
            f"affine {_rows(affine)} differs from {whose} {_rows(expected)} (the affine the "
            "session stores record): every atlas of a subject must be on one grid",
        )


def _rows(affine: np.ndarray) -> str:
    """The top three rows of an affine, compactly, for a one-line message."""
    return "[" + "; ".join(" ".join(f"{v:g}" for v in row) for row in affine[:3]) + "]"
