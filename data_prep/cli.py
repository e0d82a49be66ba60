"""Command line of the data package.

    python -m data_prep synth --out DIR --n N [--normals DIR] [--seed S] [--size 256] [--families a,b] [--anomaly-ratio R]
        [--workers N]
    python -m data_prep instruct --source DIR --out FILE.json [--seed S]
    python -m data_prep check PATH

Exit codes: 0 success; 1 `check` found problems (or the work failed); 2 bad input (one line on stderr, no
traceback: `assistant.errors.run_main`).
Outputs never overwrite user files unless `--overwrite` is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from assistant.errors import UsageError, run_main

from .parallel import default_workers

EXIT_OK, EXIT_PROBLEMS = 0, 1
#: folder names of the MVTec layout itself, which cannot name a class
RESERVED_NAMES = {"train", "test", "good", "ground_truth", "metadata.jsonl"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The `data_prep` argument parser with its three subcommands."""
    parser = _Parser(prog="python -m data_prep", description="Dataset readers, synthetic anomalies, instruction data.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    synth = commands.add_parser("synth", help="generate a synthetic anomaly dataset in the MVTec AD layout")
    synth.add_argument("--out", required=True, type=Path, help="output folder (must be empty or absent)")
    synth.add_argument("--n", required=True, type=int, help="images per family")
    synth.add_argument("--normals", type=Path, help="folder of normal images to use instead of procedural families")
    synth.add_argument("--name", help="family name for --normals (default: the folder's name)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=256, help="image side in pixels")
    synth.add_argument("--families", help="comma-separated procedural families (default: all)")
    synth.add_argument(
        "--defects",
        help="comma-separated defect types (default: the standard seven; shading, a large region, on request)",
    )
    synth.add_argument(
        "--anomaly-ratio", type=float, default=0.5, help="fraction of images that are anomalous test images"
    )
    synth.add_argument("--overwrite", action="store_true", help="replace the family folders and metadata in --out")
    synth.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="processes that generate (default: one per core; the output does not depend on it)",
    )

    instruct = commands.add_parser(
        "instruct", help="write LLaVA instruction conversations from an (image, mask) source"
    )
    instruct.add_argument(
        "--source", required=True, type=Path, help="MVTec-layout folder (e.g. synth output) or VisA root"
    )
    instruct.add_argument("--out", required=True, type=Path, help="output JSON file")
    instruct.add_argument("--seed", type=int, default=0)
    instruct.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    check = commands.add_parser("check", help="detect a dataset's format and list every problem")
    check.add_argument("path", type=Path)
    check.add_argument("--quick", action="store_true", help="read image headers only instead of decoding every image")
    check.add_argument(
        "--labels-only",
        action="store_true",
        help="defective images may lack masks (as eval.run ad and train.calibrate --all-images read them); "
        "training the expert needs the masks",
    )
    return parser


def _names(text: str | None, known, what: str) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise UsageError(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return names


def run_synth(args) -> int:
    """`synth`: write the dataset and print a one-line summary."""
    from .synth import ALL_DEFECT_TYPES, DEFECT_TYPES, FAMILIES, SynthPlan, write_dataset
    from .synth.families import all_families
    from .synth.writer import list_normals

    if args.seed < 0:
        raise UsageError("--seed must be a non-negative integer")
    if args.n < 1:
        raise UsageError("--n must be at least 1")
    if not 16 <= args.size <= 4096:
        raise UsageError("--size must be between 16 and 4096")
    if not 0.0 <= args.anomaly_ratio <= 1.0:
        raise UsageError("--anomaly-ratio must be between 0 and 1")
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    defects = _names(args.defects, ALL_DEFECT_TYPES, "defect type") or DEFECT_TYPES
    normals: list[Path] = []
    if args.normals is not None:
        if args.families is not None:
            raise UsageError("--families and --normals exclude each other (normals form one family)")
        if not args.normals.is_dir():
            raise UsageError(f"--normals {args.normals}: not a folder")
        normals = list_normals(args.normals)
        if not normals:
            raise UsageError(f"--normals {args.normals}: no images found")
        name = args.name or args.normals.resolve().name
        if name in RESERVED_NAMES or not name or "/" in name or name.startswith("."):
            name = "custom" if args.name is None else name
            if args.name is not None:
                raise UsageError(f"--name {name!r} is not usable as a class folder name")
        families = (name,)
    else:
        families = _names(args.families, tuple(all_families()), "family") or tuple(FAMILIES)
    plan = SynthPlan(args.n, families, args.size, args.seed, args.anomaly_ratio, defects, normals)
    try:
        counts = write_dataset(args.out, plan, overwrite=args.overwrite, workers=args.workers)
    except FileExistsError as error:
        raise UsageError(str(error)) from None
    print(f"wrote {sum(counts.values())} images ({', '.join(f'{k}: {v}' for k, v in counts.items())}) to {args.out}")
    return EXIT_OK


def run_instruct(args) -> int:
    """`instruct`: read the source, write the conversations, report every skipped record."""
    from .check import UnknownFormat, read_any
    from .instruct import build_instructions, write_instructions

    if args.out.exists() and not args.overwrite:
        raise UsageError(f"{args.out} exists (use --overwrite to replace it)")
    if args.out.is_dir():
        raise UsageError(f"{args.out} is a folder; give a .json file")
    if not args.source.is_dir():
        raise UsageError(f"--source {args.source}: not a folder")
    try:
        fmt, source = read_any(args.source, full_check=False)
    except UnknownFormat as error:
        raise UsageError(str(error)) from None
    if fmt not in ("mvtec", "visa"):
        raise UsageError(f"--source {args.source}: {fmt} has no masks; use an MVTec-layout folder or a VisA root")
    records, accounting = build_instructions(source, args.out.resolve().parent, seed=args.seed)
    if not records:
        raise UsageError(f"--source {args.source}: no usable images ({len(accounting.problems)} problems)")
    write_instructions(records, args.out, overwrite=args.overwrite)
    for problem in accounting.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    print(f"wrote {len(records)} conversations to {args.out} ({len(accounting.dropped)} images skipped)")
    return EXIT_OK


def run_check(args) -> int:
    """`check`: print the format, the record count and every problem; exit 1 when there are any."""
    from .check import UnknownFormat, read_any
    from .records import MISSING_MASK

    try:
        fmt, result = read_any(args.path, full_check=not args.quick, masks_required=not args.labels_only)
    except UnknownFormat as error:
        raise UsageError(str(error)) from None
    for problem in result.problems:
        print(f"problem: {problem}")
    unmasked = sum(r.label == 1 and r.mask is None for r in result.records) if args.labels_only else 0
    print(
        f"{args.path}: {fmt}, {result.n_seen} entries, {len(result.records)} ok, {len(result.problems)} problems"
        + (f" ({unmasked} defective images without a mask: image-level labels)" if unmasked else "")
    )
    if not args.labels_only and any(MISSING_MASK in str(problem) for problem in result.problems):
        print(
            "(defective images without masks are image-level labels to eval.run ad and train.calibrate --all-images: "
            "check them so with --labels-only)"
        )
    return EXIT_PROBLEMS if result.problems else EXIT_OK


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    return {"synth": run_synth, "instruct": run_instruct, "check": run_check}[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. A file that cannot be read or written is bad input too."""
    return run_main(_main, argv, bad_input=(OSError,))
