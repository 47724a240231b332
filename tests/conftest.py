"""Shared fixtures: real Snakemake runs in temporary folders, the demo release on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from nsdzarr.prepare.demo import DemoSpec, write_demo  # noqa: E402


def default_config() -> dict:
    """CI's demo config, .test/config/config.yaml (the same run as config/config.yaml)."""
    return yaml.safe_load((REPO / ".test" / "config" / "config.yaml").read_text())


def snakemake_command(
    workdir: Path, config: dict | None, *args: str, cores: int = 2
) -> tuple[list[str], dict[str, str]]:
    """Command line and environment of a workflow run in ``workdir``, writing ``config`` there."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "config.yaml"
    cfg.write_text(yaml.safe_dump(config if config is not None else default_config()))
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(cfg),
        "--cores", str(cores),
        *args,
    ]  # fmt: skip
    return cmd, {**os.environ, "PYTHONPATH": str(REPO / "src")}


def run_snakemake(
    workdir: Path, *args: str, config: dict | None = None, check: bool = True, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run the workflow with ``workdir`` as working directory and ``config`` as its config file."""
    cmd, env = snakemake_command(workdir, config, *args)
    proc = subprocess.run(
        cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A miniature NSD release written by the library (what the demo rule writes)."""
    root = tmp_path_factory.mktemp("nsd")
    write_demo(root, DemoSpec())
    return root


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working folder of one complete run of the shipped demo workflow."""
    workdir = tmp_path_factory.mktemp("demo_run")
    run_snakemake(workdir)
    return workdir
