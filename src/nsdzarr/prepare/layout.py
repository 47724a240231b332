"""Paths of the NSD release layout (the inputs); the outputs are in :mod:`nsdzarr.outputs`."""

from __future__ import annotations

import re
from pathlib import Path

from nsdzarr.errors import InputError
from nsdzarr.nsd_facts import TRIALS_PER_SESSION

SESSION_FILE = re.compile(r"^betas_session(\d{2})\.hdf5$")
# Surface spaces (NSD data manual, "Functional data (NSD)"): one file per hemisphere and session,
# nativesurface HDF5 (int16 x 300, trials first) and fsaverage MGH (float32 PSC, (V, 1, 1, T)).
SURFACE_FORMATS = {"nativesurface": "hdf5", "fsaverage": "mgh"}
HEMISPHERES = ("lh", "rh")
SURFACE_SESSION_FILE = re.compile(r"^lh\.betas_session(\d{2})\.(hdf5|mgh)$")


def is_surface(space: str) -> bool:
    """Whether ``space`` is a surface space (betas per hemisphere, ROI labels per vertex)."""
    return space in SURFACE_FORMATS


def betas_dir(root: str | Path, subject: str, space: str, beta_version: str) -> Path:
    """Folder holding a subject's ``betas_sessionNN.hdf5`` files."""
    return Path(root) / "nsddata_betas" / "ppdata" / subject / space / beta_version


def betas_path(root: str | Path, subject: str, space: str, beta_version: str, session: int) -> Path:
    """``{root}/nsddata_betas/ppdata/{subject}/{space}/{beta_version}/betas_sessionNN.hdf5``
    (surface spaces: the left hemisphere's file, which stands for the session)."""
    if is_surface(space):
        return surface_betas_paths(root, subject, space, beta_version, session)[0]
    return betas_dir(root, subject, space, beta_version) / f"betas_session{session:02d}.hdf5"


def surface_betas_paths(
    root: str | Path, subject: str, space: str, beta_version: str, session: int
) -> list[Path]:
    """``.../{space}/{beta_version}/{lh,rh}.betas_sessionNN.{hdf5|mgh}`` of a surface space."""
    folder, ext = betas_dir(root, subject, space, beta_version), SURFACE_FORMATS[space]
    return [folder / f"{hemi}.betas_session{session:02d}.{ext}" for hemi in HEMISPHERES]


def session_sources(
    root: str | Path, subject: str, space: str, beta_version: str, session: int
) -> list[Path]:
    """Every file holding one session's betas: one HDF5, or one file per hemisphere."""
    if is_surface(space):
        return surface_betas_paths(root, subject, space, beta_version, session)
    return [betas_path(root, subject, space, beta_version, session)]


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


def surface_label_paths(root: str | Path, subject: str, space: str, file: str) -> list[Path]:
    """``{root}/nsddata/freesurfer/{subject|fsaverage}/label/{lh,rh}.{file}``."""
    owner = "fsaverage" if space == "fsaverage" else subject
    folder = Path(root) / "nsddata" / "freesurfer" / owner / "label"
    return [folder / f"{hemi}.{file}" for hemi in HEMISPHERES]


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
    pattern = SURFACE_SESSION_FILE if is_surface(space) else SESSION_FILE
    found = sorted(int(m[1]) for p in folder.iterdir() if (m := pattern.match(p.name)))
    if is_surface(space):
        for session in found:
            rh = session_sources(root, subject, space, beta_version, session)[1]
            if not rh.is_file():
                raise InputError(rh, "hemisphere file not found (its lh file is present)")
    if not found:
        what = "lh.betas_sessionNN" if is_surface(space) else "betas_sessionNN.hdf5"
        raise InputError(folder, f"no {what} files in this folder")
    return found
