"""Surface betas (nativesurface HDF5, fsaverage MGH): one file per hemisphere and session.

A hemisphere is read as a ``(trials, vertices)`` matrix in blocks that follow the file's layout:
trial blocks where trials are contiguous (MGH frames, trial-chunked HDF5), vertex blocks where
each chunk holds every trial of a few vertices (then the hemisphere is held once in memory).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np

from nsdzarr.errors import InputError, unreadable
from nsdzarr.nsd_facts import BETA_SCALE, BETA_UNITS, TRIALS_PER_SESSION
from nsdzarr.prepare.hdf5_open import open_hdf5
from nsdzarr.prepare.layout import HEMISPHERES
from nsdzarr.prepare.memory import SURFACE_HDF5_BLOCK_BYTES, surface_vertex_block

# fsaverage betas are float32 percent signal change as they are (NSD data manual).
PSC_UNITS = "percent signal change"
SessionSources = Sequence[str | os.PathLike[str]]


def hemisphere_of(path: str | os.PathLike[str]) -> str:
    """``lh`` or ``rh`` from a ``{hemi}.*`` file name; InputError otherwise."""
    hemi = Path(path).name.split(".", 1)[0]
    if hemi not in HEMISPHERES:
        raise InputError(path, "surface file name must start with lh. or rh.")
    return hemi


def scale_and_units(dtype: np.dtype) -> tuple[int, str]:
    """Integer betas are PSC x 300 (nativesurface); float betas are PSC (fsaverage)."""
    return (BETA_SCALE, BETA_UNITS) if np.dtype(dtype).kind in "iu" else (1, PSC_UNITS)


class HemisphereReader:
    """One hemisphere's betas as ``(trials, vertices)``, read in layout-following blocks."""

    def __init__(self, path: str | os.PathLike[str], block_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.hemisphere = hemisphere_of(path)
        self._block_bytes = block_bytes
        self._file: h5py.File | None = None
        if self.path.suffix == ".mgh":
            self._open_mgh()
        else:
            self._open_hdf5()
        self.n_trials, self.n_vertices = self.shape

    def _open_mgh(self) -> None:
        if not self.path.is_file():
            raise InputError(self.path, "file not found")
        if problem := unreadable(self.path):
            raise InputError(self.path, problem)
        try:
            img = nib.load(self.path)
        except Exception as err:  # nibabel raises several types for a damaged header
            raise InputError(self.path, f"cannot read as MGH: {err}") from None
        shape = tuple(int(n) for n in img.shape)
        if len(shape) != 4 or shape[1:3] != (1, 1):
            raise InputError(
                self.path, f"MGH shape {shape}, expected (vertices, 1, 1, trials) as NSD writes"
            )
        self.format = "mgh"
        self._proxy = img.dataobj
        self.file_dtype = np.dtype(img.header.get_data_dtype())
        self.dtype = self.file_dtype.newbyteorder("=")
        self.shape = (shape[3], shape[0])
        self.whole_hemisphere = False  # MGH frames are contiguous: trial blocks stream
        self.vertex_step = 1

    def _open_hdf5(self) -> None:
        self._file = f = open_hdf5(self.path)
        dset = f.get("betas")
        if not isinstance(dset, h5py.Dataset):
            f.close()
            raise InputError(self.path, "no dataset named 'betas'")
        if dset.ndim != 2 or dset.dtype.kind not in "iuf":
            f.close()
            raise InputError(
                self.path,
                f"dataset 'betas' is {dset.dtype} {dset.shape}, expected 2-D (trials, vertices)",
            )
        self.format = "hdf5"
        self._dset = dset
        self.file_dtype = dset.dtype
        self.dtype = dset.dtype.newbyteorder("=")
        self.shape = tuple(int(n) for n in dset.shape)
        # chunks holding every trial of a few vertices: trial blocks would read each chunk again
        self.whole_hemisphere = bool(dset.chunks and dset.chunks[0] == self.shape[0] > 1)
        self.vertex_step = dset.chunks[1] if dset.chunks else 1

    @property
    def vertex_block(self) -> int:
        """Vertices per read where chunks span every trial: small blocks (memory.py)."""
        block = self._block_bytes or SURFACE_HDF5_BLOCK_BYTES
        return surface_vertex_block(self.n_trials, self.dtype.itemsize, self.vertex_step, block)

    def close(self) -> None:
        """Close the HDF5 file (MGH proxies hold no file open)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> HemisphereReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, t0: int, t1: int, v0: int = 0, v1: int | None = None) -> np.ndarray:
        """Trials ``[t0, t1)`` of vertices ``[v0, v1)`` as a C-ordered native-endian array."""
        v1 = self.n_vertices if v1 is None else v1
        try:
            if self.format == "mgh":
                raw = np.asarray(self._proxy[v0:v1, 0, 0, t0:t1]).T
            else:
                raw = self._dset[t0:t1, v0:v1]
        except (OSError, ValueError, EOFError) as err:
            raise InputError(
                self.path, f"cannot read betas (truncated or corrupt?): {err}"
            ) from None
        return np.ascontiguousarray(raw, dtype=self.dtype)

    def blocks(
        self, trials_per_block: int, wanted: np.ndarray | None = None
    ) -> Iterator[tuple[slice, slice, np.ndarray]]:
        """``(trials, vertices, block)`` covering the matrix in the file's natural order (vertex
        blocks holding none of the sorted ``wanted`` vertices are skipped)."""
        t, v = self.shape
        if self.whole_hemisphere:
            step = self.vertex_block
            for v0 in range(0, v, step):
                v1 = min(v0 + step, v)
                if wanted is not None and np.searchsorted(wanted, v0) == np.searchsorted(
                    wanted, v1
                ):
                    continue
                yield slice(0, t), slice(v0, v1), self.read(0, t, v0, v1)
        else:
            for t0 in range(0, t, trials_per_block):
                t1 = min(t0 + trials_per_block, t)
                yield slice(t0, t1), slice(0, v), self.read(t0, t1)

    def metadata(self) -> dict[str, Any]:
        """What the estimate records of this file."""
        return {
            "path": str(self.path),
            "format": self.format,
            "shape": [self.n_trials, self.n_vertices],
            "dtype": self.file_dtype.str,
            "whole_hemisphere": self.whole_hemisphere,
            "chunk_vertices": self.vertex_step,
            "file_bytes": self.path.stat().st_size,
        }


@dataclass
class SurfaceSession:
    """Both hemispheres of one session, checked to agree."""

    readers: list[HemisphereReader]

    @property
    def vertices(self) -> dict[str, int]:
        return {r.hemisphere: r.n_vertices for r in self.readers}

    def metadata(self) -> dict[str, Any]:
        """What an estimate records of the session's files (and plans its conversion by)."""
        r0 = self.readers[0]
        return {
            "path": str(r0.path),
            "format": r0.format,
            "paths": [str(r.path) for r in self.readers],
            "shape": [r0.n_trials, sum(self.vertices.values())],
            "hemispheres": self.vertices,
            "dtype": r0.file_dtype.newbyteorder("<").str,
            "whole_hemisphere": any(r.whole_hemisphere for r in self.readers),
            "chunk_vertices": min(r.vertex_step for r in self.readers),
            "file_bytes": sum(r.path.stat().st_size for r in self.readers),
        }

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def __enter__(self) -> SurfaceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_session(sources: SessionSources, require_trials: bool = True) -> SurfaceSession:
    """Open ``[lh, rh]`` of one session; one-line errors for a missing hemisphere or mismatch."""
    paths = [Path(p) for p in sources]
    hemis = [hemisphere_of(p) for p in paths]
    if sorted(hemis) != sorted(HEMISPHERES) or len(paths) != 2:
        raise InputError(paths[0], f"a surface session needs lh and rh files, got {hemis}")
    for p in paths:
        if not p.exists():
            other = paths[1 - paths.index(p)]
            raise InputError(
                p,
                f"hemisphere file not found (its other hemisphere {other.name} is needed with it)",
            )
    readers: list[HemisphereReader] = []
    try:
        for p in sorted(paths, key=lambda q: HEMISPHERES.index(hemisphere_of(q))):
            readers.append(HemisphereReader(p))
        lh, rh = readers
        if require_trials:
            for r in readers:
                if r.n_trials != TRIALS_PER_SESSION:
                    hint = (
                        " (trials must be the first h5py axis)"
                        if TRIALS_PER_SESSION in (r.shape)
                        else " (one NSD session)"
                    )
                    raise InputError(
                        r.path, f"{r.n_trials} trials, expected {TRIALS_PER_SESSION}{hint}"
                    )
        if lh.dtype != rh.dtype or lh.format != rh.format:
            raise InputError(
                rh.path, f"{rh.dtype} {rh.format}, but {lh.path.name} is {lh.dtype} {lh.format}"
            )
    except BaseException:
        for r in readers:
            r.close()
        raise
    return SurfaceSession(readers)


def require_same_vertices(
    session: SurfaceSession, reference: SessionSources | None, what: str = "session"
) -> None:
    """InputError unless every hemisphere has the vertex count of ``reference``'s files."""
    if not reference:
        return
    with open_session(reference, require_trials=False) as ref:
        want = ref.vertices
        paths = {r.hemisphere: r.path for r in ref.readers}
    for r in session.readers:
        if r.n_vertices != want[r.hemisphere]:
            raise InputError(
                r.path,
                f"{r.n_vertices} vertices, but {paths[r.hemisphere].name} has "
                f"{want[r.hemisphere]}: every {what} of a subject must have the same vertices",
            )


def is_surface_source(source: Any) -> bool:
    """Whether ``source`` is a surface session: a list of hemisphere files or a surface store."""
    if isinstance(source, (str, os.PathLike)):
        return (Path(source) / "lh" / "zarr.json").is_file()
    return True
