"""VisA-D&R detection: is each image anomalous? Scored per class as published, in two columns.

Prompt: the published script's question. Columns (see `eval.detection`): ``verdict``, the
assistant's structured verdict (the expert's calibrated decision; missing for a plain
LLaVA-OneVision model or a predictions file, and then counted wrong), and ``text``, the published
rule ("Yes" or "yes" anywhere in the answer). ``disagreement_rate``: how often the two differ.
"""

from __future__ import annotations

from pathlib import Path

from ..detection import score_detection
from .base import Dataset, Sample, Scores, Task
from .visa_dr import load_dataset

PROMPT = "Are there any defects for the object in the image? Please reply with 'Yes' or 'No'."


class DetectionTask(Task):
    name = "visa-dr-detection"
    prompt = PROMPT

    def load(self, data: Path, need_images: bool) -> Dataset:
        return load_dataset(data, "test_data.json", "detection", need_images)

    def infer(self, adapter, sample: Sample, save_map) -> dict:
        answer = adapter.ask(sample, PROMPT)
        prediction = {"response": answer["response"], "verdict": answer["verdict"], "score": answer["score"]}
        if answer["anomaly_map"] is not None:
            prediction["map"] = save_map(sample.key, answer["anomaly_map"])
        return prediction

    def score(self, samples: list[Sample], predictions: dict[str, dict], options: dict) -> Scores:
        records = [
            {
                "image": s.key.split("#")[0],
                "truth": bool(s.label),
                "verdict": predictions[s.key]["verdict"],
                "response": predictions[s.key]["response"],
            }
            for s in samples
        ]
        summary, rows = score_detection(records)
        notes = []
        if summary["verdict_missing"]:
            notes.append(
                f"{summary['verdict_missing']} of {summary['n']} answers carry no structured verdict (no anomaly expert); "
                "the verdict column counts them wrong, the text column uses the published yes/no rule"
            )
        return Scores(summary, rows, notes)
