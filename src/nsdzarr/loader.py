"""Old home of the training loader: `from nsdzarr.loader import BetasDataset` still works."""

from nsdzarr.training.loader import BetasBatch, BetasDataset, collate
from nsdzarr.training.sampler import TrialBatchSampler

__all__ = ["BetasBatch", "BetasDataset", "TrialBatchSampler", "collate"]
