"""The one place for storage decisions: codecs, chunk and shard shapes of every store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

CODECS = ("blosc-zstd", "blosc-lz4", "zstd")
SHUFFLES = {"shuffle": 1, "bitshuffle": 2, "noshuffle": 0}


@dataclass(frozen=True)
class StorageSettings:
    """Codec and trial blocking of a store; mirrors the ``storage`` config section."""

    codec: str = "zstd"
    level: int = 1
    shuffle: str = "shuffle"
    trials_per_chunk: int = 1
    trials_per_shard: int = 50

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}; choose one of {', '.join(CODECS)}")
        if self.shuffle not in SHUFFLES:
            raise ValueError(
                f"unknown shuffle {self.shuffle!r}; choose one of {', '.join(SHUFFLES)}"
            )
        if self.trials_per_shard % self.trials_per_chunk:
            raise ValueError("trials_per_chunk must divide trials_per_shard")

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> StorageSettings:
        """Build from the validated ``storage`` config mapping."""
        return cls(**(section or {}))


# ROI stores are read one random trial at a time by the loader: blosc-lz4 decodes ~1.8x
# faster than zstd-1 there (benchmarks/README.md), for stores ~40% larger.
ROI_STORAGE = StorageSettings(codec="blosc-lz4", level=5, shuffle="shuffle", trials_per_shard=50)


def zarr_compressor(settings: StorageSettings, itemsize: int) -> Any:
    """The Zarr v3 compressor for these settings (Blosc with byte shuffle, or plain zstd)."""
    if settings.codec == "zstd":
        return ZstdCodec(level=settings.level)
    cname = settings.codec.removeprefix("blosc-")
    return BloscCodec(
        cname=cname, clevel=settings.level, shuffle=settings.shuffle, typesize=itemsize
    )


def numcodecs_compressor(settings: StorageSettings, itemsize: int) -> numcodecs.abc.Codec:
    """The same compression as :func:`zarr_compressor`, as a numcodecs codec for sampling."""
    if settings.codec == "zstd":
        return numcodecs.Zstd(level=settings.level)
    cname = settings.codec.removeprefix("blosc-")
    return numcodecs.Blosc(cname=cname, clevel=settings.level, shuffle=SHUFFLES[settings.shuffle])


def trial_blocks(n_trials: int, trials_per_shard: int) -> list[tuple[int, int]]:
    """``[start, stop)`` trial ranges of the shards of an array with ``n_trials`` rows."""
    return [(s, min(s + trials_per_shard, n_trials)) for s in range(0, n_trials, trials_per_shard)]


def create_trial_array(
    group: zarr.Group,
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    settings: StorageSettings,
    dimension_names: tuple[str, ...],
) -> zarr.Array:
    """A trial-major array: chunks of ``trials_per_chunk`` rows, shards of ``trials_per_shard``."""
    rest = tuple(shape[1:])
    shard_rows = min(settings.trials_per_shard, shape[0])
    chunk_rows = min(settings.trials_per_chunk, shard_rows)
    return group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=(chunk_rows, *rest),
        shards=(shard_rows, *rest),
        compressors=zarr_compressor(settings, np.dtype(dtype).itemsize),
        fill_value=0,
        dimension_names=dimension_names,
    )
