"""What the demo release holds: its spec (subjects, sessions, volume, seed) and its file list."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nsdzarr.prepare.layout import (
    design_path,
    is_surface,
    roi_path,
    session_sources,
    stim_info_path,
    stimuli_path,
    surface_label_paths,
)

# Atlases the demo release ships (a subset of the real release's roi/ folder).
ROI_FILES = ("nsdgeneral.nii.gz", "prf-visualrois.nii.gz")
# Surface labels the demo release ships, as {hemi}.{name} under freesurfer/.../label/.
SURFACE_ROI_FILES = ("nsdgeneral.mgz", "prf-visualrois.mgz")


@dataclass(frozen=True)
class DemoSpec:
    """What to generate: subjects, sessions per subject, NIfTI (X, Y, Z) volume, seed."""

    subjects: tuple[str, ...] = ("subj01",)
    sessions: int = 3
    shape_xyz: tuple[int, int, int] = (20, 24, 16)
    space: str = "func1pt8mm"
    beta_version: str = "betas_fithrf_GLMdenoise_RR"
    seed: int = 0


def demo_files(root: str | Path, spec: DemoSpec) -> list[Path]:
    """Every file :func:`write_demo` creates under ``root``."""
    files = [design_path(root), stim_info_path(root), stimuli_path(root)]
    for subject in spec.subjects:
        for s in range(1, spec.sessions + 1):
            files += session_sources(root, subject, spec.space, spec.beta_version, s)
        if not is_surface(spec.space):
            files += [roi_path(root, subject, spec.space, name) for name in ROI_FILES]
        elif spec.space != "fsaverage" or subject == spec.subjects[0]:
            for name in SURFACE_ROI_FILES:  # fsaverage labels are shared by every subject
                files += surface_label_paths(root, subject, spec.space, name)
    return files
