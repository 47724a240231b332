"""Lightning DataModule over ROI stores (optional extra: ``pip install nsdzarr[lightning]``).

:class:`NSDDataModule` gives train/val/test DataLoaders of
:class:`nsdzarr.training.loader.BetasDataset`:

- test: the shared1000 trials (``split="test"``), by default one item per (subject, image)
  with its repeats averaged;
- val: a seeded ``val_fraction`` of the TRAIN images. The split is by image (``nsd_id``), not
  by trial, so the up to three repeats of an image are all in train or all in val: a model
  never validates on an image it was trained on;
- train: the other train trials.

Batches come from :class:`nsdzarr.training.sampler.TrialBatchSampler`: seeded, its epoch set
from the trainer's current epoch as each iteration starts, ranks from torch.distributed (so
under DDP pass ``Trainer(use_distributed_sampler=False)``), one subject per batch when the
stores' voxel counts differ. ``teardown`` closes every file and shuts down the DataLoader workers.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader

from nsdzarr.training.batch_transport import release_exited_pools
from nsdzarr.training.loader import BetasDataset, collate
from nsdzarr.training.sampler import TrialBatchSampler

StoreArg = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Mapping[str, Any]


def split_by_image(nsd_ids: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """(train, val) item indices: a seeded ``fraction`` of the distinct images goes to val."""
    images = np.unique(nsd_ids)
    n_val = round(fraction * len(images))
    val_images = np.random.default_rng(seed).permutation(images)[:n_val]
    is_val = np.isin(nsd_ids, val_images)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


class _EpochLoader(DataLoader):
    """Sets its TrialBatchSampler's epoch from the trainer on each iteration (Lightning calls
    ``set_epoch`` only on a loader's ``sampler`` and ``batch_sampler.sampler``)."""

    def __init__(self, *args: Any, epoch_of: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_of = epoch_of

    def __iter__(self) -> Any:
        epoch = self._epoch_of() if self._epoch_of is not None else None
        if epoch is not None:
            self.batch_sampler.set_epoch(epoch)
        return super().__iter__()


class NSDDataModule(pl.LightningDataModule):
    """Train/val/test DataLoaders over ROI stores; val is split from train by image.

    ``stores`` as for :class:`BetasDataset`; ``dataset_kwargs`` go to every BetasDataset.
    ``by_subject=None``: batches never mix subjects when the stores' voxel counts differ.
    ``multiprocessing_context`` (``"fork"``, ``"spawn"``, ...) goes to every DataLoader.
    """

    def __init__(
        self,
        stores: StoreArg,
        *,
        batch_size: int = 32,
        num_workers: int = 0,
        images: str | os.PathLike[str] | None = None,
        image_size: int | None = None,
        normalize: str = "session_zscore",
        val_fraction: float = 0.1,
        seed: int = 0,
        by_subject: bool | None = None,
        average_test_repeats: bool = True,
        persistent_workers: bool | None = None,
        multiprocessing_context: str | None = None,
        **dataset_kwargs: Any,
    ) -> None:
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.stores, self.batch_size, self.num_workers = stores, batch_size, num_workers
        self.val_fraction, self.seed, self.by_subject = val_fraction, seed, by_subject
        self.average_test_repeats = average_test_repeats
        self.multiprocessing_context = multiprocessing_context if num_workers > 0 else None
        self.persistent_workers = (
            num_workers > 0 if persistent_workers is None else bool(persistent_workers)
        )
        self.dataset_kwargs = {
            "normalize": normalize,
            "images": images,
            "image_size": image_size,
            **dataset_kwargs,
        }
        self.train: BetasDataset | None = None
        self.val: BetasDataset | None = None
        self.test: BetasDataset | None = None
        self._samplers: dict[str, TrialBatchSampler] = {}
        self._loaders: list[DataLoader] = []
        self._pending_state: dict[str, Any] = {}

    # ---- datasets
    def setup(self, stage: str | None = None) -> None:
        """Read the stores' metadata (no file stays open) for ``stage``'s datasets."""
        if stage in (None, "fit", "validate") and self.train is None:
            base = BetasDataset(self.stores, split="train", **self.dataset_kwargs)
            train_idx, val_idx = split_by_image(base.nsd_ids, self.val_fraction, self.seed)
            self.train, self.val = base.subset(train_idx), base.subset(val_idx)
        if stage in (None, "test") and self.test is None:
            self.test = BetasDataset(
                self.stores,
                split="test",
                average_repeats=self.average_test_repeats,
                **self.dataset_kwargs,
            )

    def teardown(self, stage: str | None = None) -> None:
        """Shut down the DataLoaders' workers and close every file and buffer."""
        for loader in self._loaders:
            it = getattr(loader, "_iterator", None)
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
                # the index queues' feeder threads close their pipes on their own time
                for q in getattr(it, "_index_queues", []):
                    thread = getattr(q, "_thread", None)
                    if thread is not None:
                        thread.join(timeout=5)
            loader._iterator = None
        self._loaders = []
        gc.collect()  # batches the dropped iterators held (in cycles) keep the buffers mapped
        release_exited_pools()  # the main process's mappings of the workers' batch buffers
        for ds in (self.train, self.val, self.test):
            if ds is not None:
                ds.close()
        self.train = self.val = self.test = None
        self._samplers = {}

    # ---- loaders
    def _by_subject(self, ds: BetasDataset) -> bool:
        if self.by_subject is not None:
            return self.by_subject
        return len(set(ds.voxels_per_store)) > 1

    def _loader(self, name: str, ds: BetasDataset | None, shuffle: bool) -> DataLoader:
        if ds is None:
            raise RuntimeError(f"call setup() before {name}_dataloader()")
        sampler = TrialBatchSampler(
            ds, self.batch_size, shuffle=shuffle, seed=self.seed, by_subject=self._by_subject(ds)
        )
        if name in self._pending_state:
            sampler.load_state_dict(self._pending_state.pop(name))
        self._samplers[name] = sampler
        loader = _EpochLoader(
            ds,
            epoch_of=self._current_epoch,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            multiprocessing_context=self.multiprocessing_context,
        )
        self._loaders.append(loader)
        return loader

    def _current_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.test, shuffle=False)

    # ---- checkpointing: the train sampler's position (see TrialBatchSampler on prefetching)
    def state_dict(self) -> dict[str, Any]:
        """The train sampler's state, if a train DataLoader was made."""
        if "train" in self._samplers:
            return {"train_sampler": self._samplers["train"].state_dict()}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the train sampler (now, or when the train DataLoader is made)."""
        state = state_dict.get("train_sampler")
        if state is None:
            return
        if "train" in self._samplers:
            self._samplers["train"].load_state_dict(state)
        else:
            self._pending_state["train"] = state
