"""``nsdzarr``: inspect and verify the stores, plan a release's sizes and memory requests.

Subcommands import their modules when they run, so ``nsdzarr --help`` stays fast.
Exit status: 0 all good, 1 a problem was found (or an input is bad), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_BETA_VERSION = "betas_fithrf_GLMdenoise_RR"


def _info(args: argparse.Namespace) -> int:
    from nsdzarr.prepare.describe import format_info, store_info

    if not (Path(args.store) / "zarr.json").is_file():
        print(f"{args.store}: not a Zarr v3 store or node (no zarr.json)", file=sys.stderr)
        return 2
    info = store_info(args.store)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from nsdzarr.prepare.check import check_store, find_stores

    status = 0
    for path in args.paths:
        stores = find_stores(path) if Path(path).is_dir() else []
        if not stores:
            print(f"{path}: no Zarr store here or below (no zarr.json found)", file=sys.stderr)
            return 2
        for store in stores:
            problems = check_store(store)
            for problem in problems:
                print(problem)
            if not args.quiet:
                print(f"{store}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
            status = status or (1 if problems else 0)
    return status


def _roi_spec(text: str) -> tuple[str, tuple[str, list[int] | None]]:
    """``NAME=FILE`` or ``NAME=FILE:1,2`` (the labels to keep)."""
    name, sep, rest = text.partition("=")
    file, _, labels = rest.partition(":")
    if not sep or not name or not file:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE[:LABELS], got {text!r}")
    try:
        chosen = [int(v) for v in labels.split(",")] if labels else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"labels must be integers: {labels!r}") from None
    return name, (file, chosen)


def _sessions(values: list[str]) -> list[int] | None:
    if values == ["all"]:
        return None
    try:
        numbers = [int(v) for v in values]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sessions: 'all' or numbers, got {values}") from None
    if any(n < 1 for n in numbers):
        raise argparse.ArgumentTypeError("--sessions: session numbers start at 1")
    return numbers


def _plan(args: argparse.Namespace) -> int:
    from nsdzarr.prepare.plan import format_plan, plan_release
    from nsdzarr.prepare.storage import StimuliStorage, StorageSettings

    try:
        settings = StorageSettings(
            codec=args.codec,
            level=args.level,
            trials_per_chunk=args.trials_per_chunk,
            trials_per_shard=args.trials_per_shard,
        )
        images = StimuliStorage(codec=args.stimuli_codec, images_per_shard=args.images_per_shard)
    except ValueError as err:
        print(f"nsdzarr plan: {err}", file=sys.stderr)
        return 2
    plan = plan_release(
        args.subjects,
        args.nsd_root,
        args.space,
        args.beta_version,
        args.sessions,
        settings,
        args.ceiling_mb or None,
        args.factor,
        dict(args.roi or []),
        args.sample,
        args.stimuli,
        args.stimuli_subset,
        args.stimuli_sizes,
        images,
    )
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    top = argparse.ArgumentParser(
        prog="nsdzarr", description="Inspect and verify nsd-zarr stores; plan a release."
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="arrays, codecs, chunk/shard shapes, sizes and attributes of a store",
        description="Every array of a Zarr v3 store (or one array): shape, dtype, codecs, "
        "chunk and shard shape, bytes and files on disk; and the group attributes.",
    )
    info.add_argument("store", help="a store, e.g. results/subj01/betas/session01.zarr")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=_info)

    verify = sub.add_parser(
        "verify",
        help="re-check stored checksums; every chunk must decode",
        description="Session stores against their plane_checksums, image stores against "
        "their per-image checksums, ROI stores for consistent shapes; every chunk of every "
        "array must decode. A folder that is not a store is searched for stores (hidden "
        "folders such as unfinished .incomplete-* stores are skipped). One line per problem, "
        "naming the shard file and the trial or image; exit 1 if any.",
    )
    verify.add_argument("paths", nargs="+", metavar="PATH", help="a store or a folder (results/)")
    verify.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    verify.set_defaults(run=_verify)

    plan = sub.add_parser(
        "plan",
        help="sizes and memory requests of a release, from metadata, without Snakemake",
        description="Per session: raw and predicted store bytes, and mem_mb / runtime of "
        "each job, as the workflow's estimate job computes them; then totals. Reads only "
        "HDF5 headers (and ROI atlases); without --nsd-root, uses the NSD release's known "
        "session counts and volumes.",
    )
    plan.add_argument("--nsd-root", type=Path, help="the release folder (default: NSD facts)")
    plan.add_argument("--subjects", nargs="+", required=True, metavar="SUBJ", help="e.g. subj01")
    plan.add_argument(
        "--space",
        default="func1pt8mm",
        choices=["func1pt8mm", "func1mm", "nativesurface", "fsaverage"],
        help="surface spaces need --nsd-root (sizes from the files' headers)",
    )
    plan.add_argument("--beta-version", default=DEFAULT_BETA_VERSION)
    plan.add_argument(
        "--sessions", nargs="+", default=["all"], metavar="N", help="'all' (default) or numbers"
    )
    plan.add_argument(
        "--ceiling-mb", type=int, default=16000, help="memory.ceiling_mb (0: no ceiling)"
    )
    plan.add_argument("--factor", type=float, default=1.0, help="memory.factor")
    plan.add_argument(
        "--roi",
        action="append",
        type=_roi_spec,
        metavar="NAME=FILE[:LABELS]",
        help="an ROI store to plan, e.g. V1=prf-visualrois.nii.gz:1,2 (surfaces: NAME.mgz); "
        "repeatable",
    )
    plan.add_argument(
        "--sample",
        action="store_true",
        help="measure the compression ratio on a few planes per file (as the estimate job "
        "does) instead of assuming NSD's",
    )
    plan.add_argument("--codec", default="zstd", choices=["zstd", "blosc-zstd", "blosc-lz4"])
    plan.add_argument("--level", type=int, default=1)
    plan.add_argument("--trials-per-chunk", type=int, default=1)
    plan.add_argument("--trials-per-shard", type=int, default=50)
    plan.add_argument(
        "--stimuli",
        default="auto",
        choices=["auto", "yes", "no"],
        help="plan the image store: auto (default) when the release has nsd_stimuli.hdf5",
    )
    plan.add_argument(
        "--stimuli-subset",
        default="trials",
        choices=["trials", "all"],
        help="stimuli.subset: the images the planned sessions show (default), or every one",
    )
    plan.add_argument(
        "--stimuli-sizes", nargs="*", type=int, default=[], metavar="S", help="stimuli.sizes"
    )
    plan.add_argument(
        "--stimuli-codec", default="none", choices=["none", "blosc-lz4", "blosc-zstd", "zstd"]
    )
    plan.add_argument("--images-per-shard", type=int, default=50, help="stimuli.images_per_shard")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(run=_plan)
    return top


def main(argv: list[str] | None = None) -> int:
    """Run ``nsdzarr``; returns the exit status."""
    top = parser()
    args = top.parse_args(argv)
    if args.command == "plan":
        try:
            args.sessions = _sessions(args.sessions)
        except argparse.ArgumentTypeError as err:
            top.error(str(err))
    from nsdzarr.errors import NsdzarrError

    try:
        return args.run(args)
    except NsdzarrError as err:
        print(err, file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
