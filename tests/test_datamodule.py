"""NSDDataModule: train/val/test from real ROI stores, a Lightning fit, files released.

Stores are built as in test_loader (two subjects, the demo's shared images in test); a third
store with another voxel count checks the per-subject batches.
"""

from __future__ import annotations

import contextlib
import gc
import os
from multiprocessing import resource_tracker
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import zarr
from test_loader import build_store, read_tsv

from nsdzarr.prepare.storage import StorageSettings, create_trial_array, roi_settings
from nsdzarr.training.datamodule import NSDDataModule, split_by_image
from nsdzarr.training.loader import BetasDataset


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datamodule")
    for subject in ("subj01", "subj02"):
        build_store(root, subject, [1, 14])
    return root


@pytest.fixture(scope="module")
def stores(root: Path) -> list[Path]:
    return [root / "results" / s / "roi" / "nsdgeneral.zarr" for s in ("subj01", "subj02")]


def small_store(root: Path, n_voxels: int = 50) -> Path:
    """A subject whose store has another voxel count (each image shown twice)."""
    folder = root / "results" / "subjXX"
    (folder / "roi").mkdir(parents=True, exist_ok=True)
    target = folder / "roi" / "small.zarr"
    group = zarr.open_group(target, mode="w", zarr_format=3)
    arr = create_trial_array(
        group, "betas", (750, n_voxels), np.int16, roi_settings(StorageSettings()), ("t", "v")
    )
    arr[...] = np.random.default_rng(3).integers(-900, 900, (750, n_voxels), dtype=np.int16)
    group.create_array("mean", data=np.zeros((1, n_voxels), np.float32))
    group.create_array("std", data=np.full((1, n_voxels), 300, np.float32))
    group.attrs.update({"sessions": [1], "scale": 300})
    lines = ["trial\tsession\tnsd_id\trepeat\tsplit"]
    lines += [f"{t}\t1\t{t // 2}\t{t % 2}\t{'test' if t < 100 else 'train'}" for t in range(750)]
    (folder / "trials.tsv").write_text("\n".join(lines) + "\n")
    return target


def column(batches, key: str) -> list:
    """``key`` of every item of ``batches`` (python ints for tensors of ints)."""
    out = []
    for b in batches:
        v = b[key]
        out += v.tolist() if isinstance(v, torch.Tensor) and not v.is_floating_point() else list(v)
    return out


def images_of(batches) -> set[int]:
    return {int(i) for b in batches for i in b["nsd_id"]}


def test_splits_are_disjoint_by_image_and_cover_train(root: Path, stores: list[Path]):
    dm = NSDDataModule(stores, batch_size=64, val_fraction=0.2, seed=3)
    dm.setup("fit")
    dm.setup("test")
    tsv = {s: read_tsv(root / "results" / s / "trials.tsv") for s in ("subj01", "subj02")}
    train_trials = {(s, int(t)) for s, c in tsv.items() for t in c["trial"][c["split"] == "train"]}
    seen = {}
    for name in ("train", "val"):
        batches = list(getattr(dm, f"{name}_dataloader")())
        seen[name] = list(zip(column(batches, "subject"), column(batches, "trial"), strict=True))
        seen[name + "_ids"] = images_of(batches)
    # every train trial exactly once, in train or in val
    assert sorted(seen["train"] + seen["val"]) == sorted(train_trials)
    assert not seen["train_ids"] & seen["val_ids"]  # no image on both sides
    all_ids = seen["train_ids"] | seen["val_ids"]
    assert len(seen["val_ids"]) == round(0.2 * len(all_ids))
    # test: one item per (subject, shared image), its repeats averaged
    test = list(dm.test_dataloader())
    items = list(zip(column(test, "subject"), column(test, "nsd_id"), strict=True))
    shared = {(s, int(i)) for s, c in tsv.items() for i in c["nsd_id"][c["split"] == "test"]}
    assert sorted(items) == sorted(shared)
    assert not {i for _, i in shared} & all_ids
    assert all(int(n) >= 1 for b in test for n in b["n_repeats"])
    plain = BetasDataset(stores, split="test", normalize="session_zscore", average_repeats=True)
    got = dict(zip(items, column(test, "betas"), strict=True))
    want = [plain[: len(plain)]]
    keys = zip(column(want, "subject"), column(want, "nsd_id"), strict=True)
    for key, x in zip(keys, column(want, "betas"), strict=True):
        torch.testing.assert_close(got[key], x)
    dm.teardown("fit")


def test_val_is_seeded(stores: list[Path]):
    def val_ids(seed: int) -> set[int]:
        dm = NSDDataModule(stores, seed=seed)
        dm.setup("fit")
        ids = set(dm.val.nsd_ids.tolist())
        dm.teardown("fit")
        return ids

    assert val_ids(0) == val_ids(0)
    assert val_ids(0) != val_ids(1)
    with pytest.raises(ValueError, match="val_fraction"):
        NSDDataModule(stores, val_fraction=1.0)
    train, val = split_by_image(np.array([5, 5, 5, 7, 7, 9]), 0.0, 0)
    assert train.tolist() == [0, 1, 2, 3, 4, 5] and val.tolist() == []


def test_by_subject_when_voxel_counts_differ(root: Path, stores: list[Path]):
    mixed = [stores[0], small_store(root)]
    dm = NSDDataModule(mixed, batch_size=32)
    dm.setup("fit")
    batches = list(dm.train_dataloader()) + list(dm.val_dataloader())
    assert {b["betas"].shape[1] for b in batches} == {1022, 50}
    assert all(len(set(b["subject"])) == 1 for b in batches)
    dm.teardown("fit")


class Linear(pl.LightningModule):
    """A linear read-out of the betas, recording which images each stage saw."""

    def __init__(self, n_voxels: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(n_voxels, 1)
        self.seen: dict[str, set[int]] = {"train": set(), "val": set()}
        self.epochs: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen["train"] |= {int(i) for i in batch["nsd_id"]}
        if batch_idx == 0:
            self.epochs.append(self.trainer.train_dataloader.batch_sampler.epoch)
        return self.layer(batch["betas"]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.seen["val"] |= {int(i) for i in batch["nsd_id"]}
        self.log("val_loss", self.layer(batch["betas"]).pow(2).mean(), batch_size=len(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def fds() -> dict[int, str]:
    """This process's open fds and what each is, without the fd that lists them."""
    out = {}
    with os.scandir("/proc/self/fd") as entries:
        for e in entries:
            with contextlib.suppress(OSError):  # the listing's own fd, closed by now
                out[int(e.name)] = os.readlink(e.path)
    return {k: v for k, v in out.items() if not v.startswith("/proc/")}


def opened_since(before: dict[int, str]) -> dict[int, str]:
    """fds open now that were not before (an fd of ``before`` closed meanwhile is no leak)."""
    return {k: v for k, v in fds().items() if before.get(k) != v}


@pytest.mark.parametrize("workers", [0, 2])
def test_lightning_fit_end_to_end(stores: list[Path], workers: int):
    dm = NSDDataModule(stores, batch_size=16, num_workers=workers)
    model = Linear(1022)
    before = fds()
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.state.finished and trainer.global_step == 6
    assert len(model.seen["train"]) > 16 and len(model.seen["val"]) > 16
    assert not model.seen["train"] & model.seen["val"]
    assert model.epochs == [0, 1]  # the sampler followed the trainer's epoch
    assert "val_loss" in trainer.callback_metrics
    assert dm.train is None  # Lightning's teardown released the datasets
    gc.collect()
    assert opened_since(before) == {}


def read_some(dm: NSDDataModule) -> None:
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for k, batch in enumerate(loader):
            assert batch["betas"].shape[1] == 1022
            if k == 2:
                break
    del batch


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_teardown_releases_every_fd_and_setup_works_again(stores: list[Path], context: str):
    dm = NSDDataModule(
        stores,
        batch_size=16,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context=context,
    )
    resource_tracker.ensure_running()  # spawn starts it once per process and keeps its pipe
    gc.collect()
    before = fds()
    for _ in range(2):
        dm.setup("fit")
        read_some(dm)
        mapped = opened_since(before)
        assert any("nsdzarr-batches" in v for v in mapped.values()), mapped  # workers' buffers
        assert sum(v.startswith("pipe:") for v in mapped.values()) >= 4  # the workers' queues
        dm.teardown("fit")
        assert opened_since(before) == {}
        assert dm.train is None and dm.val is None


def test_sampler_state_passes_through(stores: list[Path]):
    dm = NSDDataModule(stores, batch_size=16)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    for _ in range(3):
        next(it)
    state = dm.state_dict()
    rest = [b["trial"].tolist() for b in it]
    again = NSDDataModule(stores, batch_size=16)
    again.load_state_dict(state)
    again.setup("fit")
    assert [b["trial"].tolist() for b in again.train_dataloader()] == rest
    dm.teardown("fit")
    again.teardown("fit")
