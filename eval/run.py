"""Run an evaluation task with a model (or a predictions file), caching every prediction, then score it.

    python -m eval.run visa-dr-detection --data /data --model ./anomaly-ov-0.5b --out runs/dr-det
    python -m eval.run visa-dr-detection --data /data/VisA/test_data.json --predictions detection_results_7b.json --out runs/pub
    python -m eval.run visa-dr-reasoning --data /data --model ./ckpt --out runs/dr-reason [--judge-model gpt-4o --judge-base-url URL]
    python -m eval.run ad --data ./mvtec_ad --model ./ckpt --out runs/mvtec [--limit 50]
    python -m eval.run mmad --data /data/MMAD --model ./ckpt --out runs/mmad [--shots 1] [--similar-template]
    python -m eval.run mmad --data /data/MMAD --predictions runs/mmad/answers.jsonl --out runs/mmad-rescored

    # split the work: one process per shard (or torchrun: RANK/WORLD_SIZE pick the shard), then merge and score
    python -m eval.run ad --data ./mvtec_ad --model ./ckpt --out runs/mvtec --shard 0/2 &
    python -m eval.run ad --data ./mvtec_ad --model ./ckpt --out runs/mvtec --shard 1/2 &
    wait; python -m eval.report runs/mvtec
    torchrun --nproc_per_node 4 -m eval.run ad --data ./mvtec_ad --model ./ckpt --out runs/mvtec --device cuda

``--mode infer`` only fills the cache, ``--mode eval`` only scores it (no model loaded), ``all``
(the default) does both. A killed run started again with the same arguments skips every sample
already in the cache. ``--out`` is the run's own folder: a new or empty one is claimed (``run.json``),
one holding another task's or model's run is refused. Bad input prints one line on stderr and exits 2
(`assistant.errors.run_main`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from assistant.errors import UsageError, run_main

from .tasks import TASKS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.run", description="Evaluate a model on a task, with cached predictions."
    )
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument(
        "--data",
        required=True,
        help="the benchmark: VisA-D&R JSON (or its data folder), MVTec-layout folder, VisA root or CSV",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint folder or hub id (this project's, or a plain LLaVA-OneVision one)")
    source.add_argument(
        "--predictions", help="answers made elsewhere: the published script's JSON list, or JSONL of {image, response}"
    )
    p.add_argument("--out", required=True, help="the run's folder: cache, results, overlays")
    p.add_argument("--mode", choices=["all", "infer", "eval"], default="all")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples")
    p.add_argument(
        "--shard", default=None, metavar="I/N", help="do shard I of N (default: RANK/WORLD_SIZE when set, else 0/1)"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--map-size", type=int, default=256, help="longest side of the anomaly maps kept in the cache")
    p.add_argument(
        "--shots",
        type=int,
        default=None,
        help="ad: K normal training images per class as references (default 0); mmad: templates per query (default 1)",
    )
    p.add_argument("--shot-seed", type=int, default=0, help="ad: which K normal images are drawn")
    p.add_argument("--similar-template", action="store_true", help="mmad: the similar templates, not the random ones")
    p.add_argument(
        "--zero-shot",
        choices=["auto", "single", "batch"],
        default="auto",
        help="ad without --shots: each class's test images against each other (MuSc-style, batch) or each image on its "
        "own (single); auto: batch for a class of at least 8 test images",
    )
    add_scoring_arguments(p)
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # torch.distributed.launch
    return p


def add_scoring_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-similarity", action="store_true", help="skip the sentence-embedding similarity (reasoning)")
    p.add_argument(
        "--judge-model", default=None, help="LLM-as-judge model name (reasoning; OpenAI-compatible endpoint)"
    )
    p.add_argument("--judge-base-url", default=None, help="the judge endpoint, e.g. http://localhost:8000/v1")
    p.add_argument(
        "--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's API key"
    )
    p.add_argument("--worst", type=int, default=4, help="overlays of this many worst normals and worst anomalies")


def parse_shard(text: str | None, environ=os.environ) -> tuple[int, int]:
    """(index, count) from ``I/N``, else from torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if text is None:
        if "WORLD_SIZE" in environ and "RANK" in environ:
            text = f"{environ['RANK']}/{environ['WORLD_SIZE']}"
        else:
            return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like I/N (e.g. 0/4), got '{text}'") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text}: need 0 <= I < N")
    return index, count


def check_arguments(args) -> None:
    if not Path(args.data).exists():
        raise UsageError(f"--data '{args.data}' does not exist")
    if args.mode != "eval" and args.model is None and args.predictions is None:
        raise UsageError("give --model or --predictions (or --mode eval to score a cache)")
    if args.predictions is not None and TASKS[args.task].needs_model:
        raise UsageError(f"the {args.task} task needs anomaly maps: give --model, not --predictions")
    if args.predictions is not None and not Path(args.predictions).is_file():
        raise UsageError(f"--predictions '{args.predictions}' is not a file")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if args.map_size < 8:
        raise UsageError("--map-size must be at least 8")
    if args.judge_model is None and args.judge_base_url is not None:
        raise UsageError("--judge-base-url needs --judge-model")
    default_shots = TASKS[args.task].shots  # None: the task takes no normal references
    if args.shots is not None and default_shots is None:
        takers = ", ".join(sorted(name for name, task in TASKS.items() if task.shots is not None))
        raise UsageError(f"--shots is for the tasks that take normal references ({takers})")
    if args.shots is None:
        args.shots = default_shots or 0
    if args.shots < 0:
        raise UsageError("--shots must be 0 or more")
    if args.similar_template and args.task != "mmad":
        raise UsageError("--similar-template is for the mmad task")


def manifest_for(args) -> dict:
    from . import cache

    task = TASKS[args.task]
    model = args.model
    if model is not None and Path(model).exists():
        model = str(Path(model).resolve())
    folder = Path(model) if model is not None and Path(model).is_dir() else None
    if model == "default":
        from assistant.checkpoint import default_model_path

        folder = default_model_path()
    return {
        "task": args.task,
        "data": str(Path(args.data).resolve()),
        "model": model,
        "model_fingerprint": cache.model_fingerprint(folder) if folder is not None else None,
        "shots": args.shots,
        "shot_seed": args.shot_seed if args.shots else None,
        "templates": ("similar" if args.similar_template else "random") if args.task == "mmad" else None,
        "zero_shot": args.zero_shot if args.task == "ad" and not args.shots and args.zero_shot != "single" else None,
        "predictions": str(Path(args.predictions).resolve()) if args.predictions else None,
        "prompt": task.prompt,
        "map_size": args.map_size,
        "max_new_tokens": args.max_new_tokens,
    }


def make_adapter(args, n_entries: int):
    from .adapters import ModelAdapter, PredictionsAdapter

    if args.predictions is not None:
        adapter = PredictionsAdapter(args.predictions)
        adapter.check_count(n_entries)
        return adapter
    return ModelAdapter(args.model, device=args.device, max_new_tokens=args.max_new_tokens)


def infer(task, adapter, samples, out: Path, shard: tuple[int, int], map_size: int) -> tuple[int, int]:
    """Predict every sample of this shard not yet cached; returns (newly done, skipped as cached)."""
    from assistant.imageio import ImageInputError

    from . import cache

    done = cache.read_predictions(out)
    todo = [s for s in samples if s.key not in done]
    if not todo:
        return 0, len(samples)

    def save_map(key, anomaly_map):
        return cache.save_map(out, key, anomaly_map, map_size)

    with cache.PredictionWriter(cache.predictions_file(out, shard)) as writer:
        for number, sample in enumerate(todo, start=1):
            try:
                record = {"id": sample.key, **task.infer(adapter, sample, save_map)}
            except ImageInputError as error:  # one unreadable image does not stop the run
                record = {"id": sample.key, "error": str(error)}
            writer.write(record)
            print(f"[{number}/{len(todo)}] {sample.key}", file=sys.stderr, flush=True)
    return len(todo), len(samples) - len(todo)


def run(args) -> int:
    from . import cache, report
    from .tasks import get_task

    check_arguments(args)
    out = Path(args.out)
    if args.mode == "eval":
        manifest = cache.read_manifest(out)
        if manifest is None:
            raise UsageError(f"--out '{out}' holds no eval run to score")
        if manifest["task"] != args.task:
            raise cache.RunFolderError(f"--out '{out}' holds a {manifest['task']} run, not {args.task}")
        return report.report(out, scoring_options(args))
    shard = parse_shard(args.shard)
    task = get_task(args.task)
    cache.claim(out, manifest_for(args))
    task.shots, task.shot_seed, task.similar_template = args.shots, args.shot_seed, args.similar_template
    task.zero_shot = args.zero_shot
    dataset = task.load(Path(args.data), need_images=args.model is not None)
    samples = dataset.samples[: args.limit]
    mine = samples[shard[0] :: shard[1]]
    if args.model is not None:
        _quiet_libraries()
    adapter = make_adapter(args, dataset.n_entries)
    new, skipped = infer(task, adapter, mine, out, shard, args.map_size)
    print(f"shard {shard[0]}/{shard[1]}: {new} inferred, {skipped} already cached, in {out}", file=sys.stderr)
    if args.mode == "infer":
        return 0
    cached = cache.read_predictions(out)
    missing = sum(s.key not in cached for s in samples)
    if missing:
        print(
            f"{missing} samples are not done yet (other shards); score them all with: python -m eval.report {out}",
            file=sys.stderr,
        )
        return 0
    return report.report(out, scoring_options(args))


def scoring_options(args) -> dict:
    return {
        "similarity": not args.no_similarity,
        "judge_model": args.judge_model,
        "judge_base_url": args.judge_base_url,
        "judge_api_key_env": args.judge_api_key_env,
        "worst": args.worst,
    }


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def bad_input_types() -> tuple[type, ...]:
    """The evaluation's own bad-input errors (exit 2), besides `assistant.errors`' own."""
    from .adapters import AdapterError
    from .cache import RunFolderError
    from .tasks import DataError

    return (DataError, RunFolderError, AdapterError)


def _main(argv: list[str] | None) -> int:
    return run(parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    resume = "interrupted; run the same command again to resume"
    return run_main(_main, argv, bad_input=bad_input_types(), interrupted=resume)


if __name__ == "__main__":
    sys.exit(main())
