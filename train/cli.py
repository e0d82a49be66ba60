"""Command line of `python -m train` (see `train/__init__.py` for launch lines)."""

from __future__ import annotations

import argparse

from assistant.errors import run_main

from .config import STAGES, ConfigError, load_config


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m train", description="Train the anomaly assistant (stage 1: expert, stage 2: instructions)."
    )
    parser.add_argument("items", nargs="*", help="[stage1|stage2|all] CONFIG.yaml [key=value ...]")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of output_dir")
    parser.add_argument("--full", action="store_true", help="stage 2: full fine-tuning instead of LoRA")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # the deepspeed launcher's
    return parser


def parse(argv: list[str] | None):
    args = build_parser().parse_args(argv)
    items = list(args.items)
    stage = items.pop(0) if items and items[0] in STAGES else None
    path = items.pop(0) if items and "=" not in items[0] else None
    stray = [i for i in items if "=" not in i]
    if stray:
        raise ConfigError(f"unexpected argument {stray[0]!r}; overrides are key=value")
    overrides = (
        items
        + ([f"stage={stage}"] if stage else [])
        + (["resume=true"] if args.resume else [])
        + (["full=true"] if args.full else [])
    )
    return load_config(path, overrides)


def _main(argv: list[str] | None) -> int:
    cfg = parse(argv)
    from .run import run

    run(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 1 the run stopped (a NaN/inf loss) or failed; 2 a bad config or command line."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_main(_main, argv, bad_input=(ConfigError,))
