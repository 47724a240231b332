"""Trial -> image index tables for one NSD subject, built from ``nsd_expdesign.mat``.

All indices in this module are 0-based; the 1-based MATLAB values are converted once, in
:func:`load_design`. A table is a ``dict[str, np.ndarray]`` of equal-length columns.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from nsdzarr.errors import InputError, unreadable
from nsdzarr.nsd_facts import (
    DOCUMENTED_RUN_LENGTHS,
    MAX_REPEATS,
    MAX_SUBJECTS,
    N_IMAGES_10K,
    N_IMAGES_73K,
    N_SHARED,
    RUNS_PER_SESSION,
    SLOTS_PER_RUN,
    TRIALS_PER_SESSION,
)
from nsdzarr.prepare.atomic import atomic_output

StrPath = str | PathLike[str]
Table = dict[str, np.ndarray]


TRIAL_COLUMNS = (
    "trial",
    "session",
    "run",
    "trial_in_session",
    "image_10k",
    "nsd_id",
    "shared1000",
    "repeat",
    "split",
)
RUN_SOURCE_STIMPATTERN = "stimpattern"
RUN_SOURCE_DOCUMENTED = "documented run lengths"


@dataclass(frozen=True)
class Design:
    """The NSD experimental design with every index already converted to 0-based.

    ``masterordering`` (n_trials,): 0-based index into a subject's 10k list per global trial.
    ``subjectim`` (n_subjects, 10000): 0-based 73k NSD ids. ``sharedix`` (1000,): 0-based 73k
    ids or None. ``stimpattern`` (n_sessions, 12, 75) bool or None. ``path``: the source file.
    """

    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray | None
    stimpattern: np.ndarray | None
    path: str

    @property
    def n_sessions(self) -> int:
        """Sessions covered by ``masterordering`` (750 trials each)."""
        return len(self.masterordering) // TRIALS_PER_SESSION

    @property
    def run_source(self) -> str:
        """Where :func:`trial_table` takes run numbers from."""
        return RUN_SOURCE_DOCUMENTED if self.stimpattern is None else RUN_SOURCE_STIMPATTERN


# --------------------------------------------------------------------------- design


def _read_mat(path: Path) -> dict[str, Any]:
    """``scipy.io.loadmat`` with every failure turned into an InputError."""
    if not path.is_file():
        raise InputError(path, "file not found")
    if problem := unreadable(path):
        raise InputError(path, problem)
    try:
        return scipy.io.loadmat(path)
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5) files
        raise InputError(path, f"not a MATLAB v5 .mat file ({exc})") from exc
    except Exception as exc:  # loadmat raises many types on junk input
        raise InputError(path, f"not a readable MATLAB .mat file ({exc})") from exc


def _integers(path: Path, name: str, value: Any, lo: int, hi: int) -> np.ndarray:
    """Check a numeric array holds integers in ``lo..hi``; return it as int64."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf" or arr.size == 0:
        raise InputError(path, f"{name} must be a non-empty numeric array, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
        raise InputError(path, f"{name} holds non-integer values")
    arr = arr.astype(np.int64)
    if arr.min() < lo or arr.max() > hi:
        raise InputError(
            path, f"{name} values must be in {lo}..{hi}, found {arr.min()}..{arr.max()}"
        )
    return arr


def _row_vector(path: Path, name: str, value: Any) -> np.ndarray:
    """Flatten a (1, n) or (n,) array; any other shape is an error."""
    arr = np.asarray(value)
    if not (arr.ndim == 1 or (arr.ndim == 2 and arr.shape[0] == 1)):
        raise InputError(path, f"{name} must have shape (1, n), got {arr.shape}")
    return arr.reshape(-1)


def _masterordering(path: Path, value: Any) -> np.ndarray:
    """Validate ``masterordering`` and return it 0-based."""
    order = _integers(
        path, "masterordering", _row_vector(path, "masterordering", value), 1, N_IMAGES_10K
    )
    if len(order) % TRIALS_PER_SESSION:
        raise InputError(
            path,
            f"masterordering has {len(order)} trials, not a multiple of "
            f"{TRIALS_PER_SESSION} trials per session",
        )
    counts = np.bincount(order, minlength=N_IMAGES_10K + 1)
    if counts.max() > MAX_REPEATS:
        worst = int(counts.argmax())
        raise InputError(
            path,
            f"masterordering shows 10k image {worst} (1-based) {counts.max()} times, "
            f"at most {MAX_REPEATS} expected",
        )
    return order - 1


def _subjectim(path: Path, value: Any) -> np.ndarray:
    """Validate ``subjectim`` and return it 0-based."""
    arr = np.asarray(value)
    if arr.ndim != 2 or arr.shape[1] != N_IMAGES_10K or not 1 <= arr.shape[0] <= MAX_SUBJECTS:
        raise InputError(
            path, f"subjectim must have shape (<= {MAX_SUBJECTS}, {N_IMAGES_10K}), got {arr.shape}"
        )
    ids = _integers(path, "subjectim", arr, 1, N_IMAGES_73K) - 1
    for row in range(ids.shape[0]):
        if len(np.unique(ids[row])) != N_IMAGES_10K:
            raise InputError(path, f"subjectim row {row + 1} repeats a 73k image id")
    if ids.shape[0] > 1 and not np.all(ids[:, :N_SHARED] == ids[0, :N_SHARED]):
        raise InputError(path, f"subjectim: the first {N_SHARED} columns differ between subjects")
    return ids


def _sharedix(path: Path, value: Any, subjectim: np.ndarray) -> np.ndarray:
    """Validate ``sharedix`` (0-based on return) against the shared columns of subjectim."""
    shared = _integers(path, "sharedix", _row_vector(path, "sharedix", value), 1, N_IMAGES_73K) - 1
    if len(shared) != N_SHARED:
        raise InputError(path, f"sharedix must have {N_SHARED} entries, got {len(shared)}")
    if not np.array_equal(np.sort(shared), np.sort(subjectim[0, :N_SHARED])):
        raise InputError(path, f"sharedix is not the set of the first {N_SHARED} subjectim images")
    return shared


def _stimpattern(path: Path, value: Any, n_sessions: int) -> np.ndarray:
    """Validate ``stimpattern``: 0/1, (sessions, 12, 75), 750 stimulus slots per session."""
    arr = np.asarray(value)
    if arr.ndim != 3 or arr.shape[1:] != (RUNS_PER_SESSION, SLOTS_PER_RUN):
        raise InputError(
            path,
            f"stimpattern must have shape (sessions, {RUNS_PER_SESSION}, {SLOTS_PER_RUN}), "
            f"got {arr.shape}",
        )
    if arr.shape[0] < n_sessions:
        raise InputError(
            path,
            f"stimpattern covers {arr.shape[0]} sessions but masterordering covers {n_sessions}",
        )
    pattern = _integers(path, "stimpattern", arr, 0, 1).astype(bool)
    per_session = pattern[:n_sessions].sum(axis=(1, 2))
    bad = np.flatnonzero(per_session != TRIALS_PER_SESSION)
    if bad.size:
        raise InputError(
            path,
            f"stimpattern session {bad[0] + 1} has {per_session[bad[0]]} stimulus slots, "
            f"expected {TRIALS_PER_SESSION}",
        )
    return pattern


def load_design(path: StrPath) -> Design:
    """Read and validate ``nsd_expdesign.mat``; all 1-based MATLAB indices become 0-based here."""
    path = Path(path)
    mat = _read_mat(path)
    for name in ("masterordering", "subjectim"):
        if name not in mat:
            raise InputError(path, f"variable {name!r} is missing")
    order = _masterordering(path, mat["masterordering"])
    subjectim = _subjectim(path, mat["subjectim"])
    shared = _sharedix(path, mat["sharedix"], subjectim) if "sharedix" in mat else None
    n_sessions = len(order) // TRIALS_PER_SESSION
    pattern = _stimpattern(path, mat["stimpattern"], n_sessions) if "stimpattern" in mat else None
    return Design(order, subjectim, shared, pattern, str(path))


# --------------------------------------------------------------------------- trial table


def subject_number(subject: str, design: Design, design_path: StrPath) -> int:
    """Parse ``"subjNN"`` into 1-based N, checking the design has that subject."""
    match = re.fullmatch(r"subj(\d{2})", str(subject))
    if match is None:
        raise InputError(design_path, f"subject {subject!r} is not of the form 'subj01'")
    number = int(match.group(1))
    if not 1 <= number <= design.subjectim.shape[0]:
        raise InputError(
            design_path,
            f"subject {subject} is not in the design (subjectim has "
            f"{design.subjectim.shape[0]} subjects)",
        )
    return number


def check_sessions(sessions: Iterable[int], design: Design, design_path: StrPath) -> list[int]:
    """Validate 1-based session numbers against the design; return them sorted."""
    sessions = list(sessions)
    if not sessions:
        raise InputError(design_path, "no sessions configured")
    for s in sessions:
        if isinstance(s, bool) or not isinstance(s, int | np.integer):
            raise InputError(design_path, f"session {s!r} is not an integer")
        if not 1 <= s <= design.n_sessions:
            raise InputError(
                design_path,
                f"session {s} is out of range: masterordering covers sessions "
                f"1..{design.n_sessions} ({len(design.masterordering)} trials)",
            )
    if len(set(sessions)) != len(sessions):
        raise InputError(design_path, f"sessions {sessions} list a session twice")
    return sorted(int(s) for s in sessions)


def repeat_numbers(image_ids: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same id (0-based count)."""
    order = np.argsort(image_ids, kind="stable")
    sorted_ids = image_ids[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_ids)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(sorted_ids)]))
    repeats = np.empty(len(image_ids), dtype=np.int64)
    repeats[order] = np.arange(len(sorted_ids)) - group_start
    return repeats


def session_runs(design: Design, session: int) -> np.ndarray:
    """1-based run of each of the session's 750 trials, in trial order."""
    if design.stimpattern is None:
        return np.repeat(np.arange(1, RUNS_PER_SESSION + 1), DOCUMENTED_RUN_LENGTHS)
    slots = np.flatnonzero(design.stimpattern[session - 1].reshape(-1))  # run-major order
    return slots // SLOTS_PER_RUN + 1


def trial_table(
    design: Design, subject: str, sessions: Sequence[int], design_path: StrPath
) -> Table:
    """One row per trial of the configured sessions, in global trial order (see TRIAL_COLUMNS)."""
    subj = subject_number(subject, design, design_path)
    sessions = check_sessions(sessions, design, design_path)
    repeat_all = repeat_numbers(design.masterordering)  # over all trials from session 1
    trial = np.concatenate(
        [np.arange(TRIALS_PER_SESSION) + (s - 1) * TRIALS_PER_SESSION for s in sessions]
    )
    image_10k = design.masterordering[trial]
    shared = image_10k < N_SHARED
    return {
        "trial": trial,
        "session": trial // TRIALS_PER_SESSION + 1,
        "run": np.concatenate([session_runs(design, s) for s in sessions]),
        "trial_in_session": trial % TRIALS_PER_SESSION,
        "image_10k": image_10k,
        "nsd_id": design.subjectim[subj - 1, image_10k],
        "shared1000": shared,
        "repeat": repeat_all[trial],
        "split": np.where(shared, "test", "train"),
    }


# --------------------------------------------------------------------------- COCO ids


def _read_stim_info(path: Path, subj: int) -> dict[int, tuple[int, tuple[int, ...]]]:
    """Map nsdId -> (cocoId, (subjectN_rep0, rep1, rep2)) from ``nsd_stim_info_merged.csv``."""
    if not path.is_file():
        raise InputError(path, "file not found")
    rep_cols = [f"subject{subj}_rep{k}" for k in range(MAX_REPEATS)]
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [
                c for c in ("nsdId", "cocoId", *rep_cols) if c not in (reader.fieldnames or [])
            ]
            if missing:
                raise InputError(path, f"missing column(s) {', '.join(missing)}")
            info: dict[int, tuple[int, tuple[int, ...]]] = {}
            for line, row in enumerate(reader, start=2):
                try:
                    nsd_id = int(row["nsdId"])
                    entry = (int(row["cocoId"]), tuple(int(row[c]) for c in rep_cols))
                except (TypeError, ValueError) as exc:
                    raise InputError(
                        path, f"line {line}: non-integer nsdId/cocoId/rep value"
                    ) from exc
                if nsd_id in info:
                    raise InputError(path, f"line {line}: nsdId {nsd_id} appears twice")
                info[nsd_id] = entry
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"not a readable CSV file ({exc})") from exc
    return info


def add_coco_ids(table: Table, stim_info_csv: StrPath, subject: str) -> Table:
    """Return ``table`` plus a ``coco_id`` column, after checking the csv's trial numbers agree.

    For every row, ``subjectN_rep{repeat}`` must equal ``trial + 1`` (the csv is 1-based).
    """
    path = Path(stim_info_csv)
    match = re.fullmatch(r"subj(\d{2})", str(subject))
    if match is None:
        raise InputError(path, f"subject {subject!r} is not of the form 'subj01'")
    subj = int(match.group(1))
    info = _read_stim_info(path, subj)
    coco = np.empty(len(table["trial"]), dtype=np.int64)
    for i, (nsd_id, rep, trial) in enumerate(
        zip(
            table["nsd_id"].tolist(), table["repeat"].tolist(), table["trial"].tolist(), strict=True
        )
    ):
        if nsd_id not in info:
            raise InputError(path, f"nsdId {nsd_id} (trial {trial}) is not listed")
        coco_id, reps = info[nsd_id]
        csv_trial = reps[rep] if rep < len(reps) else None
        if csv_trial != trial + 1:
            raise InputError(
                path,
                f"disagrees with the design: nsdId {nsd_id} repeat {rep} is 0-based trial "
                f"{trial} (1-based {trial + 1}) in the design but subject{subj}_rep{rep} = "
                f"{csv_trial}",
            )
        coco[i] = coco_id
    return {**table, "coco_id": coco}


# --------------------------------------------------------------------------- image table


def image_table(table: Table) -> Table:
    """One row per nsd_id in ``table`` (sorted by nsd_id), with its trials and sessions."""
    nsd_ids, first = np.unique(table["nsd_id"], return_index=True)
    by_id: dict[int, list[int]] = {int(n): [] for n in nsd_ids}
    for row, nsd_id in enumerate(table["nsd_id"].tolist()):
        by_id[nsd_id].append(row)
    rows = [by_id[int(n)] for n in nsd_ids]
    out: Table = {
        "nsd_id": nsd_ids,
        "image_10k": table["image_10k"][first],
        "shared1000": table["shared1000"][first],
        "split": table["split"][first],
        "n_repeats": np.array([len(r) for r in rows], dtype=np.int64),
        "trials": np.array([";".join(str(table["trial"][i]) for i in r) for r in rows]),
        "sessions": np.array(
            [";".join(str(s) for s in dict.fromkeys(table["session"][r].tolist())) for r in rows]
        ),
    }
    if "coco_id" in table:
        out["coco_id"] = table["coco_id"][first]
    return out


# --------------------------------------------------------------------------- sidecar


def _column_docs(subject: str) -> dict[str, dict[str, Any]]:
    """BIDS-style LongName/Description/Levels for every column trial_table can produce."""
    bool_levels = {"true": "yes", "false": "no"}
    return {
        "trial": {
            "LongName": "Global trial index",
            "Description": "0-based over all sessions: (session - 1) * 750 + trial_in_session.",
        },
        "session": {"LongName": "Session", "Description": "1-based NSD scan session."},
        "run": {
            "LongName": "Run",
            "Description": "1-based run within the session (12 per session).",
        },
        "trial_in_session": {
            "LongName": "Trial within session",
            "Description": "0-based index of the stimulus trial within its session (0..749).",
        },
        "image_10k": {
            "LongName": "Index into the subject's 10k images",
            "Description": "0-based: masterordering[trial] - 1.",
        },
        "nsd_id": {
            "LongName": "NSD 73k image id",
            "Description": f"0-based: subjectim[{subject}, image_10k] - 1 (nsdId of the stim csv).",
        },
        "shared1000": {
            "LongName": "Shared-1000 image",
            "Description": "true if the image is one of the 1000 images shown to every subject "
            "(image_10k < 1000).",
            "Levels": bool_levels,
        },
        "repeat": {
            "LongName": "Repeat number",
            "Description": "0-based count of earlier showings of this image to this subject, "
            "counted over all trials from session 1.",
        },
        "split": {
            "LongName": "Data split",
            "Description": "test for shared1000 images, train otherwise.",
            "Levels": {"train": "not a shared1000 image", "test": "a shared1000 image"},
        },
        "coco_id": {
            "LongName": "COCO image id",
            "Description": "cocoId of nsd_id in nsd_stim_info_merged.csv.",
        },
    }


def sidecar(
    table: Table,
    design_path: StrPath,
    *,
    subject: str,
    sessions: Sequence[int],
    run_source: str,
    stim_info_csv: StrPath | None = None,
) -> dict[str, Any]:
    """BIDS-style JSON description of ``table``'s columns plus its sources and rules."""
    docs = _column_docs(subject)
    out: dict[str, Any] = {name: docs[name] for name in table}
    sources = {"design": str(design_path)}
    if stim_info_csv is not None:
        sources["stim_info"] = str(stim_info_csv)
    if run_source == RUN_SOURCE_STIMPATTERN:
        run_rule = (
            "stimpattern[session] flattened run-major; the session's 750 trials fill its "
            "1-slots in order; run = slot // 75 + 1"
        )
    else:
        run_rule = (
            "stimpattern absent; documented NSD run lengths used: "
            f"{list(DOCUMENTED_RUN_LENGTHS)} stimulus trials for runs 1..12"
        )
    out["Sources"] = sources
    out["Rules"] = {
        "subject": subject,
        "sessions": [int(s) for s in sorted(sessions)],
        "trial": "(session - 1) * 750 + trial_in_session",
        "image_10k": "masterordering[trial] - 1",
        "nsd_id": "subjectim[subject - 1, image_10k] - 1",
        "shared1000": "image_10k < 1000",
        "repeat": "number of earlier global trials (from session 1) with the same image_10k",
        "split": "test if shared1000 else train",
        "run_source": run_source,
        "run": run_rule,
    }
    if "coco_id" in table:
        out["Rules"]["coco_check"] = "subjectN_rep{repeat} == trial + 1 for every row"
    return out


# --------------------------------------------------------------------------- writing


def _cell(value: Any) -> str:
    """TSV text for one value: bools as true/false."""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    return str(value)


def write_tsv(table: Table, path: StrPath) -> None:
    """Write ``table`` as tab-separated text with a header line and no index column."""
    columns = list(table)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        for row in zip(*(table[c].tolist() for c in columns), strict=True):
            writer.writerow([_cell(v) for v in row])


def write_trial_tables(
    design_path: StrPath,
    subject: str,
    sessions: Sequence[int],
    trials_tsv: StrPath,
    trials_json: StrPath,
    images_tsv: StrPath,
    stim_info_csv: StrPath | None = None,
) -> Table:
    """Build and write the trial table, its JSON sidecar and the image table, all or nothing."""
    design = load_design(design_path)
    table = trial_table(design, subject, sessions, design_path)
    if stim_info_csv is not None:
        table = add_coco_ids(table, stim_info_csv, subject)
    images = image_table(table)
    meta = sidecar(
        table,
        design_path,
        subject=subject,
        sessions=sessions,
        run_source=design.run_source,
        stim_info_csv=stim_info_csv,
    )
    with ExitStack() as stack:
        tmp_trials = stack.enter_context(atomic_output(trials_tsv))
        tmp_json = stack.enter_context(atomic_output(trials_json))
        tmp_images = stack.enter_context(atomic_output(images_tsv))
        write_tsv(table, tmp_trials)
        Path(tmp_json).write_text(json.dumps(meta, indent=2) + "\n")
        write_tsv(images, tmp_images)
    return table
