"""What a Zarr v3 store holds: every array's shape, dtype, codecs, chunking and size on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nsdzarr.errors import InputError
from nsdzarr.training.zarr_v3 import read_json


def disk_usage(folder: str | os.PathLike[str], skip: set[Path] | None = None) -> tuple[int, int]:
    """Bytes and files below ``folder``, leaving out the folders in ``skip`` (child nodes)."""
    size = files = 0
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if Path(root, d) not in (skip or set())]
        for name in names:
            size += os.path.getsize(os.path.join(root, name))
            files += 1
    return size, files


def codec_names(codecs: list[dict[str, Any]]) -> list[str]:
    """Codec chain as readable names, e.g. ``sharding_indexed[bytes, zstd(level=1)]``."""
    out = []
    for codec in codecs:
        cfg = dict(codec.get("configuration") or {})
        if codec["name"] == "sharding_indexed":
            out.append(f"sharding_indexed[{', '.join(codec_names(list(cfg.get('codecs', []))))}]")
            continue
        cfg.pop("endian", None)
        args = ", ".join(f"{k}={v}" for k, v in sorted(cfg.items()) if v is not None)
        out.append(f"{codec['name']}({args})" if args else codec["name"])
    return out


def array_info(array_dir: Path, name: str) -> dict[str, Any]:
    """Shape, dtype, codecs, chunk and shard shape, bytes and files of one array."""
    meta = read_json(array_dir / "zarr.json")
    try:
        grid = [int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        codecs = list(meta["codecs"])
        shape = [int(n) for n in meta["shape"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(array_dir / "zarr.json", f"incomplete array metadata ({exc})") from None
    sharded = len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed"
    chunks = [int(n) for n in codecs[0]["configuration"]["chunk_shape"]] if sharded else grid
    size, files = disk_usage(array_dir)
    return {
        "name": name,
        "shape": shape,
        "dtype": str(meta.get("data_type")),
        "codecs": codec_names(codecs),
        "chunks": chunks,
        "shards": grid if sharded else None,
        "fill_value": meta.get("fill_value"),
        "dimension_names": meta.get("dimension_names"),
        "bytes": size,
        "files": files,
        "attributes": meta.get("attributes") or {},
    }


def store_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The group (with its attributes and every nested array and group) or array at ``path``."""
    root = Path(path)
    meta = read_json(root / "zarr.json")
    if meta.get("node_type") == "array":
        return {"path": str(root), "node_type": "array", **array_info(root, "")}
    if meta.get("node_type") != "group":
        raise InputError(root / "zarr.json", "node_type is neither group nor array")
    arrays, groups = [], []
    for dirpath, dirs, _names in os.walk(root):
        dirs.sort()
        for d in list(dirs):
            child = Path(dirpath, d)
            if not (child / "zarr.json").is_file():
                continue
            child_meta = read_json(child / "zarr.json")
            name = child.relative_to(root).as_posix()
            if child_meta.get("node_type") == "array":
                arrays.append(array_info(child, name))
                dirs.remove(d)  # an array's chunk folders hold no nodes
            else:
                groups.append({"name": name, "attributes": child_meta.get("attributes") or {}})
    size, files = disk_usage(root)
    return {
        "path": str(root),
        "node_type": "group",
        "attributes": meta.get("attributes") or {},
        "arrays": arrays,
        "groups": groups,
        "bytes": size,
        "files": files,
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _shape(shape: list[int] | None) -> str:
    return "-" if shape is None else "(" + ", ".join(map(str, shape)) + ")"


def _attr_lines(attrs: dict[str, Any], indent: str, width: int = 100) -> list[str]:
    lines = []
    for key, value in attrs.items():
        text = json.dumps(value)
        limit = width - len(indent) - len(key) - 2
        lines.append(f"{indent}{key}: {text if len(text) <= limit else text[: limit - 3] + '...'}")
    return lines


def format_info(info: dict[str, Any]) -> str:
    """Human-readable form of :func:`store_info`: one block per array, attributes abridged."""
    arrays = [info] if info["node_type"] == "array" else info["arrays"]
    lines = [
        f"{info['path']}: Zarr v3 {info['node_type']}, {_size(info['bytes'])} in "
        f"{info['files']} files"
    ]
    for arr in arrays:
        lines += [
            f"array {arr['name'] or '.'}: shape {_shape(arr['shape'])} {arr['dtype']}",
            f"  codecs: {' -> '.join(arr['codecs'])}",
            f"  chunk shape {_shape(arr['chunks'])}, shard shape {_shape(arr['shards'])}",
            f"  on disk: {_size(arr['bytes'])} in {arr['files']} files",
        ]
        if arr["dimension_names"]:
            lines.append(f"  dimensions: {', '.join(map(str, arr['dimension_names']))}")
    for group in info.get("groups", []):
        lines.append(f"group {group['name']}")
        lines += _attr_lines(group["attributes"], "  ")
    if info.get("attributes"):
        lines.append("attributes:")
        lines += _attr_lines(info["attributes"], "  ")
    return "\n".join(lines)
