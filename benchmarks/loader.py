"""Benchmark random trial reads for training: our loader vs zarr-python, tensorstore, h5py.

Usage: python benchmarks/loader.py [--data DIR] [--rounds N] [--seconds S] [--build-only]
       python benchmarks/loader.py --fallbacks  (private paths vs their fallbacks, small stores)
       python benchmarks/loader.py --checksums [--data DIR] [--rounds N] [--seconds S]
       python benchmarks/loader.py --memory [--data DIR] [--rounds N]  (in-memory rows only)
       python benchmarks/loader.py --workers [--data DIR] [--rounds N]  (DataLoader CPU only)

Builds, if absent, under DIR (default benchmarks/data/loader/) a subj01-size ROI store:
``subj01/roi/nsdgeneral.zarr`` with betas 30000 x 15724 int16 (round(noise x 300)), chunks
(1, 15724), shards (50, 15724) = 600 shard files, the default codec of
``StorageSettings()`` (zstd-1), laid out like ``roi.finish_store`` (mean/std per session,
attrs); ``subj01/trials.tsv`` from the demo design (40 sessions); and ``betas.h5``, the same
array in one contiguous HDF5 dataset. The page cache is warmed first (warm-cache numbers).

Every method reads the same random trials in one process; rounds run the methods
round-robin and the best round is kept (the machine is shared, so the best round is the least
disturbed one). Engines return int16 rows; ours returns float32 tensors (normalize="none"),
or the stored int16 values (``dtype="int16"``).
Prints one table with throughput and the ratio to zarr-python, for the zstd-1 store, a
blosc-lz4 copy (``nsdgeneral-lz4.zarr``) and a raw copy (``nsdgeneral-raw.zarr``, codec
none), tensorstore on the zstd store and on the store of the ROI default codec
(``storage.ROI_STORAGE``), zarrs-python on the latter (each if installed). Then DataLoaders
over the default store with 0, 1, 2 workers, with the CPU each process spends per batch,
beside a no-op dataset (what torch's DataLoader itself costs per batch) and larger batches.

``--checksums`` measures only what checking each chunk's crc32c costs the loader: under
DIR/checksums/ an 8-session (6000 x 15724) store raw and one blosc-lz4 (both with the crc32c
of ``storage.chunk_codecs``), the same random batches of 32 with ``verify_checksums`` on and
off, alternating batch by batch, best of rounds, and the ratio.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

N_SESSIONS, PER_SESSION, N_VOX = 40, 750, 15724
N_TRIALS = N_SESSIONS * PER_SESSION
BATCH = 32


# --------------------------------------------------------------------------- data


def write_random_betas(store: Path, h5: Path, sessions: int, settings) -> None:
    """A seeded (sessions x 750, N_VOX) int16 ROI store laid out by the project's own
    functions, with its per-session statistics, and its contiguous HDF5 twin."""
    import h5py
    import zarr

    from nsdzarr.prepare.storage import create_trial_array

    n_trials = sessions * PER_SESSION
    group = zarr.open_group(store, mode="w", zarr_format=3)
    arr = create_trial_array(
        group, "betas", (n_trials, N_VOX), np.int16, settings, ("trial", "voxel")
    )
    rng = np.random.default_rng(0)
    means, stds = [], []
    with h5py.File(h5, "w") as f:
        d = f.create_dataset("betas", shape=(n_trials, N_VOX), dtype=np.int16)  # contiguous
        for s in range(sessions):
            block = np.round(rng.standard_normal((PER_SESSION, N_VOX), np.float32) * 300)
            block = block.astype(np.int16)
            sl = slice(s * PER_SESSION, (s + 1) * PER_SESSION)
            arr[sl] = block
            d[sl] = block
            means.append(block.mean(axis=0, dtype=np.float64).astype(np.float32))
            stds.append(block.std(axis=0, dtype=np.float64).astype(np.float32))
    group.create_array("mean", data=np.stack(means), dimension_names=("session", "voxel"))
    group.create_array("std", data=np.stack(stds), dimension_names=("session", "voxel"))
    group.create_array("voxels", data=np.zeros((N_VOX, 3), np.int32))
    group.attrs.update({"sessions": list(range(1, sessions + 1)), "scale": 300})


def build(data: Path) -> None:
    """Write the store, the trials table and the HDF5 twin (skips what exists)."""
    import scipy.io

    from nsdzarr.prepare.demo import make_design
    from nsdzarr.prepare.storage import StorageSettings, roi_settings
    from nsdzarr.prepare.trials import write_trial_tables

    subj = data / "subj01"
    store = subj / "roi" / "nsdgeneral.zarr"
    h5 = data / "betas.h5"
    if not (subj / "trials.tsv").exists():
        subj.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(data / "nsd_expdesign.mat", make_design(0), format="5")
        write_trial_tables(
            data / "nsd_expdesign.mat",
            "subj01",
            list(range(1, N_SESSIONS + 1)),
            subj / "trials.tsv",
            subj / "trials.json",
            subj / "images.tsv",
        )
    if (store / "zarr.json").exists() and h5.exists():
        return
    t0 = time.perf_counter()
    print(f"building {store} and {h5} ...", flush=True)
    write_random_betas(store, h5, N_SESSIONS, roi_settings(StorageSettings()))
    print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)


def build_copy(data: Path, name: str, codec: str, level: int = 5) -> Path:
    """The same betas re-encoded as ``codec`` (shuffle), beside the zstd store."""
    import zarr

    from nsdzarr.prepare.storage import StorageSettings, create_trial_array, roi_settings

    roi = data / "subj01" / "roi"
    target = roi / name
    if (target / "zarr.json").exists():
        return target
    print(f"building {target} ...", flush=True)
    src = zarr.open_group(roi / "nsdgeneral.zarr", mode="r")
    group = zarr.open_group(target, mode="w", zarr_format=3)
    settings = roi_settings(StorageSettings(codec, level))
    arr = create_trial_array(group, "betas", (N_TRIALS, N_VOX), np.int16, settings, ("t", "v"))
    for a in range(0, N_TRIALS, PER_SESSION):
        arr[a : a + PER_SESSION] = src["betas"][a : a + PER_SESSION]
    for key in ("mean", "std", "voxels"):
        group.create_array(
            key, data=src[key][...], dimension_names=src[key].metadata.dimension_names
        )
    group.attrs.update(dict(src.attrs))
    return target


def warm_cache(paths: list[Path]) -> None:
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


# --------------------------------------------------------------------------- timing


def rate(fn: Callable[[int], object], per_call: int, seconds: float, n_ops: int) -> float:
    """Items per second of ``fn(k)`` for k = 0, 1, ... over at least ``seconds``."""
    fn(0)  # warm
    calls, t0 = 0, time.perf_counter()
    while True:
        fn(calls % n_ops)
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and calls >= 3:
            return calls * per_call / elapsed


# --------------------------------------------------------------------------- DataLoader


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class NoopBatches:
    """A map dataset whose batches cost nothing: what torch's DataLoader alone costs."""

    def __len__(self) -> int:
        return N_TRIALS

    def __getitems__(self, idx: list[int]) -> list[int]:
        return list(idx)


class BusyBatches(NoopBatches):
    """The no-op whose workers spend ~1 ms of CPU per batch, as ours do: torch's floor when the
    main process waits for its workers."""

    def __getitems__(self, idx: list[int]) -> list[int]:
        t = time.thread_time()
        while time.thread_time() - t < 1e-3:
            pass
        return list(idx)


class GatherBatches(NoopBatches):
    """The no-op whose workers make the float32 batch ours makes (32 int16 rows gathered from
    memory and cast into a reused buffer) and drop it: torch's floor when the workers do a
    batch's memory work, which shares the caches with the main process."""

    def __init__(self) -> None:
        self.ram = np.full((N_TRIALS, N_VOX), 7, np.int16)  # pages written: none is the zero page
        self.out: np.ndarray | None = None

    def __getitems__(self, idx: list[int]) -> list[int]:
        if self.out is None:
            self.out = np.empty((BATCH, N_VOX), np.float32)
        out = self.out[: len(idx)]
        out[...] = self.ram[np.asarray(idx)]
        return list(idx)


FLOORS = ("noop", "noop, workers busy 1 ms", "noop, workers make the batch")


def floor_dsets() -> dict[str, object]:
    """The no-op datasets the DataLoader rows are compared with (:data:`FLOORS`)."""
    return dict(zip(FLOORS, (NoopBatches(), BusyBatches(), GatherBatches()), strict=True))


def own_unpickling(dset: object, rounds: int) -> float:
    """CPU µs per batch the main process spends in our code (rebuilding a worker's batch and
    freeing it), 2 workers: the least of ``rounds`` epochs of 300 batches."""

    from nsdzarr.training import batch_transport
    from nsdzarr.training.loader import collate

    rebuild, spent = batch_transport._rebuild_batch, [0.0]

    def timed(*args: object) -> object:
        t = time.thread_time()
        batch = rebuild(*args)
        spent[0] += time.thread_time() - t
        return batch

    dl = warm_loader(dset, 2, BATCH, 300, collate)
    batch_transport._rebuild_batch = timed  # unpickling looks it up by name
    best = float("inf")
    try:
        for _ in range(rounds):
            spent[0], n = 0.0, 0
            for batch in dl:
                t = time.thread_time()
                del batch  # freed here, as a training loop frees it
                spent[0] += time.thread_time() - t
                n += 1
            best = min(best, spent[0] / n * 1e6)
    finally:
        batch_transport._rebuild_batch = rebuild
    return best


def warm_loader(dset: object, workers: int, bs: int, batches: int, collate_fn: Callable):
    """A DataLoader of ``batches`` random batches per epoch (persistent workers), warmed by one
    epoch: its workers started, their files open."""
    from torch.utils.data import DataLoader, RandomSampler

    kwargs = {"persistent_workers": True, "prefetch_factor": 4} if workers else {}
    dl = DataLoader(
        dset,  # type: ignore[arg-type]
        batch_size=bs,
        sampler=RandomSampler(range(N_TRIALS), num_samples=batches * bs),
        num_workers=workers,
        collate_fn=collate_fn,
        **kwargs,
    )
    for _ in dl:
        pass
    return dl


def loader_rates(dsets: dict[str, object], configs: list[tuple[str, int, int]], rounds: int):
    """Trials/s and CPU µs per batch (main, all workers) of DataLoaders, measured round-robin.

    ``configs``: (dataset name, num_workers, batch size). Persistent workers, warmed by one
    epoch; every round is one epoch per config; the best round is kept.
    """

    from nsdzarr.training.loader import collate

    loaders = {}
    for name, workers, bs in configs:
        loaders[name, workers, bs] = warm_loader(
            dsets[name],
            workers,
            bs,
            3000 if name == "noop" else 300,  # the no-op's CPU time counts in 10 ms ticks
            collate if name.startswith("ours") else (lambda b: b),
        )
    best: dict[tuple, tuple[float, float, float]] = {}
    for _ in range(rounds):
        for key, dl in loaders.items():
            it = iter(dl)
            pids = [p.pid for p in getattr(it, "_workers", [])]
            # the main process's own clock (ns), the workers' from /proc (10 ms ticks)
            c0 = [time.process_time()] + [cpu_seconds(p) for p in pids]
            t0 = time.perf_counter()
            n = sum(1 for _ in it)
            wall = time.perf_counter() - t0
            c1 = [time.process_time()] + [cpu_seconds(p) for p in pids]
            per = [(b - a) / n * 1e6 for a, b in zip(c0, c1, strict=True)]
            rate = n * key[2] / wall
            if rate > best.get(key, (0.0,))[0]:
                best[key] = (rate, per[0], sum(per[1:]))
    del loaders
    return best


def report_loader(
    best: dict[tuple, tuple[float, float, float]], store_name: str, own: float | None = None
) -> None:
    """The DataLoader table, the 2-worker ratios and the bound torch's own costs put on them."""
    print(
        f"\nDataLoader over the {store_name} store (our collate, random order, persistent "
        f"workers; CPU µs per batch: main process from its own clock, workers from /proc, "
        f"10 ms ticks):"
    )
    print("| dataset | batch | workers | trial/s | vs 0 workers | CPU µs/batch main | workers |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (name, workers, bs), (rate, main, work) in best.items():
        zero = best[(name if name == "noop" else "noop" if "noop" in name else "ours", 0, bs)][0]
        print(
            f"| {name} | {bs} | {workers} | {rate:,.0f} | {rate / zero:.2f} | {main:,.0f} "
            f"| {work:,.0f} |"
        )
    gather = "noop, workers make the batch"
    for w in (1, 2):
        noop, ours = best[("noop", w, BATCH)], best[("ours", w, BATCH)]
        made = best.get((gather, w, BATCH))
        print(
            f"\n{w} worker(s), batch {BATCH}: CPU µs per batch, main process: ours "
            f"{ours[1]:,.0f} vs torch's floor {noop[1]:,.0f} ({ours[1] / max(noop[1], 1):.2f}x)"
            + (
                f", vs the floor whose workers make the batch {made[1]:,.0f} "
                f"({ours[1] / max(made[1], 1):.2f}x; that floor is {made[1] / noop[1]:.2f}x "
                "the idle one)"
                if made
                else ""
            )
            + f"; workers: ours {ours[2]:,.0f} vs floor {noop[2]:,.0f}"
        )
    busy, ours = best[("noop, workers busy 1 ms", 2, BATCH)], best[("ours", 2, BATCH)]
    print(
        f"2 workers, main process: the no-op whose workers are busy 1 ms per batch "
        f"{busy[1]:,.0f} µs ({busy[1] / best[('noop', 2, BATCH)][1]:.2f}x the floor); "
        f"ours {ours[1] / busy[1]:.2f}x it"
    )
    if own is not None:
        print(
            f"2 workers, main process: of ours, {own:,.0f} µs per batch is our own code "
            f"(rebuilding the worker's batch and freeing it); the rest is torch's loop"
        )
    # 2 cores, CPU-bound: 2 workers give at most 2 * (one process's CPU per batch) / (the
    # workers' CPU per batch + the main process's), the DataLoader's own part at least
    # torch's floor (the no-op dataset)
    floor = sum(best[("noop", 2, BATCH)][1:])
    p0 = best[("ours", 0, BATCH)][1]
    print(
        f"\ntorch's own cost per batch with 2 workers (no-op dataset): {floor:,.0f} µs CPU; "
        f"ours in one process: {p0:,.0f} µs; so on {len(os.sched_getaffinity(0))} cores "
        f"2 workers can reach at most {2 * p0 / (p0 + floor):.2f}x one process at batch "
        f"{BATCH} (measured {best[('ours', 2, BATCH)][0] / best[('ours', 0, BATCH)][0]:.2f}x)"
    )


def checksum_cost(data: Path, rounds: int, seconds: float) -> None:
    """Batches of 32 with and without the crc32c checks, on a raw and a blosc-lz4 store."""
    import scipy.io

    from nsdzarr.prepare.demo import make_design
    from nsdzarr.prepare.storage import StorageSettings, roi_settings
    from nsdzarr.prepare.trials import write_trial_tables
    from nsdzarr.training.loader import BetasDataset, collate

    sessions = 8
    subj = data / "checksums" / "subj01"
    if not (subj / "trials.tsv").exists():
        subj.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(subj.parent / "nsd_expdesign.mat", make_design(0), format="5")
        tables = [subj / n for n in ("trials.tsv", "trials.json", "images.tsv")]
        write_trial_tables(subj.parent / "nsd_expdesign.mat", "subj01", [*range(1, 9)], *tables)
    stores = {}
    for codec in ("none", "blosc-lz4"):
        store = stores[codec] = subj / "roi" / f"{codec}.zarr"
        if not (store / "zarr.json").exists():
            print(f"building {store} ...", flush=True)
            settings = roi_settings(StorageSettings(codec, 5))
            write_random_betas(store, subj.parent / f"{codec}.h5", sessions, settings)
    warm_cache(list(stores.values()))
    batches = np.random.default_rng(1).integers(0, sessions * PER_SESSION, (500, BATCH))
    dsets = {
        (codec, check): BetasDataset(store, split="all", verify_checksums=check)
        for codec, store in stores.items()
        for check in (True, False)
    }
    for codec in stores:  # the same values either way
        on, off = (collate(dsets[codec, c].__getitems__(batches[0]))["betas"] for c in (1, 0))
        assert np.array_equal(on.numpy(), off.numpy())
    # checked and unchecked batches alternate, so that both see the same disturbances of this
    # shared machine; each round reads the 500 batches at least ``seconds``, the best is kept
    best: dict[tuple[str, bool], float] = {}
    for r in range(rounds):
        for codec in stores:
            spent = {True: 0.0, False: 0.0}
            calls = 0
            while calls < 500 or min(spent.values()) < seconds:
                for check in (True, False):
                    t0 = time.perf_counter()
                    collate(dsets[codec, check].__getitems__(batches[calls % 500]))
                    spent[check] += time.perf_counter() - t0
                calls += 1
            for check, secs in spent.items():
                best[codec, check] = max(best.get((codec, check), 0.0), calls * BATCH / secs)
        print(f"round {r + 1}/{rounds} done", flush=True)
    print(
        f"\ncrc32c checks in the loader: {sessions * PER_SESSION} x {N_VOX} int16, batches of "
        f"{BATCH}, one process, page cache warm, best of {rounds} rounds, load "
        f"{os.getloadavg()[0]:.1f}"
    )
    print("| store | checked trial/s | unchecked trial/s | cost of checking |")
    print("|---|---:|---:|---:|")
    for codec in stores:
        on, off = best[codec, True], best[codec, False]
        print(f"| {codec} | {on:,.0f} | {off:,.0f} | {100 * (off / on - 1):.1f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "loader")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0, help="minimum time per measurement")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--fallbacks", action="store_true", help="private paths vs their fallbacks")
    ap.add_argument("--checksums", action="store_true", help="only the crc32c checks' cost")
    ap.add_argument("--memory", action="store_true", help="only the in-memory rows")
    ap.add_argument("--workers", action="store_true", help="only the DataLoader CPU per batch")
    args = ap.parse_args()
    if args.memory:
        return memory_rates(args.data, args.rounds, args.seconds)
    if args.workers:
        return worker_rates(args.data, args.rounds)
    if args.fallbacks:
        return fallback_rates(args.data, args.rounds, args.seconds)
    if args.checksums:
        checksum_cost(args.data, args.rounds, args.seconds)
        return
    build(args.data)
    lz4_store = build_copy(args.data, "nsdgeneral-lz4.zarr", "blosc-lz4")
    raw_store = build_copy(args.data, "nsdgeneral-raw.zarr", "none")
    if args.build_only:
        return

    import h5py
    import torch
    import zarr

    from nsdzarr.prepare.storage import ROI_STORAGE
    from nsdzarr.training.loader import BetasDataset, collate
    from nsdzarr.training.readers import RoiReader
    from nsdzarr.training.zarr_v3 import Decoder

    torch.set_num_threads(1)
    store = args.data / "subj01" / "roi" / "nsdgeneral.zarr"
    h5path = args.data / "betas.h5"
    warm_cache([store, h5path, lz4_store, raw_store])
    codec_of = {"zstd": "zstd-1", "default": ROI_STORAGE.codec}
    rng = np.random.default_rng(1)
    singles = rng.integers(0, N_TRIALS, 4000)
    batches = rng.integers(0, N_TRIALS, (500, BATCH))

    ds = BetasDataset(store, split="all")
    ds_t2 = BetasDataset(store, split="all", decode_threads=2)
    ds_lz4 = BetasDataset(lz4_store, split="all")
    ds_raw = BetasDataset(raw_store, split="all")
    ds_raw_pread = BetasDataset(raw_store, split="all")  # A/B: preadv, not the mapped files
    ds_raw_pread._reader(ds_raw_pread._runtime(), 0).row_views = lambda rows: None
    ds_raw_mem = BetasDataset(raw_store, split="all", in_memory=True)
    ds_raw_16 = BetasDataset(raw_store, split="all", dtype="int16")
    ds_mem_16 = BetasDataset(raw_store, split="all", in_memory=True, dtype="int16")
    ds_raw_z = BetasDataset(raw_store, split="all", normalize="session_zscore")
    ds_z = BetasDataset(store, split="all", normalize="session_zscore")
    t0 = time.perf_counter()
    ds_mem = BetasDataset(store, split="all", in_memory=True)
    load_s = time.perf_counter() - t0
    z = zarr.open_array(store / "betas", mode="r")
    roi_reader = RoiReader(raw_store)  # the numpy reader: raw int16 rows, for comparison
    h5 = h5py.File(h5path, "r")["betas"]
    # the same int16 values in an array numpy allocated (with numpy's own huge pages, as a
    # numpy user's array would be), for numpy fancy indexing
    ram = np.array(ds_mem._mem[0].numpy())
    ram32 = ram.astype(np.float32)  # what a float32 batch costs numpy to gather (our output)
    default_store = {"none": raw_store, "blosc-lz4": lz4_store, "zstd": store}[ROI_STORAGE.codec]
    try:
        import tensorstore as ts

        tstores = {
            name: ts.open(
                {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "betas")}},
                read=True,
            ).result()
            for name, path in (("zstd", store), ("default", default_store))
        }
        ts_version = importlib.metadata.version("tensorstore")
    except Exception as exc:  # not installed, or no zarr3 driver
        print(f"tensorstore skipped: {exc}")
        tstores, ts_version = {}, ""
    try:  # zarr-python with the zarrs (Rust) codec pipeline, on the default store
        import zarrs  # noqa: F401

        with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
            zrs = zarr.open_array(default_store / "betas", mode="r")
            zrs.oindex[batches[0], :]  # the pipeline is chosen when the array is read
    except Exception as exc:
        print(f"zarrs skipped: {exc}")
        zrs = None

    def zrs_batch(k: int) -> np.ndarray:
        with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
            return zrs.oindex[batches[k], :]

    def h5_batch(k: int) -> np.ndarray:  # h5py fancy indexing needs increasing indices
        b = batches[k]
        order = np.argsort(b)
        uniq, inv = np.unique(b[order], return_inverse=True)
        out = np.empty((BATCH, N_VOX), np.int16)
        out[order] = h5[uniq][inv]
        return out

    # the decoders alone, on the encoded chunks of the batch trials (pre-read): the ceilings
    def encoded_rows(dset: BetasDataset) -> list[np.ndarray]:
        reader = dset._reader(dset._runtime(), 0)
        out = []
        for row in batches[:50].ravel().tolist():
            obj, c = divmod(row, 50)
            if not reader.loaded[obj]:
                reader.load_index(obj)
            off, nb = int(reader.offset[obj, c]), int(reader.nbytes[obj, c])
            out.append(np.frombuffer(os.pread(reader.fd(obj), nb, off), np.uint8))
        return out

    sink = np.empty(N_VOX, np.int16)
    ceilings = {
        # each chunk ends with its crc32c (storage.chunk_codecs), unchecked as the loader's default
        name: (encoded_rows(dset), Decoder(lay.codec, lay.chunk_crc, verify=False))
        for name, dset in (("zstd", ds), ("lz4", ds_lz4))
        for lay in [dset.stores[0].layout]
    }

    def decode_only(codec: str) -> Callable[[int], None]:
        encoded, decoder = ceilings[codec]

        def run(k: int) -> None:
            for enc in encoded[(k % 50) * BATCH : (k % 50 + 1) * BATCH]:
                decoder.into(enc, sink)

        return run

    methods: dict[str, tuple[Callable | None, Callable | None]] = {
        "zarr-python z[i] / z.oindex[idx]": (
            lambda k: z[int(singles[k])],
            lambda k: z.oindex[batches[k], :],
        ),
        "ours, disk (zstd fast path)": (
            lambda k: ds[int(singles[k])]["betas"],
            lambda k: collate(ds.__getitems__(batches[k]))["betas"],
        ),
        "ours, disk, session_zscore": (
            None,
            lambda k: collate(ds_z.__getitems__(batches[k]))["betas"],
        ),
        "ours, disk, decode_threads=2": (
            None,
            lambda k: collate(ds_t2.__getitems__(batches[k]))["betas"],
        ),
        "ours, disk, blosc-lz4 store": (
            lambda k: ds_lz4[int(singles[k])]["betas"],
            lambda k: collate(ds_lz4.__getitems__(batches[k]))["betas"],
        ),
        "ours, disk, raw store (no codec)": (
            lambda k: ds_raw[int(singles[k])]["betas"],
            lambda k: collate(ds_raw.__getitems__(batches[k]))["betas"],
        ),
        "ours, disk, raw store, preadv (no mapping)": (
            None,
            lambda k: collate(ds_raw_pread.__getitems__(batches[k]))["betas"],
        ),
        "ours, disk, raw store, session_zscore": (
            None,
            lambda k: collate(ds_raw_z.__getitems__(batches[k]))["betas"],
        ),
        "ours, in_memory (from the raw store)": (
            None,
            lambda k: collate(ds_raw_mem.__getitems__(batches[k]))["betas"],
        ),
        "ours, in_memory": (
            lambda k: ds_mem[int(singles[k])]["betas"],
            lambda k: collate(ds_mem.__getitems__(batches[k]))["betas"],
        ),
        "ours, in_memory, dtype=int16 (raw store)": (
            None,
            lambda k: collate(ds_mem_16.__getitems__(batches[k]))["betas"],
        ),
        "ours, disk, raw store, dtype=int16": (
            None,
            lambda k: collate(ds_raw_16.__getitems__(batches[k]))["betas"],
        ),
        "RoiReader.rows, raw store (int16, no torch)": (
            None,
            lambda k: roi_reader.rows(batches[k]),
        ),
        "zstd decode only, no I/O (ceiling)": (None, decode_only("zstd")),
        "blosc-lz4 decode only, no I/O (ceiling)": (None, decode_only("lz4")),
        "h5py kept open (contiguous)": (lambda k: h5[int(singles[k])], h5_batch),
        "numpy fancy index in RAM (int16)": (
            lambda k: ram[int(singles[k])].copy(),
            lambda k: ram[batches[k]],
        ),
        "numpy fancy index in RAM (float32 copy)": (None, lambda k: ram32[batches[k]]),
    }
    for name, tstore in tstores.items():
        methods[f"tensorstore {ts_version}, {name} store ({codec_of[name]})"] = (
            lambda k, t=tstore: t[int(singles[k])].read().result(),
            lambda k, t=tstore: t[batches[k], :].read().result(),
        )
    if zrs is not None:
        methods[f"zarrs-python, default store ({ROI_STORAGE.codec})"] = (None, zrs_batch)

    # correctness before speed
    ref = z.oindex[batches[0], :]
    assert np.array_equal(collate(ds.__getitems__(batches[0]))["betas"].numpy(), ref)
    assert np.array_equal(collate(ds_mem.__getitems__(batches[0]))["betas"].numpy(), ref)
    for d in (ds_raw, ds_raw_pread, ds_raw_mem, ds_lz4, ds_raw_16, ds_mem_16):
        assert np.array_equal(collate(d.__getitems__(batches[0]))["betas"].numpy(), ref)
    zr = collate(ds_raw_z.__getitems__(batches[0]))["betas"].numpy()
    assert np.array_equal(zr, collate(ds_z.__getitems__(batches[0]))["betas"].numpy())
    if zrs is not None:
        assert np.array_equal(zrs_batch(0), ref)
    assert np.array_equal(h5_batch(0), ref)
    assert np.array_equal(roi_reader.rows(batches[0]), ref)

    best: dict[tuple[str, str], float] = {}
    for r in range(args.rounds):
        for name, (single, batch) in methods.items():
            secs = args.seconds * (0.5 if name.startswith("zarr") else 1)
            for kind, fn, per in (("single", single, 1), ("batch", batch, BATCH)):
                if fn is None:
                    continue
                n_ops = len(singles) if kind == "single" else len(batches)
                v = rate(fn, per, secs, n_ops)
                best[name, kind] = max(best.get((name, kind), 0.0), v)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    base_s = best["zarr-python z[i] / z.oindex[idx]", "single"]
    base_b = best["zarr-python z[i] / z.oindex[idx]", "batch"]
    decoder = "numcodecs' C libraries" if Decoder("zstd").direct else "Python fallback"
    print()
    print(
        f"Random trial reads, {N_TRIALS} x {N_VOX} int16 store (600 shards of 50 trials, "
        f"zstd-1 or blosc-lz4, decoders: {decoder}), page cache warm, best of "
        f"{args.rounds} rounds, cores: {len(os.sched_getaffinity(0))}"
    )
    print(f"| {'read path':42s} | single trial/s | ratio | batch-of-32 trial/s | ratio |")
    print(f"|{'-' * 44}|---------------:|------:|--------------------:|------:|")
    for name in methods:
        s, b = best.get((name, "single")), best.get((name, "batch"))
        cells = [
            f"{s:14,.0f} | {s / base_s:5.1f}" if s else f"{'-':>14s} | {'-':>5s}",
            f"{b:19,.0f} | {b / base_b:5.1f}" if b else f"{'-':>19s} | {'-':>5s}",
        ]
        print(f"| {name:42s} | {cells[0]} | {cells[1]} |")
    np16 = best["numpy fancy index in RAM (int16)", "batch"]
    np32 = best["numpy fancy index in RAM (float32 copy)", "batch"]
    for name in ("ours, in_memory", "ours, in_memory, dtype=int16 (raw store)"):
        b = best[name, "batch"]
        print(f"{name}: {b:,.0f}/s, {b / np16:.2f}x numpy int16, {b / np32:.2f}x numpy float32")
    dsets = {
        **floor_dsets(),
        "ours": BetasDataset(default_store, split="all"),
        "ours, torch's shm transport": BetasDataset(
            default_store, split="all", pooled_batches=False
        ),
    }
    configs = [("noop", w, BATCH) for w in (0, 1, 2)] + [("ours", w, BATCH) for w in (0, 1, 2)]
    configs += [("noop, workers busy 1 ms", 2, BATCH)]
    configs += [("noop, workers make the batch", w, BATCH) for w in (1, 2)]
    configs += [("ours, torch's shm transport", 2, BATCH)]
    configs += [("ours", w, bs) for bs in (128, 512) for w in (0, 2)]
    rates = loader_rates(dsets, configs, args.rounds)
    own = own_unpickling(dsets["ours"], args.rounds)
    report_loader(rates, f"{ROI_STORAGE.codec} (ROI default)", own)
    print(
        f"\nin_memory load (decode 30000 trials into memory): {load_s:.1f} s; load "
        f"average during the run: {os.getloadavg()[0]:.1f} (another process's load slows "
        "every figure)"
    )


# --------------------------------------------------------------------------- fallbacks

FB_SESSIONS = 4
MODES = ("private", "fallback")


def memory_rates(data: Path, rounds: int, seconds: float) -> None:
    """In memory only: ours float32 and int16 next to numpy's fancy index (a quick run)."""
    import torch

    from nsdzarr.training.loader import BetasDataset, collate

    torch.set_num_threads(1)
    build(data)
    raw_store = build_copy(data, "nsdgeneral-raw.zarr", "none")
    ds32 = BetasDataset(raw_store, split="all", in_memory=True)
    ds16 = BetasDataset(raw_store, split="all", in_memory=True, dtype="int16")
    ram = np.array(ds16._mem[0].numpy())  # numpy's own array (its own huge pages)
    ram32 = ram.astype(np.float32)
    batches = np.random.default_rng(1).integers(0, N_TRIALS, (500, BATCH))
    assert np.array_equal(collate(ds16.__getitems__(batches[0]))["betas"].numpy(), ram[batches[0]])
    methods = {
        "numpy fancy index in RAM (int16)": lambda k: ram[batches[k]],
        "ours, in_memory, dtype=int16": lambda k: collate(ds16.__getitems__(batches[k]))["betas"],
        "numpy fancy index in RAM (float32)": lambda k: ram32[batches[k]],
        "ours, in_memory (float32)": lambda k: collate(ds32.__getitems__(batches[k]))["betas"],
    }
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in methods.items():
            best[name] = max(best.get(name, 0.0), rate(fn, BATCH, seconds, len(batches)))
    np16 = best["numpy fancy index in RAM (int16)"]
    print(f"In memory, batch {BATCH}, best of {rounds} rounds, load {os.getloadavg()[0]:.1f}")
    print("| read path | trial/s | x numpy int16 |\n|---|---:|---:|")
    for name, v in best.items():
        print(f"| {name} | {v:,.0f} | {v / np16:.2f} |")


def worker_rates(data: Path, rounds: int) -> None:
    """DataLoaders over the default store only: the main process's CPU per batch vs torch's
    no-op floor (a quick run of the end of the full benchmark)."""
    import torch

    from nsdzarr.prepare.storage import ROI_STORAGE
    from nsdzarr.training.loader import BetasDataset

    torch.set_num_threads(1)
    build(data)
    paths = {"none": "nsdgeneral-raw.zarr", "blosc-lz4": "nsdgeneral-lz4.zarr"}
    name = paths.get(ROI_STORAGE.codec, "nsdgeneral.zarr")
    store = build_copy(data, name, ROI_STORAGE.codec) if name != "nsdgeneral.zarr" else None
    store = store or data / "subj01" / "roi" / name
    warm_cache([store])
    dsets = {**floor_dsets(), "ours": BetasDataset(store, split="all")}
    configs = [(n, w, BATCH) for n in ("noop", "ours") for w in (0, 1, 2)]
    configs += [("noop, workers busy 1 ms", 2, BATCH)]
    configs += [("noop, workers make the batch", w, BATCH) for w in (1, 2)]
    rates = loader_rates(dsets, configs, rounds)
    own = own_unpickling(dsets["ours"], rounds)
    report_loader(rates, f"{ROI_STORAGE.codec} (ROI default)", own)
    print(f"load average: {os.getloadavg()[0]:.1f}")


def fallback_rates(data: Path, rounds: int, seconds: float) -> None:
    """``--fallbacks``: each private path next to its public fallback (``NSDZARR_DISABLE_PRIVATE``),
    on 4-session stores (zstd-1 and blosc-lz4): batches read in process (the decoders) and
    through 2 forked persistent workers (the batch transport); best of ``rounds``."""
    from torch.utils.data import DataLoader, RandomSampler

    from nsdzarr.prepare.demo import make_design
    from nsdzarr.prepare.storage import StorageSettings, roi_settings
    from nsdzarr.prepare.trials import write_trial_tables
    from nsdzarr.training import fallbacks
    from nsdzarr.training.loader import BetasDataset, collate

    subj = data / "fallbacks" / "subj01"
    stores = {c: subj / "roi" / f"{c}.zarr" for c in ("zstd", "blosc-lz4")}
    if not (subj / "trials.tsv").exists():
        import scipy.io

        subj.mkdir(parents=True, exist_ok=True)
        design = subj.parent / "nsd_expdesign.mat"
        scipy.io.savemat(design, make_design(0), format="5")
        tables = [subj / n for n in ("trials.tsv", "trials.json", "images.tsv")]
        write_trial_tables(design, "subj01", list(range(1, FB_SESSIONS + 1)), *tables)
    for codec, store in stores.items():
        if not (store / "zarr.json").exists():
            settings = roi_settings(StorageSettings(codec, 1 if codec == "zstd" else 5))
            write_random_betas(store, subj.parent / "betas.h5", FB_SESSIONS, settings)
    warm_cache(list(stores.values()))
    n = FB_SESSIONS * PER_SESSION
    batches = np.random.default_rng(1).integers(0, n, (500, BATCH))

    def dataset(store: Path, disable: str) -> BetasDataset:
        """A dataset whose seams were probed with ``disable`` (decoders made at first read)."""
        os.environ[fallbacks.ENV] = disable
        fallbacks.reset()
        ds = BetasDataset(store, split="all")
        ds.__getitems__(batches[0])
        return ds

    reads = {  # (codec, private or fallback): dataset
        (c, mode): dataset(store, "" if mode == "private" else "decoders")
        for c, store in stores.items()
        for mode in MODES
    }
    loaders = {}
    for mode, disable in (("private", ""), ("fallback", "transport")):
        dl = loaders[mode] = DataLoader(
            dataset(stores["zstd"], disable),
            batch_size=BATCH,
            sampler=RandomSampler(range(n), num_samples=300 * BATCH),
            num_workers=2,
            multiprocessing_context="fork",  # the workers keep the setting they were made with
            persistent_workers=True,
            prefetch_factor=4,
            collate_fn=collate,
        )
        for _ in dl:  # warm-up epoch: starts the workers
            pass
    os.environ.pop(fallbacks.ENV)
    for c in stores:  # the same batches either way
        a, b = (collate(reads[c, m].__getitems__(batches[1]))["betas"] for m in MODES)
        assert np.array_equal(a.numpy(), b.numpy())
    best: dict[tuple, float] = {}
    main_cpu: dict[str, float] = {}
    for _ in range(rounds):
        for key, ds in reads.items():
            fn = lambda k, d=ds: collate(d.__getitems__(batches[k]))["betas"]  # noqa: E731
            best[key] = max(best.get(key, 0.0), rate(fn, BATCH, seconds, len(batches)))
        for mode, dl in loaders.items():
            c0, t0 = cpu_seconds(os.getpid()), time.perf_counter()
            k = sum(1 for _ in dl)
            wall, cpu = time.perf_counter() - t0, cpu_seconds(os.getpid()) - c0
            if k * BATCH / wall > best.get(("loader", mode), 0.0):
                best["loader", mode] = k * BATCH / wall
                main_cpu[mode] = cpu / k * 1e6
    print(
        f"\nPrivate paths vs fallbacks, {n} x {N_VOX} int16 stores, batches of {BATCH}, "
        f"best of {rounds} rounds, load average {os.getloadavg()[0]:.1f}"
    )
    print("| seam | what | private trial/s | fallback trial/s | fallback / private |")
    print("|---|---|---:|---:|---:|")
    for c in stores:
        p, f = best[c, "private"], best[c, "fallback"]
        print(f"| decoders | in-process batches, {c} store | {p:,.0f} | {f:,.0f} | {f / p:.2f} |")
    p, f = best["loader", "private"], best["loader", "fallback"]
    print(
        f"| transport | DataLoader, 2 fork workers, zstd store (main CPU µs/batch "
        f"{main_cpu['private']:.0f} vs {main_cpu['fallback']:.0f}) | {p:,.0f} | {f:,.0f} | "
        f"{f / p:.2f} |"
    )


if __name__ == "__main__":
    main()
