"""VisA-D&R reasoning: a multi-turn conversation per image, scored against reference answers.

Each question is asked with the earlier questions and the model's own earlier answers as history.
Where the benchmark has a reference answer: ROUGE-L (F-measure), sentence-embedding cosine
similarity (all-MiniLM-L6-v2, offline), and optionally an LLM judge's 1-10 score. Means are over
all answered questions with a reference, per class and overall.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .base import Dataset, Sample, Scores, Task
from .visa_dr import load_dataset

METRICS = ("rougeL", "similarity", "judge")


class ReasoningTask(Task):
    name = "visa-dr-reasoning"
    prompt = "(the benchmark's questions, asked in turn)"

    def load(self, data: Path, need_images: bool) -> Dataset:
        return load_dataset(data, "visa_dr.json", "reasoning", need_images)

    def infer(self, adapter, sample: Sample, save_map) -> dict:
        return {"responses": adapter.converse(sample, sample.extra["questions"])}

    def score(self, samples: list[Sample], predictions: dict[str, dict], options: dict) -> Scores:
        from ..text_metrics import rouge_l_scores

        pairs = []  # (sample, question number, prediction, reference)
        for sample in samples:
            for number, (reference, response) in enumerate(
                zip(sample.extra["answers"], predictions[sample.key]["responses"])
            ):
                if reference is not None:
                    pairs.append((sample, number, response, reference))
        n_questions = sum(len(s.extra["questions"]) for s in samples)
        notes = []
        if not pairs:
            notes.append("the benchmark file has no reference answers: nothing to score")
            return Scores({"n_samples": len(samples), "n_questions": n_questions, "n_scored": 0}, [], notes)

        values: dict[str, list[float | None]] = {"rougeL": rouge_l_scores([p[2] for p in pairs], [p[3] for p in pairs])}
        if options.get("similarity", True):
            from ..text_metrics import EmbeddingSimilarity

            values["similarity"] = [
                float(v) for v in EmbeddingSimilarity()([p[2] for p in pairs], [p[3] for p in pairs])
            ]
        else:
            notes.append("sentence-embedding similarity skipped (--no-similarity)")
        if options.get("judge") is not None:
            values["judge"] = _judge(options["judge"], pairs, options["judge_cache"])
            missing = sum(v is None for v in values["judge"])
            if missing:
                notes.append(f"the judge gave no valid score for {missing} answer(s); they are left out of its mean")

        rows = []
        for category in sorted({p[0].category for p in pairs}):
            chosen = [i for i, p in enumerate(pairs) if p[0].category == category]
            row = {"class": category, "n_samples": len({pairs[i][0].key for i in chosen}), "n_scored": len(chosen)}
            for metric, column in values.items():
                row[metric] = _mean(column[i] for i in chosen)
            rows.append(row)
        summary = {"n_samples": len(samples), "n_questions": n_questions, "n_scored": len(pairs)}
        for metric, column in values.items():
            summary[metric] = _mean(column)
            summary[f"{metric}_macro"] = _mean(row[metric] for row in rows)
        return Scores(summary, rows, notes)


def _mean(values) -> float:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _judge(judge, pairs, cache_path: Path) -> list[float | None]:
    """The judge's score per pair; replies are cached by (sample, question, model) so a rerun asks nothing twice."""
    cached: dict[str, dict] = {}
    if cache_path.is_file():
        for line in cache_path.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
                cached[item["key"]] = item
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    scores = []
    with open(cache_path, "a", encoding="utf-8") as handle:
        for sample, number, prediction, reference in pairs:
            key = f"{judge.model}|{sample.key}|{number}"
            if key not in cached:
                result = judge.judge(sample.extra["questions"][number], reference, prediction)
                cached[key] = {"key": key, "score": result["score"], "raw": result["raw"]}
                handle.write(json.dumps(cached[key], ensure_ascii=False) + "\n")
                handle.flush()
            scores.append(cached[key]["score"])
    return scores
