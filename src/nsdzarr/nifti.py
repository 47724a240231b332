"""NIfTI helpers: affines and atlas volumes in NIfTI (X, Y, Z) order."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from nsdzarr.errors import InputError


def load_nifti(path: str | os.PathLike[str]) -> nib.Nifti1Image:
    """Load a NIfTI image, with a one-line error for a missing or unreadable file."""
    if not os.path.exists(path):
        raise InputError(path, "NIfTI file not found")
    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises many types for corrupt files
        raise InputError(
            path, f"not a readable NIfTI image ({type(err).__name__}: {err})"
        ) from None


def nifti_affine(path: str | os.PathLike[str] | None) -> np.ndarray | None:
    """The voxel-to-world affine of a NIfTI file, or ``None`` without a file."""
    return None if not path else np.asarray(load_nifti(path).affine, dtype=float)
