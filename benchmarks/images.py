"""Quick benchmark: paired (betas + image) batches of 32 in one process, nsdzarr vs h5py.

Usage: python benchmarks/images.py [--data DIR] [--images N] [--seconds S] [--rounds R]

Builds, if absent, under DIR (default benchmarks/data/images/): ``nsd_stimuli.hdf5``, an
``imgBrick`` of N (default 1000) random 425 x 425 x 3 uint8 images (contiguous, as h5py
writes by default), converted by ``stimuli.convert_stimuli`` into ``stimuli.zarr`` (default
storage: raw bytes, one image per chunk, 50 per shard) with a 224 x 224 copy; an ROI store
``subj/roi/roi.zarr`` of 3000 trials x 15724 voxels int16 (``roi_settings``: blosc-lz4) whose
trials show those images at random; and ``betas.h5``, the same betas in one HDF5 dataset.
The page cache is warmed first (warm-cache numbers). Methods run round-robin on the same
random batches; the best round is kept (the machine is shared).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

H = W = 425
SMALL = 224
N_TRIALS, PER_SESSION, N_VOX = 3000, 750, 15724
BATCH = 32


def build(data: Path, n_images: int) -> None:
    """Write the brick, the image store, the ROI store and its HDF5 twin (skips what exists)."""
    import h5py
    import zarr

    from nsdzarr.roi import roi_settings
    from nsdzarr.stimuli import convert_stimuli
    from nsdzarr.storage import StorageSettings, create_trial_array

    data.mkdir(parents=True, exist_ok=True)
    brick = data / "nsd_stimuli.hdf5"
    rng = np.random.default_rng(0)
    if not brick.exists():
        print(f"writing {brick} ...", flush=True)
        with h5py.File(brick, "w") as f:
            d = f.create_dataset("imgBrick", (n_images, H, W, 3), np.uint8)
            for a in range(0, n_images, 100):
                b = min(a + 100, n_images)
                d[a:b] = rng.integers(0, 256, (b - a, H, W, 3), dtype=np.uint8)
    if not (data / "stimuli.zarr" / "zarr.json").exists():
        t0 = time.perf_counter()
        convert_stimuli(brick, data / "stimuli.zarr", sizes=(SMALL,))
        print(f"convert_stimuli: {time.perf_counter() - t0:.1f} s", flush=True)
    subj = data / "subj"
    store = subj / "roi" / "roi.zarr"
    if (store / "zarr.json").exists():
        return
    (subj / "roi").mkdir(parents=True, exist_ok=True)
    ids = rng.integers(0, n_images, N_TRIALS)
    lines = ["trial\tsession\tnsd_id\trepeat\tsplit"]
    lines += [f"{t}\t{t // PER_SESSION + 1}\t{ids[t]}\t0\ttrain" for t in range(N_TRIALS)]
    (subj / "trials.tsv").write_text("\n".join(lines) + "\n")
    group = zarr.open_group(store, mode="w", zarr_format=3)
    settings = roi_settings(StorageSettings())
    arr = create_trial_array(group, "betas", (N_TRIALS, N_VOX), np.int16, settings, ("t", "v"))
    with h5py.File(data / "betas.h5", "w") as f:
        h5 = f.create_dataset("betas", (N_TRIALS, N_VOX), np.int16)
        for s in range(0, N_TRIALS, PER_SESSION):
            part = np.round(rng.standard_normal((PER_SESSION, N_VOX)) * 300).astype(np.int16)
            arr[s : s + PER_SESSION] = part
            h5[s : s + PER_SESSION] = part
    group.attrs.update({"sessions": list(range(1, N_TRIALS // PER_SESSION + 1)), "scale": 300})


def warm_cache(paths: list[Path]) -> None:
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def rate(fn: Callable[[int], object], seconds: float, n_ops: int) -> float:
    """Batches per second of ``fn(k)`` for k = 0, 1, ... over at least ``seconds``."""
    fn(0)
    calls, t0 = 0, time.perf_counter()
    while True:
        fn(calls % n_ops)
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and calls >= 3:
            return calls / elapsed


def h5_rows(dset, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[j] = dset[rows[j]]`` through h5py (fancy indexing needs increasing indices)."""
    order = np.argsort(rows)
    uniq, inv = np.unique(rows[order], return_inverse=True)
    out[order] = dset[uniq][inv]
    return out


def h5_row_by_row(dset, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[j] = dset[rows[j]]``, one ``read_direct`` per row."""
    for j, r in enumerate(rows.tolist()):
        dset.read_direct(out, np.s_[r], np.s_[j])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "images")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    build(args.data, args.images)

    import h5py

    from nsdzarr.loader import BetasDataset
    from nsdzarr.readers import ImageReader

    data = args.data
    store = data / "subj" / "roi" / "roi.zarr"
    warm_cache([data / "nsd_stimuli.hdf5", data / "stimuli.zarr", store, data / "betas.h5"])
    full = BetasDataset(store, split="all", images=data / "stimuli.zarr")
    small = BetasDataset(store, split="all", images=data / "stimuli.zarr", image_size=SMALL)
    plain = BetasDataset(store, split="all")
    images = ImageReader(data / "stimuli.zarr")
    rng = np.random.default_rng(1)
    n_ops = 64
    batches = [rng.choice(N_TRIALS, BATCH, replace=False) for _ in range(n_ops)]
    nsd_ids = [full.stores[0].columns["nsd_id"][b] for b in batches]
    f_img = h5py.File(data / "nsd_stimuli.hdf5", "r")
    f_bet = h5py.File(data / "betas.h5", "r")
    brick, betas_h5 = f_img["imgBrick"], f_bet["betas"]
    img_out = np.empty((BATCH, H, W, 3), np.uint8)
    bet_out = np.empty((BATCH, N_VOX), np.int16)
    copy_src = np.ones_like(img_out)

    def h5_pair(k: int) -> None:
        h5_rows(betas_h5, batches[k], bet_out)
        h5_rows(brick, nsd_ids[k], img_out)

    def h5_pair_rows(k: int) -> None:
        h5_row_by_row(betas_h5, batches[k], bet_out)
        h5_row_by_row(brick, nsd_ids[k], img_out)

    methods: dict[str, Callable[[int], object]] = {
        "nsdzarr BetasDataset betas + image 425": lambda k: full.__getitems__(batches[k]),
        f"nsdzarr BetasDataset betas + image {SMALL}": lambda k: small.__getitems__(batches[k]),
        "nsdzarr BetasDataset betas only": lambda k: plain.__getitems__(batches[k]),
        "nsdzarr ImageReader.read image 425": lambda k: images.read(nsd_ids[k]),
        "h5py betas + image 425 (sorted fancy index)": h5_pair,
        "h5py image 425 (sorted fancy index)": lambda k: h5_rows(brick, nsd_ids[k], img_out),
        "h5py betas + image 425 (row by row)": h5_pair_rows,
        "h5py image 425 (row by row)": lambda k: h5_row_by_row(brick, nsd_ids[k], img_out),
        "numpy copy of a batch's images (memory bound)": lambda k: np.copyto(img_out, copy_src),
    }
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            best[name] = max(best.get(name, 0.0), rate(fn, args.seconds, n_ops))
    base = best["h5py betas + image 425 (sorted fancy index)"]
    print(f"\nbatch {BATCH}, {args.images} images {H}x{W}, warm cache, best of {args.rounds}")
    print(f"{'method':48s} {'batches/s':>10s} {'ms/batch':>9s} {'vs h5py pair':>12s}")
    for name, r in best.items():
        print(f"{name:48s} {r:10.1f} {1000 / r:9.2f} {r / base:11.1f}x")
    f_img.close()
    f_bet.close()


if __name__ == "__main__":
    main()
