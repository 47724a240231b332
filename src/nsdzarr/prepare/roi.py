"""ROI-masked ``(trials x voxels)`` stores: masks, per-session parts, the finished group.

Column order is nibabel's: ``np.argwhere(mask_xyz)``, i.e. ``volume.T[mask]`` of an h5py
``(Z, Y, X)`` volume (the MindEye / brain-diffuser convention).
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import zarr

from nsdzarr import __version__
from nsdzarr.errors import InputError, VerificationError
from nsdzarr.nsd_facts import BETA_SCALE, BETA_UNITS, TRIALS_PER_SESSION
from nsdzarr.prepare.atomic import atomic_output, remove_stale_temporaries
from nsdzarr.prepare.hdf5_open import check_finite
from nsdzarr.prepare.hdf5_read import SessionReader
from nsdzarr.prepare.labels import label_selection, present_labels
from nsdzarr.prepare.layout import require_session_trials
from nsdzarr.prepare.memory import STATS_ROWS
from nsdzarr.prepare.nifti import load_nifti, require_affine, require_same_grid
from nsdzarr.prepare.storage import StorageSettings, create_trial_array, roi_settings
from nsdzarr.training.zarr_v3 import ArrayLayout, object_chunks, parse_layout, read_json

COLUMN_ORDER = "nibabel: np.argwhere(mask_xyz) == volume_zyx.T[mask_xyz] (MindEye order)"


@dataclass(frozen=True)
class RoiMask:
    """Selected voxels of an atlas: NIfTI ``(i, j, k)`` coordinates, their labels, the grid."""

    path: str
    labels: tuple[int, ...]
    voxels: np.ndarray  # (n, 3) int32, NIfTI (i, j, k), nibabel mask order
    voxel_labels: np.ndarray  # (n,) int16
    shape_xyz: tuple[int, int, int]
    affine: np.ndarray

    @property
    def columns(self) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
        """The arrays naming each column, with their dimension names."""
        return {"voxels": (self.voxels, ("voxel", "ijk"))}

    @property
    def zyx(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Index arrays into an h5py ``(Z, Y, X)`` volume, in column order."""
        return self.voxels[:, 2], self.voxels[:, 1], self.voxels[:, 0]


def load_roi_mask(
    path: str | os.PathLike[str],
    labels: list[int] | None,
    volume_zyx: tuple[int, int, int] | None = None,
) -> RoiMask:
    """Voxels of ``path`` whose value is in ``labels`` (default: every value >= 1).

    ``volume_zyx`` is the betas' h5py volume shape; the mask must be exactly its reverse.
    """
    img = load_nifti(path)
    data = np.asarray(img.dataobj)
    if data.ndim != 3:
        raise InputError(path, f"ROI mask must be 3-D (X, Y, Z), got shape {data.shape}")
    if volume_zyx is not None and tuple(data.shape) != tuple(volume_zyx)[::-1]:
        raise InputError(
            path,
            f"mask shape {tuple(data.shape)} (X, Y, Z) does not match the betas volume "
            f"{tuple(volume_zyx)} (Z, Y, X): expected {tuple(volume_zyx)[::-1]}",
        )
    if not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
        raise InputError(path, "ROI mask values must be integers (-1 outside brain, 0, labels)")
    values = data.astype(np.int64)
    present = present_labels(values)
    if labels is None:
        chosen = present
    else:
        missing = sorted(set(labels) - set(present))
        if missing:
            raise InputError(path, f"labels {missing} not in mask (present: {present})")
        chosen = sorted(labels)
    selected = label_selection(values, chosen)
    if not selected.any():
        raise InputError(path, "ROI selection is empty: no voxel has a label >= 1")
    voxels = np.argwhere(selected).astype(np.int32)
    return RoiMask(
        str(path),
        tuple(chosen),
        voxels,
        values[selected].astype(np.int16),
        tuple(int(n) for n in data.shape),
        np.asarray(img.affine, dtype=float),
    )


def read_split(trials_tsv: str | os.PathLike[str], session: int) -> np.ndarray:
    """``split`` of a session's 750 rows of ``trials.tsv``, in trial order."""
    with open(trials_tsv, newline="") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if int(r["session"]) == session]
    if len(rows) != TRIALS_PER_SESSION:
        raise InputError(trials_tsv, f"session {session} has {len(rows)} rows, expected 750")
    rows.sort(key=lambda r: int(r["trial_in_session"]))
    return np.array([r["split"] for r in rows])


def session_stats(
    betas: np.ndarray, use: np.ndarray, block: int = STATS_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel mean and std (float32, population) over the rows where ``use`` is true.

    Sums run in float64 over blocks of rows, so memory stays at a few rows whatever the count.
    """
    rows = np.flatnonzero(use)
    total = np.zeros(betas.shape[1], np.float64)
    squares = np.zeros(betas.shape[1], np.float64)
    for start in range(0, len(rows), block):
        part = betas[rows[start : start + block]].astype(np.float64)
        total += part.sum(axis=0)
        squares += np.square(part).sum(axis=0)
    n = max(len(rows), 1)
    mean = total / n
    var = np.maximum(squares / n - mean**2, 0.0)
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def is_session_store(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` is a converted session store (a folder) rather than an HDF5 file."""
    return Path(source).is_dir()


def read_store_voxels(store: str | os.PathLike[str], zyx: np.ndarray) -> np.ndarray:
    """All trials of the voxels at rows ``(z, y, x)`` of a session store's ``betas``, as
    ``(T, n)``: one shard file in memory at a time, each trial's chunk decoded and picked."""
    array_dir = Path(store) / "betas"
    meta, lay = parse_layout(array_dir)
    z, y, x = np.asarray(zyx, dtype=np.int64).reshape(-1, 3).T
    shape = tuple(int(n) for n in meta["shape"])
    out = np.empty((shape[0], len(z)), np.dtype(str(meta["data_type"])))
    if lay is None or lay.grid[1:] != lay.shape[1:] or lay.inner[1:] != lay.shape[1:]:
        arr = zarr.open_array(str(array_dir), mode="r")
        step = (arr.shards or arr.chunks)[0]
        for t0 in range(0, shape[0], step):
            out[t0 : t0 + step] = arr[t0 : t0 + step][:, z, y, x]
        return out
    out[...] = lay.fill_value
    rows = lay.inner[0]
    for obj in range(lay.n_objects()[0]):
        path = lay.key((obj, 0, 0, 0))
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:  # an all-fill-value shard is never written
            continue
        for c, chunk in object_chunks(lay, data, path):
            t0 = obj * lay.grid[0] + c * rows
            n = min(rows, shape[0] - t0)
            out[t0 : t0 + n] = chunk[:n, z, y, x]
    return out


def read_source_voxels(
    source: str | os.PathLike[str], mask_path: str | os.PathLike[str], labels: list[int] | None
) -> tuple[RoiMask, np.ndarray]:
    """The ROI mask and its voxels' rows from a session HDF5 or a session store."""
    if is_session_store(source):
        meta, _lay = parse_layout(Path(source) / "betas")
        mask = load_roi_mask(mask_path, labels, tuple(int(n) for n in meta["shape"][1:]))
        return mask, read_store_voxels(source, np.stack(mask.zyx, axis=1))
    with SessionReader(source) as reader:
        mask = load_roi_mask(mask_path, labels, tuple(reader.shape[1:]))
        return mask, reader.read_voxels(np.stack(mask.zyx, axis=1))


def extract_session(
    source: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    labels: list[int] | None,
    trials_tsv: str | os.PathLike[str],
    session: int,
    target: str | os.PathLike[str],
    settings: StorageSettings,
    stats_splits: tuple[str, ...] = ("train",),
    reference: str | os.PathLike[str] | None = None,
) -> None:
    """Write one session's ROI rows, labels and statistics as a part store (later merged).

    ``source`` is the session's HDF5 or, once that is deleted, its converted store.
    """
    remove_stale_temporaries(target)
    split = read_split(trials_tsv, session)
    extra: dict[str, Any] = {}
    if not isinstance(mask_path, (str, os.PathLike)):  # surface labels: [lh, rh] files
        from nsdzarr.prepare.surface_roi import read_surface_columns

        mask, betas, extra = read_surface_columns(source, mask_path, labels)
    else:
        mask, betas = read_source_voxels(source, mask_path, labels)
    if reference is not None:
        require_same_grid(mask_path, mask.affine, reference)
    volume = isinstance(mask_path, (str, os.PathLike))
    if volume and is_session_store(source):  # the betas' grid, as recorded at conversion
        recorded = read_json(Path(source) / "zarr.json").get("attributes", {}).get("affine")
        if recorded is not None:
            require_affine(mask_path, mask.affine, np.asarray(recorded), f"{source}'s recorded")
    require_session_trials(source, betas.shape[0])
    check_finite(betas, source)
    use = np.isin(split, stats_splits)
    mean, std = session_stats(betas, use)
    with atomic_output(target) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        arr = create_trial_array(
            group, "betas", betas.shape, betas.dtype, roi_settings(settings), ("trial", "voxel")
        )
        arr[...] = betas
        if not np.array_equal(arr[...], betas):
            raise VerificationError(target, "written rows differ from the source voxels")
        group.create_array("mean", data=mean[None], compressors=None)
        group.create_array("std", data=std[None], compressors=None)
        for name, (data, _dims) in mask.columns.items():
            group.create_array(name, data=data, compressors=None)
        group.attrs.update({"session": session, "n_stats_trials": int(use.sum()), **extra})


def _layout(array_dir: Path) -> ArrayLayout:
    """The shard layout of an array we wrote (its keys come from its own metadata)."""
    _, lay = parse_layout(array_dir)
    if lay is None:
        raise InputError(array_dir, "not a sharded array of the layout nsd-zarr writes; rerun it")
    return lay


def finish_store(
    parts: list[str | os.PathLike[str]],
    sessions: list[int],
    mask_path: str | os.PathLike[str],
    labels: list[int] | None,
    target: str | os.PathLike[str],
    settings: StorageSettings,
    stats_splits: tuple[str, ...] = ("train",),
) -> None:
    """Assemble per-session parts into the subject's ROI group by linking their shard files."""
    remove_stale_temporaries(target)
    surface = not isinstance(mask_path, (str, os.PathLike))  # [lh, rh] label files
    if surface:
        from nsdzarr.prepare.surface_roi import load_surface_mask, surface_roi_attrs

        mask: Any = load_surface_mask(mask_path, labels)
    else:
        mask = load_roi_mask(mask_path, labels)
    n_vox = len(mask.voxel_labels)
    settings = roi_settings(settings)
    shards_per_session = TRIALS_PER_SESSION // settings.trials_per_shard
    with atomic_output(target) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        arr = create_trial_array(
            group,
            "betas",
            (TRIALS_PER_SESSION * len(sessions), n_vox),
            zarr.open_group(parts[0], mode="r")["betas"].dtype,
            settings,
            ("trial", "voxel"),
        )
        dst_layout = _layout(Path(tmp) / "betas")
        means, stds = [], []
        for s, part in enumerate(parts):
            pg = zarr.open_group(part, mode="r")
            pb = pg["betas"]
            src_layout = _layout(Path(part) / "betas")
            if pb.dtype != arr.dtype:
                raise InputError(
                    part,
                    f"betas are {pb.dtype} but {parts[0]} holds {arr.dtype}: every session of "
                    "a subject must have the same dtype",
                )
            if (
                pb.shape != (TRIALS_PER_SESSION, n_vox)
                or pb.shards != arr.shards
                or pb.metadata.codecs != arr.metadata.codecs
                or any(
                    name not in pg or not np.array_equal(pg[name][...], data)
                    for name, (data, _dims) in mask.columns.items()
                )
            ):
                raise InputError(part, "part does not match the ROI mask or layout; rerun it")
            for i in range(shards_per_session):
                src = Path(src_layout.key((i, 0)))
                dst = Path(dst_layout.key((s * shards_per_session + i, 0)))
                if src.exists():  # an all-fill-value shard is never written
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    _link_or_copy(src, dst)
            means.append(pg["mean"][0])
            stds.append(pg["std"][0])
        verify_rows(arr, parts, target)
        for name, (data, dims) in mask.columns.items():
            group.create_array(name, data=data, dimension_names=dims)
        group.create_array("label", data=mask.voxel_labels, dimension_names=("voxel",))
        group.create_array("mean", data=np.stack(means), dimension_names=("session", "voxel"))
        group.create_array("std", data=np.stack(stds), dimension_names=("session", "voxel"))
        if surface:
            first = zarr.open_group(parts[0], mode="r").attrs
            group.attrs.update(
                surface_roi_attrs(
                    mask, sessions, arr.shape, stats_splits, first["scale"], first["units"]
                )
            )
        else:
            group.attrs.update(roi_attrs(mask, sessions, arr.shape, stats_splits))


def verify_rows(arr: zarr.Array, parts: list[str | os.PathLike[str]], target: Path) -> None:
    """Every session's rows of the finished store equal its part's; raise on a difference."""
    for s, part in enumerate(parts):
        rows = slice(s * TRIALS_PER_SESSION, (s + 1) * TRIALS_PER_SESSION)
        if not np.array_equal(arr[rows], zarr.open_group(part, mode="r")["betas"][...]):
            raise VerificationError(target, f"rows of session part {part} differ after assembly")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def roi_attrs(
    mask: RoiMask, sessions: list[int], shape: tuple[int, ...], stats_splits: tuple[str, ...]
) -> dict[str, Any]:
    """Group attributes: mask provenance, grid in both orders, scale, conventions, sessions."""
    x, y, z = mask.shape_xyz
    return {
        "nsdzarr_version": __version__,
        "mask_file": str(Path(mask.path).resolve()),
        "labels": list(mask.labels),
        "affine": mask.affine.tolist(),
        "shape_nifti_xyz": [x, y, z],
        "shape_hdf5_zyx": [z, y, x],
        "scale": BETA_SCALE,
        "units": BETA_UNITS,
        "column_order": COLUMN_ORDER,
        "sessions": list(sessions),
        "rows": "global trial order of the sessions listed, aligned 1:1 with trials.tsv",
        "stats": f"mean/std per session per voxel over trials with split in {list(stats_splits)}",
        "shape": list(shape),
    }


def to_nifti(
    values: np.ndarray,
    voxels: np.ndarray,
    shape_xyz: tuple[int, int, int],
    affine: np.ndarray,
    fill: float = 0.0,
) -> nib.Nifti1Image:
    """Put ``(n_voxels,)`` or ``(k, n_voxels)`` values back on the subject's NIfTI grid."""
    values = np.asarray(values)
    if values.shape[-1] != len(voxels) or values.ndim not in (1, 2):
        raise ValueError(f"values {values.shape} do not match {len(voxels)} voxels")
    rows = values[None] if values.ndim == 1 else values
    out = np.full((*shape_xyz, rows.shape[0]), fill, dtype=np.result_type(rows.dtype, np.float32))
    out[voxels[:, 0], voxels[:, 1], voxels[:, 2]] = rows.T
    return nib.Nifti1Image(out[..., 0] if values.ndim == 1 else out, affine)
