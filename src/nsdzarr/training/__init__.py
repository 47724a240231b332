"""Reading prepared stores in training: datasets, samplers, numpy readers (no h5py, no Snakemake).

`BetasDataset`, `TrialBatchSampler` and `collate` need torch; `NSDDataModule` also lightning;
`RoiReader` and `ImageReader` need only numpy, so names are imported on first use.
"""

from importlib import import_module
from typing import Any

_HOMES = {
    "BetasDataset": "loader",
    "BetasBatch": "loader",
    "collate": "loader",
    "TrialBatchSampler": "sampler",
    "RoiReader": "readers",
    "ImageReader": "readers",
    "NSDDataModule": "datamodule",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'nsdzarr.training' has no attribute {name!r}")
    return getattr(import_module(f"nsdzarr.training.{_HOMES[name]}"), name)
