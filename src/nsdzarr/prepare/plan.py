"""Sizes and memory requests of a release before any job runs: the workflow's own estimates,
from HDF5 headers (or, without a download, the NSD facts in :mod:`nsdzarr.nsd_facts`)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from nsdzarr import nsd_facts
from nsdzarr.errors import InputError
from nsdzarr.prepare import layout, nsd, trials
from nsdzarr.prepare.estimate import (
    count_roi_voxels,
    estimate_from_metadata,
    sample_compression_ratio,
    session_metadata,
    stimuli_compression_ratio,
    stimuli_estimate,
)
from nsdzarr.prepare.memory import estimate_peak, estimate_request_mb
from nsdzarr.prepare.resources import estimate_job_mem_mb
from nsdzarr.prepare.stimuli import select_ids, stimuli_metadata
from nsdzarr.prepare.storage import STIMULI_STORAGE, StimuliStorage, StorageSettings
from nsdzarr.prepare.surface_estimate import session_meta, surface_estimate
from nsdzarr.prepare.surface_roi import count_surface_columns

SIZE_KEYS = ("raw_bytes", "float32_bytes", "store_bytes", "store_files")


def _estimate_mem_mb(meta: dict[str, Any], factor: float, ceiling_mb: int | None) -> int:
    """The estimate job's own request when only the release facts are known (no file)."""
    peak = estimate_peak(tuple(meta["shape"]), np.dtype(meta["dtype"]).itemsize)
    mem = estimate_request_mb(peak, factor)
    return min(mem, ceiling_mb) if ceiling_mb else mem


def _subject_sessions(
    subject: str,
    nsd_root: Path | None,
    space: str,
    beta_version: str,
    sessions: list[int] | None,
) -> list[int]:
    if nsd_root is not None:
        present = layout.sessions_present(nsd_root, subject, space, beta_version)
    elif subject in nsd_facts.SESSIONS and space in nsd_facts.VOLUMES_XYZ:
        present = list(range(1, nsd_facts.SESSIONS[subject] + 1))
    else:
        raise InputError(subject, f"not a subject of the NSD release in {space}; give --nsd-root")
    missing = sorted(set(sessions or []) - set(present))
    if missing:
        raise InputError(
            layout.betas_dir(nsd_root or "NSD", subject, space, beta_version),
            f"sessions {missing} not present (found {present[0]}..{present[-1]})",
        )
    return sorted(sessions) if sessions else present


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    jobs: dict[str, dict[str, int]] = {}
    for row in rows:
        for name, job in row["jobs"].items():
            tot = jobs.setdefault(name, {"max_mem_mb": 0, "runtime_min": 0, "jobs": 0})
            tot["max_mem_mb"] = max(tot["max_mem_mb"], job["mem_mb"])
            tot["runtime_min"] += job.get("runtime_min", 0)
            tot["jobs"] += 1
    return {
        "sessions": len(rows),
        **{key: sum(r[key] for r in rows) for key in SIZE_KEYS},
        "jobs": jobs,
    }


def _surface_row(
    root: Path,
    subject: str,
    space: str,
    beta_version: str,
    session: int,
    settings: StorageSettings,
    ceiling_mb: int | None,
    factor: float,
    columns: dict[str, int],
    sample: bool,
) -> dict[str, Any]:
    """One surface session's row, as the workflow's estimate job computes it (surface_estimate)."""
    paths = layout.surface_betas_paths(root, subject, space, beta_version, session)
    meta, ratio = session_meta(paths, settings, sample)
    est = surface_estimate(meta, settings, ratio, ceiling_mb, factor, columns)
    return {
        "subject": subject,
        "session": session,
        "source": meta["path"],
        "shape": meta["shape"],
        "hemispheres": meta["hemispheres"],
        "compression_ratio": est["compression_ratio"],
        **{key: est[key] for key in SIZE_KEYS},
        # the estimate job's own request, as the workflow makes it (resources.py)
        "jobs": est["jobs"]
        | {"estimate": {"mem_mb": estimate_job_mem_mb(paths, factor, 1, ceiling_mb)}},
    }


def plan_stimuli(
    root: Path | None,
    shown: dict[str, list[int]],
    subset: str = "trials",
    sizes: list[int] | None = None,
    settings: StimuliStorage | None = None,
    ceiling_mb: int | None = 16000,
    factor: float = 1.0,
    sample: bool = False,
) -> dict[str, Any]:
    """The stimuli job's estimate, as the workflow's stimuli_estimate computes it.

    ``shown`` maps each subject to its planned sessions; ``subset`` "trials" holds the images
    they show (read from the design; without ``root``, at most every image of the subjects),
    "all" every row. A compressed codec's ratio is measured only with ``sample`` (else 1).
    """
    settings = settings or STIMULI_STORAGE
    if root is None:
        meta = nsd.stimuli_metadata()
        n_rows = meta["shape"][0]
        own = trials.N_IMAGES_10K - trials.N_SHARED
        n_images = min(n_rows, trials.N_SHARED + own * len(shown))
        counted = "all" if subset == "all" else "at most the subjects' 10k images"
        n_images = n_rows if subset == "all" else n_images
        ratio = 1.0
    else:
        source = layout.stimuli_path(root)
        meta = stimuli_metadata(source)
        n_rows = meta["shape"][0]
        ids = None
        if subset == "trials":
            design_file = layout.design_path(root)
            design = trials.load_design(design_file)
            ids = np.concatenate(
                [trials.trial_table(design, s, n, design_file)["nsd_id"] for s, n in shown.items()]
            )
        n_images = len(select_ids(source, ids, n_rows))
        counted = "all" if subset == "all" else "shown in the planned sessions"
        ratio = stimuli_compression_ratio(source, settings) if sample else 1.0
    est = stimuli_estimate(meta, n_images, sizes or [], settings, ceiling_mb, factor, ratio)
    return est | {"subset": subset, "images_counted": counted}


def plan_release(
    subjects: list[str],
    nsd_root: str | os.PathLike[str] | None = None,
    space: str = "func1pt8mm",
    beta_version: str = "betas_fithrf_GLMdenoise_RR",
    sessions: list[int] | None = None,
    settings: StorageSettings | None = None,
    ceiling_mb: int | None = 16000,
    factor: float = 1.0,
    rois: dict[str, tuple[str, list[int] | None]] | None = None,
    sample: bool = False,
    stimuli: str = "auto",
    stimuli_subset: str = "trials",
    stimuli_sizes: list[int] | None = None,
    stimuli_settings: StimuliStorage | None = None,
) -> dict[str, Any]:
    """Per-session estimates (sizes, and ``mem_mb`` / ``runtime_min`` per job), the stimuli
    job's and totals.

    ``sessions`` None means every session present; ``rois`` maps a name to (atlas file in the
    subject's roi folder, labels); ``sample`` measures the compression ratio on a few planes
    of each file, as the workflow's estimate job does, instead of assuming the NSD ratio.
    A surface space (``nativesurface``, ``fsaverage``) reads its ``[lh, rh]`` files' headers
    (``nsd_root`` needed) and plans as the surface estimate job does; its ``rois`` name
    ``NAME.mgz`` labels. ``stimuli`` "auto" plans the image store when the release has the
    stimulus file (always for the NSD facts), "yes" requires it, "no" leaves it out (see
    :func:`plan_stimuli`).
    """
    settings = settings or StorageSettings()
    root = Path(nsd_root) if nsd_root is not None else None
    if root is None and (rois or sample):
        raise InputError("--nsd-root", "ROI sizes and sampled ratios need the release's files")
    rows = []
    shown: dict[str, list[int]] = {}
    for subject in subjects:
        numbers = _subject_sessions(subject, root, space, beta_version, sessions)
        shown[subject] = numbers
        if root is not None and layout.is_surface(space):
            columns = {
                name: count_surface_columns(
                    layout.surface_label_paths(root, subject, space, file), labels
                )
                for name, (file, labels) in (rois or {}).items()
            }
            for session in numbers:
                rows.append(
                    _surface_row(
                        root, subject, space, beta_version, session, settings, ceiling_mb,
                        factor, columns, sample,
                    )
                )  # fmt: skip
            continue
        roi_voxels = {
            name: count_roi_voxels(layout.roi_path(root, subject, space, file), labels)
            for name, (file, labels) in (rois or {}).items()
        }
        for session in numbers:
            if root is None:
                meta = nsd.session_metadata(subject, space)
                ratio = nsd.ASSUMED_COMPRESSION_RATIO
                est_mem = _estimate_mem_mb(meta, factor, ceiling_mb)
            else:
                source = layout.betas_path(root, subject, space, beta_version, session)
                meta = session_metadata(source)
                layout.require_session_trials(source, meta["shape"][0])
                ratio = (
                    sample_compression_ratio(source, settings)
                    if sample
                    else nsd.ASSUMED_COMPRESSION_RATIO
                )
                est_mem = estimate_job_mem_mb(source, factor, 1, ceiling_mb)
            est = estimate_from_metadata(meta, settings, ratio, ceiling_mb, factor, roi_voxels)
            rows.append(
                {
                    "subject": subject,
                    "session": session,
                    "source": meta["path"],
                    "shape": meta["shape"],
                    "compression_ratio": est["compression_ratio"],
                    **{key: est[key] for key in SIZE_KEYS},
                    "jobs": {"estimate": {"mem_mb": est_mem}, **est["jobs"]},
                }
            )
    present = root is None or layout.stimuli_path(root).is_file()
    if stimuli == "yes" and not present:
        raise InputError(layout.stimuli_path(root or ""), "stimulus file not found")
    images = None
    if stimuli == "yes" or (stimuli == "auto" and present):
        images = plan_stimuli(
            root, shown, stimuli_subset, stimuli_sizes, stimuli_settings, ceiling_mb, factor,
            sample,
        )  # fmt: skip
    return {
        "nsd_root": None if root is None else str(root),
        "space": space,
        "beta_version": beta_version,
        "storage": asdict(settings),
        "ceiling_mb": ceiling_mb,
        "factor": factor,
        "compression_ratio": "sampled per session"
        if sample
        else (
            nsd.ASSUMED_SURFACE_COMPRESSION_RATIO
            if layout.is_surface(space)
            else nsd.ASSUMED_COMPRESSION_RATIO
        ),
        "sessions": rows,
        "subjects": {s: _totals([r for r in rows if r["subject"] == s]) for s in subjects},
        "total": _totals(rows),
        "stimuli": images,
    }


def _mb(n: int) -> str:
    return f"{n / 1024**2:.1f}"


def format_plan(plan: dict[str, Any]) -> str:
    """A table: one line per session, then per subject and release totals."""
    jobs = list(plan["sessions"][0]["jobs"]) if plan["sessions"] else []
    head = f"{'subject':8} {'session':>7} {'raw MB':>9} {'store MB':>9} {'files':>6} "
    head += " ".join(f"{j + ' MB':>{max(len(j) + 3, 10)}}" for j in jobs)
    head += f" {'convert min':>11} strategy"
    lines = [
        f"plan for {plan['nsd_root'] or 'the NSD release (facts, no files)'} {plan['space']} "
        f"{plan['beta_version']}; compression ratio {plan['compression_ratio']}, "
        f"memory ceiling {plan['ceiling_mb']} MB, factor {plan['factor']}",
        head,
    ]
    for row in plan["sessions"]:
        mems = " ".join(f"{row['jobs'][j]['mem_mb']:>{max(len(j) + 3, 10)}}" for j in jobs)
        conv = row["jobs"]["convert"]
        lines.append(
            f"{row['subject']:8} {row['session']:7d} {_mb(row['raw_bytes']):>9} "
            f"{_mb(row['store_bytes']):>9} {row['store_files']:6d} {mems} "
            f"{conv['runtime_min']:11d} {conv['strategy']}"
        )
    for name, tot in [*plan["subjects"].items(), ("all", plan["total"])]:
        mems = " ".join(
            f"{tot['jobs'][j]['max_mem_mb']:>{max(len(j) + 3, 10)}}" for j in jobs if tot["jobs"]
        )
        conv = tot["jobs"].get("convert", {}).get("runtime_min", 0)
        lines.append(
            f"{name:8} {str(tot['sessions']) + ' ses':>7} {_mb(tot['raw_bytes']):>9} "
            f"{_mb(tot['store_bytes']):>9} {tot['store_files']:6d} {mems} {conv:11d} "
            "total (MB: largest request)"
        )
    images = plan.get("stimuli")
    if images:
        job = images["jobs"]["stimuli"]
        sizes = ", ".join(f"{s}x{s}" for s in images["sizes"]) or "none"
        lines.append(
            f"stimuli  {images['n_images']} images ({images['images_counted']}; resized: "
            f"{sizes}): raw {_mb(images['raw_bytes'] + images['resized_bytes'])} MB, store "
            f"{_mb(images['store_bytes'])} MB in {images['store_files']} files; stimuli job "
            f"{job['mem_mb']} MB, {job['runtime_min']} min"
        )
    return "\n".join(lines)
