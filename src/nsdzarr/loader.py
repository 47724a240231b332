"""PyTorch training loader over ROI stores (``results/{subject}/roi/{roi}.zarr``).

:class:`BetasDataset` is a map-style ``torch.utils.data.Dataset`` whose items are dicts::

    betas    float32 tensor (n_voxels,)     normalized as asked
    nsd_id   int                            0-based NSD 73k image id
    trial    int                            0-based global trial (trials.tsv ``trial``)
    session  int                            NSD session number (1-based)
    repeat   int                            0, 1, 2: which showing of the image
    subject  str

With ``average_repeats=True`` an item is one (subject, nsd_id) and ``trial``, ``session`` and
``repeat`` are int64 tensors of length 3 padded with -1, plus ``n_repeats``.

A DataLoader batch is one read: ``__getitems__`` (called by torch's ``_MapDatasetFetcher``
when present) reads all rows of the batch at once and returns a :class:`BetasBatch`, a
sequence of item dicts that also carries the already-collated batch. torch passes what
``__getitems__`` returns to ``collate_fn``; the default collate stacks the items as usual,
while :func:`collate` (or :meth:`BetasDataset.dataloader`) returns the collated batch with no
second copy.

Fast path: each process reads the Zarr v3 shard files itself (``os.pread`` of the encoded inner
chunks located through the cached shard index, nearby chunks coalesced, decoded with
zstandard or numcodecs straight into the batch buffer) instead of paying zarr-python's ~1 ms
per call. Anything but the layouts nsd-zarr writes (``bytes`` + zstd or blosc, optionally
inside ``sharding_indexed``, chunks holding whole rows) falls back to zarr-python.

Safety: after ``__init__`` the dataset holds no open file and no thread (it reads the small
metadata, statistics and trials.tsv and closes them). Each process opens shard files lazily
(at most ``max_open_files`` per store, LRU), notices a fork through ``os.getpid()`` and
starts over (closing the inherited copies), and pickles without any runtime state, so it
works with ``num_workers`` 0..N, fork or spawn, persistent workers. ``in_memory=True``
decodes the rows once, at construction, into torch shared memory: forked workers inherit the
mapping, spawned ones receive it through torch's multiprocessing pickler, never a copy.

DataLoader workers hand batches to the main process through reused memfd buffers instead of
torch's fresh shared memory per batch (see ``_BatchPool``): faulting in fresh pages costs
more than decoding on our VMs.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import struct
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from nsdzarr.errors import InputError

try:  # ~25% faster zstd decoding than numcodecs (reuses one decompression context)
    import zstandard
except ImportError:  # pragma: no cover - optional
    zstandard = None

SPLITS = ("train", "test", "all")
NORMALIZE = ("none", "psc", "session_zscore")
MAX_REPEATS = 3
EMPTY = np.uint64(2**64 - 1)
EMPTY_INT = 2**64 - 1
COALESCE_GAP = 64 * 1024  # merge reads of chunks this close in one shard file
COALESCE_MAX = 16 * 2**20
TRIAL_COLUMNS = ("trial", "session", "nsd_id", "repeat", "split")

# --------------------------------------------------------------------------- Zarr v3 layout


@dataclass(frozen=True)
class ArrayLayout:
    """What the fast path needs from one array's ``zarr.json`` (plain data, picklable).

    ``grid`` is the shape of one stored object (a shard, or a chunk when unsharded), ``inner``
    the shape of one encoded chunk inside it (== ``grid`` when unsharded). ``codec`` is the
    bytes-to-bytes compressor after the ``bytes`` codec, or None.
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


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(path, "not found: not a Zarr v3 store (or an incomplete one)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"unreadable Zarr metadata ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3:
        raise InputError(path, "not Zarr format 3 metadata")
    return meta


def _bytes_pipeline(codecs: list[Any]) -> tuple[np.dtype, str | None] | None:
    """``[bytes, (zstd|blosc)?]`` -> (byte order prefix, compressor name); None if unsupported."""
    if not codecs or not isinstance(codecs[0], dict) or codecs[0].get("name") != "bytes":
        return None
    endian = (codecs[0].get("configuration") or {}).get("endian", "little")
    if endian not in ("little", "big"):
        return None
    rest = [c.get("name") if isinstance(c, dict) else c for c in codecs[1:]]
    if len(rest) > 1 or (rest and rest[0] not in ("zstd", "blosc")):
        return None
    return ("<" if endian == "little" else ">"), (rest[0] if rest else None)


def parse_layout(array_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], ArrayLayout | None]:
    """Metadata of an array and its fast-path layout (None when only zarr-python can read it)."""
    meta = _read_json(Path(array_dir) / "zarr.json")
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
    order, codec = pipeline
    fill = meta.get("fill_value", 0)
    if not isinstance(fill, int | float) or isinstance(fill, bool):
        return meta, None
    layout = ArrayLayout(
        str(array_dir), shape, dtype.newbyteorder(order), fill, grid, inner, sharded, codec,
        index_at_end, index_crc, prefix, sep,
    )  # fmt: skip
    return meta, layout


class _Decoder:
    """Decode one encoded chunk into a writable byte buffer of its exact decoded size."""

    def __init__(self, codec: str | None) -> None:
        self.codec = codec
        if codec == "zstd" and zstandard is not None:
            self._dctx = zstandard.ZstdDecompressor()
        elif codec == "zstd":
            import numcodecs

            self._nc = numcodecs.Zstd()
        elif codec == "blosc":
            import numcodecs.blosc

            self._blosc = numcodecs.blosc  # module functions: no per-call wrapper overhead

    def into(self, data: memoryview | bytes, out: np.ndarray) -> None:
        """Decode ``data`` into ``out`` (a C-contiguous uint8 array) or raise ValueError."""
        if self.codec is None:
            decoded: Any = data
        elif self.codec == "zstd" and zstandard is not None:
            try:
                decoded = self._dctx.decompress(data, max_output_size=out.nbytes)
            except zstandard.ZstdError as exc:
                raise ValueError(f"zstd: {exc}") from exc
        elif self.codec == "blosc":
            try:
                nbytes, _, cbytes = struct.unpack_from("<III", data, 4)  # blosc1 header
                if nbytes != out.nbytes or cbytes != len(data):
                    raise ValueError(f"header says {nbytes} bytes from {cbytes}")
                self._blosc.decompress(data, out)
            except Exception as exc:
                raise ValueError(f"blosc: {exc}") from exc
            return
        else:
            try:
                decoded = self._nc.decode(data)
            except Exception as exc:
                raise ValueError(f"zstd: {exc}") from exc
        raw = np.frombuffer(decoded, dtype=np.uint8)
        if raw.size != out.size:
            raise ValueError(f"decoded {raw.size} bytes, expected {out.size}")
        out[...] = raw


def _crc32c(data: bytes) -> int:
    import google_crc32c  # a zarr-python dependency

    return int(google_crc32c.value(data))


class _ChunkFiles:
    """Per-process reader of a 2-D array whose chunks hold whole rows.

    Keeps at most ``max_open`` files open (LRU) and caches every stored object's chunk index
    (16 bytes per chunk) as python ints.
    """

    def __init__(self, layout: ArrayLayout, max_open: int) -> None:
        self.layout = layout
        self.max_open = max(1, max_open)
        self.paths = [layout.key((s, 0)) for s in range(layout.n_objects()[0])]
        self.fds: OrderedDict[int, int] = OrderedDict()
        self.indexes: dict[int, list[tuple[int, int] | None] | None] = {}
        self.decoder = _Decoder(layout.codec)
        self._local = threading.local()

    # ---- files
    def fd(self, obj: int, keep: set[int] | None = None) -> int | None:
        """Open fd of stored object ``obj`` (None if the file does not exist), LRU-bounded."""
        fd = self.fds.get(obj)
        if fd is not None:
            self.fds.move_to_end(obj)
            return fd
        try:
            fd = os.open(self.paths[obj], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InputError(self.paths[obj], f"cannot open ({exc.strerror})") from exc
        self.fds[obj] = fd
        if len(self.fds) > self.max_open:
            for old in list(self.fds):
                if len(self.fds) <= self.max_open:
                    break
                if old != obj and (keep is None or old not in keep):
                    os.close(self.fds.pop(old))
        return fd

    def trim(self) -> None:
        """Close least recently used files beyond the bound (a batch may hold more briefly)."""
        while len(self.fds) > self.max_open:
            os.close(self.fds.popitem(last=False)[1])

    def close(self) -> None:
        """Close every fd (in the process that opened them)."""
        while self.fds:
            _, fd = self.fds.popitem()
            with contextlib.suppress(OSError):
                os.close(fd)

    def forget(self) -> None:
        """In a forked child: close the inherited copies, drop the state."""
        self.close()
        self.indexes.clear()

    # ---- index
    def index(self, obj: int, keep: set[int] | None = None) -> list[tuple[int, int] | None] | None:
        """(offset, nbytes) of each chunk of ``obj`` (None: empty chunk); None if no file."""
        if obj in self.indexes:
            return self.indexes[obj]
        lay, path = self.layout, self.paths[obj]
        fd = self.fd(obj, keep)
        if fd is None:
            self.indexes[obj] = None
            return None
        size = os.fstat(fd).st_size
        if not lay.sharded:
            self.indexes[obj] = [(0, size)]
            return self.indexes[obj]
        n = lay.n_inner
        nbytes = 16 * n + (4 if lay.index_crc else 0)
        if size < nbytes:
            raise InputError(path, f"shard file truncated ({size} bytes); store corrupt")
        raw = os.pread(fd, nbytes, size - nbytes if lay.index_at_end else 0)
        if lay.index_crc and _crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise InputError(path, "shard index checksum mismatch; store corrupt")
        pairs = np.frombuffer(raw, dtype="<u8", count=2 * n).reshape(n, 2)
        lo, hi = (0, size - nbytes) if lay.index_at_end else (nbytes, size)
        entries: list[tuple[int, int] | None] = []
        for off, nb in pairs.tolist():
            if off == EMPTY_INT and nb == EMPTY_INT:
                entries.append(None)
            elif off < lo or off + nb > hi:
                raise InputError(path, "shard index points outside the file; store corrupt")
            else:
                entries.append((off, nb))
        self.indexes[obj] = entries
        return entries

    # ---- reading
    def _decoder(self) -> _Decoder:
        if threading.current_thread() is threading.main_thread():
            return self.decoder
        dec = getattr(self._local, "decoder", None)
        if dec is None:
            dec = self._local.decoder = _Decoder(self.layout.codec)
        return dec

    def read_rows(self, rows: np.ndarray, out: np.ndarray, executor: Any = None) -> None:
        """``out[j] = array[rows[j]]``; one pread per run of nearby chunks of a shard."""
        lay = self.layout
        R, r = lay.grid[0], lay.inner[0]
        plan: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for j, row in enumerate(rows.tolist()):
            obj, local = divmod(row, R)
            c, k = divmod(local, r)
            dests = plan.get((obj, c))
            if dests is None:
                plan[obj, c] = [(j, k)]
            else:
                dests.append((j, k))
        keep = {obj for obj, _ in plan}
        items = []
        for (obj, c), dests in plan.items():
            idx = self.index(obj, keep)
            entry = idx[c] if idx is not None else None
            if entry is None:  # absent object or empty chunk: the fill value
                for j, _ in dests:
                    out[j] = lay.fill_value
            else:
                items.append((obj, entry[0], entry[1], c, dests))
        items.sort(key=lambda t: (t[0], t[1]))
        tasks: list[list[Any]] = []  # runs: [obj, fd, start, stop, [(c, off, nb, dests)...]]
        for obj, off, nb, c, dests in items:
            last = tasks[-1] if tasks else None
            if (
                last is not None
                and last[0] == obj
                and 0 <= off - last[3] <= COALESCE_GAP
                and off + nb - last[2] <= COALESCE_MAX
            ):
                last[3] = off + nb
                last[4].append((c, off, nb, dests))
            else:
                fd = self.fd(obj, keep)
                if fd is None:
                    raise InputError(self.paths[obj], "shard file vanished while reading")
                tasks.append([obj, fd, off, off + nb, [(c, off, nb, dests)]])
        if executor is not None and len(tasks) > 1:
            half = len(tasks) // 2
            future = executor.submit(self._run_tasks, tasks[half:], out)
            self._run_tasks(tasks[:half], out)
            future.result()
        else:
            self._run_tasks(tasks, out)
        self.trim()

    def _run_tasks(self, tasks: list[Any], out: np.ndarray) -> None:
        dec = self._decoder()
        r = self.layout.inner[0]
        chunk_buf = None
        for obj, fd, start, stop, run in tasks:
            data = os.pread(fd, stop - start, start)
            if len(data) != stop - start:
                raise InputError(self.paths[obj], "shard file shorter than its index; corrupt")
            view = memoryview(data)
            for c, off, nb, dests in run:
                enc = view[off - start : off - start + nb]
                try:
                    if r == 1 and len(dests) == 1:
                        dec.into(enc, out[dests[0][0]].view(np.uint8))
                        continue
                    if chunk_buf is None:
                        chunk_buf = np.empty((r, out.shape[1]), dtype=out.dtype)
                    dec.into(enc, chunk_buf.reshape(-1).view(np.uint8))
                except ValueError as exc:
                    raise InputError(
                        self.paths[obj], f"chunk {c} cannot be decoded ({exc}); store corrupt"
                    ) from exc
                for j, k in dests:
                    out[j] = chunk_buf[k]


def _decode_object(lay: ArrayLayout, data: bytes, path: str) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (inner chunk number, decoded chunk) of a whole stored object's bytes."""
    dec = _Decoder(lay.codec)
    n = lay.n_inner
    if lay.sharded:
        nbytes = 16 * n + (4 if lay.index_crc else 0)
        raw = data[-nbytes:] if lay.index_at_end else data[:nbytes]
        if len(data) < nbytes or (
            lay.index_crc and _crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little")
        ):
            raise InputError(path, "shard index damaged; store corrupt")
        idx = np.frombuffer(raw, dtype="<u8", count=2 * n).reshape(n, 2)
    else:
        idx = np.array([[0, len(data)]], dtype=np.uint64)
    view = memoryview(data)
    for c in range(n):
        off, nb = idx[c]
        if off == EMPTY and nb == EMPTY:
            continue
        chunk = np.empty(lay.inner, dtype=lay.dtype)
        try:
            dec.into(view[int(off) : int(off) + int(nb)], chunk.reshape(-1).view(np.uint8))
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
        for c, chunk in _decode_object(lay, data, path):
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


class _ZarrRows:
    """Fallback row reader through zarr-python (opened lazily in the reading process)."""

    def __init__(self, array_dir: str) -> None:
        import zarr

        try:
            self.array = zarr.open_array(array_dir, mode="r")
        except Exception as exc:  # zarr raises many types on damaged metadata
            raise InputError(array_dir, f"zarr-python cannot open it ({exc})") from exc

    def read_rows(self, rows: np.ndarray, out: np.ndarray, executor: Any = None) -> None:
        uniq, inverse = np.unique(rows, return_inverse=True)
        out[...] = self.array.oindex[uniq, :][inverse]

    def close(self) -> None:
        pass

    forget = close


# --------------------------------------------------------------------------- store metadata


@dataclass
class StoreInfo:
    """One ROI store: layout, statistics, its trials.tsv columns (plain data, picklable)."""

    subject: str
    path: str
    trials_tsv: str
    layout: ArrayLayout | None  # None -> zarr-python fallback
    n_rows: int
    n_voxels: int
    disk_dtype: np.dtype
    sessions: list[int]
    scale: float
    row_session: np.ndarray  # (n_rows,) index into ``sessions``
    columns: dict[str, np.ndarray]  # trial, session, nsd_id, repeat (int64), split (str)
    mean: np.ndarray | None = None
    std: np.ndarray | None = None  # zeros replaced by 1


def _read_trials(path: Path, n_rows: int) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise InputError(path, "trials table not found (expected beside the store's subject)")
    try:
        with open(path, newline="") as fh:
            reader = csv.reader(fh, delimiter="\t")
            header = next(reader, None)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"unreadable trials table ({exc})") from exc
    missing = [c for c in TRIAL_COLUMNS if c not in (header or [])]
    if missing:
        raise InputError(path, f"missing columns {missing}")
    if len(rows) != n_rows:
        raise InputError(path, f"{len(rows)} rows but the store has {n_rows} trials")
    cols = {}
    try:
        for name in TRIAL_COLUMNS:
            i = header.index(name)
            values = [r[i] for r in rows]
            cols[name] = np.array(values) if name == "split" else np.array(values, dtype=np.int64)
    except (IndexError, ValueError) as exc:
        raise InputError(path, f"malformed row ({exc})") from exc
    bad = set(np.unique(cols["split"]).tolist()) - {"train", "test"}
    if bad:
        raise InputError(path, f"unknown split values {sorted(bad)}")
    return cols


def load_store_info(
    store: str | os.PathLike[str],
    subject: str,
    trials: str | os.PathLike[str] | None,
    need_stats: bool,
) -> StoreInfo:
    """Read a store's metadata, its trials table and (if asked) its statistics, then close."""
    root = Path(store)
    if not root.is_dir():
        raise InputError(root, "ROI store not found")
    group = _read_json(root / "zarr.json")
    if group.get("node_type") != "group":
        raise InputError(root / "zarr.json", "not a Zarr group (expected an ROI store)")
    attrs = group.get("attributes") or {}
    meta, lay = parse_layout(root / "betas")
    shape = tuple(meta.get("shape", ()))
    if len(shape) != 2:
        raise InputError(root / "betas", f"betas must be 2-D (trials, voxels), got shape {shape}")
    n_rows, n_vox = int(shape[0]), int(shape[1])
    if lay is not None and (lay.inner[1] != n_vox or lay.grid[1] != n_vox):
        lay = None  # chunks split the voxels: zarr-python reads them
    if lay is not None and lay.sharded:
        absent = [
            lay.key((s, 0))
            for s in range(lay.n_objects()[0])
            if not os.path.exists(lay.key((s, 0)))
        ]
        if absent:
            raise InputError(
                absent[0],
                f"shard file missing ({len(absent)} of {lay.n_objects()[0]}); store incomplete",
            )
    try:
        dtype = lay.dtype if lay is not None else np.dtype(str(meta.get("data_type")))
    except TypeError as exc:
        raise InputError(root / "betas", f"unsupported data type ({exc})") from exc
    tsv = Path(trials) if trials is not None else root.parent.parent / "trials.tsv"
    cols = _read_trials(tsv, n_rows)
    sessions = [int(s) for s in attrs.get("sessions") or dict.fromkeys(cols["session"].tolist())]
    if not sessions or n_rows % len(sessions):
        raise InputError(root, f"{n_rows} rows do not split into sessions {sessions}")
    expected = np.repeat(sessions, n_rows // len(sessions))
    if not np.array_equal(cols["session"], expected):
        raise InputError(tsv, f"session column does not match the store's sessions {sessions}")
    info = StoreInfo(
        subject=subject,
        path=str(root),
        trials_tsv=str(tsv),
        layout=lay,
        n_rows=n_rows,
        n_voxels=n_vox,
        disk_dtype=dtype,
        sessions=sessions,
        scale=float(attrs.get("scale", 300)),
        row_session=np.repeat(np.arange(len(sessions)), n_rows // len(sessions)),
        columns=cols,
    )
    if need_stats:
        for name in ("mean", "std"):
            if not (root / name / "zarr.json").is_file():
                raise InputError(root / name, "missing: needed for normalize='session_zscore'")
        mean = read_array(root / "mean").astype(np.float32)
        std = read_array(root / "std").astype(np.float32)
        if mean.shape != (len(sessions), n_vox) or std.shape != mean.shape:
            raise InputError(root, f"mean/std shape {mean.shape} != (sessions, voxels)")
        info.mean, info.std = mean, np.where(std == 0, np.float32(1), std)
    return info


def default_max_open_files(n_stores: int) -> int:
    """Per-store bound on open shard files: 1/8 of the soft fd limit (64..4096) over the stores."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 1 << 15
    budget = max(64, min(4096, soft // 8))
    return max(16, budget // max(1, n_stores))


def _subject_of(path: Path) -> str:
    """``results/{subject}/roi/{roi}.zarr`` -> subject; else the store's name."""
    parent = path.resolve().parent
    return parent.parent.name if parent.name == "roi" else path.stem


# --------------------------------------------------------------------------- batches


class BetasBatch(Sequence):
    """What ``__getitems__`` returns: item dicts on demand plus the collated batch."""

    def __init__(self, collated: dict[str, Any]) -> None:
        self.collated = collated
        self._n = len(collated["subject"])
        self._lists: dict[str, list[Any]] | None = None

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, j: int) -> dict[str, Any]:  # type: ignore[override]
        if not -self._n <= j < self._n:
            raise IndexError(j)
        if self._lists is None:  # python ints / tensor views per item, made once per batch
            self._lists = {
                k: (v if isinstance(v, list) else list(v.unbind(0)) if v.dim() > 1 else v.tolist())
                for k, v in self.collated.items()
            }
        return {k: v[j] for k, v in self._lists.items()}


def collate(batch: Any) -> Any:
    """``collate_fn`` for :class:`BetasDataset`: the batch as read, no second copy.

    Anything else goes through torch's ``default_collate``.
    """
    if isinstance(batch, BetasBatch):
        return batch.collated
    return default_collate(batch)


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor in fresh shared memory, allocated there directly (as torch's collate does)."""
    numel = math.prod(shape)
    proto = torch.empty(0, dtype=dtype)
    try:
        storage = proto._typed_storage()._new_shared(numel, device="cpu")
        return proto.new(storage).resize_(*shape)
    except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - private API moved
        return torch.empty(shape, dtype=dtype).share_memory_()


# Worker -> main transport. torch sends a worker's batch tensors through fresh shared memory,
# one new segment per tensor and batch: the worker faults every page in, the main process
# maps it again, ~4 us per 4 KiB page on our VMs, more than decoding the rows. A worker
# instead writes batches into slots of one memfd it keeps (pages faulted once); the betas
# tensor pickles as (pool, slot) and the main process maps the pool once and wraps the slot
# without copying. A slot is reused only when freed: by the main process once nothing there
# references the tensor any more (a finalizer on the array behind it), or by the worker when
# the tensor was never sent. No free slot (batches kept alive) or no memfd: torch's usual
# path. Small metadata tensors pickle by value (``_WorkerBatch``).

_SLOTS = 16
_HEADER = 4096  # state (uint8) x 16 at 0, generation (uint32) x 16 at 1024, token at 2048
_MAPPED: OrderedDict[tuple[int, int, int], Any] = OrderedDict()  # main process: pools


class _BatchPool:
    """Worker side: ``_SLOTS`` reusable batch buffers in one memfd."""

    def __init__(self, slot_bytes: int) -> None:
        import mmap
        import secrets

        self.slot_bytes = -(-slot_bytes // 4096) * 4096
        self.fd = os.memfd_create("nsdzarr-batches", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, _HEADER + _SLOTS * self.slot_bytes)
        self.mm = mmap.mmap(self.fd, 0)
        self.state = np.frombuffer(self.mm, np.uint8, _SLOTS, 0)
        self.gen = np.frombuffer(self.mm, np.uint32, _SLOTS, 1024)
        token = secrets.randbits(62)
        np.frombuffer(self.mm, np.uint64, 1, 2048)[0] = token
        self.key = (os.getpid(), self.fd, token)
        self.lock = threading.Lock()  # take() vs finalizers running in the feeder thread

    def take(self, shape: tuple[int, int]) -> torch.Tensor | None:
        """A float32 tensor in a free slot, or None."""
        numel = shape[0] * shape[1]
        if numel * 4 > self.slot_bytes:
            return None
        with self.lock:
            free = np.flatnonzero(self.state == 0)
            if not free.size:
                return None
            i = int(free[0])
            self.gen[i] += 1
            gen = int(self.gen[i])
            self.state[i] = 1
        offset = _HEADER + i * self.slot_bytes
        arr = np.frombuffer(self.mm, np.float32, numel, offset).reshape(shape)
        weakref.finalize(arr, self._release, i, gen)  # fires once no tensor uses the slot
        t = torch.from_numpy(arr).as_subclass(_PoolTensor)
        t._nsdzarr_slot = (self, i, gen, offset)
        return t

    def _release(self, i: int, gen: int) -> None:
        with self.lock:
            if int(self.gen[i]) == gen and self.state[i] == 1:
                self.state[i] = 0


def _map_pool(key: tuple[int, int, int]) -> Any:
    """Main process: the worker's pool mapped (once; pools of exited workers are dropped)."""
    import mmap

    mm = _MAPPED.get(key)
    if mm is not None:
        return mm
    for old in [k for k in _MAPPED if not os.path.exists(f"/proc/{k[0]}")]:
        with contextlib.suppress(BufferError):
            _MAPPED.pop(old).close()
    pid, fd, token = key
    f = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        mm = mmap.mmap(f, 0)
    finally:
        os.close(f)
    if int(np.frombuffer(mm, np.uint64, 1, 2048)[0]) != token:
        mm.close()
        raise RuntimeError(f"batch buffer of DataLoader worker {pid} is gone")
    _MAPPED[key] = mm
    return mm


def _free_slot(mm: Any, slot: int) -> None:
    with contextlib.suppress(ValueError):  # the mapping was closed
        mm[slot] = 0


def _rebuild_pooled(key: tuple[int, int, int], slot: int, offset: int, shape: Any) -> Any:
    """Unpickling in the main process: a tensor over the slot, freed when it is collected."""
    mm = _map_pool(key)
    arr = np.frombuffer(mm, np.float32, math.prod(shape), offset).reshape(tuple(shape))
    weakref.finalize(arr, _free_slot, mm, slot)  # after every tensor/view of it is gone
    return torch.from_numpy(arr)


class _PoolTensor(torch.Tensor):
    """A batch tensor living in a worker's pool slot; pickles as a reference to the slot."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __reduce_ex__(self, protocol: Any) -> Any:
        info = getattr(self, "_nsdzarr_slot", None)
        if info is None or info[0].key[0] != os.getpid():
            return (torch.as_tensor, (self.numpy().copy(),))
        pool, i, gen, offset = info
        with pool.lock:
            if int(pool.gen[i]) != gen or pool.state[i] != 1:
                raise RuntimeError("a pooled batch tensor was sent twice")
            pool.state[i] = 2  # the main process frees it after copying
        return (_rebuild_pooled, (pool.key, i, offset, tuple(self.shape)))


class _WorkerBatch(dict):
    """A collated batch made in a DataLoader worker; pickles in one piece.

    The small metadata tensors travel by value in one array (torch would give each its own
    shared memory segment), the betas as a pool slot reference (``_PoolTensor``). Unpickled,
    it is a plain dict of plain tensors.
    """

    def __reduce__(self) -> Any:
        n = len(self["subject"])
        small = [k for k, v in self.items() if isinstance(v, torch.Tensor) and k != "betas"]
        if any(self[k].dtype != torch.int64 or self[k].shape[:1] != (n,) for k in small):
            return (dict, (dict(self),))
        block = np.concatenate([self[k].numpy().reshape(n, -1) for k in small] or [[]], axis=1)
        tails = [tuple(self[k].shape[1:]) for k in small]
        rest = {k: (None if k in small else v) for k, v in self.items()}  # keeps key order
        return (_rebuild_batch, (rest, small, tails, np.ascontiguousarray(block, np.int64)))


def _rebuild_batch(
    rest: dict[str, Any], keys: list[str], tails: list[tuple[int, ...]], block: np.ndarray
) -> dict[str, Any]:
    col = 0
    for key, tail in zip(keys, tails, strict=True):
        width = math.prod(tail)
        rest[key] = torch.from_numpy(block[:, col : col + width].reshape(-1, *tail))
        col += width
    return rest


def _pool_available() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


class _Runtime:
    """Per-process state: readers, in-memory views, scratch buffer, batch pool, threads."""

    def __init__(self, n_stores: int) -> None:
        self.pid = os.getpid()
        self.readers: list[Any] = [None] * n_stores
        self.mem: list[np.ndarray | None] = [None] * n_stores
        self.scratch: dict[Any, np.ndarray] = {}
        self.executor: Any = None
        self.pool: _BatchPool | None = None
        self.old_pools: list[_BatchPool] = []

    def buffer(self, n: int, n_vox: int, dtype: np.dtype) -> np.ndarray:
        key = (n_vox, dtype.str)
        buf = self.scratch.get(key)
        if buf is None or buf.shape[0] < n:
            buf = self.scratch[key] = np.empty((max(n, 64), n_vox), dtype=dtype)
        return buf[:n]

    def batch_tensor(self, shape: tuple[int, int], pooled: bool) -> torch.Tensor:
        """Output of one batch: plain memory here, a pool slot or shared memory in a worker."""
        if get_worker_info() is None:
            return torch.empty(shape, dtype=torch.float32)
        if pooled and shape[0] * shape[1]:
            if self.pool is None or shape[0] * shape[1] * 4 > self.pool.slot_bytes:
                if self.pool is not None:
                    self.old_pools.append(self.pool)  # its slots may still be in flight
                try:
                    self.pool = _BatchPool(shape[0] * shape[1] * 4)
                except OSError:  # no memfd / fd limit: torch's path
                    self.pool = None
            t = self.pool.take(shape) if self.pool is not None else None
            if t is not None:
                return t
        return _shared_empty(shape)

    def close(self) -> None:
        for reader in self.readers:
            if reader is not None:
                reader.close()
        self.readers = [None] * len(self.readers)
        if self.executor is not None:
            self.executor.shutdown(wait=False)
            self.executor = None

    def forget(self) -> None:
        """Drop state inherited through fork (the parent's threads do not exist here)."""
        for reader in self.readers:
            if reader is not None:
                reader.forget()
        self.readers = [None] * len(self.readers)
        self.executor = None
        for pool in [self.pool, *self.old_pools]:
            if pool is not None:
                with contextlib.suppress(OSError):
                    os.close(pool.fd)
        self.pool, self.old_pools = None, []

    def __del__(self) -> None:
        if getattr(self, "pid", None) == os.getpid():
            with contextlib.suppress(Exception):
                self.close()


# --------------------------------------------------------------------------- dataset


class BetasDataset(Dataset):
    """Trials (or repeat-averaged images) of one or more ROI stores, as float32 tensors.

    ``store``: a store path, a list of them, or ``{subject: path}``; the subject is otherwise
    the folder above ``roi/``. ``subjects`` keeps only those subjects. ``trials`` overrides
    ``<store>/../../trials.tsv`` (one path, or one per store). ``split``: ``train``, ``test``
    (the shared1000 trials) or ``all``. ``normalize``: ``none`` (raw int16 values as float),
    ``psc`` (divide by the store's ``scale``), ``session_zscore`` (``(x - mean) / std`` with
    the store's per-session statistics; std 0 counts as 1). ``average_repeats``: one item per
    (subject, nsd_id), the split's repeats averaged after normalization. ``in_memory``: decode
    the split's rows once, at construction, into shared memory (one copy for all workers, fork
    or spawn). ``max_open_files`` bounds each process's open shard files per store (default:
    :func:`default_max_open_files`, all 600 shards of a subject under a 20000 fd limit, 128
    under the common 1024); ``decode_threads``
    > 1 decodes a batch on a thread pool in processes that are not DataLoader workers.
    ``pooled_batches``: in DataLoader workers, hand batches to the main process through
    reused buffers (see ``_BatchPool``) instead of fresh shared memory per batch.
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Mapping[str, Any],
        split: str = "train",
        normalize: str = "none",
        average_repeats: bool = False,
        in_memory: bool = False,
        subjects: Sequence[str] | None = None,
        trials: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        max_open_files: int | None = None,
        decode_threads: int = 1,
        pooled_batches: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        pairs = self._store_pairs(store)
        if trials is None or isinstance(trials, str | os.PathLike):
            tsvs = [trials] * len(pairs)
        else:
            tsvs = list(trials)
            if len(tsvs) != len(pairs):
                raise ValueError(f"{len(tsvs)} trials tables for {len(pairs)} stores")
        if subjects is not None:
            wanted = list(subjects)
            missing = sorted(set(wanted) - {s for s, _ in pairs})
            if missing:
                raise ValueError(
                    f"subjects {missing} not among the stores' {[s for s, _ in pairs]}"
                )
            keep = [i for i, (s, _) in enumerate(pairs) if s in wanted]
            pairs, tsvs = [pairs[i] for i in keep], [tsvs[i] for i in keep]
        if not pairs:
            raise ValueError("no store given")
        self.split, self.normalize, self.average_repeats = split, normalize, average_repeats
        self.in_memory = in_memory
        self.decode_threads = max(1, int(decode_threads))
        self.pooled_batches = pooled_batches and _pool_available()
        self.stores = [
            load_store_info(p, s, t, normalize == "session_zscore")
            for (s, p), t in zip(pairs, tsvs, strict=True)
        ]
        self._single = len(self.stores) == 1
        self.max_open_files = max_open_files or default_max_open_files(len(self.stores))
        self._owner_pid = os.getpid()
        self._rt: _Runtime | None = None
        self._index_items()
        self._mem: list[torch.Tensor | None] = [None] * len(self.stores)
        self._mem_pos: list[np.ndarray | None] = [None] * len(self.stores)
        if in_memory:
            self._load_in_memory()

    @staticmethod
    def _store_pairs(store: Any) -> list[tuple[str, str]]:
        if isinstance(store, Mapping):
            return [(str(s), str(p)) for s, p in store.items()]
        paths = [store] if isinstance(store, str | os.PathLike) else list(store)
        return [(_subject_of(Path(p)), str(p)) for p in paths]

    def _index_items(self) -> None:
        store_ids, rows = [], []
        for s, info in enumerate(self.stores):
            use = (
                np.ones(info.n_rows, bool)
                if self.split == "all"
                else info.columns["split"] == self.split
            )
            r = np.flatnonzero(use)
            store_ids.append(np.full(len(r), s, dtype=np.int32))
            rows.append(r.astype(np.int64))
        item_store = np.concatenate(store_ids)
        item_row = np.concatenate(rows)
        if not self.average_repeats:
            self._item_store, self._item_row = item_store, item_row
            self._group_rows = None
            return
        # one item per (store, nsd_id), rows padded with -1, in order of first showing
        g_store, g_rows = [], []
        for s, info in enumerate(self.stores):
            sel = item_row[item_store == s]
            ids = info.columns["nsd_id"][sel]
            order = np.argsort(ids, kind="stable")
            uniq, start, count = np.unique(ids[order], return_index=True, return_counts=True)
            if count.size and count.max() > MAX_REPEATS:
                raise InputError(info.trials_tsv, f"an image has more than {MAX_REPEATS} trials")
            padded = np.full((len(uniq), MAX_REPEATS), -1, dtype=np.int64)
            for k in range(MAX_REPEATS):
                has = count > k
                padded[has, k] = sel[order[start[has] + k]]
            first = np.argsort(padded[:, 0], kind="stable")
            g_rows.append(padded[first])
            g_store.append(np.full(len(uniq), s, dtype=np.int32))
        self._item_store = np.concatenate(g_store)
        self._group_rows = np.concatenate(g_rows)
        self._item_row = self._group_rows[:, 0]

    def _load_in_memory(self) -> None:
        """Decode the rows this dataset uses once into shared memory, then close every file."""
        rt = _Runtime(len(self.stores))
        try:
            for s, info in enumerate(self.stores):
                if self._group_rows is not None:
                    used = self._group_rows[self._item_store == s].ravel()
                    used = np.unique(used[used >= 0])
                else:
                    used = np.unique(self._item_row[self._item_store == s])
                pos = np.full(info.n_rows, -1, dtype=np.int64)
                pos[used] = np.arange(len(used))
                tdtype = torch.from_numpy(np.empty(0, info.disk_dtype.newbyteorder("="))).dtype
                mem = _shared_empty((len(used), info.n_voxels), tdtype)  # filled in place
                arr = mem.numpy()
                reader = self._reader(rt, s)
                block = info.layout.grid[0] if info.layout is not None else 256
                scratch = np.empty((block, info.n_voxels), dtype=info.disk_dtype)
                a = 0
                while a < len(used):
                    # rows of one stored object at a time: one coalesced pread per shard
                    b = a + 1
                    while b < len(used) and b - a < block and used[b] // block == used[a] // block:
                        b += 1
                    reader.read_rows(used[a:b], scratch[: b - a])
                    arr[a:b] = scratch[: b - a]
                    a = b
                self._mem[s], self._mem_pos[s] = mem, pos
        finally:
            rt.close()

    # ---- pickling: no runtime state crosses a process boundary
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_rt"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def close(self) -> None:
        """Close this process's open files (they reopen on the next read)."""
        if self._rt is not None and self._rt.pid == os.getpid():
            self._rt.close()
        self._rt = None

    # ---- per-process state
    def _runtime(self) -> _Runtime:
        rt = self._rt
        if rt is not None and rt.pid == os.getpid():
            return rt
        if rt is not None:
            rt.forget()  # forked: close inherited fds, never use the parent's threads
        rt = self._rt = _Runtime(len(self.stores))
        if get_worker_info() is None and self.decode_threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            rt.executor = ThreadPoolExecutor(self.decode_threads - 1, "nsdzarr-decode")
        if os.getpid() != self._owner_pid and any(
            i.layout is not None and i.layout.codec == "blosc" for i in self.stores
        ):
            try:  # blosc's global thread pool is not fork-safe: decode without it here
                import numcodecs.blosc

                numcodecs.blosc.use_threads = False
            except ImportError:  # pragma: no cover
                pass
        return rt

    def _reader(self, rt: _Runtime, s: int) -> Any:
        reader = rt.readers[s]
        if reader is None:
            info = self.stores[s]
            if info.layout is not None:
                reader = _ChunkFiles(info.layout, self.max_open_files)
            else:
                reader = _ZarrRows(os.path.join(info.path, "betas"))
            rt.readers[s] = reader
        return reader

    # ---- map-style protocol
    def __len__(self) -> int:
        return len(self._item_store)

    @property
    def n_voxels(self) -> int | list[int]:
        """Voxels per item (a list when the stores differ)."""
        counts = sorted({info.n_voxels for info in self.stores})
        return counts[0] if len(counts) == 1 else [info.n_voxels for info in self.stores]

    @property
    def subjects(self) -> list[str]:
        """Subject of each store, in store order."""
        return [info.subject for info in self.stores]

    def indices_by_subject(self) -> dict[str, np.ndarray]:
        """Dataset indices of each subject (for per-subject samplers when voxel counts differ)."""
        out: dict[str, list[np.ndarray]] = {}
        for s, info in enumerate(self.stores):
            out.setdefault(info.subject, []).append(np.flatnonzero(self._item_store == s))
        return {k: np.concatenate(v) for k, v in out.items()}

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, int | np.integer):
            return self._item(int(index))
        if isinstance(index, slice):
            index = range(*index.indices(len(self)))
        return self.__getitems__(index).collated

    def __getitems__(self, indices: Sequence[int]) -> BetasBatch:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        try:
            self._item_store[idx]  # numpy checks the range (negative indices count back)
        except IndexError:
            raise IndexError(f"index out of range for a dataset of {len(self)} items") from None
        return BetasBatch(self._fetch(idx % len(self) if len(self) else idx))

    def dataloader(self, **kwargs: Any) -> DataLoader:
        """A DataLoader using :func:`collate` (any DataLoader argument can be passed)."""
        kwargs.setdefault("collate_fn", collate)
        return DataLoader(self, **kwargs)

    # ---- reading
    def _item(self, i: int) -> dict[str, Any]:
        """One item, without the batch machinery."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} items")
        i %= n
        if self._group_rows is not None:
            return self.__getitems__([i])[0]
        rt = self._runtime()
        s, row = int(self._item_store[i]), int(self._item_row[i])
        stores, rows = self._item_store[i : i + 1], self._item_row[i : i + 1]
        betas = torch.empty(self.stores[s].n_voxels, dtype=torch.float32)
        raw = self._read_raw(rt, stores, rows)
        self._normalize(raw, stores, rows, betas.numpy()[None])
        cols = self.stores[s].columns
        return {
            "betas": betas,
            "nsd_id": int(cols["nsd_id"][row]),
            "trial": int(cols["trial"][row]),
            "session": int(cols["session"][row]),
            "repeat": int(cols["repeat"][row]),
            "subject": self.stores[s].subject,
        }

    def _read_raw(self, rt: _Runtime, stores: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Rows (len(rows), n_vox) in the stores' dtype, in a per-process scratch buffer."""
        ids = [0] if self._single else np.unique(stores).tolist()
        n_vox = self.stores[ids[0]].n_voxels
        if any(self.stores[s].n_voxels != n_vox for s in ids):
            raise ValueError(
                "a batch mixes stores with different voxel counts; batch each subject "
                "separately (see BetasDataset.indices_by_subject)"
            )
        dtype = self.stores[ids[0]].disk_dtype if len(ids) == 1 else np.dtype(np.float32)
        raw = rt.buffer(len(rows), n_vox, dtype)
        for s in ids:
            sel = np.flatnonzero(stores == s) if len(ids) > 1 else None
            mine = rows if sel is None else rows[sel]
            target = raw if sel is None else np.empty((len(sel), n_vox), self.stores[s].disk_dtype)
            if self._mem[s] is not None:
                if rt.mem[s] is None:
                    rt.mem[s] = self._mem[s].numpy()
                pos = self._mem_pos[s][mine]
                np.take(rt.mem[s], pos, axis=0, out=target, mode="clip")  # in range
            else:
                self._reader(rt, s).read_rows(mine, target, rt.executor)
            if sel is not None:
                raw[sel] = target
        return raw

    def _normalize(
        self, raw: np.ndarray, stores: np.ndarray, rows: np.ndarray, out: np.ndarray
    ) -> None:
        ids = [0] if self._single else np.unique(stores).tolist()
        for s in ids:
            info = self.stores[s]
            sel = np.flatnonzero(stores == s) if len(ids) > 1 else None
            x = raw if sel is None else raw[sel]
            o = out if sel is None else np.empty(x.shape, np.float32)
            if self.normalize == "none":
                np.copyto(o, x, casting="unsafe")
            elif self.normalize == "psc":
                np.divide(x, np.float32(info.scale), out=o, dtype=np.float32)
            else:
                sess = info.row_session[rows if sel is None else rows[sel]]
                np.subtract(x, info.mean[sess], out=o, dtype=np.float32)
                np.divide(o, info.std[sess], out=o)
            if sel is not None:
                out[sel] = o

    def _fetch(self, idx: np.ndarray) -> dict[str, Any]:
        rt = self._runtime()
        item_store = self._item_store[idx]
        if self._group_rows is None:
            rows, stores, counts = self._item_row[idx], item_store, None
        else:
            group = self._group_rows[idx]
            counts = (group >= 0).sum(axis=1)
            rows = group[group >= 0]  # group-major
            stores = np.repeat(item_store, counts)
        s0 = int(item_store[0]) if len(idx) else 0
        betas = rt.batch_tensor((len(idx), self.stores[s0].n_voxels), self.pooled_batches)
        if len(idx):
            raw = self._read_raw(rt, stores, rows)
            out = betas.numpy()
            if counts is None:
                self._normalize(raw, stores, rows, out)
            else:
                norm = np.empty(raw.shape, dtype=np.float32)
                self._normalize(raw, stores, rows, norm)
                starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
                np.add.reduceat(norm, starts, axis=0, out=out)
                out /= counts[:, None].astype(np.float32)
        collated: dict[str, Any] = {"betas": betas}
        if counts is None:
            cols = self._columns(item_store, rows)
            collated.update({k: torch.from_numpy(v) for k, v in cols.items()})
        else:
            first = self._columns(item_store, group[:, 0])
            collated["nsd_id"] = torch.from_numpy(first["nsd_id"])
            for key in ("trial", "session", "repeat"):
                vals = np.full(group.shape, -1, dtype=np.int64)
                for s in np.unique(item_store).tolist():
                    mine = item_store == s
                    g = group[mine]
                    vals[mine] = np.where(g >= 0, self.stores[s].columns[key][np.maximum(g, 0)], -1)
                collated[key] = torch.from_numpy(vals)
            collated["n_repeats"] = torch.from_numpy(counts.astype(np.int64))
        if self._single:
            collated["subject"] = [self.stores[0].subject] * len(idx)
        else:
            collated["subject"] = [self.stores[s].subject for s in item_store.tolist()]
        return _WorkerBatch(collated) if get_worker_info() is not None else collated

    def _columns(self, stores: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
        keys = ("nsd_id", "trial", "session", "repeat")
        if self._single:
            cols = self.stores[0].columns
            return {k: cols[k][rows] for k in keys}
        out = {k: np.empty(len(rows), dtype=np.int64) for k in keys}
        for s in np.unique(stores).tolist():
            mine = stores == s
            for k in out:
                out[k][mine] = self.stores[s].columns[k][rows[mine]]
        return out

    def __repr__(self) -> str:
        subjects = ", ".join(dict.fromkeys(self.subjects))
        return (
            f"BetasDataset({len(self)} items, subjects [{subjects}], split={self.split!r}, "
            f"normalize={self.normalize!r}, average_repeats={self.average_repeats}, "
            f"in_memory={self.in_memory}, fast_path={all(i.layout for i in self.stores)})"
        )
