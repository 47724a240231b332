"""Metadata of the stores training code reads (ROI stores, image stores), without torch.

Read once, in the constructing process, then closed: plain picklable data that the torch
loader and the numpy readers (:mod:`nsdzarr.training.readers`) share.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nsdzarr.errors import InputError
from nsdzarr.nsd_facts import BETA_SCALE
from nsdzarr.outputs import trials_of_roi_store
from nsdzarr.training.fallbacks import numcodecs_c_library
from nsdzarr.training.row_reader import whole_rows
from nsdzarr.training.zarr_v3 import ArrayLayout, parse_layout, read_array, read_json

TRIAL_COLUMNS = ("trial", "session", "nsd_id", "repeat", "split")


def require_shards(lay: ArrayLayout | None) -> None:
    """Refuse a sharded array with a shard file missing (it would read as fill values)."""
    if lay is None or not lay.sharded:
        return
    rest = (0,) * (len(lay.shape) - 1)
    n = lay.n_objects()[0]
    absent = [lay.key((s, *rest)) for s in range(n) if not os.path.exists(lay.key((s, *rest)))]
    if absent:
        raise InputError(absent[0], f"shard file missing ({len(absent)} of {n}); store incomplete")


def row_layout(array_dir: Path) -> tuple[dict, ArrayLayout | None, np.dtype]:
    """An array's metadata, its fast-path layout (None unless chunks hold whole rows: then
    zarr-python reads it) and its on-disk dtype; refuses missing shards."""
    meta, lay = parse_layout(array_dir)
    if lay is not None and not whole_rows(lay):
        lay = None
    require_shards(lay)
    if lay is not None and lay.codec is not None:
        numcodecs_c_library(lay.codec)  # probed here, where a fallback warns (workers do not)
    try:
        dtype = lay.dtype if lay is not None else np.dtype(str(meta.get("data_type")))
    except TypeError as exc:
        raise InputError(array_dir, f"unsupported data type ({exc})") from exc
    return meta, lay, dtype


# --------------------------------------------------------------------------- ROI stores


@dataclass
class StoreInfo:
    """One ROI store: layout, statistics, its trials.tsv columns (plain data, picklable)."""

    subject: str
    path: str
    trials_tsv: str
    layout: ArrayLayout | None  # None -> zarr-python fallback
    n_rows: int
    n_voxels: int
    disk_dtype: np.dtype
    sessions: list[int]
    scale: float
    row_session: np.ndarray  # (n_rows,) index into ``sessions``
    columns: dict[str, np.ndarray]  # trial, session, nsd_id, repeat (int64), split (str); or {}
    mean: np.ndarray | None = None
    std: np.ndarray | None = None  # zeros replaced by 1


def _read_trials(path: Path, n_rows: int) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise InputError(path, "trials table not found (expected beside the store's subject)")
    try:
        with open(path, newline="") as fh:
            reader = csv.reader(fh, delimiter="\t")
            header = next(reader, None)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"unreadable trials table ({exc})") from exc
    missing = [c for c in TRIAL_COLUMNS if c not in (header or [])]
    if missing:
        raise InputError(path, f"missing columns {missing}")
    if len(rows) != n_rows:
        raise InputError(path, f"{len(rows)} rows but the store has {n_rows} trials")
    cols = {}
    try:
        for name in TRIAL_COLUMNS:
            i = header.index(name)
            values = [r[i] for r in rows]
            cols[name] = np.array(values) if name == "split" else np.array(values, dtype=np.int64)
    except (IndexError, ValueError) as exc:
        raise InputError(path, f"malformed row ({exc})") from exc
    bad = set(np.unique(cols["split"]).tolist()) - {"train", "test"}
    if bad:
        raise InputError(path, f"unknown split values {sorted(bad)}")
    return cols


def read_group(root: Path, what: str) -> dict:
    """The ``zarr.json`` of the store ``root`` (``what`` names it in errors): a Zarr group."""
    if not root.is_dir():
        raise InputError(root, f"{what} not found")
    group = read_json(root / "zarr.json")
    if group.get("node_type") != "group":
        raise InputError(root / "zarr.json", f"not a Zarr group (expected an {what})")
    return group


def load_store_info(
    store: str | os.PathLike[str],
    subject: str,
    trials: str | os.PathLike[str] | None,
    need_stats: bool,
    require_trials: bool = True,
) -> StoreInfo:
    """Read a store's metadata, its trials table and (if asked) its statistics, then close.

    Without ``require_trials`` a missing trials table leaves ``columns`` empty."""
    root = Path(store)
    group = read_group(root, "ROI store")
    attrs = group.get("attributes") or {}
    meta, lay, dtype = row_layout(root / "betas")
    shape = tuple(meta.get("shape", ()))
    if len(shape) != 2:
        raise InputError(root / "betas", f"betas must be 2-D (trials, voxels), got shape {shape}")
    n_rows, n_vox = int(shape[0]), int(shape[1])
    tsv = Path(trials) if trials is not None else trials_of_roi_store(root)
    cols = _read_trials(tsv, n_rows) if require_trials or tsv.is_file() else {}
    sessions = [int(s) for s in attrs.get("sessions") or dict.fromkeys(cols.get("session", []))]
    if (cols or sessions) and (not sessions or n_rows % len(sessions)):
        raise InputError(root, f"{n_rows} rows do not split into sessions {sessions}")
    per_session = n_rows // len(sessions) if sessions else n_rows
    if cols and not np.array_equal(cols["session"], np.repeat(sessions, per_session)):
        raise InputError(tsv, f"session column does not match the store's sessions {sessions}")
    info = StoreInfo(
        subject=subject,
        path=str(root),
        trials_tsv=str(tsv) if cols else "",
        layout=lay,
        n_rows=n_rows,
        n_voxels=n_vox,
        disk_dtype=dtype,
        sessions=sessions,
        scale=float(attrs.get("scale", BETA_SCALE)),
        row_session=np.repeat(np.arange(max(1, len(sessions))), per_session),
        columns=cols,
    )
    if need_stats:
        for name in ("mean", "std"):
            if not (root / name / "zarr.json").is_file():
                raise InputError(root / name, "missing: needed for normalize='session_zscore'")
        mean = read_array(root / "mean").astype(np.float32)
        std = read_array(root / "std").astype(np.float32)
        if mean.shape != (len(sessions), n_vox) or std.shape != mean.shape:
            raise InputError(root, f"mean/std shape {mean.shape} != (sessions, voxels)")
        info.mean, info.std = mean, np.where(std == 0, np.float32(1), std)
    return info


def default_max_open_files(n_stores: int) -> int:
    """Per-store bound on open shard files: 1/8 of the soft fd limit (64..4096) over the stores."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 1 << 15
    budget = max(64, min(4096, soft // 8))
    return max(16, budget // max(1, n_stores))


# --------------------------------------------------------------------------- image stores


@dataclass
class ImageStoreInfo:
    """One stimulus image store's array: layout and the NSD ids of its rows (picklable)."""

    path: str
    array: str  # images or images_{S}
    layout: ArrayLayout | None  # None -> zarr-python fallback
    shape: tuple[int, ...]  # (N, H, W, 3)
    nsd_id: np.ndarray  # (N,) int64, sorted unique

    @property
    def array_dir(self) -> str:
        return os.path.join(self.path, self.array)

    def rows_of(self, nsd_ids: np.ndarray) -> np.ndarray:
        """Row of each NSD id; InputError naming the store and the first id it lacks."""
        ids = np.asarray(nsd_ids, dtype=np.int64).reshape(-1)
        rows = np.searchsorted(self.nsd_id, ids)
        found = rows < len(self.nsd_id)
        found[found] = self.nsd_id[rows[found]] == ids[found]
        if not found.all():
            first = int(ids[np.argmin(found)])
            raise InputError(
                self.path,
                f"nsd_id {first} not in the image store ({int((~found).sum())} of "
                f"{len(ids)} ids missing; it holds {len(self.nsd_id)} images)",
            )
        return rows


def image_sizes(root: Path, names: list[str]) -> list[int]:
    """Resized copies ``images_{S}`` present among a group's members."""
    out = []
    for name in names:
        size = name.removeprefix("images_")
        if name.startswith("images_") and size.isdigit():
            out.append(int(size))
    return sorted(out)


def load_image_info(store: str | os.PathLike[str], size: int | None = None) -> ImageStoreInfo:
    """Read an image store's metadata and ``nsd_id`` (``images`` or ``images_{size}``)."""
    root = Path(store)
    read_group(root, "image store")
    name = "images" if size is None else f"images_{int(size)}"
    if not (root / name / "zarr.json").is_file():
        members = [p.name for p in root.iterdir() if (p / "zarr.json").is_file()]
        sizes = image_sizes(root, members)
        raise InputError(
            root,
            f"no array {name} (resized sizes present: {sizes or 'none'})"
            if size is not None
            else "no images array (not an image store)",
        )
    meta, lay, dtype = row_layout(root / name)
    shape = tuple(int(n) for n in meta.get("shape", ()))
    if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8:
        raise InputError(root / name, f"expected uint8 (N, H, W, 3) images, got {dtype} {shape}")
    if not (root / "nsd_id" / "zarr.json").is_file():
        raise InputError(root / "nsd_id", "missing: the store's row -> nsd_id table")
    ids = read_array(root / "nsd_id").astype(np.int64).reshape(-1)
    if len(ids) != shape[0]:
        raise InputError(root / "nsd_id", f"{len(ids)} ids for {shape[0]} images")
    if len(ids) > 1 and not (np.diff(ids) > 0).all():
        raise InputError(root / "nsd_id", "ids not sorted and unique")
    return ImageStoreInfo(str(root), name, lay, shape, ids)
