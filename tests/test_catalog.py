"""Snakemake workflow catalog conventions: config/README.md, the catalog file, .test config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO, default_config
from snakemake.utils import validate

SCHEMA = REPO / "config" / "schema.yaml"


def _schema_keys() -> list[str]:
    schema = yaml.safe_load(SCHEMA.read_text())
    keys = []
    for key, prop in schema["properties"].items():
        keys.append(key)
        keys += list(prop.get("properties", {}))
    return keys


@pytest.mark.parametrize(
    "path", [REPO / "config" / "config.yaml", REPO / ".test" / "config" / "config.yaml"]
)
def test_shipped_configs_are_schema_valid(path: Path):
    config = yaml.safe_load(path.read_text())
    validate(config, str(SCHEMA))  # raises on an invalid config


def test_ci_config_is_the_shipped_demo():
    """What CI tests (.test) is what a bare `snakemake` runs (config/config.yaml)."""
    shipped = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert default_config() == shipped
    assert shipped["demo"] is True


def test_config_readme_describes_every_key():
    text = (REPO / "config" / "README.md").read_text()
    missing = [key for key in _schema_keys() if f"`{key}`" not in text]
    assert not missing, f"config/README.md does not describe {missing}"
    assert "../README.md#running-on-a-real-nsd-download" in text
    assert "## Running on a real NSD download" in (REPO / "README.md").read_text()


def test_catalog_file_declares_usage():
    settings = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    usage = settings["usage"]
    assert set(usage["mandatory-flags"]) == {"desc", "flags"}
    deployment = usage["software-stack-deployment"]
    assert deployment["conda"] is True and deployment["report"] is True
    # `conda: true` holds only while every rule declares its environment
    for rules in (REPO / "rules").glob("*.smk"):
        text = rules.read_text()
        n_rules = len(re.findall(r"^rule ", text, re.M))
        assert n_rules == len(re.findall(r"^    conda:$", text, re.M)), rules.name
