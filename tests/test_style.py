"""Style gates CI enforces: ruff for Python, snakefmt and `snakemake --lint` for the workflow."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

SNAKE_FILES = [str(REPO / "Snakefile"), *map(str, sorted((REPO / "rules").glob("*.smk")))]


def test_ruff_is_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "src", "scripts", "tests", "benchmarks"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_snakefmt_is_clean():
    proc = subprocess.run(
        ["snakefmt", "--check", *SNAKE_FILES], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow  # Snakemake parses the whole workflow: ~10 s
def test_snakemake_lint_is_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
