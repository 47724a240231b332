"""The workflow imports the installed nsdzarr package: a pip install, the conda env's
post-deploy install, and a one-line error when it is not installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, default_config

pytestmark = pytest.mark.slow

# `python -m snakemake` in a Python where nsdzarr cannot be imported: the path entries that
# hold it (this checkout's src/, an editable install's) are dropped before Snakemake starts.
WITHOUT_NSDZARR = """
import sys
from pathlib import Path
sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "nsdzarr").is_dir()]
sys.argv = ["snakemake", *sys.argv[1:]]
from snakemake.cli import main
main()
"""


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without PYTHONPATH (which would make nsdzarr importable)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env | extra


def test_without_the_package_the_workflow_says_how_to_install_it(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_NSDZARR, "--snakefile", str(REPO / "Snakefile"),
         "--cores", "1", "--dry-run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=clean_env(),
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    wanted = f"the nsdzarr package is not installed for {sys.executable}: "
    wanted += f"run `pip install -e {REPO}` first"
    assert wanted in out.splitlines(), out
    assert "ModuleNotFoundError" not in out and "Traceback" not in out, out
    assert not (tmp_path / "results").exists()


CALLER = f"""
import os

module nsdzarr:
    snakefile:
        "{REPO / "Snakefile"}"
    config:
        config


use rule * from nsdzarr as nsdzarr_*


rule where:
    output:
        "where.txt",
    run:
        Path(output[0]).write_text(os.environ["NSDZARR_WORKFLOW_DIR"])
"""


def test_the_workflow_tells_the_post_deploy_script_its_checkout(tmp_path: Path):
    """rules/common.smk exports the checkout the rules come from, also as a module elsewhere."""
    (tmp_path / "Snakefile").write_text(CALLER)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(default_config()))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--configfile", "config.yaml", "--cores", "1",
         "where.txt"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=clean_env(PYTHONPATH=str(REPO / "src"), NSDZARR_WORKFLOW_DIR="/elsewhere"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "where.txt").read_text() == str(REPO)


def test_post_deploy_installs_this_checkout_and_the_workflow_runs_from_it(tmp_path: Path):
    """The conda env's post-deploy step, in a fresh venv standing in for the conda env (conda is
    not on this machine); then a demo run with that env's Python and no PYTHONPATH."""
    venv = tmp_path / "env"
    # The third-party packages come from this Python (the conda env pins the same ones).
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], check=True
    )
    python = venv / "bin" / "python"
    # Snakemake runs a copy of the script from .snakemake/conda/, not from envs/.
    copy = tmp_path / ".snakemake" / "conda" / "0123abcd.post-deploy.sh"
    copy.parent.mkdir(parents=True)
    shutil.copy(REPO / "envs" / "nsdzarr.post-deploy.sh", copy)
    path = f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"  # as `conda activate` sets it
    missing = subprocess.run(
        ["bash", copy], cwd=copy.parent, capture_output=True, text=True,
        env={k: v for k, v in clean_env(PATH=path).items() if k != "NSDZARR_WORKFLOW_DIR"},
    )  # fmt: skip
    assert missing.returncode != 0 and "NSDZARR_WORKFLOW_DIR" in missing.stderr
    subprocess.run(
        ["bash", copy], cwd=copy.parent, check=True, timeout=300,
        env=clean_env(PATH=path, NSDZARR_WORKFLOW_DIR=str(REPO)),
    )  # fmt: skip
    where = subprocess.run(
        [python, "-c", "import nsdzarr.prepare.convert as m; print(m.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, check=True, env=clean_env(),
    )  # fmt: skip
    assert where.stdout.strip() == str(REPO / "src/nsdzarr/prepare/convert.py")

    work = tmp_path / "work"
    work.mkdir()
    (work / "config.yaml").write_text(yaml.safe_dump(default_config()))
    run = subprocess.run(
        [python, "-m", "snakemake", "--snakefile", REPO / "Snakefile", "--configfile",
         "config.yaml", "--cores", "2", "results/subj01/betas/session01.zarr"],
        cwd=work, capture_output=True, text=True, timeout=600, env=clean_env(),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert (work / "results/subj01/betas/session01.zarr/betas/zarr.json").is_file()
