"""Silent corruption is detected: every chunk of the session, ROI and stimulus stores carries a
crc32c (storage.chunk_codecs), so one flipped byte anywhere in a shard file (chunk data, a
chunk's checksum, the index or its checksum) is an error naming the file and the trial (or
image): from our row reader and the loader, from zarr-python, and from ``nsdzarr verify``.
The stores are copies of the shipped demo run's; the flips are real bytes on disk.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from torch.utils.data import DataLoader

from nsdzarr.errors import InputError
from nsdzarr.training.loader import BetasDataset
from nsdzarr.training.row_reader import ShardRows
from nsdzarr.training.zarr_v3 import EMPTY, index_nbytes, parse_layout

pytestmark = pytest.mark.slow  # every test reads the stores of a whole demo workflow run

REPO = Path(__file__).resolve().parents[1]
# kind: (store in the demo run, its big array, what a row is)
STORES = {
    "session": ("results/subj01/betas/session01.zarr", "betas", "trial"),
    "roi": ("results/subj01/roi/nsdgeneral.zarr", "betas", "trial"),
    "stimuli": ("results/stimuli/images.zarr", "images", "image"),
}


def copy_store(demo_run: Path, tmp_path: Path, kind: str) -> Path:
    """The demo's store copied under tmp_path with the same relative path (and trials.tsv)."""
    rel = STORES[kind][0]
    shutil.copytree(demo_run / rel, tmp_path / rel)
    tsv = Path("results/subj01/trials.tsv")
    (tmp_path / tsv).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(demo_run / tsv, tmp_path / tsv)
    return tmp_path / rel


def chunk_of(shard: Path, lay) -> list[tuple[int, int]]:
    """(offset, nbytes) of each chunk of a shard file, from its index."""
    n = index_nbytes(lay)
    idx = np.frombuffer(shard.read_bytes()[-n:], "<u8", count=2 * lay.n_inner).reshape(-1, 2)
    return [(int(o), int(b)) for o, b in idx if not (o == EMPTY and b == EMPTY)]


def flip(path: Path, pos: int) -> bytes:
    """Flip one bit of byte ``pos`` of ``path``; return the original bytes."""
    raw = path.read_bytes()
    bad = bytearray(raw)
    bad[pos] ^= 0x10
    path.write_bytes(bytes(bad))
    return raw


@pytest.mark.parametrize("kind", sorted(STORES))
def test_every_chunk_has_a_crc32c_and_zarr_python_reads_it(demo_run: Path, kind: str):
    rel, name, _ = STORES[kind]
    arr = zarr.open_array(demo_run / rel / name, mode="r")
    assert type(arr.compressors[-1]).__name__ == "Crc32cCodec"
    _, lay = parse_layout(demo_run / rel / name)
    assert lay is not None and lay.chunk_crc and lay.index_crc
    rows = np.arange(arr.shape[0])[::-1].copy()
    out = np.empty((len(rows), *arr.shape[1:]), lay.dtype)
    ShardRows(lay, 8).read_rows(rows, out)
    np.testing.assert_array_equal(out, arr[...][rows])  # our reader == zarr-python


@pytest.mark.parametrize("kind", sorted(STORES))
def test_a_flipped_byte_anywhere_in_a_shard_is_detected(demo_run: Path, tmp_path: Path, kind):
    store = copy_store(demo_run, tmp_path, kind)
    _, name, what = STORES[kind]
    _, lay = parse_layout(store / name)
    shard_no = 1 if lay.n_objects()[0] > 1 else 0
    shard = Path(lay.key((shard_no,) + (0,) * (len(lay.shape) - 1)))
    size = shard.stat().st_size
    chunks = chunk_of(shard, lay)
    first = shard_no * lay.grid[0]
    rows = np.arange(first, min(first + lay.grid[0], lay.shape[0]))
    out = np.empty((len(rows), *lay.shape[1:]), lay.dtype)
    reader = ShardRows(lay, 4, what)
    reader.read_rows(rows, out)
    good = out.copy()
    # each chunk's first, middle and last data byte, its checksum bytes; every index byte
    positions = {
        p for o, b in chunks for p in (o, o + (b - 4) // 2, o + b - 5, o + b - 4, o + b - 1)
    }
    positions |= set(range(size - index_nbytes(lay), size))
    positions |= set(np.random.default_rng(0).integers(0, size, 200).tolist())
    assert max(positions) == size - 1 and min(positions) == 0
    for pos in sorted(positions):
        raw = flip(shard, pos)
        try:
            k = next((c for c, (o, b) in enumerate(chunks) if o <= pos < o + b), None)
            trial = first if k is None else first + k * lay.inner[0]  # index: first row read
            with pytest.raises(InputError) as e:
                ShardRows(lay, 4, what).read_rows(rows, out)
            msg = str(e.value)
            assert msg.startswith(f"{shard}: {what} {trial}:") and "\n" not in msg, (pos, msg)
        finally:
            shard.write_bytes(raw)
    ShardRows(lay, 4, what).read_rows(rows, out)
    np.testing.assert_array_equal(out, good)
    # zarr-python's own crc32c codec refuses a flipped data byte too
    raw = flip(shard, chunks[-1][0])
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(store / name, mode="r")[int(rows[-1])]
    shard.write_bytes(raw)


def run_verify(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "nsdzarr.cli", "verify", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("kind", sorted(STORES))
def test_verify_names_the_shard_and_the_trial(demo_run: Path, tmp_path: Path, kind: str):
    store = copy_store(demo_run, tmp_path, kind)
    _, name, what = STORES[kind]
    _, lay = parse_layout(store / name)
    assert run_verify(store).returncode == 0
    shard = Path(lay.key((0,) * len(lay.shape)))
    chunks = chunk_of(shard, lay)
    flip(shard, chunks[3][0] + 1)  # one byte of row 3's data
    proc = run_verify(store)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(f"{shard}: ")]
    assert len(lines) == 1 and f"{what} 3 cannot be read" in lines[0], proc.stdout
    assert "checksum" in lines[0]


def test_loader_names_the_file_and_the_trial(demo_run: Path, tmp_path: Path):
    store = copy_store(demo_run, tmp_path, "roi")
    _, lay = parse_layout(store / "betas")
    clean = BetasDataset(store, split="all", pooled_batches=False)
    expected = np.concatenate([b["betas"].numpy() for b in DataLoader(clean, batch_size=64)])
    shard = Path(lay.key((1, 0)))
    trial = lay.grid[0] + 7
    flip(shard, chunk_of(shard, lay)[7][0] + 3)
    for workers in (0, 1):
        ds = BetasDataset(store, split="all", pooled_batches=False, verify_checksums=True)
        with pytest.raises(Exception) as e:  # a worker's error comes back as a RuntimeError
            for _ in DataLoader(ds, batch_size=64, num_workers=workers):
                pass
        assert f"{shard}: trial {trial}: " in str(e.value) and "crc32c" in str(e.value)
    # the documented default (checks cost > 10%): without checks the flipped value is read
    off = BetasDataset(store, split="all", pooled_batches=False)
    got = np.concatenate([b["betas"].numpy() for b in DataLoader(off, batch_size=64)])
    assert not np.array_equal(got, expected)


def test_image_loader_names_the_file_and_the_image(demo_run: Path, tmp_path: Path):
    roi = copy_store(demo_run, tmp_path, "roi")
    images = copy_store(demo_run, tmp_path, "stimuli")
    _, lay = parse_layout(images / "images")
    shard = Path(lay.key((0, 0, 0, 0)))
    flip(shard, chunk_of(shard, lay)[2][0])
    ds = BetasDataset(roi, split="all", images=images, pooled_batches=False, verify_checksums=True)
    with pytest.raises(InputError) as e:
        for _ in DataLoader(ds, batch_size=64):
            pass
    assert str(e.value).startswith(f"{shard}: image 2: ") and "crc32c" in str(e.value)
