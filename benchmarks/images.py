"""Benchmark stimulus images: imgBrick -> Zarr, image codecs, paired (betas, image) batches.

Usage: python benchmarks/images.py [--data DIR] [--images N] [--sessions S] [--rounds N]
                                   [--seconds S] [--batches N] [--parts convert,codecs,read]
                                   [--build-only]

Builds, if absent, under DIR/n{N}_s{S}/ (default DIR benchmarks/data/images/):

- ``nsd_stimuli.hdf5``: ``imgBrick`` N x 425 x 425 x 3 uint8 (default N = 4000, 2.2 GB),
  chunks (1, 425, 425, 3), uncompressed. Image i is seeded by i alone: a bicubic colour field,
  3-8 flat shapes with hard edges, a 1-pixel box blur, and mid-frequency texture of up to
  +-32 grey levels over part of the image (zstd-1 packs it ~1.3x, about what it does for
  photos; JPEG q95 ~50 kB). Written in 100-image blocks.
- ``subj01/roi/nsdgeneral.zarr``: ROI betas S x 750 trials x 15724 int16 (default S = 40, the
  subj01 size), built like ``benchmarks/loader.py`` with the ROI default codec (raw),
  ``betas.h5`` its contiguous HDF5 twin (what hand-written loaders read), and
  ``subj01/trials.tsv`` from the demo design with each nsd_id mapped into 0..N-1.
- ``jpeg_425.tar`` and ``jpeg_224.tar``: WebDataset-style tars (``{nsd_id:06d}.jpg``), JPEG
  quality 95, the 224 one pre-resized with the converter's Pillow LANCZOS.

Then measures, each figure beside its baseline in the same run (best of ``--rounds``):

1. convert: each variant in a fresh process (its own peak RSS): reading the source alone
   (h5py ``read_direct`` of 100-image blocks, the ceiling), naive h5py ``imgBrick[:]`` + one
   ``zarr.create_array(data=...)`` (1-image chunks, no shards, our default codec), ours
   (``convert_stimuli``) without and with ``sizes=(224,)``. ``--parts ratio``: only the source
   read and ours, each also cold (the source's pages evicted with ``posix_fadvise`` before the
   run, checked < 5% resident with ``fincore``); every run's output is fsynced after it, so
   its writeback does not bill the next run.
2. codecs: ours converted with none / blosc-lz4-5 / zstd-1: store size, random batch-of-32
   image reads (``ImageReader.read``) and one sequential pass (``iter_batches(50)``).
3. read: random batches of 32 (betas + image) per second at 425 and 224, one process and
   DataLoader(2 workers, persistent): ours (``BetasDataset(images=..)``), h5py kept open
   (a Dataset holding ``imgBrick`` and ``betas.h5`` open per process, sorted unique ids,
   one ``read_direct`` per image, Pillow BILINEAR resize at 224; h5py's own fancy index
   ``imgBrick[sorted ids]`` is a row of its own, one batch timed: it takes seconds), JPEG tar
   (indexed ``pread`` + Pillow decode, betas from h5py; at 224 pre-resized JPEGs, and 425
   decode + resize as a row), the ``webdataset`` package's own sequential pipeline (images
   only), numpy arrays in RAM (the limit). Ratios are to h5py kept open at the same size.

Prints one table (markdown) and the targets.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

SIDE, PER_SESSION, N_VOX, BATCH, SMALL = 425, 750, 15724, 32, 224
IMAGE_BYTES = SIDE * SIDE * 3
GEN_BLOCK = 100
MB = 1024**2
COLD = " [cold: source evicted]"
BASE_READ = "source read alone (h5py read_direct, 100-image blocks)"
OURS_COLD = "ours: convert_stimuli" + COLD
ZARR_WRITER = "ours: convert_stimuli, writer=zarr-python"
READ_WRITE_FLOOR = "floor: source read + one os.write per 50 images (no checks)"
CODECS = {  # name -> StimuliStorage fields
    "none": {"codec": "none"},
    "blosc-lz4-5": {"codec": "blosc-lz4", "level": 5},
    "zstd-1": {"codec": "zstd", "level": 1},
}


# --------------------------------------------------------------------------- data


def make_image(i: int, seed: int = 0) -> np.ndarray:
    """A 425 x 425 x 3 uint8 photo-like image, the same for the same ``i``: smooth colour,
    edges, texture (not white noise, so codec figures mean something)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng((seed, i))
    low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    base = Image.fromarray(low).resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = (int(v) for v in rng.integers(-50, SIDE, 2))
        w, h = (int(v) for v in rng.integers(30, 220, 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=fill)
        else:
            pts = [tuple(int(v) for v in rng.integers(-20, SIDE + 20, 2)) for _ in range(3)]
            draw.polygon(pts, fill=fill)
    base = base.filter(ImageFilter.BoxBlur(1))
    # texture (grass, fabric): mid-frequency noise, weighted by a smooth mask
    tex = rng.integers(0, 256, (SIDE // 3, SIDE // 3), dtype=np.uint8)
    tex = Image.fromarray(tex).resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    mask = rng.integers(0, 256, (3, 3), dtype=np.uint8)
    mask = Image.fromarray(mask).resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    tx = (np.asarray(tex, np.int16) - 128) * np.asarray(mask, np.int16) >> 10  # +-32 at most
    img = np.asarray(base, np.int16) + tx[:, :, None]
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def make_sample(i: int) -> tuple[int, np.ndarray, bytes, bytes]:
    """Image ``i``, its JPEG, and the JPEG of its converter-resized 224 copy."""
    from nsdzarr.prepare.stimuli import resize_images

    img = make_image(i)
    return i, img, jpeg(img), jpeg(resize_images(img[None], SMALL)[0])


def add_jpeg(tar: tarfile.TarFile, i: int, data: bytes) -> None:
    info = tarfile.TarInfo(f"{i:06d}.jpg")
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def build_images(data: Path, n: int) -> None:
    """imgBrick and the two JPEG tars, generated on 2 processes in 100-image blocks."""
    import h5py

    from nsdzarr.prepare.atomic import atomic_output

    h5, tars = data / "nsd_stimuli.hdf5", (data / "jpeg_425.tar", data / "jpeg_224.tar")
    if h5.exists() and all(t.exists() for t in tars):
        return
    t0 = time.perf_counter()
    print(f"generating {n} images into {h5} and {tars[0].name}, {tars[1].name} ...", flush=True)
    with (
        atomic_output(h5) as tmp_h5,
        atomic_output(tars[0]) as tmp_a,
        atomic_output(tars[1]) as tmp_b,
        h5py.File(tmp_h5, "w") as f,
        tarfile.open(tmp_a, "w", format=tarfile.USTAR_FORMAT) as tar_a,
        tarfile.open(tmp_b, "w", format=tarfile.USTAR_FORMAT) as tar_b,
        Pool(2) as pool,
    ):
        dset = f.create_dataset("imgBrick", (n, SIDE, SIDE, 3), np.uint8, chunks=(1, SIDE, SIDE, 3))
        block = np.empty((GEN_BLOCK, SIDE, SIDE, 3), np.uint8)
        for i, img, ja, jb in pool.imap(make_sample, range(n), chunksize=10):
            block[i % GEN_BLOCK] = img
            add_jpeg(tar_a, i, ja)
            add_jpeg(tar_b, i, jb)
            if i % GEN_BLOCK == GEN_BLOCK - 1 or i == n - 1:
                start = i - i % GEN_BLOCK
                dset[start : i + 1] = block[: i + 1 - start]
    print(f"generated in {time.perf_counter() - t0:.0f} s", flush=True)


def build_betas(data: Path, sessions: int, n_images: int) -> None:
    """The ROI store (project functions, ROI default codec), its HDF5 twin, the trials table."""
    import scipy.io
    from loader import write_random_betas  # benchmarks/loader.py: the same ROI store and twin

    from nsdzarr.prepare.atomic import atomic_output
    from nsdzarr.prepare.demo import make_design
    from nsdzarr.prepare.storage import roi_settings
    from nsdzarr.prepare.trials import write_trial_tables

    subj = data / "subj01"
    store, h5, tsv = subj / "roi" / "nsdgeneral.zarr", data / "betas.h5", subj / "trials.tsv"
    if not tsv.exists():
        subj.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(data / "nsd_expdesign.mat", make_design(0), format="5")
        write_trial_tables(
            data / "nsd_expdesign.mat",
            "subj01",
            list(range(1, sessions + 1)),
            data / "trials_73k.tsv",
            subj / "trials.json",
            subj / "images.tsv",
        )
        # every trial must show an image of the brick: each 73k id -> its rank mod N
        with open(data / "trials_73k.tsv", newline="") as fh:
            rows = list(csv.reader(fh, delimiter="\t"))
        col = rows[0].index("nsd_id")
        ids = np.array([int(r[col]) for r in rows[1:]])
        rank = np.unique(ids, return_inverse=True)[1] % n_images
        for r, v in zip(rows[1:], rank.tolist(), strict=True):
            r[col] = str(v)
        with atomic_output(tsv) as tmp, open(tmp, "w", newline="") as fh:
            csv.writer(fh, delimiter="\t", lineterminator="\n").writerows(rows)
    if (store / "zarr.json").exists() and h5.exists():
        return
    t0 = time.perf_counter()
    print(f"building {store} and {h5} ...", flush=True)
    write_random_betas(store, h5, sessions, roi_settings())
    print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)


def warm_cache(paths: list[Path]) -> None:
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def _fincore(paths: list[Path]) -> tuple[int, int] | None:
    """(bytes resident in the page cache, bytes) of every file under ``paths`` (util-linux
    ``fincore``), or None without fincore or files."""
    import shutil

    files = [str(f) for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    files = [f for f in files if os.path.isfile(f)]
    if not shutil.which("fincore") or not files:
        return None
    res = size = 0
    for a in range(0, len(files), 500):
        out = subprocess.run(
            ["fincore", "-b", "-n", "-r", "-o", "RES,SIZE", *files[a : a + 500]],
            capture_output=True,
            text=True,
        ).stdout.split()
        res += sum(int(v) for v in out[0::2])
        size += sum(int(v) for v in out[1::2])
    return res, size


def resident(paths: list[Path]) -> str:
    """How much of ``paths`` the page cache holds now, e.g. to show that read figures come
    from memory and not from the disk."""
    got = _fincore(paths)
    if got is None:
        return "page cache residency unknown (no fincore)"
    res, size = got
    return f"{res / MB:,.0f} of {size / MB:,.0f} MB in the page cache ({100 * res / size:.1f}%)"


def evict(path: Path, flush: bool = False, drop: bool = True) -> float:
    """Drop the page-cache pages of ``path`` (a file or every file under a folder), after
    ``fsync`` when ``flush`` (dirty pages are not dropped); the fraction still resident."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            if flush:
                os.fsync(fd)
            if drop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    got = _fincore([path])
    if got is None:
        raise RuntimeError("the cold variant needs util-linux fincore to check the eviction")
    return got[0] / max(1, got[1])


def trial_nsd_ids(data: Path) -> np.ndarray:
    with open(data / "subj01" / "trials.tsv", newline="") as fh:
        return np.array([int(r["nsd_id"]) for r in csv.DictReader(fh, delimiter="\t")])


# --------------------------------------------------------------------------- 1. conversion

PRELUDE = f"""
import json, resource, sys, time
sys.path.insert(0, {str(SRC)!r})
import numpy as np
"""

READ_ONLY = """
import h5py
t = time.perf_counter()
with h5py.File(SOURCE, "r", rdcc_nbytes=0) as f:  # no chunk cache: h5py's fastest read
    d = f["imgBrick"]
    buf = np.empty((100, *d.shape[1:]), np.uint8)
    for a in range(0, d.shape[0], 100):
        b = min(a + 100, d.shape[0])
        d.read_direct(buf, np.s_[a:b], np.s_[0 : b - a])
"""

# the floor of any conversion that leaves a store: the source read plus one write of its
# bytes, 50 images per file (no checksums, no index, no read-back)
READ_WRITE = """
import h5py, os
t = time.perf_counter()
os.makedirs(TARGET)
with h5py.File(SOURCE, "r", rdcc_nbytes=0) as f:
    d = f["imgBrick"]
    buf = np.empty((50, *d.shape[1:]), np.uint8)
    for a in range(0, d.shape[0], 50):
        b = min(a + 50, d.shape[0])
        d.read_direct(buf, np.s_[a:b], np.s_[0 : b - a])
        fd = os.open(os.path.join(TARGET, str(a)), os.O_WRONLY | os.O_CREAT)
        os.write(fd, buf[: b - a])
        os.close(fd)
"""

NAIVE = """
import h5py, zarr
from nsdzarr.prepare.storage import STIMULI_STORAGE, zarr_compressor
t = time.perf_counter()
with h5py.File(SOURCE, "r") as f:
    a = f["imgBrick"][:]
zarr.create_array(TARGET, data=a, chunks=(1, *a.shape[1:]),
                  compressors=zarr_compressor(STIMULI_STORAGE, 1))
"""

OURS = """
from nsdzarr.prepare.stimuli import convert_stimuli
from nsdzarr.prepare.storage import StimuliStorage
t = time.perf_counter()
REPORT = convert_stimuli(SOURCE, TARGET, sizes=SIZES, settings=StimuliStorage(**SETTINGS),
                         threads=2, writer=globals().get("WRITER"))
"""

EPILOGUE = """
wall = time.perf_counter() - t
use = resource.getrusage(resource.RUSAGE_SELF)
fig = {"wall": wall, "rss": use.ru_maxrss * 1024, "cpu": use.ru_utime + use.ru_stime}
if "REPORT" in globals():
    fig.update(read_s=REPORT["read_seconds"], verify_s=REPORT["verify_seconds"])
print(json.dumps(fig))
"""


def run_variant(body: str, source: Path, target: Path, **params: object) -> dict[str, float]:
    """Run one variant in a fresh interpreter; return its wall time, peak RSS, store size."""
    from nsdzarr.prepare.convert import store_stats

    header = f"SOURCE = {str(source)!r}\nTARGET = {str(target)!r}\n" + "".join(
        f"{k} = {v!r}\n" for k, v in params.items()
    )
    code = PRELUDE + header + textwrap.dedent(body) + EPILOGUE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"variant failed:\n{out.stderr[-3000:]}")
    fig = json.loads(out.stdout.strip().splitlines()[-1])
    fig["size"] = store_stats(target)[0] if target.exists() else 0
    return fig


def remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)


def convert_all(data: Path, parts: set[str], rounds: int) -> dict[str, dict[str, float]]:
    """Conversion figures (best of rounds, round-robin); leaves ``stores/{codec}.zarr``."""
    source, stores = data / "nsd_stimuli.hdf5", data / "stores"
    stores.mkdir(exist_ok=True)
    default = {"codec": "none"}  # STIMULI_STORAGE's codec, checked in main
    variants: list[tuple[str, str, dict[str, Any], str | None]] = []  # name, body, params, keep
    if "convert" in parts or "ratio" in parts:  # "ratio": only ours against the source read
        variants += [
            (BASE_READ, READ_ONLY, {}, None),
            ("ours: convert_stimuli", OURS, {"SIZES": (), "SETTINGS": default}, "none"),
        ]
    if "ratio" in parts:  # the hand-written shard writer against zarr-python's, same run
        variants += [
            (ZARR_WRITER, OURS, {"SIZES": (), "SETTINGS": default, "WRITER": "zarr-python"}, None),
            (READ_WRITE_FLOOR, READ_WRITE, {}, None),
        ]
    if "convert" in parts:
        variants.insert(1, ("naive: h5py imgBrick[:] + one zarr.create_array", NAIVE, {}, None))
    # the 224 conversion leaves the store the read benchmarks use
    keep_224 = "none-224" if "convert" in parts or "read" in parts else None
    if parts - {"ratio"}:
        variants.append(
            (
                "ours: convert_stimuli, sizes=(224,)",
                OURS,
                {"SIZES": (SMALL,), "SETTINGS": default},
                keep_224,
            )
        )
    if "codecs" in parts:
        for codec, settings in CODECS.items():
            if codec == "none" and "convert" in parts:
                continue  # the default: "ours: convert_stimuli" above
            variants.append(
                (f"ours, codec {codec}", OURS, {"SIZES": (), "SETTINGS": settings}, codec)
            )
    # "ratio" also runs its two variants cold: the source's pages evicted before each run (the
    # real 39.6 GB brick does not fit most page caches, so a user's conversion reads the disk)
    temps = [("", False)] + ([(COLD, True)] if "ratio" in parts else [])
    best: dict[str, dict[str, float]] = {}
    for r in range(rounds):
        for temp, cold in temps:
            for name, body, params, keep in variants:
                if cold and not name.startswith(("source read", "ours: convert_stimuli", "floor")):
                    continue
                if cold and "sizes=" in name:
                    continue
                target = stores / f"tmp_{r}.zarr"
                remove(target)
                if cold:
                    left = evict(source)
                    if left >= 0.05:
                        raise RuntimeError(f"{source}: {100 * left:.0f}% still cached")
                else:
                    warm_cache([source])
                fig = run_variant(body, source, target, **params)
                name += temp
                kept = keep and not cold and fig["wall"] < best.get(name, {"wall": np.inf})["wall"]
                if target.exists():  # written back now, so that it does not bill the next run
                    evict(target, flush=True, drop=not kept)
                if fig["wall"] < best.get(name, {"wall": np.inf})["wall"]:
                    best[name] = fig
                    if kept:
                        remove(stores / f"{keep}.zarr")
                        target.rename(stores / f"{keep}.zarr")
                remove(target)
                print(f"  convert round {r + 1}: {name}: {fig['wall']:.2f} s", flush=True)
    return best


# --------------------------------------------------------------------------- 3. paired reads


def as_is(batch: Any) -> Any:
    """collate_fn of the baselines: their ``__getitems__`` already returns the batch."""
    return batch


class H5Pairs:
    """The hand-written loader: imgBrick and betas.h5 kept open per process, batch reads."""

    def __init__(
        self, data: Path, size: int | None, nsd_id: np.ndarray, fancy: bool = False
    ) -> None:
        self.data, self.size, self.nsd_id, self.fancy = str(data), size, nsd_id, fancy
        self._files: Any = None
        self._pid = 0

    def __len__(self) -> int:
        return len(self.nsd_id)

    def _open(self) -> tuple[Any, Any]:
        import h5py

        if self._files is None or self._pid != os.getpid():
            self._files = (
                h5py.File(os.path.join(self.data, "nsd_stimuli.hdf5"), "r")["imgBrick"],
                h5py.File(os.path.join(self.data, "betas.h5"), "r")["betas"],
            )
            self._pid = os.getpid()
        return self._files

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": None, "_pid": 0}

    def __getitems__(self, idx: list[int]) -> dict[str, Any]:
        import torch
        from PIL import Image

        images, betas = self._open()
        idx = np.asarray(idx)
        # h5py reads increasing, unique indices only
        trials, t_inv = np.unique(idx, return_inverse=True)
        ids, i_inv = np.unique(self.nsd_id[idx], return_inverse=True)
        b = betas[trials][t_inv].astype(np.float32)
        if self.fancy:  # one h5py fancy-index read (slow: h5py selects point by point)
            img = images[ids][i_inv]
        else:  # one read_direct per image into the batch buffer
            buf = np.empty((len(ids), *images.shape[1:]), np.uint8)
            for j, i in enumerate(ids.tolist()):
                images.read_direct(buf, np.s_[i : i + 1], np.s_[j : j + 1])
            img = buf[i_inv]
        if self.size is not None:
            s = self.size
            img = np.stack(
                [
                    np.asarray(Image.fromarray(x).resize((s, s), Image.Resampling.BILINEAR))
                    for x in img
                ]
            )
        return {
            "betas": torch.from_numpy(b),
            "image": torch.from_numpy(img).permute(0, 3, 1, 2),
            "nsd_id": torch.from_numpy(self.nsd_id[idx]),
        }


class TarPairs(H5Pairs):
    """JPEGs from a tar by a member index (``pread``), decoded with Pillow; betas via h5py."""

    def __init__(self, data: Path, tar: str, nsd_id: np.ndarray, resize: int | None = None) -> None:
        super().__init__(data, resize, nsd_id)
        self.tar = os.path.join(data, tar)
        with tarfile.open(self.tar) as t:
            where = {int(m.name.split(".")[0]): (m.offset_data, m.size) for m in t.getmembers()}
        self.where = np.array([where[i] for i in range(len(where))], np.int64)
        self._fd = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_fd": -1}

    def __getitems__(self, idx: list[int]) -> dict[str, Any]:
        import torch
        from PIL import Image

        _, betas = self._open()
        if self._fd < 0 or self._pid != os.getpid():
            self._fd = os.open(self.tar, os.O_RDONLY)
        idx = np.asarray(idx)
        trials, t_inv = np.unique(idx, return_inverse=True)
        b = betas[trials][t_inv].astype(np.float32)
        ids = self.nsd_id[idx]
        out = None
        for j, i in enumerate(ids.tolist()):
            off, n = self.where[i]
            im = Image.open(io.BytesIO(os.pread(self._fd, int(n), int(off)))).convert("RGB")
            if self.size is not None:
                im = im.resize((self.size, self.size), Image.Resampling.BILINEAR)
            a = np.asarray(im)
            if out is None:
                out = np.empty((len(ids), *a.shape), np.uint8)
            out[j] = a
        return {
            "betas": torch.from_numpy(b),
            "image": torch.from_numpy(out).permute(0, 3, 1, 2),
            "nsd_id": torch.from_numpy(ids),
        }


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


def loader_rates(dsets: dict[str, Any], n_trials: int, batches: int, rounds: int):
    """Pairs/s of DataLoaders with 2 persistent workers (one warm-up epoch, best round)."""
    from torch.utils.data import DataLoader, RandomSampler

    from nsdzarr.training.loader import BetasDataset, collate

    loaders = {}
    for name, dset in dsets.items():
        loaders[name] = dl = DataLoader(
            dset,
            batch_size=BATCH,
            sampler=RandomSampler(range(n_trials), num_samples=batches * BATCH),
            num_workers=2,
            persistent_workers=True,
            collate_fn=collate if isinstance(dset, BetasDataset) else as_is,
        )
        for _ in dl:
            pass
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, dl in loaders.items():
            t0 = time.perf_counter()
            n = sum(1 for _ in dl)
            best[name] = max(best.get(name, 0.0), n * BATCH / (time.perf_counter() - t0))
    del loaders
    return best


def read_all(data: Path, n_images: int, rounds: int, seconds: float, batches: int):
    """One-process and 2-worker paired batch rates at 425 and 224 (pairs/s)."""
    import h5py
    import torch

    from nsdzarr.prepare.stimuli import resize_images
    from nsdzarr.training.loader import BetasDataset, collate
    from nsdzarr.training.readers import ImageReader

    torch.set_num_threads(1)
    roi = data / "subj01" / "roi" / "nsdgeneral.zarr"
    store = data / "stores" / "none-224.zarr"
    nsd_id = trial_nsd_ids(data)
    n_trials = len(nsd_id)
    cached = [roi, store, data / "betas.h5", data / "nsd_stimuli.hdf5"]
    cached += [data / "jpeg_425.tar", data / "jpeg_224.tar"]
    warm_cache(cached)
    print(f"  read inputs warmed: {resident(cached)}", flush=True)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, n_trials, (300, BATCH))

    ds = {s: BetasDataset(roi, split="all", images=store, image_size=s) for s in (None, SMALL)}
    betas_only = BetasDataset(roi, split="all")
    h5 = {s: H5Pairs(data, s, nsd_id) for s in (None, SMALL)}
    tar = {
        None: TarPairs(data, "jpeg_425.tar", nsd_id),
        SMALL: TarPairs(data, "jpeg_224.tar", nsd_id),
    }
    tar_resize = TarPairs(data, "jpeg_425.tar", nsd_id, resize=SMALL)

    # correctness before speed: ours == the brick (and the converter's resize), JPEG close
    for s in (None, SMALL):
        got = collate(ds[s].__getitems__(idx[0]))
        ref = h5[None].__getitems__(idx[0])
        want = ref["image"].permute(0, 2, 3, 1).numpy()
        if s is not None:
            want = resize_images(want, s)
        assert np.array_equal(got["betas"].numpy(), ref["betas"].numpy())
        assert np.array_equal(got["image"].permute(0, 2, 3, 1).numpy(), want)
        j = tar[s].__getitems__(idx[0])["image"].permute(0, 2, 3, 1).numpy()
        err = np.abs(j.astype(np.int16) - want).mean()
        assert err < 4, f"JPEG decode differs by {err:.1f} grey levels on average"

    methods: dict[str, Callable[[int], object]] = {
        "ours, betas only (no images)": lambda k: collate(betas_only.__getitems__(idx[k])),
    }
    for s in (None, SMALL):
        tag = s or SIDE
        methods[f"ours @{tag}"] = lambda k, s=s: collate(ds[s].__getitems__(idx[k]))
        methods[f"h5py kept open @{tag}"] = lambda k, s=s: h5[s].__getitems__(idx[k])
        methods[f"JPEG tar @{tag}"] = lambda k, s=s: tar[s].__getitems__(idx[k])
    methods[f"JPEG tar @{SIDE} + Pillow resize @{SMALL}"] = lambda k: tar_resize.__getitems__(
        idx[k]
    )

    try:
        import webdataset as wds

        def wds_stream(tarname: str) -> Callable[[int], object]:
            pipe = wds.WebDataset(str(data / tarname), shardshuffle=False, empty_check=False)
            pipe = pipe.decode("rgb8").to_tuple("jpg").batched(BATCH)
            state: dict[str, Any] = {"it": iter(pipe)}

            def run(k: int) -> object:
                try:
                    return next(state["it"])
                except StopIteration:
                    state["it"] = iter(pipe)
                    return next(state["it"])

            return run

        wds_methods = {
            f"webdataset {wds.__version__} stream @{SIDE} (images only, sequential)": wds_stream(
                "jpeg_425.tar"
            ),
            f"webdataset {wds.__version__} stream @{SMALL} (images only, sequential)": wds_stream(
                "jpeg_224.tar"
            ),
        }
    except ImportError:
        print("webdataset not installed: its rows are skipped")
        wds_methods = {}
    methods.update(wds_methods)

    best: dict[str, float] = {}
    for r in range(rounds):
        for name, fn in methods.items():
            slow = "JPEG" in name or "webdataset" in name
            v = rate(fn, BATCH, seconds * (2 if slow else 1), len(idx))
            best[name] = max(best.get(name, 0.0), v)
        print(f"  read round {r + 1}/{rounds} done; inputs: {resident(cached)}", flush=True)

    # the fancy-index form of the hand-written loader: one batch, it takes seconds
    fancy = H5Pairs(data, None, nsd_id, fancy=True)
    t0 = time.perf_counter()
    fancy.__getitems__(idx[0])
    best[f"h5py kept open @{SIDE}, imgBrick[sorted ids] fancy index (1 batch)"] = BATCH / (
        time.perf_counter() - t0
    )

    # numpy in RAM, the limit (loaded after the others so their page cache stays)
    with h5py.File(data / "betas.h5", "r") as f:
        ram: dict[Any, np.ndarray] = {"betas": f["betas"][:]}
    ram[None] = ImageReader(store).rows(np.arange(n_images))
    ram[SMALL] = ImageReader(store, SMALL).rows(np.arange(n_images))

    def ram_batch(k: int, s: int | None) -> dict[str, Any]:
        i = idx[k]
        return {
            "betas": torch.from_numpy(ram["betas"][i].astype(np.float32)),
            "image": torch.from_numpy(ram[s][nsd_id[i]]).permute(0, 3, 1, 2),
        }

    for _ in range(rounds):
        for s in (None, SMALL):
            name = f"numpy arrays in RAM @{s or SIDE}"
            v = rate(lambda k, s=s: ram_batch(k, s), BATCH, seconds, len(idx))
            best[name] = max(best.get(name, 0.0), v)
    ram.clear()

    dl = loader_rates(
        {
            f"ours @{SIDE}": ds[None],
            f"ours @{SMALL}": ds[SMALL],
            f"h5py kept open @{SIDE}": h5[None],
            f"h5py kept open @{SMALL}": h5[SMALL],
            f"JPEG tar @{SIDE}": tar[None],
            f"JPEG tar @{SMALL}": tar[SMALL],
        },
        n_trials,
        batches,
        rounds,
    )
    return best, dl


def codec_reads(
    data: Path, n_images: int, rounds: int, seconds: float
) -> dict[str, tuple[float, float]]:
    """Random batch-of-32 images/s and one sequential pass MB/s of each codec's store."""
    from nsdzarr.training.readers import ImageReader

    readers = {c: ImageReader(data / "stores" / f"{c}.zarr") for c in CODECS}
    warm_cache([data / "stores" / f"{c}.zarr" for c in CODECS])
    ids = np.random.default_rng(2).integers(0, n_images, (300, BATCH))
    ref = readers["none"].read(ids[0])
    for r in readers.values():
        assert np.array_equal(r.read(ids[0]), ref)
    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        for c, r in readers.items():
            batch = rate(lambda k, r=r: r.read(ids[k]), BATCH, seconds, len(ids))
            t0 = time.perf_counter()
            for _ in r.iter_batches(50):
                pass
            seq = n_images * IMAGE_BYTES / MB / (time.perf_counter() - t0)
            old = best.get(c, (0.0, 0.0))
            best[c] = (max(old[0], batch), max(old[1], seq))
    return best


# --------------------------------------------------------------------------- report


def machine() -> str:
    cpu = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in cpu if "model name" in ln), "?")
    mem = Path("/proc/meminfo").read_text().splitlines()
    ram = next(int(ln.split()[1]) for ln in mem if ln.startswith("MemTotal"))
    return (
        f"{os.cpu_count()} cores ({model}), {ram / 1024**2:.0f} GiB RAM, Python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "images")
    ap.add_argument("--images", type=int, default=4000, help="images in the brick (>= 64)")
    ap.add_argument("--sessions", type=int, default=40, help="ROI store sessions of 750 trials")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per figure (best is kept)")
    ap.add_argument("--seconds", type=float, default=1.0, help="minimum time per read figure")
    ap.add_argument("--batches", type=int, default=200, help="batches per DataLoader epoch")
    ap.add_argument(
        "--parts",
        default="convert,codecs,read",
        help="comma-separated subset; ratio: only our conversion against the source read",
    )
    ap.add_argument("--build-only", action="store_true")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    data = args.data / f"n{args.images}_s{args.sessions}"
    data.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    build_images(data, args.images)
    build_betas(data, args.sessions, args.images)
    if args.build_only:
        return

    import h5py
    import zarr

    from nsdzarr.prepare.storage import STIMULI_STORAGE, roi_settings

    assert STIMULI_STORAGE.codec == "none", "update the naive/default codec in this script"
    n, raw_mb = args.images, args.images * IMAGE_BYTES / MB
    conv = convert_all(data, parts, args.rounds)
    codecs = codec_reads(data, n, args.rounds, args.seconds) if "codecs" in parts else {}
    reads, dl = (
        read_all(data, n, args.rounds, args.seconds, args.batches) if "read" in parts else ({}, {})
    )

    with h5py.File(data / "nsd_stimuli.hdf5", "r") as f:
        chunks = f["imgBrick"].chunks
    rows: list[tuple[str, ...]] = []
    base_read = conv.get(BASE_READ)
    for name, fig in conv.items():
        base = conv.get(BASE_READ + COLD) if name.endswith(COLD) else base_read
        ratio = f"{base['wall'] / fig['wall']:.2f}" if base else "-"
        if "read_s" in fig:
            name += f" (reads {fig['read_s']:.1f} s, verify {fig['verify_s']:.1f} s)"
        name += f" [process CPU {fig['cpu']:.1f} s]"  # imports included
        rows.append(
            (
                "convert (x source read)",
                name,
                f"{n / fig['wall']:,.0f} img/s",
                f"{raw_mb / fig['wall']:,.0f}",
                ratio,
                f"{fig['rss'] / MB:,.0f}",
                f"{fig['size'] / MB:,.0f}" if fig["size"] else "-",
            )
        )
    for c, (batch, seq) in codecs.items():
        size = conv[codec_variant(c, conv)]["size"]
        rows.append(
            (
                "codec: random batch-32 (x none)",
                f"{c}: {raw_mb * MB / size:.2f}x smaller than raw; one sequential pass "
                f"{seq:,.0f} MB/s",
                f"{batch:,.0f} img/s",
                f"{batch * IMAGE_BYTES / MB:,.0f}",
                f"{batch / codecs['none'][0]:.2f}",
                "-",
                f"{size / MB:,.0f}",
            )
        )
    for name, v in reads.items():
        size = image_side(name)
        base = reads.get(f"h5py kept open @{size}")
        rows.append(
            (
                "paired batch-32, 1 process (x h5py)",
                name,
                f"{v:,.0f} pairs/s",
                f"{v * size * size * 3 / MB:,.0f}" if "betas only" not in name else "-",
                f"{v / base:.2f}" if base and "betas only" not in name else "-",
                "-",
                "-",
            )
        )
    for name, v in dl.items():
        size = image_side(name)
        base = dl[f"h5py kept open @{size}"]
        rows.append(
            (
                "paired batch-32, DataLoader 2 workers (x h5py)",
                name,
                f"{v:,.0f} pairs/s",
                f"{v * size * size * 3 / MB:,.0f}",
                f"{v / base:.2f}",
                "-",
                "-",
            )
        )
    print()
    print(
        f"{n} images {SIDE}x{SIDE}x3 uint8 ({raw_mb:,.0f} MB), imgBrick chunks {chunks}, "
        f"uncompressed; ROI betas {args.sessions * PER_SESSION} x {N_VOX} int16 "
        f"({roi_settings().codec}, the ROI default); "
        f"page cache warm (rows marked cold: the source's pages evicted before each run; every "
        f"output fsynced after its run); best of {args.rounds} rounds; "
        f"zarr {zarr.__version__}, h5py {h5py.__version__}; {machine()}"
    )
    print("| part | variant | rate | MB/s | ratio | peak RSS MB | store MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")

    print("\nTargets:")
    if base_read:
        for name in ("ours: convert_stimuli", "ours: convert_stimuli, sizes=(224,)", OURS_COLD):
            if name not in conv:
                continue
            base = conv[BASE_READ + COLD] if name == OURS_COLD else base_read
            x = base["wall"] / conv[name]["wall"]
            print(f"- {name}: {x:.2f}x the source read alone (target >= 0.5): {verdict(x >= 0.5)}")
        for temp in ("", COLD):
            floor = conv.get(READ_WRITE_FLOOR + temp)
            if floor:
                x = conv[BASE_READ + temp]["wall"] / floor["wall"]
                y = floor["wall"] / conv["ours: convert_stimuli" + temp]["wall"]
                print(f"- {READ_WRITE_FLOOR}{temp}: {x:.2f}x the source read; ours {y:.2f}x it")
    if reads:
        ours, h5v, jp = (reads[f"{k} @{SMALL}"] for k in ("ours", "h5py kept open", "JPEG tar"))
        print(
            f"- paired batch-32 @224, one process: ours {ours / h5v:.2f}x h5py kept open "
            f"(target >= 1): {verdict(ours >= h5v)}; {ours / jp:.1f}x the JPEG tar (target "
            f">= 10): {verdict(ours >= 10 * jp)}"
        )
    if codecs:
        print(f"- codecs: {recommend(codecs, conv, raw_mb)}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average now {os.getloadavg()}")


def image_side(name: str) -> int:
    """The image size a read row's name gives after its '@' (425 when none)."""
    found = re.search(r"@(\d+)", name)
    return int(found.group(1)) if found else SIDE


def codec_variant(codec: str, conv: dict[str, Any]) -> str:
    """The conversion that wrote ``stores/{codec}.zarr``."""
    name = f"ours, codec {codec}"
    return name if name in conv else "ours: convert_stimuli"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def recommend(codecs: dict[str, tuple[float, float]], conv: dict[str, Any], raw_mb: float) -> str:
    """The smallest store whose random reads keep >= 0.8x the raw store's rate, else raw."""
    fast = [c for c in codecs if codecs[c][0] >= 0.8 * codecs["none"][0]]
    pick = min(fast, key=lambda c: conv[codec_variant(c, conv)]["size"])
    sizes = {c: raw_mb / conv[codec_variant(c, conv)]["size"] * MB for c in codecs}
    return (
        f"recommend {pick} (smallest store with random reads >= 0.8x raw; "
        + ", ".join(
            f"{c}: {sizes[c]:.2f}x smaller, {codecs[c][0] / codecs['none'][0]:.2f}x reads"
            for c in codecs
        )
        + ")"
    )


if __name__ == "__main__":
    main()
