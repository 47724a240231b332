"""Zarr v3 arrays of the layouts nsd-zarr writes, read without zarr-python.

Metadata (``zarr.json``), shard indexes and chunk decoding (``bytes`` then zstd or blosc,
then an optional ``crc32c`` checksum, verified before decoding), shared by the training
loader's row reader and the converter's whole-shard reads. Decoding calls the zstd and blosc
libraries bundled in numcodecs through ctypes, straight into the destination buffer with the
GIL released; without those symbols (or with ``NSDZARR_DISABLE_PRIVATE=decoders``,
:mod:`.fallbacks`) it goes through zstandard or numcodecs (one extra copy, more overhead per
chunk).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from nsdzarr.errors import InputError
from nsdzarr.training.fallbacks import numcodecs_c_library

EMPTY = 2**64 - 1  # offset and size of an empty chunk in a shard index

try:  # SSE4.2 and GIL-free, ~3x google_crc32c here (the verify extra); the same values
    from crc32c import crc32c as fast_crc32c
except ImportError:
    fast_crc32c = None


def crc32c_value(buf: Any) -> int:
    """CRC32C of a buffer's bytes, through the ``crc32c`` package when installed."""
    return fast_crc32c(buf) if fast_crc32c is not None else google_crc32c.value(buf)


@dataclass(frozen=True)
class ArrayLayout:
    """What the fast path needs from one array's ``zarr.json`` (plain data, picklable).

    ``grid`` is the shape of one stored object (a shard, or a chunk when unsharded), ``inner``
    the shape of one encoded chunk inside it (== ``grid`` when unsharded). ``codec`` is the
    bytes-to-bytes compressor after the ``bytes`` codec, or None; ``chunk_crc`` whether each
    encoded chunk ends with its ``crc32c`` (4 bytes, little endian).
    """

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype  # on disk, with byte order
    fill_value: Any
    grid: tuple[int, ...]
    inner: tuple[int, ...]
    sharded: bool
    codec: str | None
    index_at_end: bool
    index_crc: bool
    key_prefix: str
    separator: str
    chunk_crc: bool = False

    @property
    def n_inner(self) -> int:
        """Encoded chunks per stored object."""
        return math.prod(g // i for g, i in zip(self.grid, self.inner, strict=True))

    def key(self, coords: Sequence[int]) -> str:
        """File path of the stored object at grid ``coords``."""
        return os.path.join(self.path, self.key_prefix + self.separator.join(map(str, coords)))

    def n_objects(self) -> tuple[int, ...]:
        """Stored objects along each dimension."""
        return tuple(-(-s // g) for s, g in zip(self.shape, self.grid, strict=True))


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(path, "not found: not a Zarr v3 store (or an incomplete one)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"unreadable Zarr metadata ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3:
        raise InputError(path, "not Zarr format 3 metadata")
    return meta


def _bytes_pipeline(codecs: list[Any]) -> tuple[str, str | None, bool] | None:
    """``[bytes, (zstd|blosc)?, crc32c?]`` -> (byte order prefix, compressor name, checksum);
    None if unsupported."""
    if not codecs or not isinstance(codecs[0], dict) or codecs[0].get("name") != "bytes":
        return None
    endian = (codecs[0].get("configuration") or {}).get("endian", "little")
    if endian not in ("little", "big"):
        return None
    rest = [c.get("name") if isinstance(c, dict) else c for c in codecs[1:]]
    crc = bool(rest) and rest[-1] == "crc32c"
    rest = rest[:-1] if crc else rest
    if len(rest) > 1 or (rest and rest[0] not in ("zstd", "blosc")):
        return None
    return ("<" if endian == "little" else ">"), (rest[0] if rest else None), crc


def parse_layout(array_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], ArrayLayout | None]:
    """Metadata of an array and its fast-path layout (None when only zarr-python can read it)."""
    meta = read_json(Path(array_dir) / "zarr.json")
    if meta.get("node_type") != "array":
        raise InputError(Path(array_dir) / "zarr.json", "not a Zarr array")
    try:
        shape = tuple(int(n) for n in meta["shape"])
        dtype = np.dtype(str(meta["data_type"]))
        grid_meta = meta["chunk_grid"]
        codecs = list(meta["codecs"])
    except (KeyError, TypeError, ValueError):
        return meta, None
    if grid_meta.get("name") != "regular" or dtype.kind not in "biuf":
        return meta, None
    grid = tuple(int(n) for n in grid_meta["configuration"]["chunk_shape"])
    cke = meta.get("chunk_key_encoding") or {"name": "default"}
    sep = (cke.get("configuration") or {}).get(
        "separator", "/" if cke["name"] == "default" else "."
    )
    prefix = "c" + sep if cke.get("name") == "default" else ""
    if cke.get("name") not in ("default", "v2") or meta.get("storage_transformers"):
        return meta, None
    sharded = len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed"
    index_at_end, index_crc, inner = True, False, grid
    if sharded:
        cfg = codecs[0].get("configuration") or {}
        inner = tuple(int(n) for n in cfg.get("chunk_shape", ()))
        codecs = list(cfg.get("codecs", ()))
        index = [c.get("name") for c in cfg.get("index_codecs", ())]
        index_endian = ((cfg.get("index_codecs") or [{}])[0].get("configuration") or {}).get(
            "endian", "little"
        )
        if index not in (["bytes"], ["bytes", "crc32c"]) or index_endian != "little":
            return meta, None
        index_crc = index[-1] == "crc32c"
        index_at_end = cfg.get("index_location", "end") == "end"
        if len(inner) != len(shape) or any(g % i for g, i in zip(grid, inner, strict=True)):
            return meta, None
    pipeline = _bytes_pipeline(codecs)
    if pipeline is None or len(grid) != len(shape):
        return meta, None
    order, codec, chunk_crc = pipeline
    fill = meta.get("fill_value", 0)
    if not isinstance(fill, int | float) or isinstance(fill, bool):
        return meta, None
    layout = ArrayLayout(
        str(array_dir), shape, dtype.newbyteorder(order), fill, grid, inner, sharded, codec,
        index_at_end, index_crc, prefix, sep, chunk_crc,
    )  # fmt: skip
    return meta, layout


def strip_crc(buf: np.ndarray, off: int, nb: int, verify: bool = True) -> int:
    """Size of the chunk ``buf[off:off + nb]`` without its trailing crc32c, which is checked
    against the rest unless ``verify`` is false (ValueError on a mismatch)."""
    if nb < 4:
        raise ValueError(f"chunk of {nb} bytes cannot hold its crc32c")
    nb -= 4
    if verify:
        stored = int.from_bytes(buf[off + nb : off + nb + 4], "little")
        got = crc32c_value(buf[off : off + nb])
        if got != stored:
            raise ValueError(f"crc32c checksum mismatch (stored {stored:#010x}, got {got:#010x})")
    return nb


class Decoder:
    """Decode encoded chunks into buffers of their exact decoded size (one per thread).

    With ``crc`` each encoded chunk ends with its crc32c: checked first unless ``verify`` is
    false, then left out of decoding.
    """

    def __init__(self, codec: str | None, crc: bool = False, verify: bool = True) -> None:
        if codec not in (None, "zstd", "blosc"):
            raise ValueError(f"unsupported codec {codec!r}")
        self.codec, self.crc, self.verify = codec, crc, verify
        self._lib = self._dctx = self._py = None
        if codec == "zstd":
            self._lib = numcodecs_c_library("zstd")
            if self._lib is not None:
                self._dctx = self._lib.ZSTD_createDCtx()
            else:
                import zstandard

                self._py = zstandard.ZstdDecompressor()
        elif codec == "blosc":
            self._lib = numcodecs_c_library("blosc")
            if self._lib is None:
                import numcodecs.blosc

                numcodecs.blosc.use_threads = False  # its global thread pool is not fork-safe
                self._py = numcodecs.blosc

    @property
    def direct(self) -> bool:
        """Whether :meth:`at` works (the C libraries were found)."""
        return self.codec is None or self._lib is not None

    def at(self, buf: np.ndarray, buf_addr: int, off: int, nb: int, dst: int, n: int) -> None:
        """Decode ``buf[off:off + nb]`` into the ``n`` bytes at address ``dst`` (if direct).

        ``buf_addr`` is ``buf``'s address: the hot path passes addresses, as making numpy's
        ctypes views costs more than the call. Raises ValueError on damaged data.
        """
        if self.crc:
            nb = strip_crc(buf, off, nb, self.verify)
        if self.codec is None:
            if nb != n:
                raise ValueError(f"raw chunk of {nb} bytes, expected {n}")
            ctypes.memmove(dst, buf_addr + off, n)
        elif self.codec == "blosc":
            _check_blosc_header(buf, off, nb, n)
            got = self._lib.blosc_decompress_ctx(buf_addr + off, dst, n, 1)
            if got != n:
                raise ValueError(f"blosc: decompression failed ({got})")
        else:
            got = self._lib.ZSTD_decompressDCtx(self._dctx, dst, n, buf_addr + off, nb)
            if got != n:
                raise ValueError(f"zstd: decoded {got} bytes, expected {n}")  # or an error code

    def into(self, src: np.ndarray, out: np.ndarray) -> None:
        """Decode ``src`` (contiguous uint8) into ``out`` (contiguous) or raise ValueError."""
        if self.crc and not self.direct:
            src = src[: strip_crc(src, 0, src.nbytes, self.verify)]
        if self.direct:
            self.at(src, src.ctypes.data, 0, src.nbytes, out.ctypes.data, out.nbytes)
        elif self.codec == "blosc":
            _check_blosc_header(src, 0, src.nbytes, out.nbytes)
            try:
                self._py.decompress(src, out)
            except Exception as exc:
                raise ValueError(f"blosc: {exc}") from exc
        else:
            import zstandard

            try:
                raw = self._py.decompress(src, max_output_size=out.nbytes)
            except zstandard.ZstdError as exc:
                raise ValueError(f"zstd: {exc}") from exc
            if len(raw) != out.nbytes:
                raise ValueError(f"zstd: decoded {len(raw)} bytes, expected {out.nbytes}")
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, np.uint8)

    def __del__(self) -> None:
        if self._dctx is not None and self._lib is not None:
            self._lib.ZSTD_freeDCtx(self._dctx)
            self._dctx = None


def _check_blosc_header(buf: Any, off: int, nb: int, n: int) -> None:
    """Refuse a blosc chunk whose header disagrees with its size (blosc trusts the header)."""
    if nb < 16:
        raise ValueError("blosc: truncated header")
    nbytes, _, cbytes = struct.unpack_from("<III", buf, off + 4)
    if nbytes != n or cbytes != nb:
        raise ValueError(f"blosc: header says {nbytes} bytes from {cbytes}")


def index_nbytes(lay: ArrayLayout) -> int:
    """Size of a shard's index: 16 bytes per inner chunk, plus 4 with a crc32c."""
    return 16 * lay.n_inner + (4 if lay.index_crc else 0)


def parse_shard_index(lay: ArrayLayout, raw: bytes, file_size: int, path: str) -> np.ndarray:
    """(offset, nbytes) per inner chunk as uint64 (EMPTY, EMPTY for an empty chunk), checked."""
    n = lay.n_inner
    if len(raw) != index_nbytes(lay):
        raise InputError(path, f"shard file truncated ({file_size} bytes); store corrupt")
    if lay.index_crc and crc32c_value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise InputError(path, "shard index checksum mismatch; store corrupt")
    idx = np.frombuffer(raw, dtype="<u8", count=2 * n).reshape(n, 2).astype(np.uint64)
    lo, hi = (0, file_size - len(raw)) if lay.index_at_end else (len(raw), file_size)
    used = ~((idx[:, 0] == EMPTY) & (idx[:, 1] == EMPTY))
    off, nb = idx[used, 0], idx[used, 1]
    if np.any(off < lo) or np.any(nb > np.uint64(hi)) or np.any(off > np.uint64(hi) - nb):
        raise InputError(path, "shard index points outside the file; store corrupt")
    return idx


def object_index(lay: ArrayLayout, data: bytes, path: str) -> np.ndarray:
    """The checked chunk index of a whole stored object's bytes (one entry when unsharded)."""
    if not lay.sharded:
        return np.array([[0, len(data)]], dtype=np.uint64)
    n = index_nbytes(lay)
    raw = (data[-n:] if lay.index_at_end else data[:n]) if len(data) >= n else b""
    return parse_shard_index(lay, raw, len(data), path)


def object_chunks(lay: ArrayLayout, data: bytes, path: str) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (inner chunk number, decoded chunk) of a whole stored object's bytes."""
    idx = object_index(lay, data, path)
    dec = Decoder(lay.codec, lay.chunk_crc)
    buf = np.frombuffer(data, np.uint8)
    for c, (off, nb) in enumerate(idx.tolist()):
        if off == EMPTY and nb == EMPTY:
            continue
        chunk = np.empty(lay.inner, dtype=lay.dtype)
        try:
            dec.into(buf[off : off + nb], chunk)
        except ValueError as exc:
            raise InputError(path, f"chunk {c} cannot be decoded ({exc}); store corrupt") from exc
        yield c, chunk


def read_array(array_dir: str | os.PathLike[str]) -> np.ndarray:
    """Read a whole (small) array without zarr-python when the layout allows it.

    Opens and closes each file; starts no thread (zarr-python would start its IO loop).
    """
    _, lay = parse_layout(array_dir)
    if lay is None:
        import zarr

        return np.asarray(zarr.open_array(str(array_dir), mode="r")[...])
    out = np.full(lay.shape, lay.fill_value, dtype=lay.dtype.newbyteorder("="))
    per_obj = tuple(g // i for g, i in zip(lay.grid, lay.inner, strict=True))
    for obj in np.ndindex(*lay.n_objects()):
        path = lay.key(obj)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            continue
        for c, chunk in object_chunks(lay, data, path):
            pos = np.unravel_index(c, per_obj)
            start = [
                o * g + p * i for o, g, p, i in zip(obj, lay.grid, pos, lay.inner, strict=True)
            ]
            sl = tuple(
                slice(s, min(s + i, n)) for s, i, n in zip(start, lay.inner, lay.shape, strict=True)
            )
            if any(s.start >= s.stop for s in sl):
                continue
            out[sl] = chunk[tuple(slice(0, s.stop - s.start) for s in sl)]
    return out
