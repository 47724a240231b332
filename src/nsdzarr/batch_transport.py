"""Hand DataLoader batches from workers to the main process through reused memory.

torch sends a worker's batch tensors through fresh shared memory, one new segment per tensor
and batch: the worker faults every page in, the main process maps it again, ~4 us per 4 KiB
page on our VMs, more than decoding the rows. A worker instead writes batches into slots of
one memfd it keeps (pages faulted once); the betas tensor pickles as (pool, slot) and the
main process maps the pool once and wraps the slot without copying. A slot is reused only
when freed: by the main process once nothing there references the tensor any more (a
finalizer on the array behind it), or by the worker when the tensor was never sent. No free
slot (batches kept alive) or no memfd: torch's usual path. Small metadata tensors pickle by
value (``WorkerBatch``).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np
import torch


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor in fresh shared memory, allocated there directly (as torch's collate does)."""
    numel = math.prod(shape)
    proto = torch.empty(0, dtype=dtype)
    try:
        storage = proto._typed_storage()._new_shared(numel, device="cpu")
        return proto.new(storage).resize_(*shape)
    except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - private API moved
        return torch.empty(shape, dtype=dtype).share_memory_()


_SLOTS = 16
_HEADER = 4096  # state (uint8) x 16 at 0, generation (uint32) x 16 at 1024, token at 2048
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


class WorkerBatch(dict):
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


def pool_available() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")
