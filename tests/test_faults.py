"""Reliability round 2: full disks, permissions, two Snakemakes, a killed Snakemake, atlas grids.

Same promises as ``test_reliability.py`` (whose helpers these tests use): a non-zero exit, one
line ``<path>: <problem>``, no partial output and no ``.*.incomplete-*`` left; after the fault
is gone, the rerun is byte-identical to the undisturbed ``demo_run``.

Faults of the machine are real: a small tmpfs mounted as ``results/`` fills up, and the
permission cases run Snakemake as root *without* the capabilities that let root ignore
permission bits (``setpriv``), so a read-only folder or an unreadable file is what it is for
any user. Mounts and modes are undone in ``finally`` blocks.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from conftest import run_snakemake, snakemake_command
from test_reliability import (
    KEEP_GOING,
    assert_no_partial_output,
    assert_one_line_error,
    assert_same_files,
    betas_file,
    copy_release,
    job_stats,
    link_demo_release,
    one_line_errors,
    output_of,
    release_config,
    result_files,
    roi_file,
    store_files,
)

from nsdzarr.errors import InputError, OutputError, output_error
from nsdzarr.prepare.atomic import atomic_output
from nsdzarr.prepare.demo import affine, write_nifti_gz
from nsdzarr.prepare.nifti import require_same_grid

AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not AS_ROOT, reason="mounting a small filesystem needs root")

SESSIONS = [f"results/subj01/betas/session{s:02d}.zarr" for s in (1, 2, 3)]
NSDGENERAL = "results/subj01/roi/nsdgeneral.zarr"
STIMULI = "results/stimuli/images.zarr"
STIMULI_ESTIMATE = "results/stimuli/estimate.json"
# The capabilities that let root read and write whatever the permission bits say.
NO_DAC = "-dac_override,-dac_read_search"


# --------------------------------------------------------------------------- helpers


@contextmanager
def small_filesystem(folder: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of ``size_kb`` KiB mounted on ``folder`` (created), unmounted on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", folder], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", folder], check=True)


def tmpfs_kb(files: list[Path]) -> int:
    """KiB a tmpfs charges for ``files``: whole 4 KiB pages per file."""
    return sum(-(-f.stat().st_size // 4096) * 4 for f in files)


def grow(folder: Path, size_kb: int) -> None:
    """Make the tmpfs on ``folder`` bigger, keeping its files (space freed for a rerun)."""
    subprocess.run(["mount", "-o", f"remount,size={size_kb}k", folder], check=True)


def workflow(
    workdir: Path, config: dict, *args: str, cores: int = 2, unprivileged: bool = False
) -> subprocess.CompletedProcess:
    """Run the workflow; ``unprivileged``: as root without the permission-ignoring caps."""
    cmd, env = snakemake_command(workdir, config, *args, cores=cores)
    if unprivileged and AS_ROOT:
        cmd = ["setpriv", f"--inh-caps={NO_DAC}", f"--bounding-set={NO_DAC}", *cmd]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env, timeout=900)


def stores_under(files: dict[str, str], *stores: str) -> dict[str, str]:
    """The entries of :func:`store_files` that belong to the given stores."""
    return {k: v for k, v in files.items() if k.startswith(tuple(f"{s}/" for s in stores))}


def live_members(pgid: int) -> list[int]:
    """Processes of the process group ``pgid`` that still run (zombies do not count)."""
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        state, _ppid, pgrp = text[text.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            pids.append(int(Path(stat).parent.name))
    return pids


def wait_group_gone(pgid: int, timeout: float = 600) -> None:
    """Wait until the orphaned jobs of a killed Snakemake (its process group) have ended."""
    deadline = time.monotonic() + timeout
    while live_members(pgid):
        if time.monotonic() > deadline:
            os.killpg(pgid, signal.SIGKILL)
            raise AssertionError("the killed Snakemake's jobs did not end")
        time.sleep(0.2)


# --------------------------------------------------------------------------- full disk


@needs_root
def test_failed_zarr_write_leaves_no_temporary(tmp_path: Path):
    """zarr-python's other writes go on after one fails; none may re-create the temporary."""
    betas = np.random.default_rng(0).integers(-3000, 3000, (750, 4000)).astype(np.int16)
    with small_filesystem(tmp_path / "small", 1024) as small:
        target = small / "rows.zarr"
        problem = rf"^{target}: no space left on device \(ENOSPC"
        with pytest.raises(OutputError, match=problem), atomic_output(target) as tmp:
            arr = zarr.create_array(tmp, shape=betas.shape, dtype=betas.dtype, chunks=(1, 4000))
            arr[...] = betas
        time.sleep(1.0)  # time for writes still running to re-create files
        assert list(small.iterdir()) == []


def test_write_errors_name_the_output():
    full = OSError(errno.ENOSPC, "No space left on device")
    assert str(output_error("out.zarr", full)) == "out.zarr: no space left on device (ENOSPC)"
    denied = PermissionError(errno.EACCES, "Permission denied", "out/.x.incomplete-1")
    assert str(output_error("out/x", denied)) == (
        "out/x: permission denied (EACCES on out/.x.incomplete-1)"
    )
    assert output_error("x", OSError(errno.EIO, "I/O error")) is None


@pytest.mark.slow
@needs_root
def test_disk_full_writing_a_session_store(demo_run: Path, tmp_path: Path):
    config = link_demo_release(tmp_path, demo_run)
    want = stores_under(store_files(demo_run), *SESSIONS)
    # 6 MB: the estimates and one ~4 MB session store fit, the next store does not
    with small_filesystem(tmp_path / "results", 6000) as results:
        proc = workflow(tmp_path, config, *SESSIONS, cores=1)
        out = output_of(proc)
        assert proc.returncode != 0, out[-3000:]
        built = [s for s in SESSIONS if (tmp_path / s).exists()]
        full = [s for s in SESSIONS if one_line_errors(out, s)]
        assert built, "no store fitted: the filesystem is too small for the test"
        assert len(full) == 1, f"expected one store to hit the full disk; lines for: {full}"
        assert_one_line_error(out, full, r"^no space left on device \(ENOSPC")
        assert "Traceback" not in out, out[-3000:]
        assert_no_partial_output(tmp_path, *full)
        assert_same_files(stores_under(store_files(tmp_path), *built), stores_under(want, *built))

        grow(results, 64000)
        workflow(tmp_path, config, *SESSIONS, cores=1).check_returncode()
        assert_no_partial_output(tmp_path)
        assert_same_files(store_files(tmp_path), want)


@pytest.mark.slow
@needs_root
def test_disk_full_writing_an_roi_store(demo_run: Path, tmp_path: Path):
    config = link_demo_release(tmp_path, demo_run)
    want = stores_under(store_files(demo_run), NSDGENERAL)
    parts = [f"results/subj01/roi/nsdgeneral.parts/session{s:02d}.zarr" for s in (1, 2, 3)]
    # 2.6 MB: the trial index, the estimates and one ~1.7 MB session part fit, two do not
    with small_filesystem(tmp_path / "results", 2600) as results:
        proc = workflow(tmp_path, config, NSDGENERAL, cores=1)
        out = output_of(proc)
        assert proc.returncode != 0, out[-3000:]
        full = [p for p in parts if one_line_errors(out, p)]
        assert len(full) == 1, f"expected one part to hit the full disk; lines for: {full}"
        assert_one_line_error(out, full, r"^no space left on device \(ENOSPC")
        assert "Traceback" not in out, out[-3000:]
        assert_no_partial_output(tmp_path, *full, NSDGENERAL)

        grow(results, 64000)
        workflow(tmp_path, config, NSDGENERAL, cores=1).check_returncode()
        assert_no_partial_output(tmp_path)  # no temporaries left; the parts are outputs
        assert all((tmp_path / p / "zarr.json").is_file() for p in parts)
        assert_same_files(store_files(tmp_path), want)


def tree_files(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (but Snakemake's timestamps), by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".snakemake_timestamp"
    }


@pytest.mark.slow
@needs_root
def test_disk_full_writing_the_stimulus_store(demo_run: Path, tmp_path: Path):
    config = link_demo_release(tmp_path, demo_run)
    want = tree_files(demo_run / STIMULI)
    before = [demo_run / "results" / "subj01" / n for n in ("trials.tsv", "trials.json")]
    before += [demo_run / "results" / "subj01" / "images.tsv", demo_run / STIMULI_ESTIMATE]
    store = [f for f in (demo_run / STIMULI).rglob("*") if f.is_file()]
    # the trial tables and the estimate fit, then half of the image store (tmpfs pages)
    with small_filesystem(
        tmp_path / "results", tmpfs_kb(before) + 64 + tmpfs_kb(store) // 2
    ) as results:
        proc = workflow(tmp_path, config, STIMULI, cores=1)
        out = output_of(proc)
        assert proc.returncode != 0, out[-3000:]
        assert_one_line_error(out, STIMULI, r"^no space left on device \(ENOSPC")
        assert "Traceback" not in out, out[-3000:]
        assert_no_partial_output(tmp_path, STIMULI)
        assert not any((results / "stimuli").glob(".*")), "scratch space left behind"

        grow(results, 64000)
        workflow(tmp_path, config, STIMULI, cores=1).check_returncode()
        assert_no_partial_output(tmp_path)
        assert_same_files(tree_files(tmp_path / STIMULI), want)


# --------------------------------------------------------------------------- permissions


@pytest.mark.slow
def test_read_only_results_folder_fails_clearly(demo_run: Path, tmp_path: Path):
    config = link_demo_release(tmp_path, demo_run)
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o555)
    try:
        proc = workflow(tmp_path, config, unprivileged=True)
    finally:
        results.chmod(0o755)
    out = output_of(proc)
    assert proc.returncode != 0
    assert_one_line_error(out, results, r"output folder is not writable \(permission denied\)")
    assert "Traceback" not in out, out[-3000:]
    assert list(results.iterdir()) == []


@pytest.mark.slow
def test_read_only_store_folder_fails_clearly(demo_run: Path, tmp_path: Path):
    config = link_demo_release(tmp_path, demo_run)
    folder = tmp_path / "results/subj01/betas"
    folder.mkdir(parents=True)
    folder.chmod(0o555)
    try:
        proc = workflow(tmp_path, config, SESSIONS[0], unprivileged=True)
    finally:
        if folder.exists():  # Snakemake removes it once empty
            folder.chmod(0o755)
    out = output_of(proc)
    assert proc.returncode != 0
    assert_one_line_error(out, SESSIONS[0], r"^permission denied \(EACCES on .*incomplete-")
    assert "Traceback" not in out, out[-3000:]
    assert_no_partial_output(tmp_path, SESSIONS[0])
    assert not folder.exists() or list(folder.iterdir()) == []


def _unreadable_run(demo_root: Path, base: Path, source: str):
    """A --keep-going run in which one file (session 2's betas or the atlas) cannot be read.

    One file per run: Snakemake stops the whole run when it cannot record metadata of a job
    whose input is unreadable, so a second unreadable file might never be reached.
    """
    root = copy_release(demo_root, base)
    path = {"betas": betas_file(root, 2), "atlas": roi_file(root, "nsdgeneral.nii.gz")}[source]
    path.chmod(0o000)
    try:
        config = release_config(root, sessions=[1, 2])
        proc = workflow(base / "work", config, *KEEP_GOING, unprivileged=True)
    finally:
        path.chmod(0o644)
    return path, base / "work", proc


@pytest.mark.slow
@pytest.mark.parametrize("source", ["betas", "atlas"])
def test_unreadable_source_fails_clearly(demo_root: Path, tmp_path: Path, source: str):
    path, workdir, proc = _unreadable_run(demo_root, tmp_path, source)
    out = output_of(proc)
    assert proc.returncode != 0
    assert_one_line_error(out, path, r"^permission denied: the file is not readable")
    assert "Traceback" not in out, out[-3000:]
    # every estimate reads the atlas; only session 2's jobs read its betas
    sessions = (1, 2) if source == "atlas" else (2,)
    assert_no_partial_output(
        workdir,
        *(f"results/subj01/estimates/session{s:02d}.json" for s in sessions),
        *(SESSIONS[s - 1] for s in sessions),
    )


# --------------------------------------------------------------------------- two Snakemakes


def _start(workdir: Path, config: dict, *args: str, cores: int = 2) -> subprocess.Popen:
    cmd, env = snakemake_command(workdir, config, *args, cores=cores)
    log = open(workdir / "first_run.log", "w")  # noqa: SIM115 (closed by the caller's wait)
    return subprocess.Popen(
        cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def _wait_for(pattern: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not glob.glob(pattern):
        assert proc.poll() is None, "the first run ended before the test could act"
        assert time.monotonic() < deadline, f"{pattern} never appeared"
        time.sleep(0.01)


@pytest.mark.slow
def test_second_snakemake_in_the_same_folder_is_refused(demo_run: Path, tmp_path: Path):
    config = link_demo_release(tmp_path, demo_run)
    first = _start(tmp_path, config, *SESSIONS, cores=1)
    try:
        _wait_for(str(tmp_path / ".snakemake/locks/*"), first)
        second = run_snakemake(tmp_path, *SESSIONS, config=config, check=False)
        still_running = first.poll() is None
    finally:
        first.wait(timeout=900)
    assert still_running, "the first run ended before the second was refused: inconclusive"
    out = output_of(second)
    assert second.returncode != 0
    assert "Error: Directory cannot be locked." in out, out[-3000:]
    assert "Job stats" not in out
    assert first.returncode == 0, (tmp_path / "first_run.log").read_text()[-3000:]
    assert_same_files(store_files(tmp_path), stores_under(store_files(demo_run), *SESSIONS))


@pytest.mark.slow
def test_killed_snakemake_resumes_with_unlock_and_rerun_incomplete(demo_run: Path, tmp_path: Path):
    config = link_demo_release(tmp_path, demo_run)
    first = _start(tmp_path, config)
    try:
        # Snakemake itself dies mid-run (e.g. OOM-killed); its running jobs are orphaned
        _wait_for(str(tmp_path / "results/subj01/betas/.session0?.zarr.incomplete-*"), first)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        wait_group_gone(first.pid)
    finally:
        if first.poll() is None or live_members(first.pid):
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    # the lock it left refuses a plain rerun; README: --unlock, then --rerun-incomplete
    locked = run_snakemake(tmp_path, config=config, check=False)
    assert locked.returncode != 0 and "Directory cannot be locked" in output_of(locked)
    run_snakemake(tmp_path, "--unlock", config=config)
    proc = run_snakemake(tmp_path, "--rerun-incomplete", config=config)
    assert job_stats(output_of(proc)), "the rerun had nothing to do"
    assert_no_partial_output(tmp_path)
    assert_same_files(store_files(tmp_path), store_files(demo_run))
    assert_same_files(result_files(tmp_path), result_files(demo_run))


# --------------------------------------------------------------------------- atlas grids


def _flipped(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """The same atlas stored with its x axis reversed: same world positions, other voxels."""
    data = np.asarray(img.dataobj)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1
    return data[::-1].copy(), img.affine @ flip


def _shifted(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Same voxels, the grid moved by 1.8 mm: another subject's or another space's atlas."""
    aff = img.affine.copy()
    aff[:3, 3] += [1.8, 0, 0]
    return np.asarray(img.dataobj), aff


# ROI name -> (makes its atlas from nsdgeneral's, problem regex). Names sort after
# "nsdgeneral": the config file is written with sorted keys and the first ROI is the reference.
OFF_GRID = {
    "reversed": (_flipped, r"^affine \[-1\.8 .* differs from .*nsdgeneral\.nii\.gz's \[1\.8 "),
    "shifted": (_shifted, r"^affine .* differs from .*nsdgeneral\.nii\.gz's .*one grid"),
}


def test_atlas_grid_check(tmp_path: Path):
    data = np.zeros((4, 5, 6), np.int16)
    ref = affine((4, 5, 6))
    write_nifti_gz(tmp_path / "ref.nii.gz", data, ref)
    write_nifti_gz(tmp_path / "same.nii.gz", data, ref)
    img = nib.load(tmp_path / "ref.nii.gz")
    require_same_grid(tmp_path / "same.nii.gz", img.affine, tmp_path / "ref.nii.gz")
    for make in (_flipped, _shifted):
        write_nifti_gz(tmp_path / "x.nii.gz", *make(img))
        bad = nib.load(tmp_path / "x.nii.gz").affine
        with pytest.raises(InputError, match=rf"^{tmp_path}/x.nii.gz: affine .* differs from"):
            require_same_grid(tmp_path / "x.nii.gz", bad, tmp_path / "ref.nii.gz")


def test_atlas_off_the_betas_grid_is_refused_when_reading_a_session_store(
    demo_root: Path, tmp_path: Path
):
    """The HDF5 is gone and the atlas replaced by a flipped copy: the session store's recorded
    affine (the betas' grid) refuses it, even with no other atlas to compare to."""
    from nsdzarr.prepare import layout
    from nsdzarr.prepare.convert import convert_session
    from nsdzarr.prepare.roi import extract_session
    from nsdzarr.prepare.storage import ROI_STORAGE
    from nsdzarr.prepare.trials import write_trial_tables

    atlas = roi_file(demo_root, "nsdgeneral.nii.gz")
    store = tmp_path / "session01.zarr"
    convert_session(betas_file(demo_root, 1), store, affine=nib.load(atlas).affine)
    tables = [tmp_path / n for n in ("trials.tsv", "trials.json", "images.tsv")]
    write_trial_tables(layout.design_path(demo_root), "subj01", [1], *tables)
    flipped = tmp_path / "nsdgeneral.nii.gz"
    write_nifti_gz(flipped, *_flipped(nib.load(atlas)))
    part = tmp_path / "part.zarr"
    with pytest.raises(InputError) as e:
        extract_session(store, flipped, None, tables[0], 1, part, ROI_STORAGE, reference=flipped)
    assert re.match(rf"^{flipped}: affine \[-1\.8 .* differs from {store}'s recorded", str(e.value))
    assert not part.exists() and not list(tmp_path.glob(".part.zarr*"))
    extract_session(store, atlas, None, tables[0], 1, part, ROI_STORAGE, reference=atlas)
    assert (part / "zarr.json").is_file()


@pytest.fixture(scope="module")
def off_grid_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("off_grid")
    root = copy_release(demo_root, base)
    ref = nib.load(roi_file(root, "nsdgeneral.nii.gz"))
    rois = {"nsdgeneral": {"file": "nsdgeneral.nii.gz"}}  # first: the session stores' affine
    for name, (make, _problem) in OFF_GRID.items():
        write_nifti_gz(roi_file(root, f"{name}.nii.gz"), *make(ref))
        rois[name] = {"file": f"{name}.nii.gz"}
    config = release_config(root, sessions=[1], rois=rois)
    targets = [f"results/subj01/roi/{name}.zarr" for name in OFF_GRID]
    proc = run_snakemake(base / "work", *KEEP_GOING, *targets, config=config, check=False)
    return root, base / "work", proc


@pytest.mark.slow
@pytest.mark.parametrize("roi", sorted(OFF_GRID))
def test_atlas_off_the_subjects_grid_fails_clearly(off_grid_run, roi: str):
    root, workdir, proc = off_grid_run
    out = output_of(proc)
    assert proc.returncode != 0
    assert_one_line_error(out, roi_file(root, f"{roi}.nii.gz"), OFF_GRID[roi][1])
    assert_no_partial_output(
        workdir, f"results/subj01/roi/{roi}.zarr", f"results/subj01/roi/{roi}.parts/session01.zarr"
    )
