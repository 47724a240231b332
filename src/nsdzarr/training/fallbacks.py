"""Seams around the private APIs the fast paths use, each probed once, with a standard fallback.

``transport``: torch's private ``_typed_storage()._new_shared`` and memfd batch pools that the
main process opens through ``/proc/<pid>/fd`` (:mod:`.batch_transport`); fallback: torch's
standard DataLoader transport (tensors moved into shared memory when pickled). ``decoders``:
the zstd and blosc C symbols numcodecs' extension modules happen to export (:mod:`.zarr_v3`);
fallback: zstandard's and numcodecs' public decode functions. Batches are the same either way.

``NSDZARR_DISABLE_PRIVATE=transport,decoders`` (or ``all``) forces the fallbacks; it is read at
each seam, so it reaches spawned DataLoader workers. A fallback logs one warning per process;
DataLoader workers log it at debug level only (their main process probed first and warned).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import logging
import os
import sys
from typing import Any

ENV = "NSDZARR_DISABLE_PRIVATE"
SEAMS = ("transport", "decoders")
log = logging.getLogger(__name__)

_PTR, _SIZE = ctypes.c_void_p, ctypes.c_size_t
_SIGNATURES = {  # numcodecs module: {function: (restype, argtypes)}
    "zstd": {
        "ZSTD_createDCtx": (_PTR, []),
        "ZSTD_freeDCtx": (_SIZE, [_PTR]),
        "ZSTD_decompressDCtx": (_SIZE, [_PTR, _PTR, _SIZE, _PTR, _SIZE]),
    },
    "blosc": {"blosc_decompress_ctx": (ctypes.c_int, [_PTR, _PTR, _SIZE, ctypes.c_int])},
}
_INSTEAD = {  # seam: (what it is, what is used instead)
    "transport": ("batch transport", "torch's standard one (fresh shared memory per batch)"),
    "zstd": ("zstd decoder", "zstandard's public decompressor (one more copy per chunk)"),
    "blosc": ("blosc decoder", "numcodecs.blosc.decompress (one more copy per chunk)"),
}


def disabled(seam: str) -> bool:
    """Whether ``NSDZARR_DISABLE_PRIVATE`` (comma-separated seams, or ``all``) names ``seam``."""
    names = {s.strip() for s in os.environ.get(ENV, "").split(",")}
    return seam in names or "all" in names


def private_transport() -> bool:
    """Whether the private batch transport works in this process (else torch's standard one)."""
    return _transport(disabled("transport"))


def numcodecs_c_library(module: str) -> Any:
    """numcodecs' bundled C library for ``module`` (zstd, blosc) with our functions declared;
    None when unavailable (then the public decoders are used)."""
    return _c_library(module, disabled("decoders"))


@functools.cache
def _transport(off: bool) -> bool:
    if off:
        return _fall_back("transport", f"disabled by {ENV}")
    import mmap

    try:
        import torch

        torch.empty(0)._typed_storage()._new_shared(1, device="cpu")
        fd = os.memfd_create("nsdzarr-probe", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, mmap.PAGESIZE)
            f = os.open(f"/proc/{os.getpid()}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
            try:
                mmap.mmap(f, 0).close()
            finally:
                os.close(f)
        finally:
            os.close(fd)
    except (ImportError, AttributeError, TypeError, RuntimeError, OSError) as exc:
        what = "torch's _typed_storage()._new_shared, os.memfd_create or /proc/<pid>/fd"
        return _fall_back("transport", f"{what} unavailable ({type(exc).__name__}: {exc})")
    return True


@functools.cache
def _c_library(module: str, off: bool) -> Any:
    if off:
        _fall_back(module, f"disabled by {ENV}")
        return None
    try:
        lib = ctypes.CDLL(importlib.import_module(f"numcodecs.{module}").__file__)
        for name, (restype, argtypes) in _SIGNATURES[module].items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except (ImportError, OSError, AttributeError, TypeError) as exc:
        _fall_back(module, f"numcodecs.{module}'s C symbols unavailable ({exc})")
        return None
    return lib


def _fall_back(what: str, why: str) -> bool:
    level = logging.DEBUG if _in_dataloader_worker() else logging.WARNING
    name, instead = _INSTEAD[what]
    log.log(level, "nsdzarr %s: %s; using %s instead", name, why, instead)
    return False


def _in_dataloader_worker() -> bool:
    data = sys.modules.get("torch.utils.data")  # never imports torch for the decoders
    return data is not None and data.get_worker_info() is not None


def reset() -> None:
    """Forget the probes' results (tests: probe again, log again)."""
    _transport.cache_clear()
    _c_library.cache_clear()
