"""Hand DataLoader batches from workers to the main process through reused memory.

torch sends a worker's batch tensors through fresh shared memory, one new segment per tensor
and batch: the worker faults every page in, the main process maps it again, ~4 us per 4 KiB
page on our VMs, more than decoding the rows. A worker instead writes each batch, betas and
metadata, into a slot of one memfd it keeps (pages faulted once); the batch pickles as a few
numbers (pool, slot, where each tensor lies) and the main process maps the pool once, keeps
the arrays over each slot it has seen, and wraps them without copying. A slot is reused only
when freed: by the main process once none of the batch's tensors is alive (the arrays'
reference counts, looked at as later batches arrive), or by the worker when the batch was
never sent. No free slot (batches kept alive): fresh shared memory for
the betas, small tensors by value. Without memfd, /proc or torch's private storage call (or
with ``NSDZARR_DISABLE_PRIVATE=transport``): torch's standard transport (:mod:`.fallbacks`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from nsdzarr.training.fallbacks import ENV, private_transport


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor in fresh shared memory, allocated there directly (as torch's collate does);
    without the private transport a plain one, which torch's pickler moves there."""
    if not private_transport():
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return proto.new(storage).resize_(*shape)


_SLOTS = 16
_HEADER = 4096  # state (uint8) x 16 at 0, generation (uint32) x 16 at 1024, token at 2048
_ALIGN = 64
_MAPPED: OrderedDict[tuple[int, int, int], Any] = OrderedDict()  # main process: pools


class BatchPool:
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
        self.addr = self.state.ctypes.data
        self.lock = threading.Lock()  # take() vs finalizers running in the feeder thread

    def take(self) -> Slot | None:
        """A free slot (reused once nothing here uses it, unless it was sent), or None."""
        with self.lock:
            i = self.mm.find(b"\0", 0, _SLOTS)  # state 0: free (the main process frees too)
            if i < 0:
                return None
            self.gen[i] += 1
            gen = int(self.gen[i])
            self.state[i] = 1
        offset = _HEADER + i * self.slot_bytes
        base = np.frombuffer(self.mm, np.uint8, self.slot_bytes, offset)
        on_release(base, self._release, i, gen)  # once no view of it is alive
        return Slot(self, i, gen, offset, base)

    def _release(self, i: int, gen: int) -> None:
        with self.lock:
            if int(self.gen[i]) == gen and self.state[i] == 1:
                self.state[i] = 0


class Slot:
    """One batch's memory in a pool: arrays are carved from it one after another."""

    def __init__(self, pool: BatchPool, index: int, gen: int, offset: int, base: np.ndarray):
        self.pool, self.index, self.gen, self.offset = pool, index, gen, offset
        self.base, self.used = base, 0
        self.addr = pool.addr + offset

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialized array in the slot."""
        dtype = np.dtype(dtype)
        n = math.prod(shape) * dtype.itemsize
        start = -(-self.used // _ALIGN) * _ALIGN
        if start + n > len(self.base):
            raise ValueError("batch does not fit its slot")
        self.used = start + n
        return self.base[start : start + n].view(dtype).reshape(shape)

    def copy(self, arr: np.ndarray) -> np.ndarray:
        """``arr`` copied into the slot."""
        out = self.empty(arr.shape, arr.dtype)
        out[...] = arr
        return out

    def offset_of(self, t: torch.Tensor) -> int | None:
        """Where a dense tensor lies in the slot (None if elsewhere).

        Dense: contiguous up to a permutation of its axes, such as channels_last images.
        """
        off = t.data_ptr() - self.addr
        inside = off >= 0 and off + t.numel() * t.element_size() <= len(self.base)
        return off if inside and _dense(t) else None

    def send(self) -> tuple[tuple[int, int, int], int, int, int]:
        """Hand the slot to the main process (which frees it); once only."""
        pool = self.pool
        with pool.lock:
            if int(pool.gen[self.index]) != self.gen or pool.state[self.index] != 1:
                raise RuntimeError("a pooled batch was sent twice")
            pool.state[self.index] = 2
        return pool.key, self.index, self.offset, self.used


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers exactly its numel elements (contiguous once axes are reordered)."""
    if t.is_contiguous():
        return True
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(order).is_contiguous()


def _map_pool(key: tuple[int, int, int]) -> Any:
    """Main process: the worker's pool mapped (once; pools of exited workers are dropped)."""
    import mmap

    mm = _MAPPED.get(key)
    if mm is not None:
        return mm
    release_exited_pools()
    pid, fd, token = key
    try:
        f = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:  # a process of ours, but not readable (the probe saw only itself)
        raise RuntimeError(
            f"cannot open DataLoader worker {pid}'s batch buffer ({exc.strerror}); "
            f"{ENV}=transport uses torch's standard transport"
        ) from exc
    try:
        mm = mmap.mmap(f, 0)
    finally:
        os.close(f)
    if int(np.frombuffer(mm, np.uint64, 1, 2048)[0]) != token:
        mm.close()
        raise RuntimeError(f"batch buffer of DataLoader worker {pid} is gone")
    _MAPPED[key] = mm
    return mm


def release_exited_pools() -> None:
    """Main process: drop the mappings (each holds an fd) of exited workers' pools; one that
    batches still use closes when the last of them is collected."""
    for old in [k for k in _MAPPED if not os.path.exists(f"/proc/{k[0]}")]:
        with _LOCK:
            for cache in (_VIEWS, _BUSY):
                for k in [k for k in cache if k[0] == old]:
                    del cache[k]
        with contextlib.suppress(BufferError):  # else unmapped once its last batch is freed
            _MAPPED.pop(old).close()


class WorkerBatch(dict):
    """A collated batch made in a DataLoader worker; pickles as a few numbers.

    Tensors in the batch's pool slot travel as one string of (dtype, shape, strides, offset)
    (the same for every full batch: the main process parses it once); other small tensors by
    value (torch would give each its own shared memory segment). Unpickled, it is a plain
    dict of plain tensors over the slot, which is freed once they are gone.
    """

    slot: Slot | None = None

    def __reduce__(self) -> Any:
        slot, items = self.slot, self.items()
        # how each value travels depends only on these facts: the plan made for the first
        # batch of a layout serves the next ones (looking at each tensor costs ~20 us)
        addr = slot.addr if slot is not None else None
        facts = tuple(
            (key, None if addr is None else v.data_ptr() - addr, v.dtype, v.shape, v.stride())
            if isinstance(v, torch.Tensor)
            else (key,)
            for key, v in items
        )
        facts_key = (len(slot.base) if slot is not None else 0, facts)
        plan = _PLANS.get(facts_key)
        if plan is None:
            plan = _PLANS[facts_key] = _plan(slot, self)
        in_slot, by_value, kinds, mixed = plan
        rest = {}
        for (key, v), kind in zip(items, kinds, strict=True):
            if kind == _IN_SLOT:
                if mixed:  # a placeholder (None) for the slot's tensor keeps the key order
                    rest[key] = None
            else:
                rest[key] = v.numpy() if kind == _BY_VALUE else v
        ticket = slot.send() if _IN_SLOT in kinds else None  # type: ignore[union-attr]
        return (_rebuild_batch, (ticket, in_slot, by_value, rest))


_IN_SLOT, _BY_VALUE, _AS_IS = range(3)
# worker: (slot size, each value's key and tensor facts) -> how the batch's values travel
_PLANS: dict[tuple, tuple[bytes, list[str], tuple[int, ...], bool]] = {}


def _plan(slot: Slot | None, batch: dict) -> tuple[bytes, list[str], tuple[int, ...], bool]:
    """How a batch's values travel: tensors in the slot as one string of (dtype, shape,
    strides, offset), other small tensors by value (torch would give each its own shared
    memory segment), the rest as they are."""
    if len(_PLANS) >= 64:
        _PLANS.clear()
    in_slot, by_value, kinds, mixed, after_other = [], [], [], False, False
    for key, v in batch.items():
        off = slot.offset_of(v) if isinstance(v, torch.Tensor) and slot else None
        if off is not None:  # strides only when not C-contiguous (channels_last images)
            stride = None if v.is_contiguous() else v.stride()
            in_slot.append((key, v.numpy().dtype.str, tuple(v.shape), stride, off))
            kinds.append(_IN_SLOT)
            mixed = mixed or after_other
            continue
        after_other = True
        small = isinstance(v, torch.Tensor) and v.numel() * v.element_size() <= 1 << 16
        if small:
            by_value.append(key)
        kinds.append(_BY_VALUE if small else _AS_IS)
    return repr(in_slot).encode(), by_value, tuple(kinds), mixed


# id of the weakref to an array -> (that weakref, callback, its arguments)
_PENDING: dict[int, tuple[Any, Any, tuple]] = {}
# a forked child's copies of the parent's arrays must not free the parent's (shared) memory
os.register_at_fork(after_in_child=_PENDING.clear)


def on_release(base: np.ndarray, callback: Any, *args: Any) -> None:
    """Call ``callback(*args)`` once ``base`` is collected: once no view of it, nor any tensor
    over such a view, is alive. ``base`` must be an array over a buffer it does not own (of
    ``np.frombuffer``), so that every view refers to ``base`` itself. Registered before a
    fork, never called in the child."""
    ref = weakref.ref(base, _released)
    _PENDING[id(ref)] = (ref, callback, args)


def _released(ref: Any) -> None:
    entry = _PENDING.pop(id(ref), None)
    if entry is not None:
        entry[1](*entry[2])


# main process: a batch layout (WorkerBatch's string) -> (name, dtype, count, shape,
# reshape, byte strides or None, offset) per tensor
_LAYOUTS: dict[str, list[tuple[str, np.dtype, int, tuple, bool, tuple | None, int]]] = {}


def _layout(text: bytes) -> list[tuple[str, np.dtype, int, tuple, bool, tuple | None, int]]:
    parsed = _LAYOUTS.get(text)
    if parsed is None:
        import ast

        if len(_LAYOUTS) >= 64:
            _LAYOUTS.clear()
        parsed = []
        for name, dtype, shape, stride, off in ast.literal_eval(text.decode()):
            dt = np.dtype(dtype)
            strides = None if stride is None else tuple(x * dt.itemsize for x in stride)
            parsed.append((name, dt, math.prod(shape), shape, len(shape) != 1, strides, off))
        _LAYOUTS[text] = parsed
    return parsed


# main process: (pool key, slot, layout string) -> (mm, slot, names, arrays over the slot),
# made once; tensors are made of these arrays, whose reference counts show when none is left
_VIEWS: dict[tuple, tuple[Any, int, tuple[str, ...], tuple[np.ndarray, ...]]] = {}
# main process: slots whose batches may still be alive, (pool key, slot) -> a _VIEWS entry
_BUSY: dict[tuple, tuple[Any, int, tuple[str, ...], tuple[np.ndarray, ...]]] = {}
_LOCK = threading.RLock()  # the main thread and a pin-memory thread may both rebuild batches


def _forget_views() -> None:
    _VIEWS.clear()
    _BUSY.clear()


os.register_at_fork(after_in_child=_forget_views)  # a child never frees the parent's slots


def in_use(arrays: tuple[np.ndarray, ...]) -> bool:
    """Whether anything but ``arrays`` (which holds each once) refers to one of them."""
    return sum(map(sys.getrefcount, arrays)) > _FREE_REFS * len(arrays)  # none is below


_FREE_REFS = max(map(sys.getrefcount, (np.empty(0),)))  # an array only a tuple holds


def _free_unused_slots() -> None:
    """Hand back to their workers the slots of the oldest batches no tensor uses any more, up
    to the first one still in use, which goes to the back (under _LOCK): a few checks per
    batch, and a batch kept alive does not hold up the ones after it."""
    for _ in range(len(_BUSY)):
        slot_key = next(iter(_BUSY))
        entry = _BUSY.pop(slot_key)
        if in_use(entry[3]):
            _BUSY[slot_key] = entry
            return
        if not entry[0].closed:  # the worker may reuse the slot
            entry[0][entry[1]] = 0


def _slot_views(key: tuple, index: int, offset: int, in_slot: bytes) -> tuple:
    """The arrays of a batch layout over one slot, made on its first batch."""
    mm = _map_pool(key)
    names, arrays = [], []
    for name, dt, count, shape, reshape, strides, off in _layout(in_slot):
        if strides is not None:  # not C-contiguous (channels_last images)
            view = np.ndarray(shape, dt, buffer=mm, offset=offset + off, strides=strides)
        elif count:
            view = np.frombuffer(mm, dt, count, offset + off)
            if reshape:
                view = view.reshape(shape)
        else:
            view = np.empty(shape, dt)
        names.append(name)
        arrays.append(view)
    if len(_VIEWS) >= 1024:  # many pools or layouts: keep only what batches use
        busy = {id(e) for e in _BUSY.values()}
        for k in [k for k, e in _VIEWS.items() if id(e) not in busy]:
            del _VIEWS[k]
    entry = _VIEWS[key, index, in_slot] = (mm, index, tuple(names), tuple(arrays))
    return entry


def _rebuild_batch(
    ticket: Any,
    in_slot: bytes,
    by_value: list[str],
    rest: dict,
) -> dict[str, Any]:
    """Unpickling in the main process: tensors over the worker's slot.

    This runs once per batch in the main process, whose CPU bounds the workers' speed-up:
    the arrays over a slot are made on its first batch and kept, so a batch costs one
    ``from_numpy`` per tensor; a slot is handed back once no tensor uses its arrays, which
    their reference counts show (checked here, as each batch arrives: no weakref or finalizer
    per batch)."""
    if ticket is not None:
        key, index, offset, _nbytes = ticket
        with _LOCK:
            entry = _VIEWS.get((key, index, in_slot))
            if entry is None:
                entry = _slot_views(key, index, offset, in_slot)
            _free_unused_slots()
            _BUSY[key, index] = entry
        names, tensors = entry[2], map(torch.from_numpy, entry[3])
        if names[0] in rest:  # placeholders keep the key order
            for name, tensor in zip(names, tensors, strict=True):
                rest[name] = tensor
        else:  # the slot's tensors come first
            batch = dict(zip(names, tensors, strict=True))
            batch.update(rest)
            rest = batch
    for name in by_value:
        rest[name] = torch.from_numpy(rest[name])
    return rest


# a batch's metadata in one int64 block, one row per column (contiguous 1-D tensors)
META_KEYS = ("nsd_id", "trial", "session", "repeat")


class LocalFrames:
    """Memory of whole batches, reused in a process that reads for itself.

    A fresh (32, 15724) float32 batch is 2 MB, which glibc maps afresh for every batch: faulting
    its pages in cost as much as gathering an in-memory batch. A frame is a tuple: a (n, n_vox)
    betas array, then the 4 rows (n int64 each, one per ``META_KEYS`` column) of one metadata
    block, then (when asked) a (n, H, W, 3) uint8 images array. It is reused once no tensor or
    view of its arrays is alive, which their reference counts show (a tensor from
    ``torch.from_numpy`` holds the array it was made from; views of the tensor hold the
    tensor): no weakref and no new array per batch.
    """

    def __init__(self) -> None:
        self.frames: dict[tuple, list[tuple[np.ndarray, ...]]] = {}

    def take(
        self, n: int, n_vox: int, dtype: np.dtype, image_shape: tuple[int, ...] | None = None
    ) -> tuple[np.ndarray, ...]:
        """A frame for a batch of ``n``, with images of ``image_shape`` (H, W, 3) if given
        (make tensors of its arrays only, not of views)."""
        key = (n, n_vox, dtype.char, image_shape)
        frames = self.frames.get(key)
        if frames is None:
            if len(self.frames) >= 8:  # batch shapes seen: drop the old ones' free frames
                self.frames.clear()
            frames = self.frames[key] = []
        for frame in frames:
            if not in_use(frame):
                return frame
        frame = (np.empty((n, n_vox), dtype), *np.empty((len(META_KEYS), n), np.int64))
        if image_shape is not None:
            frame += (np.empty((n, *image_shape), np.uint8),)
        # keep a few (what a loop holding a batch or two needs), ~64 MB at most per shape
        nbytes = sum(a.nbytes for a in frame)
        if len(frames) < max(2, min(4, (64 << 20) // max(1, nbytes))):
            frames.append(frame)
        return frame

    def clear(self) -> None:
        """Drop the frames (those in use return to the allocator when collected)."""
        self.frames.clear()


def pool_available() -> bool:
    """Whether batch pools work here: memfd, /proc and torch's private storage call (the seam
    in :mod:`.fallbacks`, probed once; else torch's standard transport, logged once)."""
    return private_transport()
