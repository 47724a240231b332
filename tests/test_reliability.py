"""Reliability of the workflow: bad inputs, killed jobs, reruns, determinism, wildcard names.

Every case is a real Snakemake run in a temporary folder. A broken input must give a non-zero
exit, one line ``<path>: <problem>`` naming the offending file (as printed by
``nsdzarr.prepare.jobs.run_job`` or raised as a ``WorkflowError``) and no partial output: the failed
job's outputs are absent and no ``.*.incomplete-*`` sibling is left under ``results/``.

To keep the runtime low, independent breakages of different sessions (or ROIs) share one
``--keep-going`` run, config errors are dry runs, and the runs that must be byte-identical to
the shared ``demo_run`` reference read its very demo release through a ``resources`` symlink
(same config apart from ``demo: false``), so that every path and mtime in the stores agrees.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import zarr
from conftest import default_config, run_snakemake, snakemake_command

from nsdzarr.prepare import layout
from nsdzarr.prepare.demo import DemoSpec, affine, roi_volumes, write_betas_hdf5, write_nifti_gz

pytestmark = pytest.mark.slow

SPEC = DemoSpec()
ROIS = ("nsdgeneral", "V1")  # the shipped config's ROIs
# Runs with several independent breakages: every failure is reached, and a failed job is not
# retried (the profile's `retries: 1` only repeats the same one-line error).
KEEP_GOING = ("--keep-going", "--retries", "0")
# The light jobs summarising the session stores: a rebuilt store reruns them (and only them).
STORE_SUMMARIES = ("estimate_summary", "qc_stores")


# --------------------------------------------------------------------------- helpers


def betas_file(root: Path, session: int, subject: str = "subj01") -> Path:
    return layout.betas_path(root, subject, SPEC.space, SPEC.beta_version, session)


def roi_file(root: Path, name: str) -> Path:
    return layout.roi_path(root, "subj01", SPEC.space, name)


def copy_release(demo_root: Path, parent: Path) -> Path:
    """A private copy of the demo release, free to break."""
    root = parent / "NSD"
    shutil.copytree(demo_root, root)
    return root


def release_config(root: Path, **changes) -> dict:
    """The shipped config pointed at ``root`` (an NSD-layout folder, not generated)."""
    return {**default_config(), "nsd_root": str(root), "demo": False, **changes}


def output_of(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def one_line_errors(out: str, *paths: str | Path) -> list[str]:
    """Problems of the lines ``<path>: <problem>`` (bare, or after run_job's log prefix)."""
    alternatives = "|".join(re.escape(str(p)) for p in paths)
    pattern = re.compile(rf"^(?:.*\bERROR nsdzarr[\w.]*: )?(?:{alternatives}): (.+)$", re.M)
    return pattern.findall(out)


def assert_one_line_error(out: str, paths: str | Path | list, problem: str) -> None:
    """A line ``<path>: <problem>`` whose problem matches the regex ``problem``."""
    paths = paths if isinstance(paths, list) else [paths]
    found = one_line_errors(out, *paths)
    assert any(re.search(problem, line) for line in found), (
        f"no one-line error '{paths[0]}: /{problem}/'; lines for that path: {found}\n"
        f"--- output tail ---\n{out[-5000:]}"
    )


def assert_no_partial_output(workdir: Path, *outputs: str) -> None:
    """The given outputs are absent and no temporary sibling is left anywhere under results/."""
    present = [rel for rel in outputs if (workdir / rel).exists()]
    assert not present, f"outputs of failed jobs left behind: {present}"
    results = workdir / "results"
    if results.is_dir():
        leftovers = sorted(str(p.relative_to(workdir)) for p in results.rglob(".*.incomplete-*"))
        assert not leftovers, f"temporaries left behind: {leftovers}"


def job_stats(out: str) -> dict[str, int]:
    """The "Job stats" table Snakemake prints: rule -> count (empty if nothing ran)."""
    if "Job stats:" not in out:
        return {}
    table = out[out.index("Job stats:") :]
    table = table[: table.index("\ntotal")]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def executed_jobs(out: str) -> set[tuple[str, str]]:
    """(rule, wildcards) of every job block Snakemake printed."""
    jobs = set()
    for m in re.finditer(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", out, re.M):
        wildcards = re.search(r"^    wildcards: (.*)$", m[2], re.M)
        jobs.add((m[1], wildcards[1] if wildcards else ""))
    return jobs


def store_files(workdir: Path) -> dict[str, str]:
    """sha256 of every file of every Zarr store under results/ (but Snakemake's timestamps)."""
    return {
        str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((workdir / "results").glob("*/*/*.zarr/**/*"))
        if p.is_file() and p.name != ".snakemake_timestamp"
    }


def result_files(workdir: Path) -> dict[str, str]:
    """sha256 of every deterministic file under results/.

    Left out: Snakemake's timestamps, the measured benchmarks, the plot of them, and the
    measured section of ``estimates.md``.
    """
    digests = {}
    for p in sorted((workdir / "results").rglob("*")):
        rel = p.relative_to(workdir)
        if (
            not p.is_file()
            or p.name == ".snakemake_timestamp"
            or rel.parts[1] == "benchmarks"
            or p.suffix == ".png"
        ):
            continue
        data = p.read_bytes()
        if p.name == "estimates.md":
            data = data.split(b"## Requested vs measured")[0]
        digests[str(rel)] = hashlib.sha256(data).hexdigest()
    return digests


def assert_same_files(got: dict[str, str], want: dict[str, str]) -> None:
    assert got.keys() == want.keys(), (
        f"only here: {sorted(got.keys() - want.keys())}; "
        f"only in the reference: {sorted(want.keys() - got.keys())}"
    )
    differ = sorted(k for k in got if got[k] != want[k])
    assert not differ, f"files differ from the reference: {differ}"


def link_demo_release(workdir: Path, demo_run: Path) -> dict:
    """Make ``workdir`` read the demo release of ``demo_run``; return its config (demo: false).

    Paths in the stores are resolved and mtimes are the same files', so the stores can be
    byte-identical to the reference's; nothing in this folder writes to the release.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "resources").symlink_to(demo_run / "resources", target_is_directory=True)
    return link_config()


def link_config() -> dict:
    """The config of a folder prepared by :func:`link_demo_release`."""
    return {**default_config(), "demo": False}


# --------------------------------------------------------------------------- broken betas files
# One --keep-going run; each session of it is broken in its own way.


def _no_betas_dataset(path: Path, good: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=good[:, :2])


def _three_dimensional(path: Path, good: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("betas", data=good.reshape(good.shape[0], good.shape[1], -1))


def _700_trials(path: Path, good: np.ndarray) -> None:
    write_betas_hdf5(path, good[:700])


NAN_TRIAL, INF_TRIAL = 123, 400


def _float_with_nan(path: Path, good: np.ndarray) -> None:
    # in voxels of V1 (and so of nsdgeneral): the ROI jobs read them too
    i, j, k = np.argwhere(roi_volumes(SPEC.shape_xyz)["prf-visualrois.nii.gz"] == 1)[0]
    betas = good.astype(np.float32) / 300
    betas[NAN_TRIAL, k, j, i] = np.nan
    betas[INF_TRIAL, k, j, i] = np.inf
    write_betas_hdf5(path, betas)


def _truncated(path: Path, good: np.ndarray) -> None:
    write_betas_hdf5(path, good)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def _not_hdf5(path: Path, good: np.ndarray) -> None:
    path.write_bytes(b"this is a text file, not HDF5\n" * 100)


# session -> (breakage, problem regex, whether the estimate job itself must fail)
BROKEN_BETAS: dict[int, tuple[Callable[[Path, np.ndarray], None], str, bool]] = {
    4: (_no_betas_dataset, r"no dataset named 'betas'", True),
    5: (_three_dimensional, r"3-D .*expected 4-D", True),
    6: (_700_trials, r"700 trials.*750", False),
    7: (_float_with_nan, rf"(?i)(non-finite|nan|inf).*trial {NAN_TRIAL}\b", False),
    8: (_truncated, r"truncated or corrupt", True),
    9: (_not_hdf5, r"not an HDF5 file", True),
}


@pytest.fixture(scope="module")
def broken_betas_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("broken_betas")
    root = copy_release(demo_root, base)
    with h5py.File(betas_file(root, 1), "r") as f:
        good = f["betas"][...]
    for session, (breakage, _problem, _in_estimate) in BROKEN_BETAS.items():
        breakage(betas_file(root, session), good)
    config = release_config(root, sessions=sorted(BROKEN_BETAS))
    proc = run_snakemake(base / "work", *KEEP_GOING, config=config, check=False)
    return root, base / "work", proc


@pytest.mark.parametrize(
    "session",
    sorted(BROKEN_BETAS),
    ids=[BROKEN_BETAS[s][0].__name__.strip("_") for s in sorted(BROKEN_BETAS)],
)
def test_broken_betas_file_fails_clearly(broken_betas_run, session: int):
    root, workdir, proc = broken_betas_run
    _breakage, problem, in_estimate = BROKEN_BETAS[session]
    out = output_of(proc)
    assert proc.returncode != 0
    assert_one_line_error(out, betas_file(root, session), problem)
    outputs = [
        f"results/subj01/betas/session{session:02d}.zarr",
        *(f"results/subj01/roi/{roi}.parts/session{session:02d}.zarr" for roi in ROIS),
        *(f"results/subj01/roi/{roi}.zarr" for roi in ROIS),
    ]
    if in_estimate:
        outputs.append(f"results/subj01/estimates/session{session:02d}.json")
    assert_no_partial_output(workdir, *outputs)


def test_missing_listed_session_fails_clearly(demo_root: Path, tmp_path: Path):
    root = copy_release(demo_root, tmp_path)  # sessions 1..3 present
    config = release_config(root, sessions=[1, 2, 4])
    proc = run_snakemake(tmp_path / "work", config=config, check=False)
    assert proc.returncode != 0
    assert_one_line_error(output_of(proc), betas_file(root, 4), r"(?i)not found|missing")
    assert_no_partial_output(tmp_path / "work", "results/subj01/betas/session04.zarr")
    assert not (tmp_path / "work" / "results").exists(), "jobs ran although an input is missing"


def test_float_session_among_int16_sessions_fails_clearly(demo_root: Path, tmp_path: Path):
    # finite float betas are accepted, but one subject's ROI store cannot mix dtypes
    root = copy_release(demo_root, tmp_path)
    with h5py.File(betas_file(root, 2), "r") as f:
        good = f["betas"][...]
    write_betas_hdf5(betas_file(root, 2), good.astype(np.float32) / 300)
    rois = {"nsdgeneral": {"file": "nsdgeneral.nii.gz"}}
    config = release_config(root, sessions=[1, 2], rois=rois)
    workdir = tmp_path / "work"
    target = "results/subj01/roi/nsdgeneral.zarr"
    proc = run_snakemake(workdir, *KEEP_GOING, target, config=config, check=False)
    assert proc.returncode != 0
    part = "results/subj01/roi/nsdgeneral.parts/session02.zarr"
    assert_one_line_error(output_of(proc), [betas_file(root, 2), part, workdir / part], r"float32")
    assert_no_partial_output(workdir, target)


# --------------------------------------------------------------------------- broken ROI masks


def _mask_shape_mismatch(root: Path) -> str:
    shape = (SPEC.shape_xyz[0], SPEC.shape_xyz[1], SPEC.shape_xyz[2] - 1)
    write_nifti_gz(roi_file(root, "shape.nii.gz"), np.ones(shape, np.int16), affine(shape))
    return "shape.nii.gz"


def _mask_selects_nothing(root: Path) -> str:
    empty = np.where(np.arange(SPEC.shape_xyz[2]) < 4, -1, 0).astype(np.int16)
    vol = np.broadcast_to(empty, SPEC.shape_xyz).copy()
    write_nifti_gz(roi_file(root, "empty.nii.gz"), vol, affine(SPEC.shape_xyz))
    return "empty.nii.gz"


def _labels_absent(root: Path) -> str:
    return "nsdgeneral.nii.gz"


# ROI name -> (makes its atlas, labels, problem regex)
BROKEN_MASKS: dict[str, tuple[Callable[[Path], str], list[int] | None, str]] = {
    "shape": (_mask_shape_mismatch, None, r"mask shape \(20, 24, 15\).*does not match"),
    "empty": (_mask_selects_nothing, None, r"(?i)selection is empty|no voxel"),
    "nolabel": (_labels_absent, [99], r"labels \[99\] not in mask"),
}


@pytest.fixture(scope="module")
def broken_masks_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("broken_masks")
    root = copy_release(demo_root, base)
    rois = {}
    for name, (make, labels, _problem) in BROKEN_MASKS.items():
        rois[name] = {"file": make(root)} | ({"labels": labels} if labels else {})
    config = release_config(root, sessions=[1], rois=rois)
    targets = [f"results/subj01/roi/{name}.zarr" for name in BROKEN_MASKS]
    proc = run_snakemake(base / "work", *KEEP_GOING, *targets, config=config, check=False)
    return root, base / "work", rois, proc


@pytest.mark.parametrize("roi", sorted(BROKEN_MASKS))
def test_broken_roi_mask_fails_clearly(broken_masks_run, roi: str):
    root, workdir, rois, proc = broken_masks_run
    assert proc.returncode != 0
    assert_one_line_error(output_of(proc), roi_file(root, rois[roi]["file"]), BROKEN_MASKS[roi][2])
    assert_no_partial_output(
        workdir, f"results/subj01/roi/{roi}.zarr", f"results/subj01/roi/{roi}.parts/session01.zarr"
    )


# --------------------------------------------------------------------------- design / corrupt atlas
# One --keep-going run: the design lacks masterordering and the only ROI's atlas is garbage.


@pytest.fixture(scope="module")
def broken_design_and_atlas_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("broken_design")
    root = copy_release(demo_root, base)
    design = layout.design_path(root)
    mat = {k: v for k, v in scipy.io.loadmat(design).items() if not k.startswith("__")}
    del mat["masterordering"]
    scipy.io.savemat(design, mat, format="5")
    roi_file(root, "corrupt.nii.gz").write_bytes(os.urandom(4096))
    config = release_config(root, sessions=[1], rois={"atlas": {"file": "corrupt.nii.gz"}})
    targets = ["results/subj01/trials.tsv", "results/subj01/roi/atlas.zarr"]
    proc = run_snakemake(base / "work", *KEEP_GOING, *targets, config=config, check=False)
    return root, base / "work", proc


def test_design_without_masterordering_fails_clearly(broken_design_and_atlas_run):
    root, workdir, proc = broken_design_and_atlas_run
    assert proc.returncode != 0
    assert_one_line_error(output_of(proc), layout.design_path(root), r"'masterordering' is missing")
    assert_no_partial_output(
        workdir,
        "results/subj01/trials.tsv",
        "results/subj01/trials.json",
        "results/subj01/images.tsv",
    )


def test_corrupt_nifti_fails_clearly(broken_design_and_atlas_run):
    root, workdir, proc = broken_design_and_atlas_run
    assert proc.returncode != 0
    assert_one_line_error(
        output_of(proc), roi_file(root, "corrupt.nii.gz"), r"not a readable NIfTI"
    )
    assert_no_partial_output(
        workdir,
        "results/subj01/estimates/session01.json",
        "results/subj01/roi/atlas.parts/session01.zarr",
        "results/subj01/roi/atlas.zarr",
    )


# --------------------------------------------------------------------------- subjects and sessions
# One --keep-going run: subj09 is not in the design; session 41 is past the design's 40.


@pytest.fixture(scope="module")
def outside_design_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("outside_design")
    root = copy_release(demo_root, base)
    for subject, session in (("subj01", 41), ("subj09", 1), ("subj09", 41)):
        target = betas_file(root, session, subject)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(betas_file(root, 1), target)
    subj09_roi = layout.roi_path(root, "subj09", SPEC.space, "x").parent
    shutil.copytree(roi_file(root, "x").parent, subj09_roi)
    config = release_config(root, subjects=["subj01", "subj09"], sessions=[1, 41])
    targets = ["results/subj01/trials.tsv", "results/subj09/trials.tsv"]
    proc = run_snakemake(base / "work", *KEEP_GOING, *targets, config=config, check=False)
    return root, base / "work", proc


def test_subject_not_in_design_fails_clearly(outside_design_run):
    root, workdir, proc = outside_design_run
    assert proc.returncode != 0
    assert_one_line_error(
        output_of(proc), layout.design_path(root), r"subject subj09 is not in the design"
    )
    assert_no_partial_output(workdir, "results/subj09/trials.tsv", "results/subj09/trials.json")


def test_session_past_the_design_fails_clearly(outside_design_run):
    root, workdir, proc = outside_design_run
    assert proc.returncode != 0
    assert_one_line_error(
        output_of(proc), layout.design_path(root), r"session 41 is out of range.*1\.\.40"
    )
    assert_no_partial_output(workdir, "results/subj01/trials.tsv", "results/subj01/trials.json")


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"colour": "blue"}, r"'colour' was unexpected"),
        ({"storage": {"level": "high"}}, r"'high' is not of type 'integer'"),
        ({"storage": {"trials_per_shard": 40}}, r"40 is not one of"),
        ({"storage": {"trials_per_chunk": 3, "trials_per_shard": 50}}, r"must divide"),
        ({"rois": {"V1;touch pwned": {"file": "x.nii.gz"}}}, r"does not match"),
        ({"rois": {"a.b": {"file": "x.nii.gz"}}}, r"does not match"),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "shard-not-dividing-750",
        "chunk-not-dividing-shard",
        "roi-shell-metachar",
        "roi-dot",
    ],
)
def test_bad_config_fails_clearly(tmp_path: Path, change: dict, problem: str):
    config = {**default_config(), **change}
    proc = run_snakemake(tmp_path, "-n", config=config, check=False)
    out = output_of(proc)
    assert proc.returncode != 0
    assert_one_line_error(out, tmp_path / "config.yaml", problem)
    assert "Traceback" not in out
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "pwned").exists()


def test_output_folder_not_writable_fails_clearly(demo_root: Path, tmp_path: Path):
    # Tests run as root, where a read-only folder is still writable: a FILE named `results`
    # makes every output path impossible instead.
    root = copy_release(demo_root, tmp_path)
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "results").write_text("not a folder\n")
    proc = run_snakemake(workdir, config=release_config(root, sessions=[1]), check=False)
    out = output_of(proc)
    assert proc.returncode != 0
    assert_one_line_error(
        out, ["results", workdir / "results"], r"(?i)not a (directory|folder)|not writable"
    )
    assert "Traceback" not in out, out[-3000:]
    assert (workdir / "results").read_text() == "not a folder\n"


# --------------------------------------------------------------------------- wildcard names


@pytest.mark.parametrize(
    "target",
    [
        "results/subj1/betas/session01.zarr",
        "results/subj01/betas/session1.zarr",
        "results/subj01/roi/a.b.zarr",
        "results/subj01/roi/nope.zarr",  # a valid name, but no such ROI in the config
    ],
)
def test_bad_names_match_no_rule(tmp_path: Path, target: str):
    proc = run_snakemake(tmp_path, "-n", target, check=False)
    out = output_of(proc)
    assert proc.returncode != 0
    assert re.search(rf"MissingRuleException:\nNo rule to produce {re.escape(target)}", out), out[
        -3000:
    ]
    assert "Traceback" not in out and "Job stats" not in out


# --------------------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def second_run(demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second complete run of the demo release of ``demo_run``, in another folder."""
    workdir = tmp_path_factory.mktemp("second_run")
    run_snakemake(workdir, config=link_demo_release(workdir, demo_run))
    return workdir


def test_two_runs_are_byte_identical(demo_run: Path, second_run: Path):
    assert_same_files(result_files(second_run), result_files(demo_run))
    assert len(store_files(demo_run)) > 50


# --------------------------------------------------------------------------- killed jobs


def _run_until(workdir: Path, config: dict, pattern: str, *args: str) -> Path | None:
    """Run the workflow on one core; SIGKILL its process group once ``pattern`` exists.

    Returns the ``.*.incomplete-*`` folder that was being written, or None if the run ended
    without ``pattern`` appearing.
    """
    cmd, env = snakemake_command(workdir, config, *args, cores=1)
    with open(workdir / "killed_run.log", "a") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        caught = None
        deadline = time.monotonic() + 600
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                hits = glob.glob(str(workdir / pattern))
                if hits:
                    os.killpg(proc.pid, signal.SIGKILL)
                    caught = next(p for p in Path(hits[0]).parents if ".incomplete-" in p.name)
                    break
                time.sleep(0.001)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return caught


def _assert_killed_mid_write(incomplete: Path | None) -> None:
    assert incomplete is not None, "the run ended before the job could be killed"
    time.sleep(0.5)  # had the job survived the kill, it would rename its output by now
    assert incomplete.is_dir(), "the killed job went on writing"
    target = incomplete.with_name(incomplete.name.split(".incomplete-")[0].lstrip("."))
    assert not target.exists(), "a killed job left a store that looks complete"


def test_killed_jobs_resume_to_identical_stores(demo_run: Path, tmp_path: Path):
    config = link_demo_release(tmp_path, demo_run)
    # 1. kill a convert job once it has written a shard
    convert = "results/subj01/betas/.session0?.zarr.incomplete-*/betas/c/*"
    _assert_killed_mid_write(_run_until(tmp_path, config, convert))
    # a killed Snakemake leaves its lock: --unlock, then resume
    run_snakemake(tmp_path, "--unlock", config=config)
    # 2. kill an roi_session job mid-write during the resumed run (or a forced one)
    part = "results/subj01/roi/*.parts/.session0?.zarr.incomplete-*/betas/c/*"
    incomplete = _run_until(tmp_path, config, part, "--rerun-incomplete")
    if incomplete is None:  # every part was written before: force them again
        run_snakemake(tmp_path, "--unlock", config=config)
        incomplete = _run_until(tmp_path, config, part, "--forcerun", "roi_session")
    _assert_killed_mid_write(incomplete)
    run_snakemake(tmp_path, "--unlock", config=config)
    # 3. resume to the end
    proc = run_snakemake(tmp_path, "--rerun-incomplete", config=config)
    assert job_stats(output_of(proc)).get("roi_store") == len(ROIS)
    assert_no_partial_output(tmp_path)
    assert_same_files(store_files(tmp_path), store_files(demo_run))
    assert_same_files(result_files(tmp_path), result_files(demo_run))


# --------------------------------------------------------------------------- single-rule reruns


def test_forcerun_convert_rebuilds_only_the_stores(second_run: Path):
    before = store_files(second_run)
    proc = run_snakemake(second_run, "--forcerun", "convert", config=link_config())
    stats = job_stats(output_of(proc))
    assert stats.get("convert") == 3
    assert set(stats) <= {"convert", *STORE_SUMMARIES, "all"}, stats
    assert_same_files(store_files(second_run), before)


def test_forcerun_one_file_rebuilds_only_that_store(second_run: Path):
    before = store_files(second_run)
    target = "results/subj01/betas/session02.zarr"
    proc = run_snakemake(second_run, "--forcerun", target, config=link_config())
    out = output_of(proc)
    assert job_stats(out).get("convert") == 1
    assert set(job_stats(out)) <= {"convert", *STORE_SUMMARIES, "all"}, job_stats(out)
    assert ("convert", "subject=subj01, session=02") in executed_jobs(out)
    assert_same_files(store_files(second_run), before)


def test_replaced_source_rebuilds_what_depends_on_it(second_run: Path, tmp_path: Path):
    # a complete copy of the second run with a private copy of the release (files, mtimes kept)
    workdir = tmp_path / "work"
    shutil.copytree(second_run, workdir, symlinks=False)
    config = link_config()
    dry = run_snakemake(workdir, "-n", config=config)
    assert job_stats(output_of(dry)) == {}, "the copied run is not up to date"
    source = workdir / "resources/demo_nsd" / betas_file(Path(), 2)
    with h5py.File(source, "r") as f:
        new = (f["betas"][...] // 2).astype(np.int16)
    time.sleep(0.01)
    write_betas_hdf5(source, new)

    proc = run_snakemake(workdir, config=config)
    jobs = executed_jobs(output_of(proc))
    must = {
        ("convert", "subject=subj01, session=02"),
        *(("roi_session", f"subject=subj01, roi={roi}, session=02") for roi in ROIS),
        *(("roi_store", f"subject=subj01, roi={roi}") for roi in ROIS),
    }
    assert must <= jobs, sorted(must - jobs)
    # sessions 1 and 3 are untouched: neither their stores nor their ROI parts are rebuilt
    unrelated = {("trial_index", "subject=subj01")}
    for s in ("01", "03"):
        unrelated |= {
            ("estimate", f"subject=subj01, session={s}"),
            ("convert", f"subject=subj01, session={s}"),
            *(("roi_session", f"subject=subj01, roi={roi}, session={s}") for roi in ROIS),
        }
    assert not unrelated & jobs, sorted(unrelated & jobs)

    group = zarr.open_group(workdir / "results/subj01/betas/session02.zarr", mode="r")
    st = source.stat()
    assert group.attrs["source"] == {
        "path": str(source.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }
    np.testing.assert_array_equal(group["betas"][...], new)
    roi = zarr.open_group(workdir / "results/subj01/roi/nsdgeneral.zarr", mode="r")
    voxels = roi["voxels"][...]
    np.testing.assert_array_equal(
        roi["betas"][750:1500], new[:, voxels[:, 2], voxels[:, 1], voxels[:, 0]]
    )
