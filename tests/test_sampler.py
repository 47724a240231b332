"""TrialBatchSampler and plain PyTorch conventions with real DataLoader workers.

One demo-built ROI store (subj01, 1022 voxels, as in test_loader) and one small synthetic
store of another voxel count (subjXX, 200 voxels) for the per-subject cases.
"""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchdata.stateful_dataloader as sdl
import zarr
from test_loader import build_store, read_tsv
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from nsdzarr.prepare.storage import StorageSettings, create_trial_array, roi_settings
from nsdzarr.training.loader import BetasDataset, TrialBatchSampler, collate
from nsdzarr.training.sampler import TrialBatchSampler as SamplerFromModule

SMALL_VOXELS = 200


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sampler")
    build_store(root, "subj01", [1, 14, 27])
    folder = root / "results" / "subjXX"
    (folder / "roi").mkdir(parents=True)
    group = zarr.open_group(folder / "roi" / "small.zarr", mode="w", zarr_format=3)
    arr = create_trial_array(
        group, "betas", (1500, SMALL_VOXELS), np.int16, roi_settings(StorageSettings()), ("t", "v")
    )
    arr[...] = np.random.default_rng(2).integers(-900, 900, (1500, SMALL_VOXELS), dtype=np.int16)
    group.attrs.update({"sessions": [1, 2], "scale": 300})
    lines = ["trial\tsession\tnsd_id\trepeat\tsplit"]
    lines += [
        f"{t}\t{t // 750 + 1}\t{t}\t0\t{'test' if t % 10 == 0 else 'train'}" for t in range(1500)
    ]
    (folder / "trials.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def stores(root: Path) -> list[Path]:
    return [
        root / "results" / "subj01" / "roi" / "nsdgeneral.zarr",
        root / "results" / "subjXX" / "roi" / "small.zarr",
    ]


@pytest.fixture(scope="module")
def truth(root: Path, stores: list[Path]) -> dict[str, dict[str, np.ndarray]]:
    """Per subject: betas read by zarr-python and the trials table."""
    out = {}
    for subject, store in zip(("subj01", "subjXX"), stores, strict=True):
        tsv = read_tsv(root / "results" / subject / "trials.tsv")
        out[subject] = {
            "betas": zarr.open_array(store / "betas", mode="r")[...],
            "trial": tsv["trial"].astype(int),
            "split": tsv["split"],
        }
    return out


def check_values(batch: dict, truth: dict) -> None:
    """Every row of a single-subject batch equals the store's row of its trial."""
    t = truth[batch["subject"][0]]
    assert set(batch["subject"]) == {batch["subject"][0]}
    rows = np.searchsorted(t["trial"], batch["trial"].numpy())
    np.testing.assert_array_equal(batch["betas"].numpy(), t["betas"][rows])


def trials_of(batches: list[dict]) -> list[list[tuple[str, int]]]:
    return [list(zip(b["subject"], b["trial"].tolist(), strict=True)) for b in batches]


# --------------------------------------------------------------------------- one replica


# spawn: seconds of worker start-ups (test_loader.py::test_dataloader_two_workers keeps one fast)
@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_seeded_epochs_cover_the_split_once_through_workers(stores, truth, context: str):
    ds = BetasDataset(stores[0])  # train split
    sampler = TrialBatchSampler(ds, 32, seed=7)
    assert SamplerFromModule is TrialBatchSampler
    loader = DataLoader(
        ds,
        batch_sampler=sampler,
        num_workers=2,
        multiprocessing_context=context,
        persistent_workers=True,  # the sampler's epoch lives in this process all the same
    )
    orders = []
    for epoch in (0, 0, 1):
        sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(sampler) == len(loader) == -(-len(ds) // 32)
        for b in batches:
            check_values(b, truth)
        orders.append(torch.cat([b["trial"] for b in batches]).numpy())
    t = truth["subj01"]
    train = t["trial"][t["split"] == "train"]
    np.testing.assert_array_equal(np.sort(orders[0]), train)  # every index exactly once
    np.testing.assert_array_equal(orders[0], orders[1])  # same seed + epoch: same order
    assert not np.array_equal(orders[0], orders[2])  # another epoch: another order
    np.testing.assert_array_equal(np.sort(orders[2]), train)
    other = [b for b in TrialBatchSampler(ds, 32, seed=8)]
    assert other != [b for b in TrialBatchSampler(ds, 32, seed=7)]
    in_order = [i for b in TrialBatchSampler(ds, 32, shuffle=False) for i in b]
    assert in_order == list(range(len(ds)))


# --------------------------------------------------------------------------- replicas


def rank_batches(ds, replicas: int, **kw) -> list[list[list[int]]]:
    out = []
    for r in range(replicas):
        s = TrialBatchSampler(ds, 32, num_replicas=replicas, rank=r, **kw)
        s.set_epoch(3)
        batches = list(s)
        assert len(batches) == len(s)
        out.append(batches)
    return out


@pytest.mark.parametrize("by_subject", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_replicas_are_disjoint_with_equal_batch_counts(stores, replicas, drop_last, by_subject):
    ds = BetasDataset(stores, split="all")  # 2250 + 1500 items
    groups = list(ds.indices_by_subject().values()) if by_subject else [np.arange(len(ds))]
    ranks = rank_batches(ds, replicas, drop_last=drop_last, by_subject=by_subject)
    assert len({len(b) for b in ranks}) == 1  # equal batch counts
    flat = [i for batches in ranks for b in batches for i in b]
    counts = np.bincount(flat, minlength=len(ds))
    if drop_last:
        assert counts.max() == 1  # disjoint, no padding
        assert all(len(b) == 32 for batches in ranks for b in batches)
        assert len(ds) - len(flat) < len(groups) * replicas * 32
    else:
        assert counts.min() == 1  # the whole split, once ...
        pad = sum(-len(g) % replicas for g in groups)
        assert counts.sum() - len(ds) == pad and counts.max() <= 2  # ... plus < R per group
        if by_subject:
            ds_index = {s: set(g.tolist()) for s, g in zip("ab", groups, strict=True)}
            for step in zip(*ranks, strict=True):  # all ranks hold one subject at each step
                owners = {next(k for k, v in ds_index.items() if b[0] in v) for b in step}
                assert len(owners) == 1


def distributed_rank(rank: int, store: str, folder: str) -> None:
    """One gloo rank: the sampler's defaults come from the process group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", world_size=2, rank=rank)
    try:
        sampler = TrialBatchSampler(BetasDataset(store), 32, seed=4)
        sampler.set_epoch(1)
        got = {"world": sampler.num_replicas, "rank": sampler.rank, "batches": list(sampler)}
        Path(folder, f"{rank}.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned ranks
def test_replicas_default_to_the_torch_distributed_group(stores, tmp_path: Path):
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=distributed_rank, args=(r, str(stores[0]), str(tmp_path)))
        for r in (0, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = [json.loads(Path(tmp_path, f"{r}.json").read_text()) for r in (0, 1)]
    assert [(g["world"], g["rank"]) for g in got] == [(2, 0), (2, 1)]
    ds = BetasDataset(stores[0])
    for g, r in zip(got, (0, 1), strict=True):
        expected = TrialBatchSampler(ds, 32, seed=4, num_replicas=2, rank=r)
        expected.set_epoch(1)
        assert g["batches"] == list(expected)
    assert TrialBatchSampler(ds, 32).num_replicas == 1  # no process group here


def test_torch_distributed_sampler_with_the_dataset(stores, truth):
    ds = BetasDataset(stores[0], split="all")
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1)
        loader = DataLoader(
            ds, batch_size=32, sampler=sampler, num_workers=2, multiprocessing_context="fork"
        )
        batches = list(loader)
        for b in batches:
            check_values(b, truth)
        seen.append(torch.cat([b["trial"] for b in batches]).numpy())
    assert len(seen[0]) == len(seen[1]) == 1125
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), truth["subj01"]["trial"])


# --------------------------------------------------------------------------- subjects


@pytest.mark.slow  # spawned workers (test_datamodule.py keeps by-subject batches in the fast lane)
def test_by_subject_batches_of_two_voxel_counts(stores, truth):
    ds = BetasDataset(stores, split="all")
    assert ds.voxels_per_store == [1022, SMALL_VOXELS]
    with pytest.raises(ValueError, match="voxels_per_store"):
        _ = ds.n_voxels
    assert BetasDataset(stores[1]).n_voxels == SMALL_VOXELS
    sampler = TrialBatchSampler(ds, 48, by_subject=True, seed=3)
    sampler.set_epoch(1)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2, multiprocessing_context="spawn")
    batches = list(loader)
    assert len(batches) == len(sampler)
    for b in batches:
        check_values(b, truth)  # one subject per batch, its own voxel count
        assert b["betas"].shape[1] == {"subj01": 1022, "subjXX": SMALL_VOXELS}[b["subject"][0]]
    subjects = [b["subject"][0] for b in batches]
    switches = sum(a != b for a, b in itertools.pairwise(subjects))
    assert switches > 10  # interleaved, not one subject after the other
    for s in ("subj01", "subjXX"):
        got = sorted(t for b in batches if b["subject"][0] == s for t in b["trial"].tolist())
        assert got == truth[s]["trial"].tolist()
    again = TrialBatchSampler(ds, 48, by_subject=True, seed=3)
    again.set_epoch(1)
    assert list(again) == list(sampler)  # the interleaving is seeded too


def test_a_batch_mixing_voxel_counts_names_the_fix(stores):
    ds = BetasDataset(stores, split="test")
    with pytest.raises(ValueError, match=r"by_subject=True") as e:
        ds[[0, len(ds) - 1]]
    msg = str(e.value)
    assert "\n" not in msg and "TrialBatchSampler" in msg and "1022" in msg
    loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=2)
    with pytest.raises(ValueError, match=r"TrialBatchSampler\(dataset, batch_size, by_subject"):
        list(loader)


# --------------------------------------------------------------------------- resume


def epoch_batches(loader, n: int | None = None) -> list[list[int]]:
    out = []
    for b in loader:
        out.append(b["trial"].tolist())
        if len(out) == n:
            break
    return out


# one store: slow lane (by_subject=True resumes too, over both stores)
@pytest.mark.parametrize("by_subject", [pytest.param(False, marks=pytest.mark.slow), True])
def test_resume_with_stateful_dataloader(stores, by_subject: bool):
    ds = BetasDataset(stores if by_subject else stores[0], split="test")  # voxels differ

    def make():
        s = TrialBatchSampler(ds, 8, seed=5, by_subject=by_subject, num_replicas=2, rank=1)
        return s, sdl.StatefulDataLoader(
            ds, batch_sampler=s, num_workers=2, multiprocessing_context="fork"
        )

    sampler, loader = make()
    sampler.set_epoch(2)
    full = epoch_batches(loader)
    assert len(full) == len(sampler) > 10
    sampler.set_epoch(2)
    k = 7
    assert epoch_batches(loader, k) == full[:k]
    state = loader.state_dict()  # workers have prefetched more: the state is still k
    resumed_sampler, resumed = make()
    resumed.load_state_dict(state)
    assert epoch_batches(resumed) == full[k:]  # exactly the remaining batches
    assert resumed_sampler.epoch == 2
    resumed_sampler.set_epoch(3)
    assert len(epoch_batches(resumed)) == len(sampler)  # the next epoch is whole


def test_resume_with_plain_dataloader_and_state_checks(stores):
    ds = BetasDataset(stores[0])
    sampler = TrialBatchSampler(ds, 32, seed=11)
    sampler.set_epoch(4)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2, multiprocessing_context="fork")
    full = epoch_batches(loader)
    sampler.set_epoch(4)
    k = 5
    it = iter(loader)
    done = [next(it)["trial"].tolist() for _ in range(k)]
    assert sampler.state_dict()["batches"] > k  # the workers' prefetch ran ahead
    state = {**sampler.state_dict(), "batches": k}  # so save the steps trained
    del it
    fresh = TrialBatchSampler(ds, 32, seed=11)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    fresh.set_epoch(4)  # the same epoch keeps the pending resume
    rest = epoch_batches(
        DataLoader(ds, batch_sampler=fresh, num_workers=2, multiprocessing_context="fork")
    )
    assert done + rest == full and len(rest) == len(full) - k
    assert len(list(fresh)) == len(fresh)  # then whole epochs again
    other = TrialBatchSampler(ds, 32, seed=11)
    other.load_state_dict(state)
    other.set_epoch(5)  # another epoch drops it
    assert len(list(other)) == len(other)
    with pytest.raises(ValueError, match="batch_size"):
        TrialBatchSampler(ds, 16).load_state_dict(state)
    ranks = [TrialBatchSampler(ds, 32, seed=11, num_replicas=2, rank=r) for r in (0, 1)]
    whole = list(ranks[1])
    it = iter(ranks[0])
    for _ in range(k):
        next(it)
    ranks[1].load_state_dict(ranks[0].state_dict())  # rank 0's checkpoint resumes rank 1
    assert list(ranks[1]) == whole[k:]
    with pytest.raises(ValueError, match="num_replicas"):
        TrialBatchSampler(ds, 32, num_replicas=2, rank=0).load_state_dict(state)


# --------------------------------------------------------------------------- conventions


def test_default_collate_takes_the_one_read_batch(stores, truth):
    ds = BetasDataset(stores[0], split="all", normalize="psc")
    items = ds.__getitems__(list(range(40, 80)))
    assert default_collate(items)["betas"] is items.collated["betas"]  # no copy
    mixed = default_collate([items[0], ds.__getitems__([5])[0]])  # items of two batches
    assert torch.equal(mixed["betas"][1], ds[5]["betas"]) and mixed["trial"].tolist() == [40, 5]
    kw = dict(batch_size=32, num_workers=2, multiprocessing_context="fork")
    plain = list(DataLoader(ds, **kw))
    ours = list(DataLoader(ds, collate_fn=collate, **kw))
    assert len(plain) == len(ours) == -(-2250 // 32)
    for a, b in zip(plain, ours, strict=True):
        assert a.keys() == b.keys() and a["subject"] == b["subject"]
        for key in a.keys() - {"subject"}:
            assert torch.equal(a[key], b[key])
    # in the worker's pooled buffers (16 per worker, all kept here), not in torch's fresh
    # shared memory as a stacked copy would be
    assert not any(a["betas"].is_shared() for a in plain[:16])
    expected = truth["subj01"]["betas"].astype(np.float32) / np.float32(300)
    np.testing.assert_array_equal(torch.cat([b["betas"] for b in plain]).numpy(), expected)


def test_pin_memory(stores, truth):
    ds = BetasDataset(stores[0], split="test")
    sampler = TrialBatchSampler(ds, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = DataLoader(
            ds,
            batch_sampler=sampler,
            num_workers=2,
            pin_memory=True,
            multiprocessing_context="fork",
        )
        batches = list(loader)
    assert len(batches) == len(sampler)
    for b in batches:
        check_values(b, truth)
        if torch.accelerator.is_available():
            assert b["betas"].is_pinned() and b["trial"].is_pinned()
    if not torch.accelerator.is_available():  # CPU-only torch skips pinning, with a warning
        assert any("no accelerator" in str(w.message) for w in caught)
