"""The training loader: values, normalization, splits, repeats, batching, workers, safety, errors.

Stores are built from the demo release exactly as ``roi.finish_store`` lays them out (same
``create_trial_array`` settings, arrays and attributes), for sessions 1, 14 and 27 so that
images repeat across sessions.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import shutil
import threading
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io
import torch
import zarr
from torch.utils.data import DataLoader
from zarr.codecs import GzipCodec

from nsdzarr.errors import InputError
from nsdzarr.prepare import demo, layout
from nsdzarr.prepare.roi import load_roi_mask, roi_attrs, session_stats
from nsdzarr.prepare.storage import (
    ROI_STORAGE,
    StorageSettings,
    chunk_codecs,
    create_trial_array,
    roi_settings,
    zarr_compressor,
)
from nsdzarr.prepare.trials import write_trial_tables
from nsdzarr.training import loader as loader_module
from nsdzarr.training.loader import NORMALIZE, BetasDataset, collate, parse_layout
from nsdzarr.training.row_reader import ShardRows

SPEC = demo.DemoSpec(subjects=("subj01", "subj02"))
DEFAULT = StorageSettings()
SESSIONS = {"subj01": [1, 14, 27], "subj02": [1, 14]}


def read_tsv(path: Path) -> dict[str, np.ndarray]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    cols = list(zip(*(line.split("\t") for line in lines[1:]), strict=True))
    return {h: np.array(c) for h, c in zip(header, cols, strict=True)}


def build_store(
    root: Path,
    subject: str,
    sessions: list[int],
    settings: StorageSettings = DEFAULT,
    name: str = "nsdgeneral",
) -> Path:
    """Demo HDF5 sessions -> ``results/{subject}/roi/{name}.zarr`` in finish_store's layout."""
    design_file = layout.design_path(root)
    if not design_file.exists():
        design_file.parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(design_file, demo.make_design(SPEC.seed), format="5")
    design = scipy.io.loadmat(design_file)
    mask_file = layout.roi_path(root, subject, SPEC.space, "nsdgeneral.nii.gz")
    mask_file.parent.mkdir(parents=True, exist_ok=True)
    demo.write_nifti_gz(
        mask_file,
        demo.roi_volumes(SPEC.shape_xyz)["nsdgeneral.nii.gz"],
        demo.affine(SPEC.shape_xyz),
    )
    out = root / "results" / subject
    out.mkdir(parents=True, exist_ok=True)
    table = write_trial_tables(
        design_file, subject, sessions, out / "trials.tsv", out / "trials.json", out / "images.tsv"
    )
    mask = load_roi_mask(mask_file, None)
    rows, means, stds = [], [], []
    for i, s in enumerate(sessions):
        h5 = layout.betas_path(root, subject, SPEC.space, SPEC.beta_version, s)
        if not h5.exists():
            h5.parent.mkdir(parents=True, exist_ok=True)
            demo.write_betas_hdf5(h5, demo.session_betas(design, subject, s, SPEC))
        with h5py.File(h5, "r") as f:
            vol = f["betas"][...]
        part = vol[(slice(None), *mask.zyx)]  # == volume.T[mask] per trial
        rows.append(part)
        mean, std = session_stats(part, table["split"][i * 750 : (i + 1) * 750] == "train")
        means.append(mean)
        stds.append(std)
    betas = np.concatenate(rows)
    target = out / "roi" / f"{name}.zarr"
    group = zarr.open_group(target, mode="w", zarr_format=3)
    arr = create_trial_array(
        group, "betas", betas.shape, np.int16, roi_settings(settings), ("trial", "voxel")
    )
    for i in range(len(sessions)):
        arr[i * 750 : (i + 1) * 750] = betas[i * 750 : (i + 1) * 750]
    group.create_array("voxels", data=mask.voxels, dimension_names=("voxel", "ijk"))
    group.create_array("label", data=mask.voxel_labels, dimension_names=("voxel",))
    group.create_array("mean", data=np.stack(means), dimension_names=("session", "voxel"))
    group.create_array("std", data=np.stack(stds), dimension_names=("session", "voxel"))
    group.attrs.update(roi_attrs(mask, sessions, arr.shape, ("train",)))
    return target


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    for subject, sessions in SESSIONS.items():
        build_store(root, subject, sessions)
    return root


@pytest.fixture(scope="module")
def store(root: Path) -> Path:
    return root / "results" / "subj01" / "roi" / "nsdgeneral.zarr"


@pytest.fixture(scope="module")
def truth(root: Path, store: Path) -> dict:
    """The store read by zarr-python, its trials table and its statistics."""
    group = zarr.open_group(store, mode="r")
    tsv = read_tsv(root / "results" / "subj01" / "trials.tsv")
    return {
        "betas": group["betas"][...],
        "mean": group["mean"][...],
        "std": group["std"][...],
        "split": tsv["split"],
        "shared": tsv["shared1000"] == "true",
        "nsd_id": tsv["nsd_id"].astype(int),
        "trial": tsv["trial"].astype(int),
        "session": tsv["session"].astype(int),
        "repeat": tsv["repeat"].astype(int),
    }


def reference(truth: dict, normalize: str) -> np.ndarray:
    x = truth["betas"].astype(np.float32)
    if normalize == "psc":
        return x / np.float32(300)
    if normalize == "session_zscore":
        s = np.repeat(np.arange(len(truth["mean"])), 750)
        std = np.where(truth["std"] == 0, np.float32(1), truth["std"])
        return (x - truth["mean"][s]) / std[s]
    return x


def rows_of(truth: dict, trials: torch.Tensor) -> np.ndarray:
    """Store rows of global trial numbers."""
    return np.searchsorted(truth["trial"], trials.numpy())


def n_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_files(folder: Path, pid: int | str = "self") -> tuple[int, int]:
    """(fds of ``pid`` on files under ``folder``, its other fds)."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    mine = sum(link.startswith(str(folder.resolve())) for link in links)
    return mine, len(links) - mine


# --------------------------------------------------------------------------- values


def test_items_equal_store_hdf5_and_trials_table(root: Path, store: Path, truth: dict):
    ds = BetasDataset(store, split="all")
    assert len(ds) == 2250 and ds.n_voxels == 1022 and ds.stores[0].layout is not None
    atlas = np.asarray(
        nib.load(layout.roi_path(root, "subj01", SPEC.space, "nsdgeneral.nii.gz")).dataobj
    )
    with h5py.File(layout.betas_path(root, "subj01", SPEC.space, SPEC.beta_version, 14)) as f:
        for i in (750, 1000, 1499):
            item = ds[i]
            assert item["betas"].dtype == torch.float32
            np.testing.assert_array_equal(item["betas"].numpy(), truth["betas"][i])
            volume = f["betas"][i - 750]  # h5py (Z, Y, X); store rows are volume.T[mask]
            np.testing.assert_array_equal(item["betas"].numpy(), volume.T[atlas >= 1])
            assert item["subject"] == "subj01" and item["session"] == 14
            for key in ("nsd_id", "trial", "repeat"):
                assert item[key] == truth[key][i]
    whole = ds[:]
    np.testing.assert_array_equal(whole["betas"].numpy(), truth["betas"])
    np.testing.assert_array_equal(whole["trial"].numpy(), truth["trial"])


@pytest.mark.parametrize("normalize", ["none", "psc", "session_zscore"])
def test_normalize_modes_match_numpy(store: Path, truth: dict, normalize: str):
    ds = BetasDataset(store, split="all", normalize=normalize)
    np.testing.assert_allclose(ds[:]["betas"].numpy(), reference(truth, normalize), rtol=1e-6)


def test_splits_and_counts(store: Path, truth: dict):
    train, test = BetasDataset(store), BetasDataset(store, split="test")
    assert len(test) == truth["shared"].sum() > 0
    assert len(train) + len(test) == 2250
    np.testing.assert_array_equal(
        np.sort(test[:]["trial"].numpy()), truth["trial"][truth["shared"]]
    )
    np.testing.assert_array_equal(test[:]["betas"].numpy(), truth["betas"][truth["shared"]])
    with pytest.raises(ValueError, match="split"):
        BetasDataset(store, split="val")


@pytest.mark.parametrize("split", ["train", "test"])
def test_average_repeats_equal_numpy_mean(store: Path, truth: dict, split: str):
    ds = BetasDataset(store, split=split, normalize="session_zscore", average_repeats=True)
    norm = reference(truth, "session_zscore")
    use = truth["split"] == split
    ids = np.unique(truth["nsd_id"][use])
    assert len(ds) == len(ids)
    batch = ds[:]
    assert sorted(batch["nsd_id"].tolist()) == ids.tolist()
    assert batch["n_repeats"].max() >= 2  # sessions 1/14/27 share images
    for j in range(len(ds)):
        rows = np.flatnonzero(use & (truth["nsd_id"] == int(batch["nsd_id"][j])))
        np.testing.assert_allclose(batch["betas"][j].numpy(), norm[rows].mean(axis=0), atol=1e-5)
        k = int(batch["n_repeats"][j])
        assert k == len(rows)
        assert batch["trial"][j, :k].tolist() == truth["trial"][rows].tolist()
        assert (batch["trial"][j, k:] == -1).all()
        assert batch["session"][j, :k].tolist() == truth["session"][rows].tolist()
    in_memory = BetasDataset(
        store, split=split, normalize="session_zscore", average_repeats=True, in_memory=True
    )
    assert torch.equal(in_memory[:]["betas"], batch["betas"])


@pytest.mark.parametrize("average", [False, True])
def test_subset_is_those_items_of_the_parent(store: Path, average: bool):
    full = BetasDataset(store, normalize="psc", average_repeats=average)
    pick = np.random.default_rng(0).permutation(len(full))[:40]
    sub = full.subset(pick)
    assert len(sub) == 40 and sub.nsd_ids.tolist() == full.nsd_ids[pick].tolist()
    want, got = full[pick.tolist()], sub[:]
    for key in ("betas", "nsd_id", "trial", "session", "repeat"):
        assert torch.equal(got[key], want[key]), key
    assert torch.equal(sub[3]["betas"], full[int(pick[3])]["betas"])
    assert len(full) > 40  # the parent is untouched
    loader = DataLoader(sub, batch_size=16, num_workers=2, collate_fn=collate)
    assert torch.equal(torch.cat([b["betas"] for b in loader]), want["betas"])
    with pytest.raises(IndexError, match="subset"):
        full.subset([len(full)])


def test_getitems_batch_equals_items_and_both_collates_agree(store: Path):
    ds = BetasDataset(store, normalize="psc")
    idx = np.random.default_rng(0).choice(len(ds), 40, replace=True).tolist()
    batch = ds.__getitems__(idx)
    assert len(batch) == 40
    fast = collate(batch)
    slow = torch.utils.data.default_collate(batch)
    assert fast.keys() == slow.keys()
    for key in fast:
        if key == "subject":
            assert fast[key] == slow[key]
        else:
            assert torch.equal(fast[key], slow[key])
    for j, i in enumerate(idx):
        item = ds[i]
        assert torch.equal(fast["betas"][j], item["betas"]) and fast["trial"][j] == item["trial"]


@pytest.mark.parametrize("in_memory", [False, True])
def test_batches_in_one_process_reuse_only_dropped_memory(
    store: Path, truth: dict, in_memory: bool
):
    """Without workers a batch's betas come from reused frames (``LocalFrames``): memory
    is reused once no tensor or view of a batch is left, never while one is."""
    ds = BetasDataset(raw_copy(store, truth), split="all", in_memory=in_memory)
    rng = np.random.default_rng(4)
    idx = [rng.integers(0, len(ds), 32) for _ in range(6)]
    first = collate(ds.__getitems__(idx[0]))
    ptr = first["betas"].data_ptr()
    del first
    again = collate(ds.__getitems__(idx[1]))["betas"]  # the dropped batch's memory
    assert again.data_ptr() == ptr
    kept_view = again[3:5]  # a view keeps it, and its values
    numpy_view = again.numpy()[:2]
    del again
    later = [collate(ds.__getitems__(i))["betas"] for i in idx[2:]]  # all alive at once
    assert ptr not in {b.data_ptr() for b in later}
    np.testing.assert_array_equal(kept_view.numpy(), truth["betas"][idx[1][3:5]])
    np.testing.assert_array_equal(numpy_view, truth["betas"][idx[1][:2]])
    for b, i in zip(later, idx[2:], strict=True):
        np.testing.assert_array_equal(b.numpy(), truth["betas"][i])
    freed = {ptr, *(b.data_ptr() for b in later)}
    del kept_view, numpy_view, later
    assert collate(ds.__getitems__(idx[0]))["betas"].data_ptr() in freed


@pytest.mark.parametrize("in_memory", [False, True])
def test_kept_metadata_keeps_its_batch_memory(store: Path, truth: dict, in_memory: bool):
    """A batch's betas and metadata share one reused frame: a metadata tensor (or a view of
    it) kept alone keeps its values and its frame while later batches are read."""
    ds = BetasDataset(raw_copy(store, truth), split="all", in_memory=in_memory, dtype="int16")
    rng = np.random.default_rng(5)
    idx = [rng.integers(0, len(ds), 32) for _ in range(8)]
    first = collate(ds.__getitems__(idx[0]))
    ptr, trial, session = first["betas"].data_ptr(), first["trial"], first["session"][4:9]
    del first
    later = []
    for i in idx[1:]:
        batch = collate(ds.__getitems__(i))
        assert batch["betas"].data_ptr() != ptr  # the kept metadata holds the whole frame
        np.testing.assert_array_equal(batch["trial"].numpy(), truth["trial"][i])
        later.append(batch["nsd_id"])
    np.testing.assert_array_equal(trial.numpy(), truth["trial"][idx[0]])
    np.testing.assert_array_equal(session.numpy(), truth["session"][idx[0][4:9]])
    for ids, i in zip(later, idx[1:], strict=True):
        np.testing.assert_array_equal(ids.numpy(), truth["nsd_id"][i])
    del trial, session, later
    assert collate(ds.__getitems__(idx[0]))["betas"].data_ptr() == ptr  # then reused


# --------------------------------------------------------------------------- workers


def record_pid(folder: str, worker_id: int) -> None:
    Path(folder, f"{worker_id}.{os.getpid()}").touch()


def epoch(loader: DataLoader) -> dict:
    batches = list(loader)
    return {k: torch.cat([b[k] for b in batches]) for k in ("betas", "trial")}


def raw_copy(store: Path, truth: dict) -> Path:
    """The test store with the ROI default codec (raw rows: read through mapped files)."""
    raw = store.parent / "raw.zarr"
    if not raw.exists():
        rewrite_betas(store, raw, truth["betas"], compressors=chunk_codecs(roi_settings(), 2))
    return raw


# spawn: seconds of worker start-ups (test_dataloader_two_workers keeps one fast)
@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_raw_store_through_workers_after_the_parent_mapped_it(
    store: Path, truth: dict, context: str
):
    raw = raw_copy(store, truth)
    ds = BetasDataset(raw, split="all", normalize="psc")
    ds[[0, 900]]  # the parent maps two shard files; forked workers drop their copies
    assert mapped_files(raw) == 2
    fast = epoch(ds.dataloader(batch_size=32, num_workers=2, multiprocessing_context=context))
    np.testing.assert_array_equal(fast["betas"].numpy(), reference(truth, "psc"))
    np.testing.assert_array_equal(fast["trial"].numpy(), truth["trial"])
    ds.close()
    assert mapped_files(raw) == 0


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_two_workers(store: Path, truth: dict, context: str):
    ds = BetasDataset(store, split="all", normalize="psc")
    fast = epoch(ds.dataloader(batch_size=32, num_workers=2, multiprocessing_context=context))
    np.testing.assert_array_equal(fast["betas"].numpy(), reference(truth, "psc"))
    np.testing.assert_array_equal(fast["trial"].numpy(), truth["trial"])
    if context == "fork":  # the default collate gets the same batches
        slow = epoch(DataLoader(ds, batch_size=32, num_workers=2, multiprocessing_context=context))
        assert torch.equal(slow["betas"], fast["betas"])
    assert open_files(store)[0] == 0  # the parent never opened a shard file


def worker_fds(folder: Path, store: Path) -> dict[int, tuple[int, int]]:
    """Per worker pid (recorded by ``record_pid`` in ``folder``): ``open_files`` of it."""
    pids = [int(p.name.split(".")[1]) for p in folder.iterdir()]
    return {pid: open_files(store, pid) for pid in pids}


def no_fresh_shared_memory(shape):
    raise AssertionError("a worker ran out of reusable batch buffers")


def test_persistent_workers_keep_fds_and_memory_flat(
    store: Path, truth: dict, tmp_path: Path, monkeypatch
):
    import psutil

    # forked workers inherit this: streaming batches must always find a freed buffer slot
    monkeypatch.setattr(loader_module, "shared_empty", no_fresh_shared_memory)
    ds = BetasDataset(store, split="all", max_open_files=16)  # 45 shards: the LRU works
    loader = ds.dataloader(
        batch_size=32,
        shuffle=True,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context="fork",
        worker_init_fn=functools.partial(record_pid, str(tmp_path)),
    )
    fds, rss, main_rss = [], [], []
    for _ in range(3):
        n = 0
        for batch in loader:  # batches arrive in reused worker buffers: check each one
            assert type(batch["betas"]) is torch.Tensor and type(batch["trial"]) is torch.Tensor
            np.testing.assert_array_equal(
                batch["betas"].numpy(), truth["betas"][rows_of(truth, batch["trial"])]
            )
            n += len(batch["trial"])
        assert n == 2250
        fds.append(worker_fds(tmp_path, store))
        rss.append({pid: psutil.Process(pid).memory_info().rss for pid in fds[-1]})
        main_rss.append(psutil.Process().memory_info().rss)
    assert len(fds[0]) == 2  # the same two workers served all three epochs
    assert fds[0] == fds[1] == fds[2]
    assert all(mine == 16 for mine, _ in fds[0].values())
    for pid in fds[0]:
        assert rss[2][pid] - rss[1][pid] < 8 * 2**20
    assert main_rss[2] - main_rss[1] < 8 * 2**20
    assert open_files(store)[0] == 0


def test_worker_buffers_survive_kept_batches(store: Path, truth: dict):
    """Batches kept alive (more than a worker's buffer slots) stay intact."""
    ds = BetasDataset(store, split="all", normalize="psc")
    ref = reference(truth, "psc")
    loader = ds.dataloader(batch_size=16, num_workers=2, multiprocessing_context="fork")
    kept = list(loader)  # 141 batches alive at once: slots run out, torch's path takes over
    assert len(kept) > 2 * 16
    for batch in kept:
        np.testing.assert_array_equal(batch["betas"].numpy(), ref[rows_of(truth, batch["trial"])])
    betas = [b["betas"][:2] for b in kept[:20]]  # views keep their slot too
    trials = [b["trial"][-2:] for b in kept[20:40]]  # so do views of the metadata alone
    del kept
    for _ in loader:  # workers reuse freed slots meanwhile
        pass
    for v, start in zip(betas, range(0, 320, 16), strict=True):
        np.testing.assert_array_equal(v.numpy(), ref[start : start + 2])
    for v, start in zip(trials, range(320 + 14, 640, 16), strict=True):
        np.testing.assert_array_equal(v.numpy(), truth["trial"][start : start + 2])


def test_kept_metadata_keeps_its_worker_slot(store: Path, truth: dict):
    """With persistent workers, a batch's metadata kept alone (its betas dropped) keeps its
    slot: the same workers' later batches never write over it."""
    ds = BetasDataset(store, split="all")
    loader = ds.dataloader(
        batch_size=16, num_workers=2, persistent_workers=True, multiprocessing_context="fork"
    )
    kept = []
    for e in range(2):
        for k, batch in enumerate(loader):
            if e == 0 and k % 10 == 0:  # every other tensor of the batch is dropped
                kept.append((batch["session"][3:], batch["trial"], batch["trial"].numpy().copy()))
    for session, trial, ref in kept:
        np.testing.assert_array_equal(trial.numpy(), ref)
        np.testing.assert_array_equal(session.numpy(), truth["session"][rows_of(truth, trial)][3:])


_MADE = [0]  # batches made by this process (one worker: in the order they arrive)


def changing_collate(batch):
    """Our collate, then every third batch's betas replaced by a new tensor (outside the
    worker's slot) and every third one transposed (a strided view inside it)."""
    out = collate(batch)
    turn, _MADE[0] = _MADE[0] % 3, _MADE[0] + 1
    if turn == 1:
        out["betas"] = out["betas"] * 2
    elif turn == 2:
        out["betas"] = out["betas"].t()
    return out


def test_batches_changed_by_a_collate_travel_as_changed(store: Path, truth: dict):
    """Batch after batch of one worker, what a collate_fn makes of the batch arrives as it was
    made: a replaced tensor, a transposed view, the plain batch (each layout travels its own
    way, however often the others came before)."""
    ds = BetasDataset(store, split="all", normalize="psc")
    ref = reference(truth, "psc")
    loader = ds.dataloader(
        batch_size=16, num_workers=1, collate_fn=changing_collate, multiprocessing_context="fork"
    )
    _MADE[0] = 0  # the forked worker starts from here
    n = 0
    for n, batch in enumerate(loader, 1):
        want = ref[rows_of(truth, batch["trial"])]
        turn = (n - 1) % 3
        want = want * 2 if turn == 1 else want.T if turn == 2 else want
        assert batch["betas"].shape == want.shape
        np.testing.assert_array_equal(batch["betas"].numpy(), want)
    assert n > 6


def test_fork_after_the_parent_read(store: Path, truth: dict):
    ds = BetasDataset(store, split="all")
    ds[5]  # the parent now holds open shard files; forked workers must not share them
    got = epoch(ds.dataloader(batch_size=50, num_workers=2, multiprocessing_context="fork"))
    np.testing.assert_array_equal(got["betas"].numpy(), truth["betas"])
    ds.close()


# --------------------------------------------------------------------------- safety


def test_construction_opens_nothing_and_pickles(store: Path, truth: dict):
    before, threads = n_fds(), threading.active_count()
    datasets = [
        BetasDataset(store, normalize=n, average_repeats=a)
        for n in ("none", "session_zscore")
        for a in (False, True)
    ]
    assert n_fds() == before and threading.active_count() == threads
    ds = datasets[0]
    ds[0]  # opens one shard in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._rt is None
    assert torch.equal(clone[0]["betas"], ds[0]["betas"])
    clone.close()
    ds.close()
    assert n_fds() == before


def test_open_files_are_bounded(store: Path, truth: dict):
    ds = BetasDataset(store, split="all", max_open_files=4)
    before = n_fds()
    for start in range(0, 2250, 100):
        ds[list(range(start, min(start + 100, 2250), 7))]
        assert n_fds() - before <= 4
    np.testing.assert_array_equal(ds[:]["betas"].numpy(), truth["betas"])
    ds.close()
    assert n_fds() == before


def test_several_subjects(root: Path):
    stores = [root / "results" / s / "roi" / "nsdgeneral.zarr" for s in SESSIONS]
    both = BetasDataset(stores, split="test")
    one = BetasDataset(stores, split="test", subjects=["subj02"])
    assert both.subjects == ["subj01", "subj02"] and one.subjects == ["subj02"]
    counts = {k: len(v) for k, v in both.indices_by_subject().items()}
    assert counts["subj02"] == len(one) and sum(counts.values()) == len(both)
    batch = both[[0, len(both) - 1]]
    assert batch["subject"] == ["subj01", "subj02"]
    assert torch.equal(batch["betas"][1], one[len(one) - 1]["betas"])
    in_memory = BetasDataset(stores, split="test", normalize="session_zscore", in_memory=True)
    on_disk = BetasDataset(stores, split="test", normalize="session_zscore")
    idx = np.random.default_rng(0).permutation(len(on_disk))[:64]
    assert torch.equal(in_memory[idx]["betas"], on_disk[idx]["betas"])
    named = BetasDataset({"a": stores[0]}, split="test")
    assert named[0]["subject"] == "a"
    with pytest.raises(ValueError, match="subj09"):
        BetasDataset(stores, subjects=["subj09"])


# --------------------------------------------------------------------------- in memory


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> Path:
    """3000 x 12000 int16 (72 MB): large enough to see a per-worker copy in smaps."""
    folder = tmp_path_factory.mktemp("big") / "results" / "subjXX"
    (folder / "roi").mkdir(parents=True)
    rng = np.random.default_rng(1)
    group = zarr.open_group(folder / "roi" / "big.zarr", mode="w", zarr_format=3)
    arr = create_trial_array(
        group, "betas", (3000, 12000), np.int16, roi_settings(StorageSettings()), ("t", "v")
    )
    for s in range(4):
        arr[s * 750 : (s + 1) * 750] = (rng.standard_normal((750, 12000)) * 300).astype(np.int16)
    group.attrs.update({"sessions": [1, 2, 3, 4], "scale": 300})
    lines = ["trial\tsession\tnsd_id\trepeat\tsplit"]
    lines += [f"{t}\t{t // 750 + 1}\t{t}\t0\ttrain" for t in range(3000)]
    (folder / "trials.tsv").write_text("\n".join(lines) + "\n")
    return folder / "roi" / "big.zarr"


def record_in_memory_range(folder: str, worker_id: int) -> None:
    """worker_init_fn: where this worker sees the in-memory array (address, bytes)."""
    mem = torch.utils.data.get_worker_info().dataset._mem[0]
    Path(folder, f"{worker_id}.{os.getpid()}").write_text(
        f"{mem.data_ptr()} {mem.numel() * mem.element_size()}"
    )


def page_sharing(pid: int, addr: int, nbytes: int) -> tuple[int, int, int]:
    """(pages, resident pages, pages mapped by ``pid`` alone) of a memory range, from pagemap."""
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = addr // page, (addr + nbytes - 1) // page
    with open(f"/proc/{pid}/pagemap", "rb") as fh:
        fh.seek(first * 8)
        entries = np.frombuffer(fh.read((last - first + 1) * 8), dtype="<u8")
    present = (entries >> np.uint64(63)) & np.uint64(1)
    exclusive = (entries >> np.uint64(56)) & np.uint64(1)  # PM_MMAP_EXCLUSIVE
    return len(entries), int(present.sum()), int((present & exclusive).sum())


# spawn: seconds of worker start-ups (test_loader.py::test_dataloader_two_workers keeps one fast)
@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_in_memory_is_one_shared_copy(big_store: Path, tmp_path: Path, context: str):
    ds = BetasDataset(big_store, in_memory=True, normalize="psc")
    assert open_files(big_store)[0] == 0  # decoded at construction, every file closed
    nbytes = 3000 * 12000 * 2
    loader = ds.dataloader(
        batch_size=100,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context=context,
        worker_init_fn=functools.partial(record_in_memory_range, str(tmp_path)),
    )
    got = epoch(loader)
    ref = zarr.open_array(big_store / "betas", mode="r")[...]
    np.testing.assert_array_equal(got["betas"].numpy(), ref.astype(np.float32) / 300)
    workers = list(tmp_path.iterdir())
    assert len(workers) == 2
    for p in workers:
        addr, size = map(int, p.read_text().split())
        assert size == nbytes
        pages, resident, alone = page_sharing(int(p.name.split(".")[1]), addr, size)
        assert resident > 0.4 * pages  # the worker read its half of the rows ...
        assert alone < 0.05 * pages  # ... from pages it shares with the parent: no copy
    del loader


# --------------------------------------------------------------------------- layouts, errors


def rewrite_betas(store: Path, target: Path, betas: np.ndarray, **codec) -> Path:
    """A copy of ``store`` whose betas array is written again with other codecs."""
    shutil.copytree(store, target, ignore=shutil.ignore_patterns("betas"))
    group = zarr.open_group(target, mode="a")
    arr = group.create_array(
        "betas", shape=betas.shape, dtype=np.int16, chunks=(1, betas.shape[1]),
        shards=(50, betas.shape[1]), **codec,
    )  # fmt: skip
    arr[...] = betas
    return target


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_raw_store_default_disk_and_memory(store: Path, truth: dict, normalize: str):
    """The ROI default (raw rows, codec none): read into the batch, from disk and memory."""
    assert ROI_STORAGE.codec == "none"
    raw = store.parent / "raw.zarr"
    if not raw.exists():
        rewrite_betas(
            store, raw, truth["betas"], compressors=chunk_codecs(roi_settings(), 2)
        )  # fmt: skip
    ref = reference(truth, normalize)
    idx = np.random.default_rng(3).integers(0, len(ref), 200)
    idx[:3] = idx[3]  # a row asked more than once
    for in_memory in (False, True):
        ds = BetasDataset(raw, split="all", normalize=normalize, in_memory=in_memory)
        assert ds.stores[0].layout.codec is None
        np.testing.assert_array_equal(ds[idx.tolist()]["betas"].numpy(), ref[idx])
        np.testing.assert_array_equal(ds[int(idx[5])]["betas"].numpy(), ref[idx[5]])


@pytest.mark.slow  # zarr-python per row (blosc: also test_fallbacks; gzip: test_readers)
def test_blosc_store_and_zarr_fallback(store: Path, truth: dict):
    roi = store.parent
    lz4 = rewrite_betas(
        store, roi / "lz4.zarr", truth["betas"], compressors=zarr_compressor(
            StorageSettings("blosc-lz4", 5), 2
        )
    )  # fmt: skip
    ds = BetasDataset(lz4, split="all")
    assert ds.stores[0].layout.codec == "blosc"
    np.testing.assert_array_equal(ds[:]["betas"].numpy(), truth["betas"])
    # an unsupported codec (gzip) reads through zarr-python
    gz = rewrite_betas(store, roi / "gzip.zarr", truth["betas"], compressors=GzipCodec(level=1))
    assert parse_layout(gz / "betas")[1] is None
    ds = BetasDataset(gz, split="all", normalize="psc")
    some = np.arange(0, 2250, 9)  # zarr-python costs ~1 ms per row
    np.testing.assert_array_equal(ds[some]["betas"].numpy(), reference(truth, "psc")[some])
    subset = torch.utils.data.Subset(ds, some.tolist())
    got = epoch(
        DataLoader(
            subset, batch_size=32, num_workers=2, multiprocessing_context="fork", collate_fn=collate
        )
    )
    np.testing.assert_array_equal(got["betas"].numpy(), reference(truth, "psc")[some])


def one_line_error(excinfo, path: Path) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_and_corrupt_stores_give_one_line_errors(store: Path, tmp_path: Path):
    with pytest.raises(InputError) as e:
        BetasDataset(tmp_path / "nope.zarr")
    assert "not found" in one_line_error(e, tmp_path / "nope.zarr")

    bad = tmp_path / "results" / "subj01" / "roi" / "bad.zarr"
    shutil.copytree(store, bad)
    (bad / "betas" / "zarr.json").write_text("{not json")
    with pytest.raises(InputError) as e:
        BetasDataset(bad)
    one_line_error(e, bad / "betas" / "zarr.json")

    shutil.rmtree(bad)
    shutil.copytree(store, bad)
    with pytest.raises(InputError) as e:  # no trials.tsv beside it
        BetasDataset(bad)
    one_line_error(e, tmp_path / "results" / "subj01" / "trials.tsv")
    tsv = store.parent.parent / "trials.tsv"
    short = tmp_path / "short.tsv"
    short.write_text("".join(tsv.read_text().splitlines(keepends=True)[:100]))
    with pytest.raises(InputError) as e:
        BetasDataset(bad, trials=short)
    assert "rows" in one_line_error(e, short)

    shard = bad / "betas" / "c" / "7" / "0"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated: index damaged
    ds = BetasDataset(bad, split="all", trials=tsv)
    ds[0]
    with pytest.raises(InputError) as e:
        ds[7 * 50 + 3]
    assert "corrupt" in one_line_error(e, shard)
    with pytest.raises(RuntimeError, match="corrupt"):  # re-raised from a worker
        epoch(ds.dataloader(batch_size=50, num_workers=1, multiprocessing_context="fork"))
    shard.unlink()
    with pytest.raises(InputError) as e:
        BetasDataset(bad, trials=tsv)
    assert "missing" in one_line_error(e, shard)


def mapped_files(folder: Path) -> int:
    """Mappings of files under ``folder`` in this process (each a shard file)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return len({line.split()[-1] for line in lines if str(folder.resolve()) in line})


def test_raw_rows_read_from_bounded_mappings(store: Path, truth: dict, tmp_path: Path):
    """Raw stores (the default) are read through mapped shard files: batches equal the store,
    at most ``max_open_files`` files are mapped or open, close() unmaps them all, and a chunk
    of the wrong size falls back to the checked read (a one-line error naming the file)."""
    assert ROI_STORAGE.codec == "none" and ShardRows.row_views  # the default takes this path
    store = raw_copy(store, truth)
    ref = reference(truth, "psc")
    ds = BetasDataset(store, split="all", normalize="psc", max_open_files=3)
    idx = np.random.default_rng(5).permutation(len(ref))[:160]
    for part in np.array_split(idx, 8):
        got = ds.__getitems__(part.tolist()).collated["betas"].numpy()
        np.testing.assert_array_equal(got, ref[part])
        reader = ds._rt.readers[0]
        assert len(reader.maps) > 0  # read through mappings, not preadv
        assert len(reader.maps) + len(reader.fds) <= 3
        assert mapped_files(store) <= 3 and open_files(store)[0] <= 3
    ds.close()
    assert mapped_files(store) == 0 and open_files(store)[0] == 0

    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    shard = bad / "betas" / "c" / "2" / "0"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3] + data[-(len(data) // 3) :])  # chunks gone, index kept
    ds = BetasDataset(bad, split="all", trials=store.parent.parent / "trials.tsv")
    assert ds.stores[0].layout.codec is None
    np.testing.assert_array_equal(ds[[0, 1]]["betas"].numpy(), reference(truth, "none")[:2])
    with pytest.raises(InputError) as e:
        ds[[1, 2 * 50 + 40]]
    assert "corrupt" in one_line_error(e, shard)


# --------------------------------------------------------------------------- int16 output


def test_int16_output_is_the_stored_values(root: Path, store: Path, truth: dict):
    """dtype="int16": the stored integers exactly, from disk (raw and blosc), from memory, one
    item or a batch, one store or two; ``scale`` turns them into ``normalize="psc"``."""
    lz4 = store.parent / "lz4-int16.zarr"
    if not lz4.exists():
        compressors = zarr_compressor(StorageSettings("blosc-lz4", 5), 2)
        rewrite_betas(store, lz4, truth["betas"], compressors=compressors)
    idx = np.random.default_rng(5).integers(0, len(truth["betas"]), 100)
    idx[:2] = idx[2]  # a row asked more than once
    for path in (raw_copy(store, truth), lz4):
        for in_memory in (False, True):
            ds = BetasDataset(path, split="all", dtype="int16", in_memory=in_memory)
            batch = ds[idx.tolist()]
            assert batch["betas"].dtype == torch.int16
            np.testing.assert_array_equal(batch["betas"].numpy(), truth["betas"][idx])
            item = ds[int(idx[7])]["betas"]
            assert item.dtype == torch.int16
            np.testing.assert_array_equal(item.numpy(), truth["betas"][idx[7]])
            assert ds.scale == 300
            psc = (batch["betas"].float() / ds.scale).numpy()
            np.testing.assert_array_equal(psc, reference(truth, "psc")[idx])
    stores = [root / "results" / s / "roi" / "nsdgeneral.zarr" for s in SESSIONS]
    both = BetasDataset(stores, split="all", dtype=torch.int16)
    ref = BetasDataset(stores, split="all")
    mixed = [0, len(both) - 1, 5]  # a batch from two stores
    assert both[mixed]["betas"].dtype == torch.int16
    assert torch.equal(both[mixed]["betas"].float(), ref[mixed]["betas"])


@pytest.mark.parametrize(
    "context,in_memory",
    [("fork", False), ("fork", True), pytest.param("spawn", True, marks=pytest.mark.slow)],
)
def test_int16_through_workers(store: Path, truth: dict, context: str, in_memory: bool):
    """Batches of stored int16 values through the workers' reused buffers, fork and spawn."""
    ds = BetasDataset(raw_copy(store, truth), split="all", dtype="int16", in_memory=in_memory)
    loader = ds.dataloader(batch_size=32, num_workers=2, multiprocessing_context=context)
    got = epoch(loader)
    assert got["betas"].dtype == torch.int16
    np.testing.assert_array_equal(got["betas"].numpy(), truth["betas"])
    np.testing.assert_array_equal(got["trial"].numpy(), truth["trial"])


def test_int16_refuses_what_is_not_an_integer(store: Path):
    for kwargs in ({"normalize": "psc"}, {"normalize": "session_zscore"}):
        with pytest.raises(ValueError, match="normalize must be 'none'") as excinfo:
            BetasDataset(store, dtype="int16", **kwargs)
        assert "\n" not in str(excinfo.value)
    with pytest.raises(ValueError, match="cannot average repeats"):
        BetasDataset(store, dtype="int16", average_repeats=True)
    for dtype in ("float64", "int17"):
        with pytest.raises(ValueError, match="dtype must be one of"):
            BetasDataset(store, dtype=dtype)
    assert BetasDataset(store, dtype=np.float32)[0]["betas"].dtype == torch.float32
