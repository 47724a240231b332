"""Stimulus store conversion: measured peak RSS against memory.stimuli_peak, and throughput.

Usage: python benchmarks/stimuli.py [--n 2000] [--dir /tmp/nsdzarr-stimuli-bench]

Writes a brick of ``n`` natural-like 425 x 425 images (smooth colour fields plus noise, as
JPEG-decoded photos are) in two layouts, then converts it in a fresh process per setting
and prints peak RSS (ru_maxrss) beside the model's prediction, and the conversion's wall time
beside that of reading the source alone (page cache warm for both).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))

from nsdzarr.prepare.memory import MB, stimuli_peak  # noqa: E402

H = W = 425


def natural_like(n: int, seed: int = 1) -> np.ndarray:
    """``n`` smooth random colour fields, upsampled from 14 x 14, with +-6 noise."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, H, W, 3), np.uint8)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8))
        img = np.asarray(small.resize((W, H), Image.Resampling.BICUBIC)).astype(np.int16)
        out[i] = np.clip(img + rng.integers(-6, 7, img.shape, dtype=np.int16), 0, 255)
    return out


def write_brick(path: Path, n: int, chunks: tuple[int, ...] | None) -> Path:
    if path.exists():
        return path
    with h5py.File(path, "w") as f:
        d = f.create_dataset("imgBrick", (n, H, W, 3), np.uint8, chunks=chunks)
        for s in range(0, n, 100):
            d[s : s + 100] = natural_like(min(100, n - s), seed=s)
    return path


def run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; its last stdout line is JSON; adds peak RSS."""
    prelude = f"import json, resource, sys, time\nsys.path.insert(0, {str(SRC)!r})\n"
    tail = (
        "\nout['peak'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024"
        "\nprint(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code) + tail],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def read_alone(src: Path) -> dict:
    return run(f"""
        import h5py, numpy as np
        t = time.perf_counter()
        with h5py.File({str(src)!r}) as f:
            d = f["imgBrick"]
            step = 256 * 2**20 // (d[0].nbytes * (d.chunks or [1])[0]) * (d.chunks or [1])[0]
            buf = np.empty((step, *d.shape[1:]), np.uint8)
            for s in range(0, d.shape[0], step):
                e = min(s + step, d.shape[0])
                d.read_direct(buf[: e - s], np.s_[s:e], np.s_[0 : e - s])
        out = {{"seconds": time.perf_counter() - t}}
    """)


def convert(src: Path, dst: Path, codec: str, sizes: tuple[int, ...], budget: int | None) -> dict:
    return run(f"""
        from nsdzarr.prepare.stimuli import convert_stimuli
        from nsdzarr.prepare.storage import StimuliStorage
        r = convert_stimuli({str(src)!r}, {str(dst)!r}, sizes={sizes!r},
                            settings=StimuliStorage(codec={codec!r}), budget_bytes={budget!r})
        out = {{k: r[k] for k in ("seconds", "read_seconds", "verify_seconds", "bytes")}}
    """)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/nsdzarr-stimuli-bench"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    n = args.n
    layouts = {"contiguous": None, "chunks-1": (1, H, W, 3)}
    print(f"{n} images {H}x{W}: {n * H * W * 3 / MB:.0f} MB")
    print("layout      codec      sizes  budget  measured  predicted  ratio  convert  read")
    for name, chunks in layouts.items():
        src = write_brick(args.dir / f"brick-{name}-{n}.hdf5", n, chunks)
        read_alone(src)  # warm the page cache
        read = read_alone(src)
        for codec, sizes, budget in (
            ("none", (), None),
            ("none", (224,), None),
            ("none", (), 64 * MB),
            ("zstd", (), None),
            ("blosc-lz4", (), None),
        ):
            got = convert(src, args.dir / "out.zarr", codec, sizes, budget)
            pred = stimuli_peak((n, H, W, 3), n, 50, sizes, budget, (chunks or [1])[0], codec)
            print(
                f"{name:11s} {codec:10s} {sizes!s:6s} {(budget or 256 * MB) // MB:4d}MB"
                f"  {got['peak'] / MB:6.0f}MB  {pred / MB:7.0f}MB  {pred / got['peak']:5.2f}"
                f"  {got['seconds']:6.1f}s  {read['seconds']:4.1f}s"
            )


if __name__ == "__main__":
    main()
