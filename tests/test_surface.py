"""Surface spaces: nativesurface HDF5 and fsaverage MGH betas -> Zarr session and ROI stores."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import zarr
from conftest import run_snakemake

from nsdzarr.errors import InputError
from nsdzarr.prepare import layout
from nsdzarr.prepare.convert import convert_session
from nsdzarr.prepare.demo import write_mgh, write_surface_session
from nsdzarr.prepare.estimate import write_session_estimate
from nsdzarr.prepare.resources import job_mem_mb
from nsdzarr.prepare.roi import extract_session, finish_store
from nsdzarr.prepare.storage import ROI_STORAGE, StorageSettings

VERSION = "betas_fithrf_GLMdenoise_RR"
COUNTS = {"fsaverage": (162, 162), "nativesurface": (190, 185)}


def source_rows(path: Path) -> np.ndarray:
    """A hemisphere file's betas as ``(trials, vertices)``, read the way peers read them."""
    if path.suffix == ".mgh":
        return np.asarray(nib.load(path).get_fdata(dtype=np.float32))[:, 0, 0, :].T
    with h5py.File(path, "r") as f:
        return f["betas"][...]


def make_session(root: Path, space: str, session: int, counts=None, seed: int = 0) -> list[Path]:
    """Write one session's ``[lh, rh]`` files as NSD lays them out; return their paths."""
    paths = layout.surface_betas_paths(root, "subj01", space, VERSION, session)
    rng = np.random.default_rng([seed, session])
    for path, n in zip(paths, counts or COUNTS[space], strict=True):
        write_surface_session(path, rng.standard_normal((750, n)).astype(np.float32) * 2)
    return paths


def make_labels(root: Path, space: str, counts=None) -> list[Path]:
    """``{lh,rh}.nsdgeneral.mgz``: -1 on the first tenth, 1 on the last half, 0 between."""
    paths = layout.surface_label_paths(root, "subj01", space, "nsdgeneral.mgz")
    for path, n in zip(paths, counts or COUNTS[space], strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        pos = np.linspace(0, 1, n)
        write_mgh(path, np.where(pos < 0.1, -1, pos > 0.5).astype(np.int32)[:, None, None])
    return paths


def write_trials(path: Path, sessions: list[int]) -> None:
    """A minimal trials.tsv: every 5th trial is a test trial."""
    rows = ["trial\tsession\trun\ttrial_in_session\timage_10k\tnsd_id\tshared1000\trepeat\tsplit"]
    for s in sessions:
        for t in range(750):
            test = t % 5 == 0
            g = (s - 1) * 750 + t
            rows.append(f"{g}\t{s}\t1\t{t}\t{g}\t{g}\t{test}\t0\t{'test' if test else 'train'}")
    path.write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("space", ["fsaverage", "nativesurface"])
def test_session_store_equals_source(tmp_path: Path, space: str) -> None:
    paths = make_session(tmp_path, space, 1)
    target = tmp_path / "session01.zarr"
    report = convert_session(paths, target, StorageSettings(trials_per_shard=50), threads=2)
    group = zarr.open_group(target, mode="r")
    for hemi, path, n in zip(layout.HEMISPHERES, paths, COUNTS[space], strict=True):
        want = source_rows(path)
        arr = group[hemi]
        assert arr.shape == (750, n) and arr.shards == (50, n) and arr.chunks == (1, n)
        assert arr.dtype == (np.float32 if space == "fsaverage" else np.int16)
        assert np.array_equal(arr[...], want)  # lossless, not rescaled
    attrs = group.attrs.asdict()
    assert attrs["space"] == space
    assert attrs["hemispheres"] == dict(zip(("lh", "rh"), COUNTS[space], strict=True))
    assert attrs["scale"] == (1 if space == "fsaverage" else 300)
    assert group["checksums"].shape == (750, 2)
    assert report.strategy == ("stream" if space == "fsaverage" else "whole-hemisphere")


def test_trial_chunked_hdf5_streams(tmp_path: Path) -> None:
    """Any HDF5 chunking is read: trial-chunked files stream by trial blocks."""
    paths = layout.surface_betas_paths(tmp_path, "subj01", "nativesurface", VERSION, 1)
    rng = np.random.default_rng(1)
    for path, n in zip(paths, (70, 60), strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            f.create_dataset("betas", data=rng.integers(-900, 900, (750, n), dtype=np.int16),
                             chunks=(10, n))  # fmt: skip
    report = convert_session(paths, tmp_path / "s.zarr")
    assert report.strategy == "stream"
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    for hemi, path in zip(("lh", "rh"), paths, strict=True):
        assert np.array_equal(group[hemi][...], source_rows(path))


def test_verification_catches_a_changed_shard(tmp_path: Path, monkeypatch) -> None:
    """The verify step compares every shard with the source checksums (a corrupt write fails)."""
    from nsdzarr.errors import VerificationError
    from nsdzarr.prepare import convert as conv

    paths = make_session(tmp_path, "fsaverage", 1)
    real = conv.ShardIO.write

    def flip(self, t0, block):
        block = block.copy()
        if t0 == 100:
            block[3, 7] += 1
        real(self, t0, block)

    monkeypatch.setattr(conv.ShardIO, "write", flip)
    with pytest.raises(VerificationError, match="trials \\[103\\]"):
        convert_session(paths, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(
    "space", ["fsaverage", pytest.param("nativesurface", marks=pytest.mark.slow)]
)
def test_roi_store_from_labels(tmp_path: Path, space: str) -> None:
    from nsdzarr.training import BetasDataset

    labels = make_labels(tmp_path, space)
    trials = tmp_path / "subj01" / "trials.tsv"
    trials.parent.mkdir()
    write_trials(trials, [1, 2])
    parts, want = [], []
    masks = [np.asarray(nib.load(p).dataobj).reshape(-1) == 1 for p in labels]
    for s in (1, 2):
        paths = make_session(tmp_path, space, s, seed=3)
        part = tmp_path / f"part{s}.zarr"
        source = [str(p) for p in paths]
        if s == 2:  # the second session from its converted store (its files deleted)
            convert_session(paths, tmp_path / "s2.zarr")
            source = str(tmp_path / "s2.zarr")
        extract_session(source, [str(p) for p in labels], None, trials, s, part, ROI_STORAGE)
        parts.append(part)
        want.append(
            np.concatenate(
                [source_rows(p)[:, m] for p, m in zip(paths, masks, strict=True)], axis=1
            )
        )
    store = tmp_path / "subj01" / "roi" / "nsdgeneral.zarr"
    finish_store(parts, [1, 2], [str(p) for p in labels], None, store, ROI_STORAGE)
    group = zarr.open_group(store, mode="r")
    rows = np.concatenate(want)
    assert np.array_equal(group["betas"][...], rows)
    hemi, vertex = group["hemisphere"][...], group["vertex"][...]
    for h, m in enumerate(masks):
        assert np.array_equal(vertex[hemi == h], np.flatnonzero(m))
    assert "voxels" not in group
    train = np.arange(750) % 5 != 0
    for s in range(2):
        x = want[s][train].astype(np.float64)
        np.testing.assert_allclose(group["mean"][s], x.mean(0), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(group["std"][s], x.std(0), rtol=1e-5, atol=1e-4)
    # the loader reads it unchanged: raw values, psc (scale 1 for fsaverage) and z-scores
    ds = BetasDataset(store, split="all", normalize="psc")
    got = np.stack([ds[i]["betas"].numpy() for i in (0, 751)])
    scale = 1 if space == "fsaverage" else 300
    np.testing.assert_allclose(got, rows[[0, 751]] / scale, rtol=1e-6)
    z = BetasDataset(store, split="train", normalize="session_zscore")
    assert z[0]["betas"].shape == (rows.shape[1],)


def test_missing_hemisphere(tmp_path: Path) -> None:
    lh, rh = make_session(tmp_path, "fsaverage", 1)
    rh.unlink()
    with pytest.raises(InputError, match=r"rh\.betas_session01\.mgh: hemisphere file not found"):
        convert_session([lh, rh], tmp_path / "s.zarr")
    with pytest.raises(InputError, match=r"rh\.betas_session01\.mgh: hemisphere file not found"):
        layout.sessions_present(tmp_path, "subj01", "fsaverage", VERSION)
    assert not (tmp_path / "s.zarr").exists()


def test_wrong_mgh_shape(tmp_path: Path) -> None:
    lh, rh = make_session(tmp_path, "fsaverage", 1)
    write_mgh(rh, np.zeros((162, 750, 1), np.float32))  # trials where frames belong
    with pytest.raises(InputError) as err:
        convert_session([lh, rh], tmp_path / "s.zarr")
    assert str(err.value).startswith(f"{rh}: MGH shape (162, 750, 1)")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "s.zarr").exists()


def test_vertex_count_differs_between_sessions(tmp_path: Path) -> None:
    make_session(tmp_path, "fsaverage", 1)
    second = make_session(tmp_path, "fsaverage", 2, counts=(162, 150))
    target = tmp_path / "est.json"
    with pytest.raises(InputError) as err:
        write_session_estimate(second, target, StorageSettings())
    assert str(err.value).startswith(f"{second[1]}: 150 vertices, but rh.betas_session01.mgh")
    assert not target.exists()


def test_label_vertex_count_differs(tmp_path: Path) -> None:
    paths = make_session(tmp_path, "nativesurface", 1)
    labels = make_labels(tmp_path, "nativesurface", counts=(190, 184))
    trials = tmp_path / "trials.tsv"
    write_trials(trials, [1])
    part = tmp_path / "part.zarr"
    with pytest.raises(InputError) as err:
        extract_session(paths, labels, None, trials, 1, part, ROI_STORAGE)
    assert str(err.value) == (
        f"{labels[1]}: 184 vertices, but the rh betas have 185 (labels of another surface?)"
    )
    assert not part.exists()


def test_estimate_predicts_the_jobs(tmp_path: Path) -> None:
    paths = make_session(tmp_path, "nativesurface", 1)
    labels = make_labels(tmp_path, "nativesurface")
    target = tmp_path / "est.json"
    est = write_session_estimate(
        paths, target, StorageSettings(), ceiling_mb=16000, rois={"g": (labels, None)}
    )
    assert json.loads(target.read_text()) == est
    assert est["source"]["hemispheres"] == {"lh": 190, "rh": 185}
    assert est["raw_bytes"] == 750 * 375 * 2
    assert est["jobs"]["convert"]["strategy"] == "whole-hemisphere"
    assert est["jobs"]["roi_session/g"]["voxels"] == sum(
        int((np.asarray(nib.load(p).dataobj) == 1).sum()) for p in labels
    )
    assert job_mem_mb(target, "convert") == est["jobs"]["convert"]["mem_mb"] > 0
    with pytest.raises(InputError, match=r"memory\.ceiling_mb 100 is below"):
        write_session_estimate(paths, tmp_path / "e2.json", StorageSettings(), ceiling_mb=100)


@pytest.mark.slow
@pytest.mark.parametrize("space", ["fsaverage", "nativesurface"])
def test_workflow_surface_demo(tmp_path: Path, space: str) -> None:
    """The demo in a surface space: session and ROI stores equal nibabel's / h5py's reads."""
    from nsdzarr.training import BetasDataset

    config = {
        "nsd_root": "resources/demo_nsd",
        "demo": True,
        "subjects": ["subj01"],
        "sessions": [1, 2],
        "space": space,
        "rois": {"V1": {"file": "prf-visualrois.mgz", "labels": [1, 2]}},
        "stimuli": {"enabled": False},
    }
    run_snakemake(tmp_path, config=config)
    root = tmp_path / "resources" / "demo_nsd"
    labels = layout.surface_label_paths(root, "subj01", space, "prf-visualrois.mgz")
    masks = [np.isin(np.asarray(nib.load(p).dataobj).reshape(-1), [1, 2]) for p in labels]
    want = []
    for s in (1, 2):
        paths = layout.surface_betas_paths(root, "subj01", space, VERSION, s)
        group = zarr.open_group(tmp_path / f"results/subj01/betas/session{s:02d}.zarr", mode="r")
        for hemi, path in zip(("lh", "rh"), paths, strict=True):
            assert np.array_equal(group[hemi][...], source_rows(path))
        want.append(
            np.concatenate(
                [source_rows(p)[:, m] for p, m in zip(paths, masks, strict=True)], axis=1
            )
        )
        est = json.loads((tmp_path / f"results/subj01/estimates/session{s:02d}.json").read_text())
        assert est["jobs"]["convert"]["mem_mb"] > 0 and "roi_session/V1" in est["jobs"]
    store = tmp_path / "results/subj01/roi/V1.zarr"
    assert np.array_equal(zarr.open_group(store, mode="r")["betas"][...], np.concatenate(want))
    ds = BetasDataset(store, split="all")
    assert np.array_equal(ds[760]["betas"].numpy(), want[1][10])


@pytest.mark.parametrize("space", ["fsaverage", "nativesurface"])
def test_blocks_cover_the_hemisphere(tmp_path: Path, space: str) -> None:
    """Small read buffers split a hemisphere into many blocks; together they are the file."""
    from nsdzarr.prepare.surface import HemisphereReader

    path = make_session(tmp_path, space, 1)[0]
    with HemisphereReader(path, block_bytes=750 * 4 * 16) as reader:
        got = np.full(reader.shape, np.nan, np.float64)
        n = 0
        for rows, cols, block in reader.blocks(7):
            got[rows, cols] = block
            n += 1
    assert n > 5
    assert np.array_equal(got, source_rows(path))


def test_nan_betas(tmp_path: Path) -> None:
    lh, rh = make_session(tmp_path, "fsaverage", 1)
    data = source_rows(lh)
    data[400, 3] = np.nan
    write_surface_session(lh, data)
    with pytest.raises(InputError) as err:
        convert_session([lh, rh], tmp_path / "s.zarr")
    assert str(err.value) == f"{lh}: betas hold NaN or inf values, first at trial 400"
    assert not (tmp_path / "s.zarr").exists()


def test_verify_compares_surface_checksums(tmp_path: Path) -> None:
    """``nsdzarr verify`` checks each hemisphere against the source's per-trial checksums."""
    from nsdzarr.prepare.check import check_store

    target = tmp_path / "s.zarr"
    convert_session(make_session(tmp_path, "nativesurface", 1), target)
    assert check_store(target) == []
    arr = zarr.open_array(target / "rh", mode="r+")
    arr[3] = arr[3] + 1  # a valid chunk holding other values
    problems = [str(p) for p in check_store(target)]
    assert len(problems) == 1 and "trial 3 differs from its source" in problems[0]
    assert problems[0].startswith(str(target / "rh" / "c" / "0" / "0"))


def test_vertex_blocks_without_wanted_vertices_are_skipped(tmp_path: Path) -> None:
    from nsdzarr.prepare.surface import HemisphereReader

    path = make_session(tmp_path, "nativesurface", 1)[0]
    wanted = np.array([3, 4, 150])
    with HemisphereReader(path, block_bytes=750 * 2 * 16) as reader:
        spans = [(cols, block) for _rows, cols, block in reader.blocks(7, wanted)]
    assert [c.start for c, _ in spans] == [0, 144]
    want = source_rows(path)
    for cols, block in spans:
        assert np.array_equal(block, want[:, cols])


def test_hdf5_with_vertices_first(tmp_path: Path) -> None:
    lh, rh = make_session(tmp_path, "nativesurface", 1)
    with h5py.File(rh, "w") as f:
        f.create_dataset("betas", data=np.zeros((185, 750), np.int16))
    with pytest.raises(InputError) as err:
        convert_session([lh, rh], tmp_path / "s.zarr")
    assert str(err.value) == f"{rh}: 185 trials, expected 750 (trials must be the first h5py axis)"
    assert not (tmp_path / "s.zarr").exists()


def write_vertex_chunked(folder: Path, counts, k: int, allocate: bool = True) -> list[Path]:
    """``{lh,rh}.betas_session01.hdf5`` int16 ``(750, n)`` chunked ``(750, k)`` (``allocate``
    False: no chunk written, the file reads as zeros)."""
    paths = layout.surface_betas_paths(folder, "subj01", "nativesurface", VERSION, 1)
    rng = np.random.default_rng(7)
    for path, n in zip(paths, counts, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            d = f.create_dataset("betas", (750, n), np.int16, chunks=(750, k))
            for v0 in range(0, n if allocate else 0, 8192):
                v1 = min(v0 + 8192, n)
                d[:, v0:v1] = (rng.standard_normal((750, v1 - v0)) * 600).astype(np.int16)
    return paths


def test_scratch_path_equals_source(tmp_path: Path) -> None:
    """The bounded path (vertex blocks -> scratch store -> trial shards) is lossless, over
    several vertex blocks and a last partial chunk, and leaves no scratch behind."""
    from nsdzarr.prepare.memory import surface_vertex_block

    paths = write_vertex_chunked(tmp_path, (6000, 3001), 7)
    assert surface_vertex_block(750, 2, 7) < 3001  # several vertex blocks per hemisphere
    target = tmp_path / "s.zarr"
    report = convert_session(
        paths, target, StorageSettings(trials_per_shard=40), strategy="scratch"
    )
    assert report.strategy == "scratch"
    group = zarr.open_group(target, mode="r")
    for hemi, path in zip(layout.HEMISPHERES, paths, strict=True):
        assert np.array_equal(group[hemi][...], source_rows(path))
        assert group[hemi].shards == (40, group[hemi].shape[1])
    assert not [p for p in tmp_path.rglob("*") if "rechunk" in p.name]
    from nsdzarr.prepare.check import check_store

    assert check_store(target) == []  # the checksums are the source's, trial by trial


def test_estimate_picks_the_surface_strategy_by_ceiling(tmp_path: Path) -> None:
    """Below the whole hemisphere's request the estimate plans the scratch path (and the job's
    budget from it makes the convert choose it too); below that path's own, it refuses."""
    from nsdzarr.prepare.memory import budget_bytes
    from nsdzarr.prepare.surface import open_session
    from nsdzarr.prepare.surface_convert import surface_plan

    paths = write_vertex_chunked(tmp_path, (150_000, 1000), 4, allocate=False)
    free = write_session_estimate(paths, tmp_path / "e0.json", StorageSettings())
    whole_mb = free["jobs"]["convert"]["mem_mb"]
    assert free["jobs"]["convert"]["strategy"] == "whole-hemisphere"
    with open_session(paths) as session:
        meta = session.metadata()
    scratch_mb = whole_mb - 100
    for ceiling, want in ((whole_mb, "whole-hemisphere"), (scratch_mb, "scratch")):
        target = tmp_path / f"e{ceiling}.json"
        est = write_session_estimate(paths, target, StorageSettings(), ceiling_mb=ceiling)
        conv = est["jobs"]["convert"]
        assert conv["strategy"] == want and conv["mem_mb"] <= ceiling
        assert conv["in_memory_peak_bytes"] == free["jobs"]["convert"]["peak_bytes"]
        job_budget = budget_bytes(job_mem_mb(target, "convert"))
        assert surface_plan(meta, 50, job_budget).strategy == want
    need = write_session_estimate(
        paths, tmp_path / "e.json", StorageSettings(), ceiling_mb=scratch_mb
    )
    need_mb = need["jobs"]["convert"]["mem_mb"]
    with pytest.raises(InputError) as err:
        write_session_estimate(
            paths, tmp_path / "e2.json", StorageSettings(), ceiling_mb=need_mb - 1
        )
    assert str(err.value).startswith(
        f"{paths[0]}: memory.ceiling_mb {need_mb - 1} is below the {need_mb} MB"
    )
    assert "\n" not in str(err.value)


PEAK_RUN = """
import json, sys
from nsdzarr.prepare.convert import convert_session
report = convert_session(sys.argv[1:3], sys.argv[3], strategy=sys.argv[4])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps([report.strategy, report.predicted_peak_bytes, int(hwm.split()[1]) * 1024]))
"""


@pytest.mark.slow
def test_scratch_path_peak_rss(tmp_path: Path) -> None:
    """Measured in a fresh process: the scratch path's peak RSS stays within its model and
    well below the whole-hemisphere path's (a 225 MB hemisphere)."""
    import subprocess
    import sys

    paths = write_vertex_chunked(tmp_path, (150_000, 1000), 4)
    peaks = {}
    for strategy in ("whole-hemisphere", "scratch"):
        target = tmp_path / f"{strategy}.zarr"
        out = subprocess.run(
            [sys.executable, "-c", PEAK_RUN, *map(str, paths), str(target), strategy],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        got, predicted, measured = json.loads(out.stdout.splitlines()[-1])
        assert got == strategy and measured <= predicted
        peaks[strategy] = measured
        if strategy == "scratch":
            group = zarr.open_group(target, mode="r")
            for hemi, path in zip(layout.HEMISPHERES, paths, strict=True):
                assert np.array_equal(group[hemi][...], source_rows(path))
    hemisphere = 750 * 150_000 * 2
    assert peaks["scratch"] < peaks["whole-hemisphere"] - hemisphere // 2
