"""Surface ROI masks (``{lh,rh}.NAME.mgz`` vertex labels) and one session's ROI columns."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import zarr

from nsdzarr import __version__
from nsdzarr.errors import InputError
from nsdzarr.prepare.labels import label_selection, present_labels
from nsdzarr.prepare.layout import HEMISPHERES
from nsdzarr.prepare.surface import SessionSources, hemisphere_of, open_session, scale_and_units

COLUMN_ORDER = "lh vertices ascending, then rh vertices ascending"


@dataclass(frozen=True)
class SurfaceMask:
    """Selected vertices of a pair of label files: hemisphere (0 lh, 1 rh), vertex, label."""

    paths: tuple[str, str]
    labels: tuple[int, ...]
    hemisphere: np.ndarray  # (n,) int8
    vertex: np.ndarray  # (n,) int32
    voxel_labels: np.ndarray  # (n,) int16
    n_vertices: dict[str, int]

    @property
    def columns(self) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
        """The arrays naming each column, with their dimension names."""
        return {"hemisphere": (self.hemisphere, ("voxel",)), "vertex": (self.vertex, ("voxel",))}

    def hemisphere_vertices(self, hemi: str) -> np.ndarray:
        """Vertex indices of ``hemi`` in column order."""
        return self.vertex[self.hemisphere == HEMISPHERES.index(hemi)]


def load_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Vertex values of an MGZ/MGH label file as int64 ``(vertices,)``; InputError if unusable."""
    if not Path(path).is_file():
        raise InputError(path, "label file not found")
    try:
        data = np.asarray(nib.load(path).dataobj)
    except Exception as err:  # nibabel raises several types for a damaged file
        raise InputError(path, f"cannot read as MGH/MGZ: {err}") from None
    if sum(n > 1 for n in data.shape) > 1:
        raise InputError(path, f"labels must be one value per vertex, got shape {data.shape}")
    data = data.reshape(-1)
    if not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
        raise InputError(path, "label values must be integers (-1 / 0 outside, 1..N labels)")
    return data.astype(np.int64)


def load_surface_mask(
    paths: SessionSources, labels: list[int] | None, vertices: dict[str, int] | None = None
) -> SurfaceMask:
    """Vertices of ``[lh, rh]`` label files whose value is in ``labels`` (default all >= 1);
    ``vertices`` (hemisphere -> count of the betas) must match each file's length."""
    by_hemi = {hemisphere_of(p): Path(p) for p in paths}
    if sorted(by_hemi) != sorted(HEMISPHERES):
        raise InputError(next(iter(paths)), "surface ROI needs lh and rh label files")
    values = {h: load_labels(by_hemi[h]) for h in HEMISPHERES}
    for h in HEMISPHERES:
        if vertices is not None and len(values[h]) != vertices[h]:
            raise InputError(
                by_hemi[h],
                f"{len(values[h])} vertices, but the {h} betas have {vertices[h]} "
                "(labels of another surface?)",
            )
    present = present_labels(np.concatenate([values[h] for h in HEMISPHERES]))
    if labels is not None and (missing := sorted(set(labels) - set(present))):
        raise InputError(
            by_hemi["lh"], f"labels {missing} in neither hemisphere (present: {present})"
        )
    chosen = present if labels is None else sorted(labels)
    hemi, vert, lab = [], [], []
    for i, h in enumerate(HEMISPHERES):
        idx = np.flatnonzero(label_selection(values[h], chosen))
        hemi.append(np.full(len(idx), i, np.int8))
        vert.append(idx.astype(np.int32))
        lab.append(values[h][idx].astype(np.int16))
    if not sum(len(v) for v in vert):
        raise InputError(by_hemi["lh"], "ROI selection is empty: no vertex has a label >= 1")
    return SurfaceMask(
        (str(by_hemi["lh"]), str(by_hemi["rh"])),
        tuple(chosen),
        np.concatenate(hemi),
        np.concatenate(vert),
        np.concatenate(lab),
        {h: len(values[h]) for h in HEMISPHERES},
    )


def count_surface_columns(paths: SessionSources, labels: list[int] | None) -> int:
    """Vertices an ROI selects, counted leniently (the ROI job itself checks the files)."""
    values = np.concatenate([load_labels(p) for p in paths])
    return int(label_selection(values, labels).sum())


def read_surface_columns(
    source: SessionSources | str | os.PathLike[str],
    mask_paths: SessionSources,
    labels: list[int] | None,
) -> tuple[SurfaceMask, np.ndarray, dict[str, Any]]:
    """The mask, its ``(750, columns)`` rows (lh then rh) and the store attributes (scale,
    units) from the session's hemisphere files or its converted surface store."""
    if isinstance(source, (str, os.PathLike)):  # a converted store (the files deleted)
        group = zarr.open_group(str(source), mode="r")
        arrays = {h: group[h] for h in HEMISPHERES}
        mask = load_surface_mask(mask_paths, labels, {h: a.shape[1] for h, a in arrays.items()})
        parts = []
        for h, arr in arrays.items():
            cols = mask.hemisphere_vertices(h)
            step = arr.shards[0] if arr.shards else arr.chunks[0]
            parts.append(
                np.concatenate(
                    [arr[t0 : t0 + step][:, cols] for t0 in range(0, arr.shape[0], step)]
                )
            )
        scale = group.attrs.get("scale", 1)
        return mask, np.concatenate(parts, axis=1), {"scale": scale, "units": group.attrs["units"]}
    with open_session(source) as session:
        mask = load_surface_mask(mask_paths, labels, session.vertices)
        n_trials = session.readers[0].n_trials
        out = np.empty((n_trials, len(mask.vertex)), session.readers[0].dtype)
        start = 0
        for reader in session.readers:
            cols = mask.hemisphere_vertices(reader.hemisphere)
            dest = out[:, start : start + len(cols)]
            for rows, span, block in reader.blocks(64, cols):
                inside = (cols >= span.start) & (cols < span.stop)
                dest[rows, np.flatnonzero(inside)] = block[:, cols[inside] - span.start]
            start += len(cols)
        scale, units = scale_and_units(out.dtype)
    return mask, out, {"scale": scale, "units": units}


def surface_roi_attrs(
    mask: SurfaceMask,
    sessions: list[int],
    shape: tuple[int, ...],
    stats_splits: tuple[str, ...],
    scale: float,
    units: str,
) -> dict[str, Any]:
    """Group attributes of a surface ROI store (the volume store's, vertices for voxels)."""
    return {
        "nsdzarr_version": __version__,
        "mask_files": [str(Path(p).resolve()) for p in mask.paths],
        "labels": list(mask.labels),
        "hemispheres": mask.n_vertices,
        "scale": scale,
        "units": units,
        "column_order": COLUMN_ORDER,
        "columns": "hemisphere (0 lh, 1 rh) and vertex (0-based index into that hemisphere)",
        "sessions": list(sessions),
        "rows": "global trial order of the sessions listed, aligned 1:1 with trials.tsv",
        "stats": f"mean/std per session per vertex over trials with split in {list(stats_splits)}",
        "shape": list(shape),
    }
