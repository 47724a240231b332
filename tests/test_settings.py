"""The storage defaults live once: the schema's defaults are the library's settings objects."""

from __future__ import annotations

import dataclasses

import yaml
from conftest import REPO

from nsdzarr.prepare.storage import ROI_STORAGE, STIMULI_STORAGE, StorageSettings


def _defaults(section: str) -> dict:
    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())
    props = schema["properties"][section]["properties"]
    return {key: prop["default"] for key, prop in props.items() if "default" in prop}


def _fields(settings, keys) -> dict:
    values = dataclasses.asdict(settings)
    return {key: values[key] for key in keys}


def test_session_storage_defaults_are_the_library_defaults():
    schema = _defaults("storage")
    assert schema == _fields(StorageSettings(), schema)
    assert set(schema) == {f.name for f in dataclasses.fields(StorageSettings)}


def test_roi_storage_defaults_are_roi_storage():
    schema = _defaults("roi_storage")
    assert schema == _fields(ROI_STORAGE, schema)
    assert ROI_STORAGE.trials_per_chunk == 1  # not configurable: the loader reads single trials


def test_stimuli_storage_defaults_are_stimuli_storage():
    schema = _defaults("stimuli")
    storage = {f.name for f in dataclasses.fields(STIMULI_STORAGE)}
    assert {k: schema[k] for k in storage} == dataclasses.asdict(STIMULI_STORAGE)


def test_shipped_config_repeats_the_schema_defaults():
    """config/config.yaml shows the storage keys for users to read; they must be the defaults."""
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    for section in ("storage", "roi_storage"):
        schema = _defaults(section)
        assert config[section] == {k: schema[k] for k in config[section]}, section
