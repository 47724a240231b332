"""Facts of the Natural Scenes Dataset release, in one place for both halves of the library."""

from __future__ import annotations

TRIALS_PER_SESSION = 750  # every NSD session: 12 runs of 62 or 63 stimulus trials
RUNS_PER_SESSION = 12
SLOTS_PER_RUN = 75  # stimpattern columns per run (stimulus and blank slots)
# Fallback when stimpattern is absent: odd runs hold 63 stimulus trials, even runs 62 (sum 750).
DOCUMENTED_RUN_LENGTHS = (63, 62) * 6
BETA_SCALE = 300  # int16 betas are percent signal change x 300
BETA_UNITS = "percent signal change x 300 (divide by scale for PSC)"
MAX_REPEATS = 3  # each image is shown at most three times to a subject
N_IMAGES_10K = 10_000  # images per subject (a row of subjectim)
N_SHARED = 1_000  # the first N_SHARED of each subjectim row: shown to every subject (test split)
N_IMAGES_73K = 73_000  # rows of nsd_stimuli.hdf5's imgBrick
MAX_SUBJECTS = 8

SESSIONS = {
    "subj01": 40, "subj02": 40, "subj03": 32, "subj04": 30,
    "subj05": 40, "subj06": 32, "subj07": 40, "subj08": 30,
}  # fmt: skip
# Functional volumes per space and subject, NIfTI (X, Y, Z) order.
VOLUMES_XYZ = {
    "func1pt8mm": {
        "subj01": (81, 104, 83), "subj02": (82, 106, 84), "subj03": (81, 106, 82),
        "subj04": (85, 99, 80), "subj05": (79, 97, 78), "subj06": (85, 113, 83),
        "subj07": (78, 95, 81), "subj08": (80, 103, 78),
    },
    "func1mm": {
        "subj01": (145, 186, 148), "subj02": (146, 190, 150), "subj03": (145, 190, 146),
        "subj04": (152, 177, 143), "subj05": (141, 173, 139), "subj06": (152, 202, 148),
        "subj07": (139, 170, 145), "subj08": (143, 184, 139),
    },
}  # fmt: skip
