"""The ``nsdzarr`` command line on real stores: info, verify (clean and corrupted), plan."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr
from conftest import REPO

from nsdzarr.prepare import layout, nsd
from nsdzarr.prepare.convert import convert_session, store_stats
from nsdzarr.prepare.demo import DemoSpec
from nsdzarr.prepare.estimate import write_session_estimate
from nsdzarr.prepare.resources import estimate_job_mem_mb
from nsdzarr.prepare.roi import extract_session, finish_store, read_split
from nsdzarr.prepare.storage import ROI_STORAGE, StorageSettings
from nsdzarr.prepare.trials import write_trial_tables

SPEC = DemoSpec()
SESSIONS = (1, 2, 3)
N_IMAGES = 12


def nsdzarr(*args: str) -> subprocess.CompletedProcess:
    """Run the command line in a fresh interpreter, on this checkout's package."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "nsdzarr.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def write_image_store(target: Path) -> None:
    """An image store as the stimulus helper lays it out, written with zarr-python."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (N_IMAGES, 16, 16, 3), dtype=np.uint8)
    group = zarr.open_group(target, mode="w", zarr_format=3)
    arr = group.create_array(
        "images", shape=images.shape, dtype="u1", chunks=(1, 16, 16, 3), shards=(4, 16, 16, 3)
    )
    arr[...] = images
    sums = [google_crc32c.value(im.tobytes()) for im in images]
    group.create_array("checksums", data=np.array(sums, dtype=np.uint32))
    group.create_array("nsd_id", data=np.arange(N_IMAGES, dtype=np.int64) * 7)
    small = group.create_array(
        "images_8", shape=(N_IMAGES, 8, 8, 3), dtype="u1", chunks=(1, 8, 8, 3), shards=(4, 8, 8, 3)
    )
    small[...] = images[:, ::2, ::2]


@pytest.fixture(scope="module")
def results(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """results/ with the demo's three session stores, one ROI store and an image store."""
    out = tmp_path_factory.mktemp("cli") / "results"
    subj = out / "subj01"
    write_trial_tables(
        layout.design_path(demo_root),
        "subj01",
        list(SESSIONS),
        subj / "trials.tsv",
        subj / "trials.json",
        subj / "images.tsv",
    )
    mask = layout.roi_path(demo_root, "subj01", SPEC.space, "nsdgeneral.nii.gz")
    parts = []
    for s in SESSIONS:
        source = layout.betas_path(demo_root, "subj01", SPEC.space, SPEC.beta_version, s)
        convert_session(source, subj / "betas" / f"session{s:02d}.zarr")
        part = subj / "roi" / "nsdgeneral.parts" / f"session{s:02d}.zarr"
        extract_session(source, mask, None, subj / "trials.tsv", s, part, ROI_STORAGE)
        parts.append(part)
    finish_store(parts, list(SESSIONS), mask, None, subj / "roi" / "nsdgeneral.zarr", ROI_STORAGE)
    write_image_store(out / "stimuli" / "images.zarr")
    return out


def flip_byte_in_chunk(shard: Path, chunk: int, n_chunks: int) -> None:
    """Invert one byte in the middle of inner chunk ``chunk``'s data; the index stays intact."""
    data = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(data[-(16 * n_chunks + 4) : -4]), "<u8").reshape(n_chunks, 2)
    offset, size = (int(v) for v in index[chunk])
    data[offset + size // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def problem_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stdout.splitlines() if not re.search(r": (OK|\d+ problem)", line)]


def test_help_of_every_subcommand():
    top = nsdzarr("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("info", "verify", "plan"))
    for command, option in [("info", "--json"), ("verify", "--quiet"), ("plan", "--nsd-root")]:
        proc = nsdzarr(command, "--help")
        assert proc.returncode == 0 and option in proc.stdout, proc.stderr
    assert nsdzarr().returncode == 2


def test_entry_point_is_declared():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"nsdzarr": "nsdzarr.cli:main"}
    from nsdzarr.cli import main

    assert main(["info", "/nonexistent/store"]) == 2


@pytest.mark.slow
def test_verify_finds_and_passes_every_store_of_a_clean_release(results: Path):
    # an unfinished store left by a killed job is hidden and skipped, whatever it holds
    junk = results / "subj01" / "betas" / ".session04.zarr.incomplete-0123abcd"
    junk.mkdir()
    (junk / "zarr.json").write_text("not json")
    proc = nsdzarr("verify", results)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ok = sorted(line.removesuffix(": OK") for line in proc.stdout.splitlines())
    stores = [
        *(f"subj01/betas/session{s:02d}.zarr" for s in SESSIONS),
        *(f"subj01/roi/nsdgeneral.parts/session{s:02d}.zarr" for s in SESSIONS),
        "subj01/roi/nsdgeneral.zarr",
        "stimuli/images.zarr",
    ]
    assert ok == sorted(str(results / s) for s in stores)


@pytest.mark.slow
def test_flipped_byte_in_a_session_shard_names_the_shard_and_trial(results: Path, tmp_path: Path):
    store = tmp_path / "session01.zarr"
    shutil.copytree(results / "subj01" / "betas" / "session01.zarr", store)
    assert nsdzarr("verify", store).returncode == 0
    shard = store / "betas" / "c" / "1" / "0" / "0" / "0"
    flip_byte_in_chunk(shard, 7, 50)
    proc = nsdzarr("verify", store)
    assert proc.returncode == 1
    lines = problem_lines(proc)
    assert len(lines) == 1, proc.stdout
    assert lines[0].startswith(f"{shard}: trial 57 "), lines[0]
    # found the same way when given the folder above it
    assert problem_lines(nsdzarr("verify", "-q", tmp_path)) == lines
    # a shard file that is gone reads as zeros: every trial of it is named, the file as missing
    (store / "betas" / "c" / "3" / "0" / "0" / "0").unlink()
    lines = problem_lines(nsdzarr("verify", store))
    missing = [
        line for line in lines if line.endswith("the file is missing, read as the fill value)")
    ]
    assert [re.search(r"trial (\d+) ", line)[1] for line in missing] == [
        str(t) for t in range(150, 200)
    ]


@pytest.mark.slow  # builds a whole results/ folder (~30 s)
def test_flipped_byte_in_an_image_shard_names_the_shard_and_image(results: Path, tmp_path: Path):
    store = tmp_path / "images.zarr"
    shutil.copytree(results / "stimuli" / "images.zarr", store)
    shard = store / "images" / "c" / "2" / "0" / "0" / "0"
    flip_byte_in_chunk(shard, 1, 4)
    proc = nsdzarr("verify", store)
    assert proc.returncode == 1
    lines = problem_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(f"{shard}: image 9 "), proc.stdout


@pytest.mark.slow  # builds a whole results/ folder (~30 s)
def test_unreadable_shards_of_derived_arrays_are_found(results: Path, tmp_path: Path):
    images = tmp_path / "images.zarr"
    shutil.copytree(results / "stimuli" / "images.zarr", images)
    small = images / "images_8" / "c" / "1" / "0" / "0" / "0"
    small.write_bytes(small.read_bytes()[:-40])  # truncated: the shard index is gone
    roi = tmp_path / "nsdgeneral.zarr"
    shutil.copytree(results / "subj01" / "roi" / "nsdgeneral.zarr", roi)
    roi_shard = roi / "betas" / "c" / "20" / "0"
    roi_shard.write_bytes(roi_shard.read_bytes()[:-40])
    proc = nsdzarr("verify", tmp_path)
    assert proc.returncode == 1
    lines = problem_lines(proc)
    assert len(lines) == 2, lines
    assert any(line.startswith(f"{small}: rows 4..7 cannot be read") for line in lines), lines
    assert any(line.startswith(f"{roi_shard}: trials 1000..1049 cannot") for line in lines)


@pytest.mark.slow  # builds a whole results/ folder (~30 s)
def test_inconsistent_roi_shapes_are_reported(results: Path, tmp_path: Path):
    roi = tmp_path / "nsdgeneral.zarr"
    shutil.copytree(results / "subj01" / "roi" / "nsdgeneral.zarr", roi)
    meta = json.loads((roi / "zarr.json").read_text())
    meta["attributes"]["sessions"] = [1, 2]
    (roi / "zarr.json").write_text(json.dumps(meta))
    proc = nsdzarr("verify", roi)
    assert proc.returncode == 1
    assert any("2250 trials for 2 session(s)" in line for line in problem_lines(proc))


@pytest.mark.slow
def test_changed_roi_rows_no_longer_match_their_statistics(results: Path, tmp_path: Path):
    subj = tmp_path / "subj01"
    shutil.copytree(results / "subj01" / "roi" / "nsdgeneral.zarr", subj / "roi" / "r.zarr")
    shutil.copy(results / "subj01" / "trials.tsv", subj / "trials.tsv")
    assert nsdzarr("verify", subj).returncode == 0
    train = [t for t, split in enumerate(read_split(subj / "trials.tsv", 2)) if split == "train"]
    betas = zarr.open_group(subj / "roi" / "r.zarr", mode="r+")["betas"]
    row = 750 + train[0]
    betas[row] = betas[row] + 5  # decodes fine: only the statistics can tell
    proc = nsdzarr("verify", subj)
    assert proc.returncode == 1
    lines = problem_lines(proc)
    assert lines and all(": session 2: " in line for line in lines), lines
    assert lines[0].startswith(f"{subj / 'roi' / 'r.zarr' / 'mean'}: session 2: mean of voxels")


def test_usage_errors_exit_2(tmp_path: Path):
    assert nsdzarr("verify", tmp_path / "missing").returncode == 2
    empty = nsdzarr("verify", tmp_path)
    assert empty.returncode == 2 and "no Zarr store" in empty.stderr
    assert nsdzarr("info", tmp_path).returncode == 2
    assert nsdzarr("plan", "--subjects", "subj01", "--sessions", "one").returncode == 2
    assert nsdzarr("plan", "--subjects", "subj01", "--trials-per-shard", "7",
                   "--trials-per-chunk", "2").returncode == 2  # fmt: skip


@pytest.mark.slow  # builds a whole results/ folder (~30 s)
def test_info_shows_shapes_codecs_shards_and_sizes(results: Path):
    store = results / "subj01" / "betas" / "session01.zarr"
    text = nsdzarr("info", store)
    assert text.returncode == 0, text.stderr
    assert "array betas: shape (750, 16, 24, 20) int16" in text.stdout
    assert "zstd(checksum=False, level=1)" in text.stdout
    assert "chunk shape (1, 16, 24, 20), shard shape (50, 16, 24, 20)" in text.stdout
    assert "scale: 300" in text.stdout
    info = json.loads(nsdzarr("info", "--json", store).stdout)
    betas = {a["name"]: a for a in info["arrays"]}["betas"]
    assert betas["shards"] == [50, 16, 24, 20] and betas["chunks"] == [1, 16, 24, 20]
    assert {a["name"]: a for a in info["arrays"]}["plane_checksums"]["shards"] is None
    assert (betas["bytes"], betas["files"]) == store_stats(store / "betas")
    assert (info["bytes"], info["files"]) == store_stats(store)
    assert info["attributes"]["axes"] == ["trial", "z", "y", "x"]
    roi = json.loads(nsdzarr("info", "--json", results / "subj01/roi/nsdgeneral.zarr").stdout)
    arrays = {a["name"]: a for a in roi["arrays"]}
    assert set(arrays) == {"betas", "voxels", "label", "mean", "std"}
    # ROI stores are raw, each chunk with its checksum
    assert arrays["betas"]["codecs"][0] == "sharding_indexed[bytes, crc32c]"
    assert roi["attributes"]["sessions"] == list(SESSIONS)
    one = json.loads(nsdzarr("info", "--json", results / "stimuli/images.zarr/images").stdout)
    assert one["node_type"] == "array" and one["shape"] == [N_IMAGES, 16, 16, 3]


@pytest.mark.slow
def test_plan_matches_the_workflow_estimates(demo_root: Path, tmp_path: Path):
    mask = layout.roi_path(demo_root, "subj01", SPEC.space, "nsdgeneral.nii.gz")
    args = ["plan", "--nsd-root", demo_root, "--subjects", "subj01", "--json", "--sample"]
    proc = nsdzarr(*args, "--roi", "nsdgeneral=nsdgeneral.nii.gz")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert [r["session"] for r in plan["sessions"]] == list(SESSIONS)
    for row in plan["sessions"]:
        source = layout.betas_path(
            demo_root, "subj01", SPEC.space, SPEC.beta_version, row["session"]
        )
        est = write_session_estimate(
            source, tmp_path / "e.json", StorageSettings(), 16000, 1.0,
            {"nsdgeneral": (str(mask), None)},
        )  # fmt: skip
        for key in ("raw_bytes", "store_bytes", "store_files", "compression_ratio"):
            assert row[key] == est[key], key
        assert row["jobs"]["convert"] == est["jobs"]["convert"]
        assert row["jobs"]["roi_session/nsdgeneral"] == est["jobs"]["roi_session/nsdgeneral"]
        assert row["jobs"]["estimate"]["mem_mb"] == estimate_job_mem_mb(source, 1.0, 1, 16000)
    total = plan["total"]
    assert total["raw_bytes"] == sum(r["raw_bytes"] for r in plan["sessions"]) == 3 * 750 * 7680 * 2
    assert total["jobs"]["convert"]["jobs"] == 3
    # without sampling: metadata only, NSD's compression ratio; some sessions, readable table
    quick = json.loads(nsdzarr(*args[:-1], "--sessions", "2", "3").stdout)
    assert [r["session"] for r in quick["sessions"]] == [2, 3]
    assert quick["sessions"][0]["store_bytes"] == int(
        750 * 7680 * 2 / nsd.ASSUMED_COMPRESSION_RATIO
    )
    table = nsdzarr("plan", "--nsd-root", demo_root, "--subjects", "subj01")
    assert table.returncode == 0 and "convert MB" in table.stdout
    assert re.search(r"^all\s+3 ses\s+33\.0\s+9\.7\s+57\s", table.stdout, re.M), table.stdout
    missing = nsdzarr("plan", "--nsd-root", demo_root, "--subjects", "subj01", "--sessions", "9")
    assert missing.returncode == 1 and "sessions [9] not present" in missing.stderr


def test_plan_without_a_download_uses_the_release_facts():
    plan = json.loads(nsdzarr("plan", "--subjects", "subj01", "subj03", "--json").stdout)
    facts = [r for r in nsd.release_estimates("func1pt8mm") if r["subject"] in ("subj01", "subj03")]
    assert len(plan["sessions"]) == len(facts) == 40 + 32
    for row, fact in zip(plan["sessions"], facts, strict=True):
        assert (row["subject"], row["session"]) == (fact["subject"], fact["session"])
        assert row["store_bytes"] == fact["store_bytes"]
        assert row["jobs"]["convert"] == fact["jobs"]["convert"]
    assert plan["subjects"]["subj03"]["sessions"] == 32


@pytest.mark.slow
@pytest.mark.parametrize("space", ["nativesurface", "fsaverage"])
def test_plan_of_a_surface_space_matches_the_workflow_estimates(tmp_path: Path, space: str):
    """`nsdzarr plan --space nativesurface|fsaverage` on the demo's surface files: the rows the
    estimate jobs would write (sizes, strategy, mem_mb), from the files' headers."""
    from nsdzarr.prepare.demo import write_demo

    root = tmp_path / "nsd"
    spec = DemoSpec(space=space)
    write_demo(root, spec)
    args = ["plan", "--nsd-root", root, "--subjects", "subj01", "--space", space, "--json"]
    proc = nsdzarr(*args, "--sample", "--roi", "V1=prf-visualrois.mgz:1,2")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    labels = [
        str(p) for p in layout.surface_label_paths(root, "subj01", space, "prf-visualrois.mgz")
    ]
    assert [r["session"] for r in plan["sessions"]] == list(SESSIONS)
    for row in plan["sessions"]:
        paths = layout.surface_betas_paths(root, "subj01", space, spec.beta_version, row["session"])
        est = write_session_estimate(
            [str(p) for p in paths], tmp_path / "e.json", StorageSettings(), 16000, 1.0,
            {"V1": (labels, [1, 2])},
        )  # fmt: skip
        for key in ("raw_bytes", "store_bytes", "store_files", "compression_ratio"):
            assert row[key] == est[key], key
        assert row["hemispheres"] == est["source"]["hemispheres"]
        assert row["jobs"]["convert"] == est["jobs"]["convert"]
        assert row["jobs"]["roi_session/V1"] == est["jobs"]["roi_session/V1"]
        assert row["jobs"]["estimate"]["mem_mb"] == estimate_job_mem_mb(paths, 1.0, 1, 16000)
    strategy = "whole-hemisphere" if space == "nativesurface" else "stream"
    assert plan["sessions"][0]["jobs"]["convert"]["strategy"] == strategy
    table = nsdzarr(*args[:-1])
    assert table.returncode == 0 and re.search(rf"^subj01\s+1\s.*\s{strategy}$", table.stdout, re.M)
    assert f"{space} {spec.beta_version}; compression ratio 1.0" in table.stdout
    facts = nsdzarr("plan", "--subjects", "subj01", "--space", space)
    assert facts.returncode == 1 and "give --nsd-root" in facts.stderr


@pytest.mark.slow
def test_verify_passes_what_the_demo_workflow_wrote(demo_run: Path):
    proc = nsdzarr("verify", demo_run / "results")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ok = {line.removesuffix(": OK") for line in proc.stdout.splitlines()}
    subj = demo_run / "results" / "subj01"
    expected = {str(subj / "betas" / f"session{s:02d}.zarr") for s in SESSIONS}
    assert expected | {str(subj / "roi" / f"{r}.zarr") for r in ("nsdgeneral", "V1")} <= ok


@pytest.mark.slow
def test_plan_of_the_stimuli_job_matches_the_workflow_estimate(demo_run: Path):
    """The image store's size, files and memory request equal the demo run's stimuli_estimate
    (subset trials, sizes [4], raw)."""
    workflow = json.loads((demo_run / "results/stimuli/estimate.json").read_text())
    root = demo_run / "resources/demo_nsd"
    args = ["plan", "--nsd-root", root, "--subjects", "subj01", "--stimuli-sizes", "4"]
    proc = nsdzarr(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    images = json.loads(proc.stdout)["stimuli"]
    for key in ("n_images", "sizes", "storage", "raw_bytes", "resized_bytes", "store_bytes",
                "store_files", "jobs"):  # fmt: skip
        assert images[key] == workflow[key], key
    # the same file: the workflow names it relative to its working folder
    source = images["source"] | {"path": str(Path(images["source"]["path"]).resolve())}
    local = workflow["source"]["path"]
    assert source == workflow["source"] | {"path": str((demo_run / local).resolve())}
    store = zarr.open_group(demo_run / "results/stimuli/images.zarr", mode="r")
    assert images["n_images"] == store["images"].shape[0]
    table = nsdzarr(*args)
    job = images["jobs"]["stimuli"]
    line = f"stimuli  {images['n_images']} images (shown in the planned sessions; resized: 4x4)"
    assert line in table.stdout and f"stimuli job {job['mem_mb']} MB" in table.stdout


@pytest.mark.slow
def test_plan_of_the_stimuli_job_follows_subset_sessions_and_switch(demo_root: Path, tmp_path):
    base = ["plan", "--nsd-root", demo_root, "--subjects", "subj01", "--json"]
    one = json.loads(nsdzarr(*base, "--sessions", "2").stdout)["stimuli"]
    trials = write_trial_tables(
        layout.design_path(demo_root), "subj01", [2], *(tmp_path / n for n in ("t", "j", "i"))
    )
    assert one["n_images"] == len(np.unique(trials["nsd_id"])) < 750  # session 2 repeats some
    every = json.loads(nsdzarr(*base, "--stimuli-subset", "all").stdout)["stimuli"]
    assert every["n_images"] == 73_000 and every["store_bytes"] > 50 * one["store_bytes"]
    assert json.loads(nsdzarr(*base, "--stimuli", "no").stdout)["stimuli"] is None
    facts = json.loads(nsdzarr("plan", "--subjects", "subj01", "subj02", "--json").stdout)
    real = facts["stimuli"]
    assert real["n_images"] == 1000 + 2 * 9000 and real["source"]["shape"] == [73_000, 425, 425, 3]
    assert real["raw_bytes"] == 19_000 * 425 * 425 * 3
    assert 0 < real["jobs"]["stimuli"]["mem_mb"] <= 16000
    bare = tmp_path / "bare"
    shutil.copytree(demo_root, bare)
    layout.stimuli_path(bare).unlink()
    assert json.loads(nsdzarr(*base[:2], bare, *base[3:]).stdout)["stimuli"] is None
    wanted = nsdzarr(*base[:2], bare, *base[3:], "--stimuli", "yes")
    assert wanted.returncode == 1 and "stimulus file not found" in wanted.stderr
