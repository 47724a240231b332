"""Quality-control numbers and figures of a finished run: stores, trials, ROI drift, reliability."""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from nsdzarr.nsd_facts import TRIALS_PER_SESSION
from nsdzarr.outputs import SESSION_ESTIMATE_FILE
from nsdzarr.prepare.figures import new_figure, no_data, save_png
from nsdzarr.prepare.memory import MB

# Float64 bytes of one block of pairs' rows: memory stays at a few such blocks per ROI (~10:
# the rows, their z-scored copies and products), whatever the ROI's voxels or images.
PAIR_BLOCK_BYTES = 16 * MB
# Fewer images than this and a per-voxel correlation is not reported (NaN).
MIN_IMAGES = 3
ENGINE_FILES = {".snakemake_timestamp"}
STORE_PATH = re.compile(r"(subj\d+)/betas/session(\d+)\.zarr/?$")

StrPath = str | os.PathLike[str]


def folder_usage(path: StrPath) -> tuple[int, int]:
    """(bytes, files) of the files under ``path``, leaving out Snakemake's own marker."""
    sizes = [
        p.stat().st_size
        for p in Path(path).rglob("*")
        if p.is_file() and p.name not in ENGINE_FILES
    ]
    return sum(sizes), len(sizes)


def store_rows(estimate_files: list[StrPath], stores: list[StrPath]) -> list[dict[str, Any]]:
    """Per session: source, predicted and measured store size, file count, compression ratio."""
    on_disk = {}
    for store in stores:
        m = STORE_PATH.search(Path(store).as_posix())
        if m:
            on_disk[(m[1], int(m[2]))] = folder_usage(store)
    rows = []
    for path in sorted(map(str, estimate_files)):
        m = SESSION_ESTIMATE_FILE.search(Path(path).as_posix())
        if not m:
            continue
        est = json.loads(Path(path).read_text())
        key = (m[1], int(m[2]))
        measured_bytes, measured_files = on_disk.get(key, (0, 0))
        rows.append(
            {
                "subject": key[0],
                "session": key[1],
                "raw_mb": est["raw_bytes"] / MB,
                "source_mb": est["source"]["file_bytes"] / MB,
                "predicted_store_mb": est["store_bytes"] / MB,
                "store_mb": measured_bytes / MB,
                "predicted_files": est["store_files"],
                "store_files": measured_files,
                "predicted_ratio": est["raw_bytes"] / est["store_bytes"],
                "ratio": est["raw_bytes"] / measured_bytes if measured_bytes else float("nan"),
            }
        )
    return rows


def plot_store_sizes(rows: list[dict[str, Any]], path: StrPath) -> None:
    """Per session: store size, compression ratio and file count, predicted vs on disk."""
    fig, axes = new_figure(8, 9, nrows=3, sharex=True)
    if not rows:
        no_data(axes[0], "no session stores")
    sessions = np.arange(len(rows))  # one slot per session, labelled with its number
    w = 0.38
    ax = axes[0]
    if rows:
        ax.bar(sessions - w / 2, [r["predicted_store_mb"] for r in rows], w, label="predicted")
        ax.bar(sessions + w / 2, [r["store_mb"] for r in rows], w, label="on disk")
        ax.plot(sessions, [r["source_mb"] for r in rows], "k_", ms=22, mew=2, label="source HDF5")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_ylabel("size (MB)")
    ax.set_title("Session store size")
    ax = axes[1]
    if rows:
        ax.plot(sessions, [r["predicted_ratio"] for r in rows], "o--", label="predicted")
        ax.plot(sessions, [r["ratio"] for r in rows], "s-", label="on disk")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
        ax.set_ylim(0, max(max(r["predicted_ratio"], r["ratio"]) for r in rows) * 1.2)
    ax.set_ylabel("int16 bytes / store bytes")
    ax.set_title("Compression ratio")
    ax = axes[2]
    if rows:
        for shift, key, label in (
            (-w / 2, "predicted_files", "predicted"),
            (w / 2, "store_files", "on disk"),
        ):
            bars = ax.bar(sessions + shift, [r[key] for r in rows], w, label=label)
            ax.bar_label(bars, label_type="center")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_ylabel("files per store")
    ax.yaxis.get_major_locator().set_params(integer=True)  # no 17.5 files
    ax.set_title("File count (shards + metadata)")
    ax.set_xlabel("session")
    if rows:
        ax.set_xticks(sessions, [str(r["session"]) for r in rows])
        fig.suptitle(f"{rows[0]['subject']}: session stores ({len(rows)} sessions)")
    save_png(fig, path)


def read_trials(trials_tsv: StrPath) -> list[dict[str, str]]:
    """The rows of ``trials.tsv`` as strings."""
    with open(trials_tsv, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def trial_counts(trials_tsv: StrPath) -> dict[tuple[int, str], int]:
    """Number of trials per (session, split)."""
    return dict(Counter((int(r["session"]), r["split"]) for r in read_trials(trials_tsv)))


def plot_trial_counts(trials_tsv: StrPath, path: StrPath, subject: str) -> None:
    """Stacked bars: trials per session, train and test (shared1000), with their counts."""
    rows = read_trials(trials_tsv)
    counts = Counter((int(r["session"]), r["split"]) for r in rows)
    sessions = sorted({s for s, _ in counts})
    slots = np.arange(len(sessions))
    fig, ax = new_figure(8, 4.5)
    bottom = np.zeros(len(sessions))
    for split, colour in (("train", "tab:blue"), ("test", "tab:orange")):
        n = np.array([counts.get((s, split), 0) for s in sessions])
        bars = ax.bar(slots, n, 0.7, bottom=bottom, color=colour, label=split)
        ax.bar_label(bars, labels=[str(v) if v else "" for v in n], label_type="center")
        bottom += n
    images = len({r["nsd_id"] for r in rows})
    ax.set_xticks(slots, [str(s) for s in sessions])
    ax.set_xlabel("session")
    ax.set_ylabel("trials")
    ax.set_ylim(0, max(bottom.max(initial=0), 1) * 1.15)
    ax.legend(title="split", loc="upper right", ncols=2)
    ax.set_title(f"{subject}: trials per session and split ({len(rows)} trials, {images} images)")
    save_png(fig, path)


def session_drift(store: StrPath) -> dict[str, np.ndarray]:
    """Across-voxel average of an ROI store's per-session train mean and std, in PSC."""
    import zarr

    group = zarr.open_group(store, mode="r")
    scale = float(group.attrs["scale"])
    return {
        "sessions": np.asarray(group.attrs["sessions"]),
        "mean": group["mean"][...].mean(axis=1) / scale,
        "std": group["std"][...].mean(axis=1) / scale,
    }


def plot_session_drift(stores: dict[str, StrPath], path: StrPath, subject: str) -> None:
    """Per ROI, the across-voxel average of the train mean and std per session."""
    fig, (top, bottom) = new_figure(8, 6.5, nrows=2, sharex=True)
    if not stores:
        no_data(top, "no ROI stores configured")
    for name, store in stores.items():
        drift = session_drift(store)
        top.plot(drift["sessions"], drift["mean"], "o-", label=name)
        bottom.plot(drift["sessions"], drift["std"], "o-", label=name)
        bottom.set_xticks(drift["sessions"])
    top.axhline(0, color="grey", lw=0.8)
    top.set_ylabel("mean beta (% signal change)")
    top.set_title("Mean over train trials, averaged over the ROI's voxels")
    bottom.set_ylabel("std of beta (% signal change)")
    bottom.set_title("Standard deviation over train trials, averaged over voxels")
    bottom.set_xlabel("session")
    if stores:
        bottom.set_ylim(0, max(line.get_ydata().max() for line in bottom.get_lines()) * 1.2)
        fig.legend(*top.get_legend_handles_labels(), title="ROI", loc="outside right upper")
    fig.suptitle(f"{subject}: session drift of the ROI betas")
    save_png(fig, path)


def repeat_pairs(trials_tsv: StrPath, sessions: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Store rows of the first and second presentation of every image shown twice in
    ``sessions`` (rows are in the ROI store's order: session by session, 750 each)."""
    offset = {s: i * TRIALS_PER_SESSION for i, s in enumerate(sessions)}
    shown: dict[tuple[int, int], int] = {}
    for r in read_trials(trials_tsv):
        session = int(r["session"])
        if session in offset and int(r["repeat"]) in (0, 1):
            row = offset[session] + int(r["trial_in_session"])
            shown[(int(r["nsd_id"]), int(r["repeat"]))] = row
    images = sorted(i for i, rep in shown if rep == 0 and (i, 1) in shown)
    first = np.array([shown[(i, 0)] for i in images], dtype=np.int64)
    second = np.array([shown[(i, 1)] for i in images], dtype=np.int64)
    return first, second


def pair_correlation(
    read: Any, first: np.ndarray, second: np.ndarray, n_voxels: int, block: int | None = None
) -> np.ndarray:
    """Per voxel, Pearson r across pairs between ``read(first rows)`` and ``read(second rows)``.

    ``read(rows)`` returns a ``(len(rows), n_voxels)`` array. Sums run in float64 over
    blocks of pairs (``block`` pairs, by default ``PAIR_BLOCK_BYTES`` of rows), so memory stays
    at a few blocks whatever the count. NaN where r is undefined
    (fewer than ``MIN_IMAGES`` pairs, or a voxel constant over them).
    """
    n = len(first)
    if n < MIN_IMAGES:
        return np.full(n_voxels, np.nan, np.float32)
    sums = np.zeros((5, n_voxels), np.float64)  # x, y, xx, yy, xy
    block = block or max(1, PAIR_BLOCK_BYTES // (8 * max(n_voxels, 1)))
    for start in range(0, n, block):
        x = np.asarray(read(first[start : start + block]), np.float64)
        y = np.asarray(read(second[start : start + block]), np.float64)
        sums += [x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), (x * y).sum(0)]
    sx, sy, sxx, syy, sxy = sums
    cov = n * sxy - sx * sy
    var_x, var_y = n * sxx - sx**2, n * syy - sy**2
    # a constant voxel leaves only rounding error in its variance, not an exact zero
    varies = (var_x > 1e-9 * n * sxx) & (var_y > 1e-9 * n * syy)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(varies, cov / np.sqrt(np.maximum(var_x * var_y, 0)), np.nan)
    return np.clip(r, -1, 1).astype(np.float32)


def roi_reliability(store: StrPath, trials_tsv: StrPath) -> tuple[np.ndarray, int]:
    """Split-half reliability per voxel of an ROI store and the number of images it uses.

    Each presentation is z-scored with its session's train mean and std (as the loader's
    ``session_zscore``), so session offsets do not count as signal.
    """
    import zarr

    group = zarr.open_group(store, mode="r")
    betas = group["betas"]
    mean = group["mean"][...].astype(np.float64)
    std = group["std"][...].astype(np.float64)
    std[std == 0] = np.nan
    first, second = repeat_pairs(trials_tsv, list(group.attrs["sessions"]))

    def read(rows: np.ndarray) -> np.ndarray:
        order = np.argsort(rows)
        out = np.empty((len(rows), betas.shape[1]), np.float64)
        out[order] = betas.oindex[rows[order], :]
        s = rows // TRIALS_PER_SESSION
        return (out - mean[s]) / std[s]

    return pair_correlation(read, first, second, betas.shape[1]), len(first)


def write_reliability_nifti(r: np.ndarray, store: StrPath, path: StrPath) -> None:
    """The reliability back on the subject's NIfTI grid (NaN outside the ROI), gzipped."""
    import zarr

    from nsdzarr.prepare.demo import write_nifti_gz
    from nsdzarr.prepare.roi import to_nifti

    group = zarr.open_group(store, mode="r")
    img = to_nifti(
        r,
        group["voxels"][...],
        tuple(group.attrs["shape_nifti_xyz"]),
        np.asarray(group.attrs["affine"]),
        fill=np.nan,
    )
    write_nifti_gz(Path(path), np.asarray(img.dataobj, np.float32), img.affine)


def session_ranges(sessions: list[int]) -> str:
    """Session numbers as compact ranges, e.g. [1, 2, 3, 15, 17] -> "1-3, 15, 17"."""
    parts: list[list[int]] = []
    for s in sorted(sessions):
        if parts and s == parts[-1][-1] + 1:
            parts[-1].append(s)
        else:
            parts.append([s])
    return ", ".join(f"{p[0]}-{p[-1]}" if len(p) > 2 else ", ".join(map(str, p)) for p in parts)


def _n_text(n: int, sessions: list[int]) -> str:
    word = "sessions" if len(sessions) > 1 else "session"
    return f"n = {n} images shown twice in {word} {session_ranges(sessions)}"


def reliability_counts(r: np.ndarray, n: int) -> dict[str, int]:
    """What a reliability figure rests on: images shown twice, ROI voxels, voxels with an r."""
    return {"images": n, "voxels": len(r), "voxels_with_r": int(np.isfinite(r).sum())}


def plot_reliability_hist(
    r: np.ndarray, n: int, sessions: list[int], path: StrPath, title: str
) -> None:
    """Histogram of the per-voxel split-half r, with its median and the image count."""
    fig, ax = new_figure(7, 4.5)
    ok = r[np.isfinite(r)]
    if len(ok):
        ax.hist(ok, bins=np.linspace(-1, 1, 41), color="tab:blue", edgecolor="white")
        median = float(np.median(ok))
        ax.axvline(median, color="k", ls="--", label=f"median r = {median:.2f}")
        ax.axvline(0, color="grey", lw=0.8)
        ax.legend(loc="upper left", title=_n_text(n, sessions))
    else:
        no_data(ax, f"{_n_text(n, sessions)}:\nat least {MIN_IMAGES} are needed for a correlation")
    ax.set_xlim(-1, 1)
    ax.set_xlabel("split-half reliability r (first vs second presentation, across images)")
    ax.set_ylabel(f"voxels (of {len(r)})")
    ax.set_title(title)
    save_png(fig, path, reliability_counts(r, n))


def _axis_coords(affine: np.ndarray, axis: int, size: int) -> tuple[np.ndarray, str]:
    """Millimetre coordinates of one voxel axis when the affine is axis-aligned, else indices."""
    off = np.delete(affine[:3, axis], axis)
    if np.allclose(off, 0) and affine[axis, axis] != 0:
        return affine[axis, axis] * np.arange(size) + affine[axis, 3], "mm"
    return np.arange(size, dtype=float), "voxel"


def plot_reliability_slices(
    r: np.ndarray,
    n: int,
    store: StrPath,
    atlas: StrPath,
    path: StrPath,
    title: str,
    sessions: list[int],
) -> None:
    """Axial, coronal and sagittal slices through the ROI's centre showing r per voxel."""
    import zarr

    from nsdzarr.prepare.nifti import load_nifti

    group = zarr.open_group(store, mode="r")
    voxels = group["voxels"][...]
    shape = tuple(group.attrs["shape_nifti_xyz"])
    affine = np.asarray(group.attrs["affine"])
    brain = np.asarray(load_nifti(atlas).dataobj) >= 0
    volume = np.full(shape, np.nan, np.float32)
    volume[tuple(voxels.T)] = r
    in_roi = np.zeros(shape, bool)
    in_roi[tuple(voxels.T)] = True
    centre = np.round(np.median(voxels, axis=0)).astype(int)
    finite = r[np.isfinite(r)]
    vmax = max(0.1, float(np.ceil(np.abs(finite).max() * 10) / 10)) if len(finite) else 1.0
    names = "xyz"
    fig, axes = new_figure(12, 4.6, ncols=3)
    image = None
    for ax, (fixed, label) in zip(
        axes, ((2, "axial"), (1, "coronal"), (0, "sagittal")), strict=True
    ):
        a, b = [d for d in range(3) if d != fixed]
        take = [slice(None)] * 3
        take[fixed] = centre[fixed]
        ca, unit_a = _axis_coords(affine, a, shape[a])
        cb, unit_b = _axis_coords(affine, b, shape[b])
        cf, unit_f = _axis_coords(affine, fixed, shape[fixed])
        da = (ca[1] - ca[0]) / 2 if len(ca) > 1 else 0.5
        db = (cb[1] - cb[0]) / 2 if len(cb) > 1 else 0.5
        extent = (ca[0] - da, ca[-1] + da, cb[0] - db, cb[-1] + db)
        show = dict(origin="lower", extent=extent, interpolation="nearest", aspect="equal")
        background = np.where(brain[tuple(take)], 0.85, 1.0)
        background[in_roi[tuple(take)]] = 0.55  # ROI voxels without a value stay visible
        ax.imshow(background.T, cmap="gray", vmin=0, vmax=1, **show)
        image = ax.imshow(volume[tuple(take)].T, cmap="RdBu_r", vmin=-vmax, vmax=vmax, **show)
        ax.set_xlabel(f"{names[a]} ({unit_a})")
        ax.set_ylabel(f"{names[b]} ({unit_b})")
        ax.set_title(f"{label}, {names[fixed]} = {cf[centre[fixed]]:.1f} {unit_f}")
    bar = fig.colorbar(image, ax=list(axes), shrink=0.85)
    bar.set_label("split-half reliability r (Pearson, unitless)")
    note = "" if len(finite) else " - too few repeats: no value (dark grey = ROI)"
    fig.suptitle(f"{title} ({_n_text(n, sessions)}){note}")
    save_png(fig, path, reliability_counts(r, n))


def write_roi_reliability(
    store: StrPath,
    trials_tsv: StrPath,
    atlas: StrPath,
    subject: str,
    roi: str,
    out_nifti: StrPath,
    out_hist: StrPath,
    out_slices: StrPath,
) -> None:
    """Reliability of one ROI store: the NIfTI, its histogram and its brain slices."""
    import zarr

    sessions = list(zarr.open_group(store, mode="r").attrs["sessions"])
    r, n = roi_reliability(store, trials_tsv)
    write_reliability_nifti(r, store, out_nifti)
    title = f"{subject} {roi}: split-half reliability per voxel"
    plot_reliability_hist(r, n, sessions, out_hist, title)
    plot_reliability_slices(r, n, store, atlas, out_slices, title, sessions)


def write_store_sizes(estimate_files: list[StrPath], stores: list[StrPath], path: StrPath) -> None:
    """The store-size figure of one subject's sessions."""
    plot_store_sizes(store_rows(estimate_files, stores), path)
