"""The seams around private APIs: each fallback gives the fast path's batches and warns once.

``NSDZARR_DISABLE_PRIVATE`` is read at the seam in every process, so it also forces spawned
DataLoader workers (a monkeypatch in the parent would not reach them); each worker records
what its seams chose, which shows the fallback really ran where the batches were made.
"""

from __future__ import annotations

import ctypes.util
import functools
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from test_loader import build_store

from nsdzarr.prepare.storage import StorageSettings
from nsdzarr.training import fallbacks
from nsdzarr.training.loader import BetasDataset
from nsdzarr.training.zarr_v3 import Decoder

SUBJECTS = {"subj01": StorageSettings("zstd", 1), "subj02": StorageSettings("blosc-lz4", 5)}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """One session per subject: a zstd store and a blosc store (both decoders' paths)."""
    root = tmp_path_factory.mktemp("fallbacks")
    return {s: build_store(root, s, [1], settings) for s, settings in SUBJECTS.items()}


@pytest.fixture(scope="module")
def fast_betas(stores: dict) -> torch.Tensor:
    """Every item's betas read by the fast path in this process."""
    fallbacks.reset()
    return BetasDataset(stores, split="all")[:]["betas"]


@pytest.fixture(autouse=True)
def fresh_probes(monkeypatch):
    """Each test probes anew, without the setting of whoever ran before."""
    monkeypatch.delenv(fallbacks.ENV, raising=False)
    fallbacks.reset()
    yield
    fallbacks.reset()


def record_seams(folder: str, worker_id: int) -> None:
    """worker_init_fn: what this worker's seams chose."""
    seen = {
        "transport": fallbacks.private_transport(),
        "zstd": Decoder("zstd").direct,
        "blosc": Decoder("blosc").direct,
    }
    Path(folder, f"{worker_id}.json").write_text(json.dumps(seen))


def epoch(ds: BetasDataset, context: str | None, folder: Path | None = None) -> dict:
    kwargs: dict = {"batch_size": 64, "shuffle": False}
    if context is not None:
        init = functools.partial(record_seams, str(folder)) if folder else None
        kwargs.update(num_workers=2, multiprocessing_context=context, worker_init_fn=init)
    batches = list(ds.dataloader(**kwargs))
    out = {k: torch.cat([b[k] for b in batches]) for k in ("betas", "trial", "nsd_id")}
    out["subject"] = [s for b in batches for s in b["subject"]]
    out["shared"] = {b["betas"].is_shared() for b in batches}  # torch's shared memory or not
    return out


def warnings(caplog, name: str = "") -> list[str]:
    """The seams' warnings (about ``name``) that this process logged."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == fallbacks.__name__ and r.levelno == logging.WARNING and name in r.getMessage()
    ]


@pytest.mark.parametrize(
    "context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)]
)  # spawn: seconds per worker start-up
def test_forced_fallbacks_give_the_fast_paths_batches(
    stores: dict, tmp_path: Path, context: str, monkeypatch, caplog, capfd
):
    caplog.set_level(logging.WARNING)
    fast_dir = tmp_path / "fast"
    fast_dir.mkdir()
    fast = epoch(BetasDataset(stores, split="all", normalize="psc"), context, fast_dir)
    assert not warnings(caplog)
    assert fast["shared"] == {False}  # the worker's reused buffers, not fresh shared memory
    for path in fast_dir.iterdir():
        assert json.loads(path.read_text()) == {"transport": True, "zstd": True, "blosc": True}
    assert sorted(set(fast["subject"])) == ["subj01", "subj02"]
    # spawn: both at once (each spawned epoch costs seconds of worker start-up)
    cases = ("transport", "decoders", "transport,decoders") if context == "fork" else ("all",)
    for disable in cases:
        monkeypatch.setenv(fallbacks.ENV, disable)
        fallbacks.reset()
        folder = tmp_path / disable
        folder.mkdir()
        caplog.clear()
        ds = BetasDataset(stores, split="all", normalize="psc")
        slow = epoch(ds, context, folder)
        for key in ("betas", "trial", "nsd_id"):
            assert torch.equal(slow[key], fast[key]), (disable, key)
        assert slow["subject"] == fast["subject"]
        transport = not {"transport", "all"} & set(disable.split(","))
        decoders = not {"decoders", "all"} & set(disable.split(","))
        assert ds.pooled_batches is transport
        assert slow["shared"] == {not transport}  # torch's own transport: its shared memory
        seen = [json.loads(p.read_text()) for p in folder.iterdir()]
        assert len(seen) == 2
        assert all(s == {"transport": transport, "zstd": decoders, "blosc": decoders} for s in seen)
        # the main process warned once per seam that fell back
        assert len(warnings(caplog, "batch transport")) == (not transport)
        assert len(warnings(caplog, "zstd decoder")) == (not decoders)
        assert len(warnings(caplog, "blosc decoder")) == (not decoders)
    assert "nsdzarr" not in capfd.readouterr().err  # spawned workers probed again, quietly


def test_warns_once_per_process_naming_what_is_missing(stores: dict, monkeypatch, caplog):
    monkeypatch.setenv(fallbacks.ENV, "all")
    caplog.set_level(logging.WARNING)
    for _ in range(3):  # datasets, batches, decoders per thread: one warning per seam
        ds = BetasDataset(stores, split="all", decode_threads=2)
        ds[list(range(0, len(ds), 7))]
        epoch(ds, None)
    assert len(warnings(caplog, "batch transport")) == 1
    (zstd,) = warnings(caplog, "zstd decoder")
    (blosc,) = warnings(caplog, "blosc decoder")
    assert fallbacks.ENV in zstd and "zstandard" in zstd and "numcodecs.blosc" in blosc
    assert len(warnings(caplog)) == 3


def no_proc_open(path, *args, **kwargs):
    """os.open as where /proc/<pid>/fd is not readable (hidepid, a sandbox)."""
    if str(path).startswith("/proc/"):
        raise PermissionError(13, "Permission denied", path)
    return OS_OPEN(path, *args, **kwargs)


OS_OPEN = os.open
BREAKAGES = {  # what the warning names: how to take it away
    "_new_shared": lambda m: m.delattr(torch.storage.TypedStorage, "_new_shared"),
    "memfd_create": lambda m: m.delattr(os, "memfd_create"),
    "Permission denied": lambda m: m.setattr(os, "open", no_proc_open),
}


@pytest.mark.parametrize("missing", list(BREAKAGES))
def test_missing_torch_storage_call_memfd_or_proc(
    stores: dict, fast_betas: torch.Tensor, missing: str, caplog
):
    """Really missing (not disabled): the probe fails and torch's transport is used."""
    caplog.set_level(logging.WARNING)
    with pytest.MonkeyPatch.context() as m:
        BREAKAGES[missing](m)
        fallbacks.reset()
        ds = BetasDataset(stores, split="all")
        got = epoch(ds, "fork")  # forked workers inherit the breakage and the probe's result
    assert not ds.pooled_batches
    assert torch.equal(got["betas"], fast_betas) and got["shared"] == {True}
    (line,) = warnings(caplog, "batch transport")
    assert missing in line and "torch's standard" in line


def test_missing_numcodecs_symbols(stores: dict, fast_betas: torch.Tensor, monkeypatch, caplog):
    """numcodecs' modules without the C symbols (here: libc in their place) -> public decoders."""
    import numcodecs.blosc
    import numcodecs.zstd

    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(numcodecs.blosc, "use_threads", numcodecs.blosc.use_threads)
    for module in (numcodecs.zstd, numcodecs.blosc):
        monkeypatch.setattr(module, "__file__", ctypes.util.find_library("c"))
    fallbacks.reset()
    ds = BetasDataset(stores, split="all")
    assert not Decoder("zstd").direct and not Decoder("blosc").direct
    assert torch.equal(ds[:]["betas"], fast_betas)
    assert "ZSTD_createDCtx" in warnings(caplog, "zstd decoder")[0]
    assert "blosc_decompress_ctx" in warnings(caplog, "blosc decoder")[0]
