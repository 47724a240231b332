"""The one place for storage decisions: codecs, chunk and shard shapes of every store."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Self

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from nsdzarr.nsd_facts import TRIALS_PER_SESSION

CODECS = ("blosc-zstd", "blosc-lz4", "zstd")
# Image and ROI stores may also be raw: natural images barely compress losslessly (see
# stimuli.py), and raw ROI rows are read straight into the loader's batch (loader.py).
IMAGE_CODECS = ("none", *CODECS)
SHUFFLES = {"shuffle": 1, "bitshuffle": 2, "noshuffle": 0}


def check_codec(codec: str, shuffle: str) -> None:
    """ValueError unless ``codec`` and ``shuffle`` name a known compressor and pre-filter."""
    if codec not in IMAGE_CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(IMAGE_CODECS)}")
    if shuffle not in SHUFFLES:
        raise ValueError(f"unknown shuffle {shuffle!r}; choose one of {', '.join(SHUFFLES)}")


@dataclass(frozen=True)
class CodecSettings:
    """The codec part shared by every store's settings, built from its config section."""

    codec: str = "zstd"
    level: int = 1
    shuffle: str = "shuffle"

    def __post_init__(self) -> None:
        check_codec(self.codec, self.shuffle)

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> Self:
        """Build from the validated config mapping of this store kind."""
        return cls(**(section or {}))


@dataclass(frozen=True)
class StorageSettings(CodecSettings):
    """Codec and trial blocking of a store; mirrors the ``storage`` config section."""

    trials_per_chunk: int = 1
    trials_per_shard: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trials_per_shard % self.trials_per_chunk:
            raise ValueError("trials_per_chunk must divide trials_per_shard")


# ROI stores are read one random trial at a time by the loader: raw rows are read straight
# into the batch, ~2x faster than blosc-lz4 (benchmarks/README.md, loader.py), for stores of
# 2 bytes per voxel and trial (subj01 nsdgeneral: 0.94 GB). level/shuffle apply to codecs.
ROI_STORAGE = StorageSettings(codec="none", level=5, shuffle="shuffle", trials_per_shard=50)


def roi_settings(settings: StorageSettings | None = None) -> StorageSettings:
    """ROI stores: the given codec, one trial per chunk, shards that never span sessions."""
    settings = settings or ROI_STORAGE
    per_shard = settings.trials_per_shard
    if TRIALS_PER_SESSION % per_shard:
        per_shard = TRIALS_PER_SESSION
    return replace(settings, trials_per_chunk=1, trials_per_shard=per_shard)


# The bounded-memory convert's scratch store (convert.py) is written once and read once:
# the fastest codec wins there, not the smallest.
SCRATCH_COMPRESSOR = BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")


@dataclass(frozen=True)
class StimuliStorage(CodecSettings):
    """Codec and shard size of a stimulus image store; mirrors the ``stimuli_storage`` config."""

    codec: str = "none"
    shuffle: str = "noshuffle"
    images_per_shard: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.images_per_shard < 1:
            raise ValueError("images_per_shard must be at least 1")


# The defaults of every stimulus store (the config schema's defaults match these). One image
# per chunk (the loader's unit of reading), 50 per shard file (73,000 images -> 1,460 files).
STIMULI_STORAGE = StimuliStorage()


def zarr_compressor(settings: CodecSettings, itemsize: int) -> Any:
    """The Zarr v3 compressor for these settings (Blosc, plain zstd, or None for raw bytes)."""
    if settings.codec == "none":
        return None
    if settings.codec == "zstd":
        return ZstdCodec(level=settings.level)
    cname = settings.codec.removeprefix("blosc-")
    return BloscCodec(
        cname=cname, clevel=settings.level, shuffle=settings.shuffle, typesize=itemsize
    )


def chunk_codecs(settings: CodecSettings, itemsize: int) -> tuple[Any, ...]:
    """The bytes-to-bytes codecs of every chunk of a store's big arrays: the compressor (if
    any), then a ``crc32c`` of the encoded bytes, so that a flipped byte is detected by every
    reader (zarr-python, ours) instead of being decoded into wrong values."""
    compressor = zarr_compressor(settings, itemsize)
    return (*((compressor,) if compressor is not None else ()), Crc32cCodec())


def numcodecs_compressor(settings: CodecSettings, itemsize: int) -> numcodecs.abc.Codec | None:
    """The same compression as :func:`zarr_compressor`, as a numcodecs codec for sampling."""
    if settings.codec == "none":
        return None
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
        compressors=chunk_codecs(settings, np.dtype(dtype).itemsize),
        fill_value=0,
        dimension_names=dimension_names,
    )


def create_image_array(
    group: zarr.Group, name: str, shape: tuple[int, ...], settings: StimuliStorage
) -> zarr.Array:
    """An ``(image, y, x, channel)`` uint8 array: one image per chunk, ``images_per_shard``
    images per shard file."""
    shard_rows = max(1, min(settings.images_per_shard, shape[0]))
    return group.create_array(
        name,
        shape=shape,
        dtype=np.uint8,
        chunks=(1, *shape[1:]),
        shards=(shard_rows, *shape[1:]),
        compressors=chunk_codecs(settings, 1),
        fill_value=0,
        dimension_names=("image", "y", "x", "channel"),
        # skip zarr's per-chunk comparison with the fill value (a third of the write time);
        # an all-black image is then stored like any other
        config={"write_empty_chunks": True},
    )
