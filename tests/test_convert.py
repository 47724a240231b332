"""Session HDF5 -> Zarr conversion: lossless in both strategies, atomic, verified."""

from __future__ import annotations

import filecmp
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from conftest import REPO

from nsdzarr.errors import InputError, VerificationError
from nsdzarr.prepare import layout, memory
from nsdzarr.prepare.convert import convert_session, plane_checksums, verify_store
from nsdzarr.prepare.demo import DemoSpec, affine, write_betas_hdf5, write_synthetic_session
from nsdzarr.prepare.memory import plan_conversion
from nsdzarr.prepare.storage import StorageSettings
from nsdzarr.prepare.verify import READERS


def demo_session(root: Path, session: int = 1) -> Path:
    spec = DemoSpec()
    return layout.betas_path(root, "subj01", spec.space, spec.beta_version, session)


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(a / d, b / d) for d in cmp.common_dirs)


def test_both_strategies_write_identical_lossless_stores(demo_root: Path, tmp_path: Path):
    source = demo_session(demo_root)
    aff = affine(DemoSpec().shape_xyz)
    whole = convert_session(source, tmp_path / "a.zarr", strategy="in-memory", affine=aff)
    slabs = convert_session(
        source, tmp_path / "b.zarr", strategy="slabs", affine=aff, scratch_dir=str(tmp_path)
    )
    assert (whole.strategy, slabs.strategy) == ("in-memory", "slabs")
    assert same_tree(tmp_path / "a.zarr", tmp_path / "b.zarr")
    group = zarr.open_group(tmp_path / "a.zarr", mode="r")
    with h5py.File(source, "r") as f:
        np.testing.assert_array_equal(group["betas"][...], f["betas"][...])
    assert group["betas"].shards == (50, 16, 24, 20)
    assert group["betas"].chunks == (1, 16, 24, 20)
    assert whole.store_files <= 32
    attrs = group.attrs.asdict()
    assert attrs["source"]["path"] == str(source.resolve())
    assert attrs["source"]["size"] == source.stat().st_size
    assert attrs["scale"] == 300 and attrs["axes"] == ["trial", "z", "y", "x"]
    assert attrs["shape_nifti_xyz"] == [20, 24, 16]
    np.testing.assert_array_equal(attrs["affine"], aff)
    assert not list(tmp_path.glob("nsdzarr-rechunk-*")), "scratch store left behind"


def test_budget_chooses_the_strategy(demo_root: Path, tmp_path: Path):
    source = demo_session(demo_root)
    shape = (750, 16, 24, 20)
    big = plan_conversion(shape, 2, 50, None)
    assert big.strategy == "in-memory"
    small = plan_conversion(shape, 2, 50, big.peak_bytes - 1)
    # (slabs of a session this small cost more than holding it: an estimate refuses that
    # ceiling; test_estimates checks real-size plans fit their budgets)
    assert small.strategy == "slabs" and small.planes_per_slab >= 1
    report = convert_session(source, tmp_path / "c.zarr", memory_budget_bytes=big.peak_bytes - 1)
    assert report.strategy == "slabs"


@pytest.mark.parametrize("codec", ["blosc-zstd", "blosc-lz4", "zstd"])
def test_codecs_and_shards_round_trip(demo_root: Path, tmp_path: Path, codec: str):
    source = demo_session(demo_root, 2)
    settings = StorageSettings(codec=codec, level=3, trials_per_chunk=5, trials_per_shard=250)
    report = convert_session(source, tmp_path / "s.zarr", settings)
    betas = zarr.open_group(tmp_path / "s.zarr", mode="r")["betas"]
    assert betas.chunks[0] == 5 and betas.shards[0] == 250
    assert report.store_files == 3 + 4
    with h5py.File(source, "r") as f:
        np.testing.assert_array_equal(betas[...], f["betas"][...])


@pytest.mark.parametrize("reader", READERS)
def test_verification_catches_a_changed_value(demo_root: Path, tmp_path: Path, reader: str):
    convert_session(demo_session(demo_root), tmp_path / "v.zarr")
    group = zarr.open_group(tmp_path / "v.zarr", mode="r+")
    betas = group["betas"]
    expected = group["plane_checksums"][...]
    assert expected.shape == (750, 16)
    array_dir = tmp_path / "v.zarr" / "betas"
    assert verify_store(array_dir, expected, tmp_path / "v.zarr", reader) == reader  # intact
    np.testing.assert_array_equal(plane_checksums(betas[:50]), expected[:50])
    # the same values moved to another voxel of the plane must be caught too
    plane = betas[200, 8]
    betas[200, 8] = np.roll(plane, 1, axis=1)
    betas[123, 8, 12, 10] = betas[123, 8, 12, 10] + 1
    with pytest.raises(
        VerificationError, match=r"v\.zarr: store differs from its source at trials \[123, 200\]"
    ):
        verify_store(array_dir, expected, tmp_path / "v.zarr", reader)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_text("not hdf5"), "not an HDF5 file"),
        (lambda p: h5py.File(p, "w").create_dataset("data", data=np.zeros((2, 2, 2, 2))), "betas"),
    ],
)
def test_bad_source_gives_one_line_and_no_output(tmp_path: Path, make, problem: str):
    source = tmp_path / "betas_session01.hdf5"
    made = make(source)
    if hasattr(made, "file"):
        made.file.close()
    with pytest.raises(InputError) as err:
        convert_session(source, tmp_path / "out.zarr")
    assert str(err.value).startswith(str(source)) and problem in str(err.value)
    assert "\n" not in str(err.value)
    assert not [p for p in tmp_path.iterdir() if p != source]


@pytest.mark.slow  # a 72 MB session in a subprocess
def test_killed_conversion_never_leaves_a_complete_looking_store(tmp_path: Path):
    source = tmp_path / "big.hdf5"
    rng = np.random.default_rng(0)
    write_betas_hdf5(source, rng.integers(-900, 900, size=(750, 30, 40, 40), dtype=np.int16))
    target = tmp_path / "out.zarr"
    code = (
        "import sys; sys.path.insert(0, sys.argv[3]);"
        "from nsdzarr.prepare.convert import convert_session;"
        "convert_session(sys.argv[1], sys.argv[2], strategy='slabs')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(source), str(target), str(REPO / "src")]
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.zarr.incomplete-*/betas/c")):
        assert time.monotonic() < deadline and proc.poll() is None, "writer never started"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    assert list(tmp_path.glob(".out.zarr.incomplete-*"))
    convert_session(source, target)
    assert not list(tmp_path.glob(".out.zarr.incomplete-*")), "stale temporary not removed"
    with h5py.File(source, "r") as f:
        np.testing.assert_array_equal(
            zarr.open_group(target, mode="r")["betas"][...], f["betas"][...]
        )


@pytest.mark.parametrize("reader", READERS)
def test_a_shard_damaged_before_the_rename_fails_the_conversion(
    demo_root: Path, tmp_path: Path, monkeypatch, reader: str
):
    from nsdzarr.prepare import convert

    real = convert.ShardIO.write

    def write(io, t0: int, block: np.ndarray) -> None:  # test seam: damage the real file
        real(io, t0, block)
        if t0 == 100:
            path = Path(io.shard_file(t0))
            data = bytearray(path.read_bytes())
            data[len(data) // 3] ^= 0xFF
            path.write_bytes(bytes(data))

    monkeypatch.setattr(convert.ShardIO, "write", write)
    monkeypatch.setattr(convert, "default_reader", lambda: reader)
    other = tmp_path / "q.zarr"
    with pytest.raises(
        VerificationError,
        match=rf"q\.zarr: .*(trials 100\.\.149 unreadable by {reader}|at trials \[1\d\d)",
    ):
        convert_session(demo_session(demo_root), other, threads=2)
    assert not other.exists() and not list(tmp_path.glob(".q.zarr*"))


def peak_in_subprocess(code: str) -> list:
    """Run ``code`` in a fresh interpreter; the JSON list it prints last."""
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


# VmHWM, not ru_maxrss: Linux carries the forking parent's (pytest's) peak into ru_maxrss
STATUS = """
def status(key):
    line = next(line for line in open("/proc/self/status") if line.startswith(key))
    return int(line.split()[1]) * 1024
"""


@pytest.mark.slow  # a 125 MB session converted in a subprocess
def test_bounded_conversion_with_its_read_back_stays_within_the_model(tmp_path: Path):
    # The read-back (verify_store) runs after the slabs are written and holds two shards;
    # the model counts it (memory.read_back_bytes) in the convert's peak.
    source = write_synthetic_session(tmp_path / "s.hdf5", (40, 52, 40))
    shape, per_shard = (750, 40, 52, 40), 150
    budget = memory.in_memory_peak(shape, 2, per_shard) - 1
    plan = plan_conversion(shape, 2, per_shard, budget)
    assert plan.strategy == "slabs" and plan.peak_bytes <= budget
    target = tmp_path / "s.zarr"
    strategy, predicted, peak = peak_in_subprocess(f"""{STATUS}
import json
from nsdzarr.prepare.convert import convert_session
from nsdzarr.prepare.storage import StorageSettings
r = convert_session({str(source)!r}, {str(target)!r},
                    StorageSettings(trials_per_shard={per_shard}), memory_budget_bytes={budget})
print(json.dumps([r.strategy, r.predicted_peak_bytes, status("VmHWM")]))
""")
    assert (strategy, predicted) == ("slabs", plan.peak_bytes)
    assert peak <= predicted, (peak / memory.MB, predicted / memory.MB)
    # the read-back alone, in a fresh process: what it adds to the RSS it starts from
    start, end = peak_in_subprocess(f"""{STATUS}
import json
import zarr
from nsdzarr.prepare.convert import verify_store
sums = zarr.open_group({str(target)!r}, mode="r")["plane_checksums"][...]
start = status("VmRSS")
verify_store({str(target / "betas")!r}, sums, {str(target)!r})
print(json.dumps([start, status("VmHWM")]))
""")
    shard = per_shard * math.prod(shape[1:]) * 2
    assert end - start <= memory.read_back_bytes(shard), ((end - start) / memory.MB, shard)
