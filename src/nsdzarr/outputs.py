"""Where the workflow writes: the paths under ``results/``, in one place for rules and library."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = "results"
SESSION_STORE = "results/{subject}/betas/session{session}.zarr"
SESSION_ESTIMATE = "results/{subject}/estimates/session{session}.json"
TRIALS_TSV = "results/{subject}/trials.tsv"
ROI_STORE = "results/{subject}/roi/{roi}.zarr"
ROI_PART = "results/{subject}/roi/{roi}.parts/session{session}.zarr"
STIMULI_STORE = "results/stimuli/images.zarr"
STIMULI_ESTIMATE = "results/stimuli/estimate.json"
STIMULI_BENCHMARK = "results/benchmarks/stimuli/stimuli.tsv"

# The tail of SESSION_ESTIMATE and STIMULI_BENCHMARK, to recognise them inside longer paths.
SESSION_ESTIMATE_FILE = re.compile(r"(subj\d+)/estimates/session(\d+)\.json$")
STIMULI_BENCHMARK_FILE = re.compile(r"benchmarks/stimuli/stimuli\.tsv$")


def trials_of_roi_store(store: str | Path) -> Path:
    """The trials.tsv beside an ROI store: ``results/{subject}/roi/{roi}.zarr`` -> its subject's."""
    return Path(store).parent.parent / "trials.tsv"


def subject_of_roi_store(store: str | Path) -> str:
    """``results/{subject}/roi/{roi}.zarr`` -> subject; a store elsewhere -> its own name."""
    path = Path(store)
    parent = path.resolve().parent
    return parent.parent.name if parent.name == "roi" else path.stem
