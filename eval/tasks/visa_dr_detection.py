"""VisA-D&R detection: is each image anomalous? Scored per class as published, in two columns.

Prompt: the published script's question. Columns (see `eval.detection`): ``verdict``, the
assistant's structured verdict (the expert's calibrated decision; missing for a plain
LLaVA-OneVision model or a predictions file, and then counted wrong), and ``text``, the published
rule ("Yes" or "yes" anywhere in the answer). ``disagreement_rate``: how often the two differ.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.readers.jsonfile import entry_id
from data_prep.readers.visa_dr import category_from_image
from data_prep.records import parse_label

from ..detection import score_detection
from .base import Dataset, Sample, Scores, Task, unique_keys
from .visa_dr import entry_problem, find_json, image_root, load_entries

PROMPT = "Are there any defects for the object in the image? Please reply with 'Yes' or 'No'."


class DetectionTask(Task):
    name = "visa-dr-detection"
    prompt = PROMPT

    def load(self, data: Path, need_images: bool) -> Dataset:
        path = find_json(data, "test_data.json")
        entries = load_entries(path)
        images = [e["image"] if isinstance(e, dict) and isinstance(e.get("image"), str) else "" for e in entries]
        root = image_root(path, [i for i in images if i])
        dataset = Dataset(samples=[], n_entries=len(entries))
        for index, (entry, key) in enumerate(zip(entries, unique_keys(images))):
            problem = entry_problem(entry, index, root, need_images)
            label = parse_label(entry.get("anomaly")) if problem is None else None
            if problem is None and label is None:
                problem = f"{entry_id(entry, index)}: 'anomaly' must be true or false, got {entry.get('anomaly')!r}"
            if problem is not None:
                dataset.problems.append(problem)
                continue
            dataset.samples.append(
                Sample(key=key, index=index, image=str(root / entry["image"]), label=label, category=category_from_image(entry["image"]))
            )
        return dataset

    def infer(self, adapter, sample: Sample, save_map) -> dict:
        answer = adapter.ask(sample, PROMPT)
        prediction = {"response": answer["response"], "verdict": answer["verdict"], "score": answer["score"]}
        if answer["anomaly_map"] is not None:
            prediction["map"] = save_map(sample.key, answer["anomaly_map"])
        return prediction

    def score(self, samples: list[Sample], predictions: dict[str, dict], options: dict) -> Scores:
        records = [
            {"image": s.key.split("#")[0], "truth": bool(s.label), "verdict": predictions[s.key]["verdict"], "response": predictions[s.key]["response"]}
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
