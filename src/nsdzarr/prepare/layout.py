"""Paths of the NSD release layout (the inputs); the outputs are in :mod:`nsdzarr.outputs`."""

from __future__ import annotations

import re
from pathlib import Path

from nsdzarr.errors import InputError
from nsdzarr.nsd_facts import TRIALS_PER_SESSION

SESSION_FILE = re.compile(r"^betas_session(\d{2})\.hdf5$")


def betas_dir(root: str | Path, subject: str, space: str, beta_version: str) -> Path:
    """Folder holding a subject's ``betas_sessionNN.hdf5`` files."""
    return Path(root) / "nsddata_betas" / "ppdata" / subject / space / beta_version


def betas_path(root: str | Path, subject: str, space: str, beta_version: str, session: int) -> Path:
    """``{root}/nsddata_betas/ppdata/{subject}/{space}/{beta_version}/betas_sessionNN.hdf5``."""
    return betas_dir(root, subject, space, beta_version) / f"betas_session{session:02d}.hdf5"


def design_path(root: str | Path) -> Path:
    """``{root}/nsddata/experiments/nsd/nsd_expdesign.mat``."""
    return Path(root) / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat"


def root_of_design(design: str | Path) -> Path:
    """The release folder that holds ``design`` at its standard place (inverse of design_path)."""
    return Path(design).parents[3]


def stim_info_path(root: str | Path) -> Path:
    """``{root}/nsddata/experiments/nsd/nsd_stim_info_merged.csv`` (optional input)."""
    return Path(root) / "nsddata" / "experiments" / "nsd" / "nsd_stim_info_merged.csv"


def stimuli_path(root: str | Path) -> Path:
    """``{root}/nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5`` (dataset ``imgBrick``)."""
    return Path(root) / "nsddata_stimuli" / "stimuli" / "nsd" / "nsd_stimuli.hdf5"


def roi_path(root: str | Path, subject: str, space: str, file: str) -> Path:
    """``{root}/nsddata/ppdata/{subject}/{space}/roi/{file}``."""
    return Path(root) / "nsddata" / "ppdata" / subject / space / "roi" / file


def require_session_trials(path: str | Path, n_trials: int) -> None:
    """Raise a one-line error unless ``path`` holds one NSD session's 750 trials."""
    if n_trials != TRIALS_PER_SESSION:
        raise InputError(
            path,
            f"dataset 'betas' has {n_trials} trials, expected {TRIALS_PER_SESSION} "
            "(one NSD session)",
        )


def sessions_present(root: str | Path, subject: str, space: str, beta_version: str) -> list[int]:
    """Session numbers of the ``betas_sessionNN.hdf5`` files present, sorted; error if none."""
    folder = betas_dir(root, subject, space, beta_version)
    if not folder.is_dir():
        raise InputError(folder, "betas folder not found (check nsd_root, space, beta_version)")
    found = sorted(int(m[1]) for p in folder.iterdir() if (m := SESSION_FILE.match(p.name)))
    if not found:
        raise InputError(folder, "no betas_sessionNN.hdf5 files in this folder")
    return found
