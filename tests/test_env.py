"""The conda environment and pyproject.toml list every third-party module the code imports."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import yaml
from conftest import REPO

# Import name -> distribution name, where they differ (pip and conda-forge agree on these).
DISTRIBUTIONS = {"google_crc32c": "google-crc32c", "yaml": "pyyaml", "PIL": "pillow"}
# conda-forge packages that provide a distribution without its GUI backends.
CONDA_ALTERNATIVES = {"matplotlib": {"matplotlib", "matplotlib-base"}}
# Optional extras: import name -> extra. torch is used by the training loader only
# (loader.py, batch_transport.py) and is brought by the user with their own CUDA build;
# lightning by training/datamodule.py only. tensorstore and crc32c speed up the lossless checks
# (verify.py) and have fallbacks.
OPTIONAL = {
    "torch": "torch",
    "lightning": "lightning",
    "tensorstore": "verify",
    "crc32c": "verify",
}
# Needed although nothing imports it yet: the image stores decode the NSD stimuli with pillow.
ALSO_REQUIRED = {"pillow"}


def source_files() -> list[Path]:
    return sorted((REPO / "src" / "nsdzarr").rglob("*.py")) + sorted(
        (REPO / "scripts").glob("*.py")
    )


def imported_modules() -> dict[str, list[str]]:
    """Top-level third-party modules imported anywhere in src/ and scripts/ -> files."""
    found: dict[str, list[str]] = {}
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "nsdzarr":
                    found.setdefault(top, []).append(str(path.relative_to(REPO)))
    return found


def requirement_name(spec: str) -> str:
    """``"zarr>=3.1"`` or ``"zarr =3.1.6"`` -> ``"zarr"`` (normalized)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    assert match, spec
    return re.sub(r"[-_.]+", "-", match[1]).lower()


def required() -> dict[str, list[str]]:
    """Distribution -> importing files, for every module that is not an optional extra."""
    out = {
        DISTRIBUTIONS.get(module, module).lower(): files
        for module, files in imported_modules().items()
        if module not in OPTIONAL
    }
    return out | {name: ["(image stores)"] for name in ALSO_REQUIRED}


def conda_packages() -> set[str]:
    env = yaml.safe_load((REPO / "envs" / "nsdzarr.yaml").read_text())
    return {requirement_name(d) for d in env["dependencies"] if isinstance(d, str)}


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_the_scan_sees_the_imports_we_know_of():
    found = imported_modules()
    assert {"numpy", "zarr", "h5py", "zstandard", "google_crc32c", "torch"} <= found.keys()
    assert "os" not in found and "nsdzarr" not in found
    assert REPO / "scripts" / "convert.py" in source_files()


def test_every_imported_module_is_in_the_conda_env():
    packages = conda_packages()
    missing = {
        dist: files
        for dist, files in required().items()
        if not CONDA_ALTERNATIVES.get(dist, {dist}) & packages
    }
    assert not missing, f"envs/nsdzarr.yaml lacks {missing}"


def test_every_imported_module_is_a_pyproject_dependency():
    deps = {requirement_name(d) for d in pyproject()["dependencies"]}
    missing = {dist: files for dist, files in required().items() if dist not in deps}
    assert not missing, f"pyproject.toml dependencies lack {missing}"


def test_optional_imports_are_extras():
    extras = pyproject()["optional-dependencies"]
    for module, extra in OPTIONAL.items():
        assert module in imported_modules(), f"{module} is no longer imported: drop it here"
        assert DISTRIBUTIONS.get(module, module) in {requirement_name(d) for d in extras[extra]}


def test_the_conda_env_has_the_verify_extra():
    """Workflow jobs run in the conda env: it brings the independent read-back (tensorstore)
    and the fast checksums (crc32c), not only their fallbacks."""
    verify = {requirement_name(d) for d in pyproject()["optional-dependencies"]["verify"]}
    assert verify == {"tensorstore", "crc32c"}
    assert verify <= conda_packages(), f"envs/nsdzarr.yaml lacks {verify - conda_packages()}"


def test_the_conda_env_installs_the_package_itself():
    """--sdm conda: pip and setuptools in the env, and the post-deploy script that Snakemake runs
    beside an env file installs the checkout (tests/test_install.py runs it)."""
    assert {"pip", "setuptools"} <= conda_packages()
    script = (REPO / "envs" / "nsdzarr.post-deploy.sh").read_text()
    assert '--no-deps --no-build-isolation --editable "$NSDZARR_WORKFLOW_DIR"' in script
