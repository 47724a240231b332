"""Session conversion: the naive way vs ours (in memory, and slabs under a 512 MB budget).

Usage: python benchmarks/convert.py [--source PATH] [--repeat N] [--codecs]

Generates a real-size NSD-layout session (750 x 83 x 104 x 81 int16, chunks (750, 1, 1, 1),
uncompressed, ~1.1 GB) if absent, then runs each variant in a fresh process (so its peak RSS is
its own) and prints wall time, MB/s of source, peak RSS, store size and files, with ratios to
the naive baseline measured in the same run. Page cache warm (the file is read once first).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))

from nsdzarr.prepare.convert import store_stats  # noqa: E402
from nsdzarr.prepare.demo import write_synthetic_session  # noqa: E402

DEFAULT_SOURCE = HERE / "data" / "nsd_session_750x83x104x81.hdf5"
MB = 1024**2

PRELUDE = textwrap.dedent(
    f"""
    import json, os, resource, sys, time
    sys.path.insert(0, {str(SRC)!r})
    """
)

NAIVE = """
import h5py, zarr
from zarr.codecs import BloscCodec
t = time.perf_counter()
with h5py.File(SOURCE, "r") as f:
    a = f["betas"][...]
z = zarr.create_array(TARGET, shape=a.shape, dtype=a.dtype, chunks=(1, *a.shape[1:]),
                      compressors=BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"))
z[:] = a
"""

OURS = """
from nsdzarr.prepare.convert import convert_session
from nsdzarr.prepare.storage import StorageSettings
t = time.perf_counter()
convert_session(SOURCE, TARGET, StorageSettings(**SETTINGS), memory_budget_bytes=BUDGET,
                strategy=STRATEGY, threads=2)
"""

EPILOGUE = """
wall = time.perf_counter() - t
print(json.dumps({"wall": wall, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_variant(body: str, source: Path, target: Path, **params: object) -> dict[str, float]:
    """Run one variant in a fresh interpreter; return its figures."""
    header = f"SOURCE = {str(source)!r}\nTARGET = {str(target)!r}\n" + "".join(
        f"{k} = {v!r}\n" for k, v in params.items()
    )
    code = PRELUDE + header + textwrap.dedent(body) + EPILOGUE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    figures["size"], figures["files"] = store_stats(target)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant (best is kept)")
    parser.add_argument("--codecs", action="store_true", help="also compare codecs and shards")
    args = parser.parse_args()
    if not args.source.exists():
        print(f"generating {args.source} ...", flush=True)
        write_synthetic_session(args.source)
    raw = 750 * 83 * 104 * 81 * 2
    with open(args.source, "rb") as fh:  # warm the page cache
        while fh.read(64 * MB):
            pass
    default = {
        "codec": "zstd",
        "level": 1,
        "shuffle": "noshuffle",
        "trials_per_chunk": 1,
        "trials_per_shard": 50,
    }
    variants = [
        ("naive: h5py d[...] + one zarr write", NAIVE, {}),
        ("ours, in memory", OURS, {"SETTINGS": default, "BUDGET": None, "STRATEGY": "in-memory"}),
        ("ours, 512 MB budget", OURS, {"SETTINGS": default, "BUDGET": 512 * MB, "STRATEGY": None}),
    ]
    if args.codecs:
        for codec, level, shuffle in (
            ("blosc-lz4", 5, "shuffle"),
            ("blosc-lz4", 5, "bitshuffle"),
            ("blosc-zstd", 1, "shuffle"),
            ("blosc-zstd", 1, "bitshuffle"),
            ("zstd", 3, "noshuffle"),
        ):
            settings = {**default, "codec": codec, "level": level, "shuffle": shuffle}
            variants.append(
                (
                    f"ours, in memory, {codec}-{level} {shuffle}",
                    OURS,
                    {
                        "SETTINGS": settings,
                        "BUDGET": None,
                        "STRATEGY": "in-memory",
                    },
                )
            )
        for shard in (25, 150):
            settings = {**default, "trials_per_shard": shard}
            variants.append(
                (
                    f"ours, in memory, shard {shard}",
                    OURS,
                    {
                        "SETTINGS": settings,
                        "BUDGET": None,
                        "STRATEGY": "in-memory",
                    },
                )
            )
    results = []
    (HERE / "data").mkdir(exist_ok=True)  # absent in a fresh clone given --source
    with tempfile.TemporaryDirectory(dir=HERE / "data") as tmp:
        for i, (name, body, params) in enumerate(variants):
            best = None
            for r in range(args.repeat):
                fig = run_variant(body, args.source, Path(tmp) / f"v{i}_{r}.zarr", **params)
                best = fig if best is None or fig["wall"] < best["wall"] else best
            results.append((name, best))
            print(f"  done: {name} {best['wall']:.2f} s", file=sys.stderr, flush=True)
    base = results[0][1]
    print(f"source: {args.source} ({raw / MB:.0f} MB raw int16)")
    print(
        f"{'variant':40} {'wall s':>7} {'MB/s':>6} {'x naive':>8} {'peak RSS MB':>11} "
        f"{'RSS/raw':>7} {'store MB':>8} {'files':>5}"
    )
    for name, fig in results:
        print(
            f"{name:40} {fig['wall']:7.2f} {raw / MB / fig['wall']:6.0f} "
            f"{base['wall'] / fig['wall']:8.2f} {fig['rss'] / MB:11.0f} {fig['rss'] / raw:7.2f} "
            f"{fig['size'] / MB:8.1f} {fig['files']:5d}"
        )


if __name__ == "__main__":
    main()
