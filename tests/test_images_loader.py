"""BetasDataset with stimulus images: every item's image is imgBrick[nsd_id], channels first.

ROI stores are built as in test_loader; the image store is converted by the pipeline's writer
from a real HDF5 brick of 10 x 7 images (H != W, random pixels: a swapped axis changes the
shape or the values), holding every image the two subjects' trials show.
"""

from __future__ import annotations

import functools
import gc
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import zarr  # noqa: E402
from test_loader import SESSIONS, build_store, open_files, record_pid, worker_fds  # noqa: E402
from test_readers import SIZE, H, W, write_brick  # noqa: E402
from torch.utils.data import DataLoader, default_collate  # noqa: E402

from nsdzarr.errors import InputError  # noqa: E402
from nsdzarr.prepare.stimuli import convert_stimuli  # noqa: E402
from nsdzarr.training import loader as loader_module  # noqa: E402
from nsdzarr.training.loader import BetasDataset, collate  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images_loader")
    for subject, sessions in SESSIONS.items():
        build_store(root, subject, sessions)
    return root


@pytest.fixture(scope="module")
def stores(root: Path) -> list[Path]:
    return [root / "results" / s / "roi" / "nsdgeneral.zarr" for s in SESSIONS]


@pytest.fixture(scope="module")
def brick(root: Path) -> np.ndarray:
    return write_brick(root / "stimuli" / "nsd_stimuli.hdf5")


def shown_ids(root: Path) -> np.ndarray:
    ids = []
    for s in SESSIONS:
        lines = (root / "results" / s / "trials.tsv").read_text().splitlines()
        col = lines[0].split("\t").index("nsd_id")
        ids += [int(line.split("\t")[col]) for line in lines[1:]]
    return np.unique(ids)


@pytest.fixture(scope="module")
def images(root: Path, brick: np.ndarray) -> Path:
    source = root / "stimuli" / "nsd_stimuli.hdf5"
    target = root / "stimuli" / "images.zarr"
    convert_stimuli(source, target, nsd_ids=shown_ids(root), sizes=(SIZE,))
    return target


@pytest.fixture(autouse=True)
def collected():
    """Collect earlier tests' datasets first: one caught in a traceback cycle (pytest.raises
    keeps the test's frame) holds its files open until then, and forked workers inherit them."""
    gc.collect()


def nchw(brick: np.ndarray, nsd_id) -> np.ndarray:
    """What a batch's ``image`` must equal: imgBrick rows, channels first."""
    return brick[np.asarray(nsd_id)].transpose(0, 3, 1, 2)


def check_batch(batch: dict, brick: np.ndarray) -> None:
    image = batch["image"]
    assert image.dtype == torch.uint8 and image.shape == (len(batch["nsd_id"]), 3, H, W)
    np.testing.assert_array_equal(image.numpy(), nchw(brick, batch["nsd_id"].numpy()))


# --------------------------------------------------------------------------- values


def test_items_and_batches_carry_their_image(stores: list[Path], images: Path, brick: np.ndarray):
    ds = BetasDataset(stores[0], split="all", images=images)
    plain = BetasDataset(stores[0], split="all")
    for i in (0, 777, 2249):
        item = ds[i]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, H, W)
        np.testing.assert_array_equal(
            item["image"].numpy(), brick[item["nsd_id"]].transpose(2, 0, 1)
        )
        assert torch.equal(item["betas"], plain[i]["betas"])
    idx = np.random.default_rng(0).choice(len(ds), 40).tolist()
    batch = ds.__getitems__(idx)
    fast, slow = collate(batch), default_collate(batch)
    check_batch(fast, brick)
    assert fast["image"].is_contiguous(memory_format=torch.channels_last)  # NHWC, zero copy
    assert torch.equal(slow["image"], fast["image"]) and torch.equal(slow["betas"], fast["betas"])
    check_batch(ds[:], brick)
    assert "image" not in plain[0]
    threads = BetasDataset(stores[0], split="all", images=images, decode_threads=2)
    assert torch.equal(threads[idx]["image"], fast["image"])
    threads.close()


def test_resized_images(stores: list[Path], images: Path, brick: np.ndarray):
    ds = BetasDataset(stores[0], split="test", images=images, image_size=SIZE)
    group = zarr.open_group(images, mode="r")
    small = group[f"images_{SIZE}"][...]
    batch = ds[:]
    rows = np.searchsorted(group["nsd_id"][...], batch["nsd_id"].numpy())
    assert batch["image"].shape == (len(ds), 3, SIZE, SIZE)
    np.testing.assert_array_equal(batch["image"].numpy(), small[rows].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(ds[3]["image"].numpy(), small[rows[3]].transpose(2, 0, 1))
    with pytest.raises(InputError) as e:
        BetasDataset(stores[0], images=images, image_size=SIZE + 1)
    msg = str(e.value)
    assert "\n" not in msg and str(images) in msg and f"[{SIZE}]" in msg
    with pytest.raises(ValueError, match="images="):
        BetasDataset(stores[0], image_size=SIZE)


@pytest.mark.parametrize("split", ["train", "test"])
def test_average_repeats_one_image_per_item(
    stores: list[Path], images: Path, brick: np.ndarray, split: str
):
    ds = BetasDataset(stores[0], split=split, average_repeats=True, images=images)
    batch = ds[:]
    assert batch["n_repeats"].max() >= 2
    check_batch(batch, brick)
    np.testing.assert_array_equal(
        ds[5]["image"].numpy(), brick[int(batch["nsd_id"][5])].transpose(2, 0, 1)
    )


def test_several_subjects_and_in_memory(stores: list[Path], images: Path, brick: np.ndarray):
    for in_memory in (False, True):
        ds = BetasDataset(stores, split="test", normalize="psc", in_memory=in_memory, images=images)
        assert ds.subjects == ["subj01", "subj02"]
        idx = np.random.default_rng(1).permutation(len(ds))[:64]
        check_batch(ds[idx], brick)
        batch = ds[[0, len(ds) - 1]]
        assert batch["subject"] == ["subj01", "subj02"]
        check_batch(batch, brick)
        assert open_files(images)[0] > 0
        ds.close()
        assert open_files(images)[0] == 0


@pytest.mark.parametrize("average", [False, True])
def test_kept_images_in_one_process_keep_their_memory(
    stores: list[Path], images: Path, brick: np.ndarray, average: bool
):
    """Without workers a batch's images share its reused frame: dropped, the next batch
    reuses their memory; an image batch (or a view of it) kept alone keeps its values while
    later batches are read, and its memory is reused once it is dropped."""
    ds = BetasDataset(stores[0], split="all", images=images, average_repeats=average)
    rng = np.random.default_rng(6)
    idx = [rng.integers(0, len(ds), 16) for _ in range(8)]
    first = collate(ds.__getitems__(idx[0]))
    ptr = first["image"].data_ptr()
    del first
    kept = collate(ds.__getitems__(idx[1]))  # the dropped batch's memory
    ids, image, view = kept["nsd_id"].numpy().copy(), kept["image"], kept["image"][2:5, 1]
    assert image.data_ptr() == ptr
    del kept  # the image alone holds its frame
    for i in idx[2:]:
        batch = collate(ds.__getitems__(i))
        assert batch["image"].data_ptr() != ptr
        check_batch(batch, brick)
    np.testing.assert_array_equal(image.numpy(), nchw(brick, ids))
    del image, batch
    for i in idx[2:]:  # the view alone still holds it
        assert collate(ds.__getitems__(i))["image"].data_ptr() != ptr
    np.testing.assert_array_equal(view.numpy(), nchw(brick, ids[2:5])[:, 1])
    del view
    assert collate(ds.__getitems__(idx[0]))["image"].data_ptr() == ptr  # then reused


def test_missing_ids_are_refused_at_construction(
    root: Path, stores: list[Path], brick: np.ndarray, tmp_path: Path
):
    needed = BetasDataset(stores[0], split="test")[:]["nsd_id"].numpy()  # in item order
    partial = tmp_path / "partial.zarr"
    source = root / "stimuli" / "nsd_stimuli.hdf5"
    convert_stimuli(source, partial, nsd_ids=np.setdiff1d(needed, needed[[3, 10]]))
    with pytest.raises(InputError) as e:
        BetasDataset(stores[0], split="test", images=partial)
    msg = str(e.value)
    assert "\n" not in msg and str(partial) in msg and f"nsd_id {needed[3]} " in msg
    with pytest.raises(InputError, match=f"nsd_id {needed[3]} "):  # one image per item too
        BetasDataset(stores[0], split="test", average_repeats=True, images=partial)


# --------------------------------------------------------------------------- workers


def epoch(loader: DataLoader, brick: np.ndarray) -> dict:
    batches = list(loader)
    for b in batches:
        check_batch(b, brick)
    return {k: torch.cat([b[k] for b in batches]) for k in ("betas", "trial", "image", "nsd_id")}


# spawn: seconds of worker start-ups (test_loader.py::test_dataloader_two_workers keeps one fast)
@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataloader_two_workers(stores: list[Path], images: Path, brick: np.ndarray, context: str):
    ds = BetasDataset(stores[0], split="all", normalize="psc", images=images)
    plain = BetasDataset(stores[0], split="all", normalize="psc")
    kwargs = {"batch_size": 32, "num_workers": 2, "multiprocessing_context": context}
    fast = epoch(ds.dataloader(**kwargs), brick)
    assert len(fast["nsd_id"]) == len(ds)
    assert torch.equal(fast["betas"], plain[:]["betas"])
    assert open_files(images)[0] == 0  # the parent never opened an image shard
    if context == "spawn":  # spawning workers is slow: the rest under fork only
        return
    slow = epoch(DataLoader(ds, **kwargs), brick)  # torch's default collate
    assert torch.equal(slow["image"], fast["image"])
    small = BetasDataset(stores[0], split="test", images=images, image_size=SIZE)
    got = torch.cat([b["image"] for b in small.dataloader(**kwargs)])
    assert torch.equal(got, small[:]["image"])


def no_fresh_shared_memory(shape, dtype=None):
    raise AssertionError("a worker ran out of reusable batch buffers")


def test_persistent_workers_keep_fds_and_memory_flat_with_images(
    stores: list[Path], images: Path, brick: np.ndarray, tmp_path: Path, monkeypatch
):
    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(loader_module, "shared_empty", no_fresh_shared_memory)
    ds = BetasDataset(stores[0], split="all", images=images, max_open_files=8)
    loader = ds.dataloader(
        batch_size=32,
        shuffle=True,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context="fork",
        worker_init_fn=functools.partial(record_pid, str(tmp_path)),
    )
    fds, img_fds, rss = [], [], []
    for _ in range(3):
        n = 0
        for batch in loader:
            check_batch(batch, brick)
            # the images came in the batch's slot, right after the betas (not torch's path)
            betas_bytes = -(-batch["betas"].numel() * 4 // 64) * 64
            assert batch["image"].data_ptr() - batch["betas"].data_ptr() == betas_bytes
            n += len(batch["nsd_id"])
        assert n == len(ds)
        fds.append(worker_fds(tmp_path, stores[0]))
        img_fds.append(worker_fds(tmp_path, images))
        rss.append({pid: psutil.Process(pid).memory_info().rss for pid in fds[-1]})
    assert len(fds[0]) == 2
    assert fds[0] == fds[1] == fds[2] and img_fds[0] == img_fds[1] == img_fds[2]
    assert all(mine == 8 for mine, _ in img_fds[0].values())  # LRU-bounded image shards
    for pid in fds[0]:
        assert rss[2][pid] - rss[1][pid] < 8 * 2**20
    assert open_files(images)[0] == 0
