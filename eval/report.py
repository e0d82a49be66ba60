"""Merge a run folder's cached predictions (all shards) and score them; no model is loaded.

    python -m eval.report runs/mvtec
    python -m eval.report runs/dr-reason --judge-model gpt-4o --judge-base-url http://localhost:8000/v1

Writes into the run folder: ``results.json`` (summary, per-class rows, notes, counts, problems, and
any task-specific sections), ``per_class.csv``, ``results.md`` (a Markdown table), any file the task
adds (MMAD: ``answers.jsonl``) and ``worst/`` (overlays of the highest-scored normal images and the
lowest-scored anomalous ones, when the predictions carry scores). Samples not yet inferred are
counted as missing (``complete`` is false), never guessed.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
from pathlib import Path

from assistant import jsonutil

from . import cache
from .tasks import get_task

RESULTS, CSV, MARKDOWN, WORST = "results.json", "per_class.csv", "results.md", "worst"
MAX_LISTED = 50


def report(out: Path, options: dict) -> int:
    results = evaluate(out, options)
    print(markdown(results))
    print(f"wrote {out / RESULTS}, {out / CSV}, {out / MARKDOWN}", file=sys.stderr)
    return 0


def evaluate(out: Path, options: dict) -> dict:
    """Score the run in `out` and write its result files; returns what ``results.json`` holds."""
    manifest = cache.read_manifest(out)
    if manifest is None:
        raise cache.RunFolderError(f"'{out}' holds no eval run (no {cache.MANIFEST})")
    task = get_task(manifest["task"])
    if manifest.get("shots") is not None:  # the run's references, as `eval.run` set them (ad: they leave the test set)
        task.shots, task.shot_seed = manifest["shots"], manifest.get("shot_seed") or 0
        task.similar_template = manifest.get("templates") == "similar"
    dataset = task.load(Path(manifest["data"]), need_images=False)
    predictions = cache.read_predictions(out)
    errors = {s.key: predictions[s.key]["error"] for s in dataset.samples if "error" in predictions.get(s.key, {})}
    scored = [s for s in dataset.samples if s.key in predictions and s.key not in errors]
    missing = [s.key for s in dataset.samples if s.key not in predictions]
    if not scored:
        raise cache.RunFolderError(f"'{out}' holds no predictions to score yet")

    scores = task.score(scored, predictions, _task_options(out, options))
    results = {
        "task": manifest["task"],
        "model": manifest["model"] or manifest["predictions"],
        "data": manifest["data"],
        "prompt": manifest.get("prompt"),
        "complete": not missing and not errors,
        "n_entries": dataset.n_entries,
        "n_scored": len(scored),
        "n_missing": len(missing),
        "n_errors": len(errors),
        "summary": scores.summary,
        "per_class": scores.rows,
        "notes": scores.notes,
        "errors": [f"{key}: {reason}" for key, reason in list(errors.items())[:MAX_LISTED]],
        "problems": dataset.problems[:MAX_LISTED],
        "n_problems": len(dataset.problems),
        "missing": missing[:MAX_LISTED],
        "worst": write_worst_cases(out, scored, predictions, options.get("worst", 4)),
        **scores.sections,
    }
    results = jsonutil.finite(results)
    _write(out / RESULTS, jsonutil.dumps(results, indent=2, ensure_ascii=False) + "\n")
    _write(out / CSV, per_class_csv(scores.rows))
    _write(out / MARKDOWN, markdown(results) + "\n")
    for name, text in scores.files.items():
        _write(out / name, text)
    return results


def _task_options(out: Path, options: dict) -> dict:
    judge = None
    if options.get("judge_model"):
        from .text_metrics import LLMJudge

        judge = LLMJudge(
            options["judge_model"],
            base_url=options.get("judge_base_url"),
            api_key_env=options.get("judge_api_key_env", "OPENAI_API_KEY"),
        )
    return {
        "similarity": options.get("similarity", True),
        "judge": judge,
        "judge_cache": out / "judge.jsonl",
        "load_map": lambda name: cache.load_map(out, name),
    }


# -- worst cases --------------------------------------------------------------------------------------


def write_worst_cases(out: Path, samples, predictions: dict, k: int) -> dict:
    """Overlays of the `k` highest-scored normal and `k` lowest-scored anomalous samples."""
    folder = out / WORST
    for old in folder.glob("*.png") if folder.is_dir() else []:  # the previous report's overlays
        old.unlink()
    scored = [s for s in samples if s.label in (0, 1) and isinstance(predictions[s.key].get("score"), (int, float))]
    if k < 1 or not scored:
        return {}
    normals = sorted((s for s in scored if s.label == 0), key=lambda s: -predictions[s.key]["score"])[:k]
    anomalies = sorted((s for s in scored if s.label == 1), key=lambda s: predictions[s.key]["score"])[:k]
    folder.mkdir(exist_ok=True)
    worst = {}
    for kind, chosen in (("normal", normals), ("anomalous", anomalies)):
        worst[kind] = []
        for rank, sample in enumerate(chosen, start=1):
            prediction = predictions[sample.key]
            name = f"{kind}-{rank}-{_safe(sample.key)}.png"
            entry = {"key": sample.key, "score": prediction["score"], "overlay": None}
            if _draw(out, sample, prediction, folder / name, kind):
                entry["overlay"] = f"{WORST}/{name}"
            worst[kind].append(entry)
    return worst


def _draw(out: Path, sample, prediction: dict, path: Path, kind: str) -> bool:
    from assistant.imageio import ImageInputError
    from assistant.visualize import overlay

    anomaly_map = cache.load_map(out, prediction["map"]) if prediction.get("map") else None
    mask = None
    if sample.mask is not None:
        import numpy as np
        from PIL import Image

        with Image.open(sample.mask) as image:
            mask = np.asarray(image.convert("L")) > 0
    title = f"truth {kind}  score {prediction['score']:.3f}"
    try:
        overlay(sample.image, anomaly_map, mask, title=title).save(path)
    except (ImageInputError, OSError) as error:
        print(f"warning: no overlay for {sample.key}: {error}", file=sys.stderr)
        return False
    return True


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(Path(key).with_suffix("")))[-80:]


# -- writing ---------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def per_class_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def markdown(results: dict) -> str:
    lines = [f"## {results['task']}: {results['model']}", ""]
    state = "complete" if results["complete"] else f"{results['n_missing']} missing, {results['n_errors']} failed"
    lines.append(f"{results['n_scored']} samples scored ({state}).")
    lines.append("")
    summary = {k: v for k, v in results["summary"].items()}
    lines += [
        "| " + " | ".join(summary) + " |",
        "|" + " --- |" * len(summary),
        "| " + " | ".join(_cell(v) for v in summary.values()) + " |",
        "",
    ]
    rows = results["per_class"]
    if rows:
        columns = list(rows[0])
        lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    if results["notes"]:
        lines.append("")
        lines += [f"- {note}" for note in results["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from assistant.errors import run_main

    from .run import add_scoring_arguments, bad_input_types, scoring_options

    def _main(argv: list[str] | None) -> int:
        description = "Merge the shards of an eval run and score it."
        p = argparse.ArgumentParser(prog="python -m eval.report", description=description)
        p.add_argument("out", help="the run folder given to eval.run --out")
        add_scoring_arguments(p)
        args = p.parse_args(argv)
        return report(Path(args.out), scoring_options(args))

    return run_main(_main, argv, bad_input=bad_input_types())


if __name__ == "__main__":
    sys.exit(main())
