"""Seeded, resumable, distributed batch sampler for :class:`nsdzarr.training.loader.BetasDataset`.

``DataLoader(ds, batch_sampler=TrialBatchSampler(ds, 32), num_workers=N)``: each batch is a
list of dataset indices that the dataset reads in one go (``__getitems__``).

Order: epoch ``e`` uses ``numpy.random.default_rng([seed, e])``; the same seed, epoch and
configuration give the same batches on every machine. Call :meth:`set_epoch` before each
epoch (as with ``DistributedSampler``); otherwise every epoch repeats epoch 0's order.

Replicas (``num_replicas``/``rank``, default: torch.distributed's world size and rank when
it is initialized, else 1/0): the epoch's order is cut into ``num_replicas`` contiguous
blocks of equal size, one per rank. ``drop_last=False`` makes the size ``ceil(n / R)``,
padding the last block with the first ``R * size - n`` indices of the epoch's order (fewer
than R; as ``DistributedSampler`` does): every index is yielded once across the ranks, and
only those padded ones twice. ``drop_last=True`` makes it ``floor(n / R)`` (the last
``n % R`` indices of the order are skipped this epoch) and also drops each rank's final
incomplete batch. Every rank yields ``len(sampler)`` batches.

``by_subject=True``: batches never mix subjects (the groups of
``dataset.indices_by_subject()``, needed when voxel counts differ). Each subject is
shuffled, split across ranks and batched as above on its own (padding at most R - 1 of its
indices per subject); the subjects' batches are then interleaved in a seeded order that is
the same on every rank, so at each step all ranks hold the same subject.

Resume: :meth:`state_dict` after k batches of an epoch and :meth:`load_state_dict` on a new
sampler (same dataset length and configuration) make its next iteration yield exactly the
remaining ``len - k`` batches of that epoch; later iterations start epochs from the start.
The state holds no rank: at the same step it is the same on every rank, so rank 0's
checkpoint resumes all of them.
torchdata's ``StatefulDataLoader`` does this by itself (it takes the sampler's state as it
hands out batches). With a plain DataLoader the sampler runs ahead of training by the
prefetched batches, so save ``{**sampler.state_dict(), "batches": steps_done}``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
from torch.utils.data import Sampler

STATE_VERSION = 1


def _distributed_default() -> tuple[int, int]:
    """(world size, rank) of an initialized torch.distributed process group, else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class TrialBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices: seeded per epoch, split across replicas, resumable."""

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        by_subject: bool = False,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        world, me = _distributed_default()
        self.num_replicas = world if num_replicas is None else int(num_replicas)
        self.rank = me if rank is None else int(rank)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in [0, num_replicas={self.num_replicas})")
        self.batch_size, self.shuffle, self.drop_last = batch_size, bool(shuffle), bool(drop_last)
        self.seed, self.by_subject = int(seed), bool(by_subject)
        self.n = len(dataset)
        groups = (
            list(dataset.indices_by_subject().values())  # type: ignore[attr-defined]
            if by_subject
            else [np.arange(self.n)]
        )
        self._groups = [np.asarray(g, dtype=np.int64) for g in groups if len(g)]
        self.epoch = 0
        self._resume: int | None = None  # batches to skip in the next iteration
        self._yielded = 0

    # ---- epoch plan
    def _share(self, n: int) -> int:
        """Indices of a group of ``n`` that each rank gets."""
        r = self.num_replicas
        return n // r if self.drop_last else math.ceil(n / r)

    def _n_batches(self, n: int) -> int:
        share = self._share(n)
        return share // self.batch_size if self.drop_last else math.ceil(share / self.batch_size)

    def __len__(self) -> int:
        """Batches per epoch on every rank."""
        return sum(self._n_batches(len(g)) for g in self._groups)

    def _plan(self) -> list[np.ndarray]:
        """This rank's batches of the current epoch, in order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        per_group: list[list[np.ndarray]] = []
        for g in self._groups:  # every rank draws the same numbers: only the slicing differs
            order = rng.permutation(g) if self.shuffle else g
            share = self._share(len(g))
            order = np.resize(order, share * self.num_replicas)  # pads by repeating the start
            mine = order[self.rank * share : (self.rank + 1) * share]
            bs, k = self.batch_size, self._n_batches(len(g))
            per_group.append([mine[b * bs : (b + 1) * bs] for b in range(k)])
        labels = np.repeat(np.arange(len(per_group)), [len(b) for b in per_group])
        if self.shuffle and len(per_group) > 1:
            labels = rng.permutation(labels)  # the subjects' batches interleaved
        nxt = [0] * len(per_group)
        out = []
        for s in labels.tolist():
            out.append(per_group[s][nxt[s]])
            nxt[s] += 1
        return out

    def __iter__(self) -> Iterator[list[int]]:
        start, self._resume = self._resume or 0, None
        self._yielded = start
        for batch in self._plan()[start:]:
            self._yielded += 1  # before the yield: state_dict() then counts this batch
            yield batch.tolist()

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order from the next iteration on (a pending resume is kept
        only if it is for this same epoch)."""
        if int(epoch) != self.epoch:
            self._resume = None
        self.epoch = int(epoch)

    # ---- checkpointing
    def _config(self) -> dict[str, Any]:
        """What a saved state must agree on (not the rank: every rank is at the same step)."""
        return {
            "n": self.n,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
            "by_subject": self.by_subject,
            "groups": [len(g) for g in self._groups],
        }

    def state_dict(self) -> dict[str, Any]:
        """Seed, epoch, batches yielded so far in this epoch, and the configuration."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "batches": self._yielded,
            "config": self._config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields the rest of the saved epoch."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')!r} != {STATE_VERSION}")
        mine = self._config()
        diff = {k: (v, mine.get(k)) for k, v in state["config"].items() if mine.get(k) != v}
        if diff:
            raise ValueError(f"sampler state does not fit this sampler (saved, here): {diff}")
        batches = int(state["batches"])
        if not 0 <= batches <= len(self):
            raise ValueError(f"sampler state has {batches} batches of an epoch of {len(self)}")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self._resume = self._yielded = batches
