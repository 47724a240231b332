"""PyTorch training loader over ROI stores (``results/{subject}/roi/{roi}.zarr``).

:class:`BetasDataset` is a map-style ``torch.utils.data.Dataset`` whose items are dicts::

    betas    float32 tensor (n_voxels,)     normalized as asked (``dtype="int16"``: the
                                            stored int16 values, PSC x ``dataset.scale``)
    nsd_id   int                            0-based NSD 73k image id
    trial    int                            0-based global trial (trials.tsv ``trial``)
    session  int                            NSD session number (1-based)
    repeat   int                            0, 1, 2: which showing of the image
    subject  str
    image    uint8 tensor (3, H, W)         with ``images=``: imgBrick[nsd_id], channels first

With ``average_repeats=True`` an item is one (subject, nsd_id) and ``trial``, ``session`` and
``repeat`` are int64 tensors of length 3 padded with -1, plus ``n_repeats``.

A DataLoader batch is one read: ``__getitems__`` (called by torch's ``_MapDatasetFetcher``
when present) reads all rows of the batch at once and returns a :class:`BetasBatch`, a
sequence of item dicts that also carries the already-collated batch. torch passes what
``__getitems__`` returns to ``collate_fn``; torch's ``default_collate`` (its items' type is
registered in ``default_collate_fn_map``) and :func:`collate` both return the collated batch
with no second copy. :class:`TrialBatchSampler` (:mod:`nsdzarr.training.sampler`) gives seeded,
resumable, distributed batches; ``by_subject=True`` when the stores' voxel counts differ.

Fast path: each process reads the Zarr v3 shard files itself (:mod:`.row_reader`: the
encoded chunks located through the cached shard indexes, nearby ones read together, decoded
straight into the batch buffer) instead of paying zarr-python's ~1 ms per call. Anything but
the layouts nsd-zarr writes (``bytes``, raw or + zstd or blosc, optionally inside
``sharding_indexed``, chunks holding whole rows) falls back to zarr-python.

Safety: after ``__init__`` the dataset holds no open file and no thread (it reads the small
metadata, statistics and trials.tsv and closes them). Each process opens shard files lazily
(at most ``max_open_files`` per store, LRU), notices a fork through ``os.getpid()`` and
starts over (closing the inherited copies), and pickles without any runtime state, so it
works with ``num_workers`` 0..N, fork or spawn, persistent workers. ``in_memory=True``
decodes the rows once, at construction, into ordinary memory (random rows gather 2-4x faster
from it than from shared memory here): forked workers share its pages copy-on-write (nothing
writes them), and for spawned ones torch's multiprocessing pickler moves it into shared memory
once, when the workers start. Either way one copy serves every process.

DataLoader workers hand batches to the main process through reused memfd buffers instead of
torch's fresh shared memory per batch (:mod:`nsdzarr.training.batch_transport`): faulting in fresh
pages costs more than decoding on our VMs. For the same reason a process reading for itself
(``num_workers=0``) takes a batch's betas, metadata and images from frames reused once no
tensor of an earlier batch is alive (``LocalFrames``). Each item's metadata is gathered once at
construction into one (4, items) array, so a batch's metadata is one gather.

Images (``images=`` an image store, :class:`nsdzarr.training.readers.ImageReader`): a batch's images
are read like its betas, one pass over the shard files decoding each (H, W, 3) row straight
into the batch buffer, which travels through the same worker buffers. The batch's ``image``
is that NHWC buffer permuted to (B, 3, H, W): channels_last memory format, no copy
(``.contiguous()`` makes an NCHW copy if a model needs one). Images are always read from disk,
also with ``in_memory=True`` (73k full-size images are ~40 GB; the page cache serves re-reads).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info
from torch.utils.data._utils.collate import collate as torch_collate
from torch.utils.data._utils.collate import default_collate_fn_map

from nsdzarr.errors import InputError
from nsdzarr.nsd_facts import MAX_REPEATS
from nsdzarr.outputs import subject_of_roi_store
from nsdzarr.training.batch_transport import (
    META_KEYS,
    BatchPool,
    LocalFrames,
    Slot,
    WorkerBatch,
    pool_available,
    shared_empty,
)
from nsdzarr.training.readers import ImageReader
from nsdzarr.training.row_reader import ShardRows, ZarrRows
from nsdzarr.training.sampler import TrialBatchSampler  # noqa: F401 (re-exported)
from nsdzarr.training.store_groups import default_max_open_files, load_store_info
from nsdzarr.training.zarr_v3 import parse_layout  # noqa: F401 - re-exported for tests and users

SPLITS = ("train", "test", "all")
NORMALIZE = ("none", "psc", "session_zscore")
# the betas' output dtypes; int16: the stored values as they are
TORCH_DTYPES = {"float32": torch.float32, "int16": torch.int16}
DTYPES = tuple(TORCH_DTYPES)
# int64 metadata per batch item: nsd_id, n_repeats, 3 x trial/session/repeat
META_BYTES_PER_ITEM = 8 * 11

# --------------------------------------------------------------------------- batches


class BetasItem(dict):
    """One item of a :class:`BetasBatch` (a plain dict; its type lets collate find the batch)."""


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
        return BetasItem({k: v[j] for k, v in self._lists.items()})


def _collate_items(batch: Sequence[BetasItem], *, collate_fn_map: Any = None) -> Any:
    """torch's ``default_collate`` on items of a BetasBatch: the batch as read, no copy."""
    if isinstance(batch, BetasBatch):
        return batch.collated
    return torch_collate([dict(x) for x in batch], collate_fn_map=collate_fn_map)


# torch documents extending default_collate through this map (dispatch on the first item's type)
default_collate_fn_map[BetasItem] = _collate_items


def collate(batch: Any) -> Any:
    """``collate_fn`` for :class:`BetasDataset`: the batch as read, no second copy.

    Anything else goes through torch's ``default_collate``.
    """
    if isinstance(batch, BetasBatch):
        return batch.collated
    return default_collate(batch)


def _huge_pages(t: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages under ``t`` before it is filled (as numpy does for
    its own large arrays): random rows then gather ~15% faster here (fewer TLB misses)."""
    import ctypes
    import mmap

    with contextlib.suppress(OSError, AttributeError):  # not Linux / not glibc: small pages
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        start = -(-t.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
        end = t.data_ptr() + t.numel() * t.element_size()
        if end > start:
            madvise(start, end - start, mmap.MADV_HUGEPAGE)


class _Runtime:
    """Per-process state: readers, in-memory views, scratch buffer, batch pool, threads."""

    def __init__(self, n_stores: int) -> None:
        self.pid = os.getpid()
        self.readers: list[Any] = [None] * n_stores
        self.mem: list[np.ndarray | None] = [None] * n_stores
        self.mem_rows: np.ndarray | None = None  # one store in memory: each item's row there
        self.scratch: dict[Any, np.ndarray] = {}
        self.executor: Any = None
        self.pool: BatchPool | None = None
        self.old_pools: list[BatchPool] = []
        self.frames = LocalFrames()  # batch memory when not in a DataLoader worker

    def buffer(self, n: int, n_vox: int, dtype: np.dtype) -> np.ndarray:
        key = (n_vox, dtype.str)
        buf = self.scratch.get(key)
        if buf is None or buf.shape[0] < n:
            buf = self.scratch[key] = np.empty((max(n, 64), n_vox), dtype=dtype)
        return buf[:n]

    def slot(self, nbytes: int, pooled: bool) -> Slot | None:
        """Memory for one batch in this DataLoader worker's pool (None: not in a worker, or
        no free slot, or no memfd)."""
        if not pooled or get_worker_info() is None or nbytes == 0:
            return None
        if self.pool is None or nbytes > self.pool.slot_bytes:
            if self.pool is not None:
                self.old_pools.append(self.pool)  # its slots may still be in flight
            try:
                self.pool = BatchPool(nbytes)
            except OSError:  # no memfd / fd limit: torch's path
                self.pool = None
        return self.pool.take() if self.pool is not None else None

    def close(self) -> None:
        for reader in self.readers:
            if reader is not None:
                reader.close()
        self.readers = [None] * len(self.readers)
        self.frames.clear()
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
    """Trials (or repeat-averaged images) of one or more ROI stores, as float32 (or int16) tensors.

    ``store``: a store path, a list of them, or ``{subject: path}``; the subject is otherwise
    the folder above ``roi/``. ``subjects`` keeps only those subjects. ``trials`` overrides
    ``<store>/../../trials.tsv`` (one path, or one per store). ``split``: ``train``, ``test``
    (the shared1000 trials) or ``all``. ``normalize``: ``none`` (raw int16 values as float),
    ``psc`` (divide by the store's ``scale``), ``session_zscore`` (``(x - mean) / std`` with
    the store's per-session statistics; std 0 counts as 1). ``average_repeats``: one item per
    (subject, nsd_id), the split's repeats averaged after normalization. ``in_memory``: decode
    the split's rows once, at construction, into memory (one copy for all workers, fork or
    spawn). ``max_open_files`` bounds each process's open shard files per store (default:
    :func:`default_max_open_files`, all 600 shards of a subject under a 20000 fd limit, 128
    under the common 1024); ``decode_threads``
    > 1 decodes a batch on a thread pool in processes that are not DataLoader workers.
    ``pooled_batches``: in DataLoader workers, hand batches to the main process through
    reused buffers (see ``BatchPool``) instead of fresh shared memory per batch.
    ``images``: an image store; items gain ``image`` (every item's nsd_id must be in it);
    ``image_size=S`` reads its resized copy ``images_{S}``. ``verify_checksums=True`` checks
    each chunk's crc32c before using it: a flipped byte is an InputError naming the file and
    the trial. Off by default: it costs 44-61% of the read rate on raw ROI stores
    (benchmarks/README.md), and ``nsdzarr verify`` checks every chunk of a store once.
    ``dtype="int16"``: betas are the stored int16 values (PSC x :attr:`scale`), half the bytes
    of float32 to gather and to copy to a GPU; only with ``normalize="none"`` and without
    ``average_repeats`` (a mean of integers is not an integer).
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
        images: str | os.PathLike[str] | None = None,
        image_size: int | None = None,
        verify_checksums: bool = False,
        dtype: Any = "float32",
    ) -> None:
        dname = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else None
        with contextlib.suppress(TypeError):
            dname = dname or np.dtype(dtype).name
        if dname not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if dname == "int16" and normalize != "none":
            raise ValueError(
                f"dtype='int16' returns the stored values: normalize must be 'none', "
                f"got {normalize!r} (or use dtype='float32')"
            )
        if dname == "int16" and average_repeats:
            raise ValueError(
                "dtype='int16' cannot average repeats (a mean of integers is not an integer): "
                "use dtype='float32'"
            )
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
        if image_size is not None and images is None:
            raise ValueError("image_size needs images= (an image store)")
        self.split, self.normalize, self.average_repeats = split, normalize, average_repeats
        self.in_memory, self.verify_checksums = in_memory, verify_checksums
        self.decode_threads = max(1, int(decode_threads))
        self.pooled_batches = pooled_batches and pool_available()
        self.stores = [
            load_store_info(p, s, t, normalize == "session_zscore")
            for (s, p), t in zip(pairs, tsvs, strict=True)
        ]
        self._single = len(self.stores) == 1
        self.dtype = np.dtype(dname)
        for info in self.stores if dname == "int16" else ():
            if info.disk_dtype.kind != "i" or info.disk_dtype.itemsize != 2:
                raise ValueError(f"dtype='int16': {info.path} stores {info.disk_dtype}, not int16")
        self.max_open_files = max_open_files or default_max_open_files(len(self.stores))
        self._rt: _Runtime | None = None
        self._index_items()
        self.images: ImageReader | None = None
        self._item_image: np.ndarray | None = None  # image store row of each item
        if images is not None:
            self.images = ImageReader(images, image_size, self.max_open_files, verify_checksums)
            self._item_image = self.images.rows_of(self._item_nsd_id())
        self._mem: list[torch.Tensor | None] = [None] * len(self.stores)
        self._mem_pos: list[np.ndarray | None] = [None] * len(self.stores)
        if in_memory:
            self._load_in_memory()
        # batches read in this process take _fetch_lean: one store, no images, no averaging
        self._lean = self._single and self._item_meta is not None and self.images is None

    @staticmethod
    def _store_pairs(store: Any) -> list[tuple[str, str]]:
        if isinstance(store, Mapping):
            return [(str(s), str(p)) for s, p in store.items()]
        paths = [store] if isinstance(store, str | os.PathLike) else list(store)
        return [(subject_of_roi_store(p), str(p)) for p in paths]

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
            # META_KEYS of every item, one row each: one gather serves a batch's metadata
            self._item_meta = np.empty((len(META_KEYS), len(item_row)), dtype=np.int64)
            for s, info in enumerate(self.stores):
                mine = item_store == s
                for k, key in enumerate(META_KEYS):
                    self._item_meta[k, mine] = info.columns[key][item_row[mine]]
            return
        self._item_meta = None
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

    def _item_nsd_id(self) -> np.ndarray:
        ids = np.empty(len(self._item_store), dtype=np.int64)
        for s, info in enumerate(self.stores):
            mine = self._item_store == s
            ids[mine] = info.columns["nsd_id"][self._item_row[mine]]
        return ids

    def _load_in_memory(self) -> None:
        """Decode the rows this dataset uses once into memory, then close every file."""
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
                mem = torch.empty((len(used), info.n_voxels), dtype=tdtype)  # filled in place
                _huge_pages(mem)
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

    def subset(self, indices: Sequence[int] | np.ndarray) -> BetasDataset:
        """These items only, in this order: same stores and settings, no open file shared."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and not (-len(self) <= idx.min() and idx.max() < len(self)):
            raise IndexError(f"subset index out of range for a dataset of {len(self)} items")
        out = copy.copy(self)
        out._rt = None
        out._item_store, out._item_row = self._item_store[idx], self._item_row[idx]
        if self._item_meta is not None:
            out._item_meta = self._item_meta[:, idx]
        if self._group_rows is not None:
            out._group_rows = self._group_rows[idx]
        if self._item_image is not None:
            out._item_image = self._item_image[idx]
        return out

    @property
    def nsd_ids(self) -> np.ndarray:
        """0-based NSD image id of each item."""
        return self._item_nsd_id()

    def close(self) -> None:
        """Close this process's open files (they reopen on the next read)."""
        if self._rt is not None and self._rt.pid == os.getpid():
            self._rt.close()
        self._rt = None
        if self.images is not None:
            self.images.close()

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
        return rt

    def _reader(self, rt: _Runtime, s: int) -> Any:
        reader = rt.readers[s]
        if reader is None:
            info = self.stores[s]
            if info.layout is not None:
                reader = ShardRows(info.layout, self.max_open_files, "trial", self.verify_checksums)
            else:
                reader = ZarrRows(os.path.join(info.path, "betas"))
            rt.readers[s] = reader
        return reader

    # ---- map-style protocol
    def __len__(self) -> int:
        return len(self._item_store)

    @property
    def n_voxels(self) -> int:
        """Voxels per item; ValueError when the stores differ (see ``voxels_per_store``)."""
        counts = set(self.voxels_per_store)
        if len(counts) > 1:
            raise ValueError(
                f"stores differ in voxel count {self.voxels_per_store}: see voxels_per_store"
            )
        return counts.pop()

    @property
    def scale(self) -> float:
        """Stored value per percent signal change (NSD: 300); ValueError when stores differ.

        With ``dtype="int16"``, ``betas.float() / scale`` (on the GPU) is ``normalize="psc"``."""
        scales = {info.scale for info in self.stores}
        if len(scales) > 1:
            raise ValueError(f"stores differ in scale {sorted(scales)}")
        return scales.pop()

    @property
    def voxels_per_store(self) -> list[int]:
        """Voxels per item of each store, in store order (as ``subjects``)."""
        return [info.n_voxels for info in self.stores]

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
        idx = indices
        if type(idx) is not np.ndarray or idx.dtype != np.int64 or idx.ndim != 1:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return BetasBatch(self._fetch(idx))

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
        betas = torch.from_numpy(np.empty(self.stores[s].n_voxels, self.dtype))
        raw = self._read_raw(rt, stores, rows)
        self._normalize(raw, stores, rows, betas.numpy()[None])
        cols = self.stores[s].columns
        item = {
            "betas": betas,
            "nsd_id": int(cols["nsd_id"][row]),
            "trial": int(cols["trial"][row]),
            "session": int(cols["session"][row]),
            "repeat": int(cols["repeat"][row]),
            "subject": self.stores[s].subject,
        }
        if self.images is not None:
            image = torch.empty(self.images.shape[1:], dtype=torch.uint8)
            self.images.read_into(self._item_image[i : i + 1], image.numpy()[None])
            item["image"] = image.permute(2, 0, 1)
        return item

    def _read_raw(
        self, rt: _Runtime, stores: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Rows (len(rows), n_vox) in the stores' dtype, in a per-process scratch buffer, or
        in ``out`` when that is their dtype and needs no normalizing (``dtype="int16"``)."""
        ids = [0] if self._single else np.unique(stores).tolist()
        n_vox = self.stores[ids[0]].n_voxels
        if any(self.stores[s].n_voxels != n_vox for s in ids):
            raise ValueError(
                "a batch mixes stores with different voxel counts "
                f"{sorted({self.stores[s].n_voxels for s in ids})}: "
                "batch with TrialBatchSampler(dataset, batch_size, by_subject=True)"
            )
        dtype = self.stores[ids[0]].disk_dtype if len(ids) == 1 else np.dtype(np.float32)
        if out is not None and out.dtype == dtype and self.normalize == "none":
            raw = out
        else:
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

    def _gather_normalized(
        self, rt: _Runtime, stores: np.ndarray, rows: np.ndarray, out: np.ndarray
    ) -> bool:
        """One store, in memory or raw rows in the page cache (``ShardRows.row_views``): each
        row cast and normalized straight from there into ``out`` (one pass over the data
        instead of a gather, then a cast); False otherwise."""
        s = 0 if self._single else int(stores[0])
        if not (self._single or (stores == s).all()):
            return False
        if self._mem[s] is not None:
            if rt.mem[s] is None:
                rt.mem[s] = self._mem[s].numpy()
            mem, pos = rt.mem[s], self._mem_pos[s][rows]
            if mem.dtype == out.dtype:  # dtype="int16": one gather, no cast
                np.take(mem, pos, axis=0, out=out, mode="clip")  # in range; "raise" buffers
                return True
            src = [mem[p] for p in pos.tolist()]
        else:
            reader = self._reader(rt, s)
            src = reader.row_views(rows) if isinstance(reader, ShardRows) else None
            if src is None:
                return False
        info = self.stores[s]
        if self.normalize == "none":
            for j, x in enumerate(src):  # item assignment: the cheapest per-row call here
                out[j] = x
        elif self.normalize == "psc":
            scale = np.float32(info.scale)
            for o, x in zip(out, src, strict=True):
                np.divide(x, scale, out=o, dtype=np.float32)
        else:
            mean, std = info.mean, info.std
            for o, x, q in zip(out, src, info.row_session[rows].tolist(), strict=True):
                np.subtract(x, mean[q], out=o, dtype=np.float32)
                np.divide(o, std[q], out=o)
        return True

    def _normalize(
        self, raw: np.ndarray, stores: np.ndarray, rows: np.ndarray, out: np.ndarray
    ) -> None:
        ids = [0] if self._single else np.unique(stores).tolist()
        for s in ids:
            info = self.stores[s]
            sel = np.flatnonzero(stores == s) if len(ids) > 1 else None
            x = raw if sel is None else raw[sel]
            o = out if sel is None else np.empty(x.shape, out.dtype)
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
        """The collated batch of items ``idx`` (negative ones count back, as numpy's)."""
        rt = self._runtime()
        if self._lean and get_worker_info() is None:
            return self._fetch_lean(rt, idx)
        try:
            item_store = self._item_store[idx]  # numpy checks the range
        except IndexError:
            raise IndexError(f"index out of range for a dataset of {len(self)} items") from None
        worker = get_worker_info() is not None
        n = len(idx)
        if self._group_rows is None:
            rows, stores, counts = self._item_row[idx], item_store, None
        else:
            group = self._group_rows[idx]
            counts = (group >= 0).sum(axis=1)
            rows = group[group >= 0]  # group-major
            stores = np.repeat(item_store, counts)
        shape = (n, self.stores[0 if self._single or not n else int(item_store[0])].n_voxels)
        # meta: (4, n) int64, one row per META_KEYS column; tensors are made of meta_rows
        slot = meta = meta_rows = None
        ishape = (n, *self.images.shape[1:]) if self.images is not None else None
        if worker:
            per_item = self.dtype.itemsize * shape[1] + META_BYTES_PER_ITEM
            nbytes = n * per_item + 512  # + alignment of 6 arrays
            nbytes += math.prod(ishape) + 64 if ishape is not None else 0
            slot = rt.slot(nbytes, self.pooled_batches)
        if slot is not None:
            out = slot.empty(shape, self.dtype)
            betas = torch.from_numpy(out)
        elif worker:
            betas = shared_empty(shape, TORCH_DTYPES[self.dtype.name])
            out = betas.numpy()
        else:  # reused memory: a fresh 2 MB batch costs as much to fault in as to fill
            frame = rt.frames.take(n, shape[1], self.dtype, ishape[1:] if ishape else None)
            out, meta_rows = frame[0], frame[1 : 1 + len(META_KEYS)]
            betas = torch.from_numpy(out)
            meta = meta_rows[0].base if counts is None else None  # the frame's rows, no others
        collated: dict[str, Any] = {"betas": betas}
        if ishape is not None:  # NHWC rows, handed out as NCHW in channels_last format
            if slot is not None:
                image = torch.from_numpy(slot.empty(ishape, np.uint8))
            elif worker:
                image = shared_empty(ishape, torch.uint8)
            else:  # the frame's own array (a tensor of a view of it escapes its refcount)
                image = torch.from_numpy(frame[-1])
            if n:
                self.images.read_into(self._item_image[idx], image.numpy(), rt.executor)
            collated["image"] = image.permute(0, 3, 1, 2)
        if slot is not None and counts is None:  # after the images: they follow the betas
            meta = slot.empty((len(META_KEYS), n), np.int64)
        if n:
            if counts is None and self._gather_normalized(rt, stores, rows, out):
                pass
            elif counts is None:
                raw = self._read_raw(rt, stores, rows, out)
                if raw is not out:
                    self._normalize(raw, stores, rows, out)
            else:
                raw = self._read_raw(rt, stores, rows)
                norm = np.empty(raw.shape, dtype=np.float32)
                self._normalize(raw, stores, rows, norm)
                starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
                np.add.reduceat(norm, starts, axis=0, out=out)
                out /= counts[:, None].astype(np.float32)
        if counts is None:
            if meta is None:  # a worker without a free slot: small tensors travel by value
                meta = np.empty((len(META_KEYS), n), np.int64)
            np.take(self._item_meta, idx, axis=1, out=meta)
            for key, row in zip(META_KEYS, meta_rows or tuple(meta), strict=True):
                collated[key] = torch.from_numpy(row)
        else:
            cols = {"nsd_id": self._columns(item_store, group[:, 0])["nsd_id"]}
            for key in ("trial", "session", "repeat"):
                vals = np.full(group.shape, -1, dtype=np.int64)
                for s in np.unique(item_store).tolist():
                    mine = item_store == s
                    g = group[mine]
                    vals[mine] = np.where(g >= 0, self.stores[s].columns[key][np.maximum(g, 0)], -1)
                cols[key] = vals
            cols["n_repeats"] = counts.astype(np.int64)
            for key, v in cols.items():
                collated[key] = torch.from_numpy(slot.copy(v) if slot is not None else v)
        if self._single:
            collated["subject"] = [self.stores[0].subject] * n
        else:
            collated["subject"] = [self.stores[s].subject for s in item_store.tolist()]
        if not worker:
            return collated
        batch = WorkerBatch(collated)
        batch.slot = slot
        return batch

    def _fetch_lean(self, rt: _Runtime, idx: np.ndarray) -> dict[str, Any]:
        """:meth:`_fetch` in the reading process for one store without images or averaging:
        the same batch with the fewest steps (their fixed cost is ~1/4 of an in-memory
        batch), into a reused frame."""
        info = self.stores[0]
        frame = rt.frames.take(len(idx), info.n_voxels, self.dtype)
        out = frame[0]
        if rt.mem_rows is None and self._mem[0] is not None:
            rt.mem[0] = self._mem[0].numpy()
            rt.mem_rows = self._mem_pos[0][self._item_row]  # item -> row in memory
        one_gather = rt.mem_rows is not None and rt.mem[0].dtype == self.dtype
        try:  # numpy checks the range (negative indices count back)
            rows = (rt.mem_rows if one_gather else self._item_row)[idx]
            self._item_meta.take(idx, axis=1, out=frame[1].base)
        except IndexError:
            raise IndexError(f"index out of range for a dataset of {len(self)} items") from None
        if one_gather:
            rt.mem[0].take(rows, axis=0, out=out, mode="clip")  # in range
        elif len(idx) and not self._gather_normalized(rt, None, rows, out):  # type: ignore[arg-type]
            raw = self._read_raw(rt, None, rows, out)  # type: ignore[arg-type]
            if raw is not out:
                self._normalize(raw, None, rows, out)  # type: ignore[arg-type]
        t = torch.from_numpy
        return {
            "betas": t(out),
            "nsd_id": t(frame[1]),
            "trial": t(frame[2]),
            "session": t(frame[3]),
            "repeat": t(frame[4]),
            "subject": [info.subject] * len(idx),
        }

    def _columns(self, stores: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
        if self._single:
            cols = self.stores[0].columns
            return {k: cols[k][rows] for k in META_KEYS}
        out = {k: np.empty(len(rows), dtype=np.int64) for k in META_KEYS}
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
            f"in_memory={self.in_memory}, fast_path={all(i.layout for i in self.stores)}"
            + (f", images={self.images.path!r} ({self.images.info.array})" if self.images else "")
            + ")"
        )
