"""Which voxels or vertices an ROI selects from a label atlas: the one rule, for the ROI jobs
and the estimates alike."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def label_selection(values: np.ndarray, labels: Sequence[int] | None) -> np.ndarray:
    """Boolean mask of ``values`` in ``labels``, or of every value >= 1 (a label, not -1
    outside the brain or 0 unlabeled) when ``labels`` is None."""
    values = np.asarray(values)
    return values >= 1 if labels is None else np.isin(values, list(labels))


def present_labels(values: np.ndarray) -> list[int]:
    """The labels (values >= 1) an atlas holds, sorted."""
    return sorted(int(v) for v in np.unique(values) if v >= 1)
