"""What the demo release holds: its spec (subjects, sessions, volume, seed) and its file list."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nsdzarr.prepare.layout import betas_path, design_path, roi_path, stim_info_path, stimuli_path

# Atlases the demo release ships (a subset of the real release's roi/ folder).
ROI_FILES = ("nsdgeneral.nii.gz", "prf-visualrois.nii.gz")


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
        files += [
            betas_path(root, subject, spec.space, spec.beta_version, s)
            for s in range(1, spec.sessions + 1)
        ]
        files += [roi_path(root, subject, spec.space, name) for name in ROI_FILES]
    return files
