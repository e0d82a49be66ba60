"""MMAD (Jiang et al., ICLR 2025): multiple-choice questions about industrial images, 1-shot with a normal template.

Layout: ``DIR/mmad.json`` maps each query image's path (relative to ``DIR``; its first part names the dataset,
its second the class) to ``{"image_path", "mask_path", "similar_templates", "random_templates", "conversation":
[{"Question", "Options": {"A": ..., ...}, "Answer", "type", "annotation"}, ...]}``. One sample per query image;
each question is asked on its own with the benchmark's inspector prompt. With this project's models the template
(``--shots`` of them, random or ``--similar-template``) goes to the anomaly expert as its few-shot normal
reference, and the prompt says so: the chat takes one image, so the template is not shown to the LLM itself.

Two answer rules, both aggregated the benchmark's way (see `aggregate`): **structured** (`structured_choice`: the
option the answer states; an unparsable answer counts wrong and is counted) and **published**
(`published_choice`: the benchmark scorer's last standalone A-E letter, else the closest option text; an
unparsable answer is dropped). ``Anomaly Detection`` is also scored from the expert's calibrated verdict.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import warnings
from pathlib import Path

from .base import DataError, Dataset, Sample, Scores, Task

INSTRUCTION = (
    "You are an industrial inspector who checks products by images. You should judge whether there is a defect "
    "in the query image and answer the questions about it.\n"
    "Answer with the option's letter from the given choices directly."
)
# the question types as asked, and the 7 they are scored as (Object Structure and Object Details pool)
QUESTION_TYPES = (
    "Anomaly Detection",
    "Defect Classification",
    "Defect Localization",
    "Defect Description",
    "Defect Analysis",
    "Object Classification",
    "Object Structure",
    "Object Details",
)
POOLED = {"Object Structure": "Object Analysis", "Object Details": "Object Analysis"}
SCORED_TYPES = (
    "Anomaly Detection",
    "Defect Classification",
    "Defect Localization",
    "Defect Description",
    "Defect Analysis",
    "Object Classification",
    "Object Analysis",
)
# short column names for the per-class table, as the MMAD paper abbreviates its columns
SHORT = dict(zip(SCORED_TYPES, ("AD", "DC", "DL", "DD", "DA", "OC", "OA")))
RULES = ("structured", "published")
ANSWERS_FILE = "answers.jsonl"


# -- prompts -------------------------------------------------------------------------------------------


def question_text(question: str, options: dict[str, str]) -> str:
    """The benchmark's question block: ``Question 1: {Question} \\nA. {A}\\nB. {B}...``."""
    return f"Question 1: {question} \n" + "\n".join(f"{key}. {value}" for key, value in options.items())


def build_prompt(question: str, options: dict[str, str], n_templates: int) -> str:
    """The prompt text for a model that sees the query image only; `n_templates` normal templates went to its expert.

    The benchmark shows the template(s) between the instruction and the query image; a one-image chat cannot, so
    the sentence that introduces them says where they went instead (0 templates: the 0-shot prompt).
    """
    parts = [INSTRUCTION]
    if n_templates:
        plural = "image was" if n_templates == 1 else "images were"
        parts.append(
            f"{n_templates} {plural} of normal sample given to the anomaly expert as a template "
            "to compare the image being queried."
        )
    parts += [
        "The image shown is the query image.",
        "Following is the question list: ",
        question_text(question, options),
    ]
    return "\n".join(parts)


# -- answer rules ---------------------------------------------------------------------------------------


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(text).lower()).split())


def _article(response: str, start: int, letter: str, options: dict[str, str]) -> str | None:
    """The option whose text the answer spells from the letter on ("A scratch on the neck" is that option, not A)."""
    rest = f"{_normal(response[start:])} "
    for key, value in options.items():
        text = _normal(value)
        if key != letter and text.startswith(letter.lower() + " ") and rest.startswith(text + " "):
            return key
    return None


# "Answer: B", "answer is (C)", "Option D", "(E)": a capital letter that is not the start of a word
_STATED = re.compile(
    r"(?:(?i:\banswer\b)\s*(?:(?i:is)\s*)?[:\-]?|(?i:\boption\b))\s*\(?\**\s*([A-E])(?![A-Za-z])|\(([A-E])\)"
)
# a leading letter: "B", "B.", "B)", "(B)", "**B**:", "B -"; "A scratch" is an article, not a letter
_LEADING = re.compile(r"^\W*([A-E])(?:\s*$|\s*[.):\],\-*]|\s*\n)")


def structured_choice(response: str, options: dict[str, str]) -> str | None:
    """The option an answer states, or None when it states none (the structured rule).

    In order: an explicit statement ("Answer: X", "the answer is X", "option X", "(X)"), a leading letter
    followed by punctuation or nothing, the whole answer being one letter, then an option's text contained in the
    answer (exactly one option, a shorter text inside a longer one's not counting). A letter that begins the text of
    another option ("Answer: A scratch on the neck" when B is "A scratch on the neck") is read as that option.
    """
    response = response or ""
    for match in _STATED.finditer(response):
        letter = match.group(1) or match.group(2)
        if letter in options:
            return (match.group(1) and _article(response, match.start(1), letter, options)) or letter
    leading = _LEADING.match(response)
    if leading and leading.group(1) in options:
        return _article(response, leading.start(1), leading.group(1), options) or leading.group(1)
    bare = response.strip().strip("*.:)( ").upper()
    if len(bare) == 1 and bare in options:
        return bare
    said = f" {_normal(response)} "
    found = {key: _normal(value) for key, value in options.items() if _normal(value) and f" {_normal(value)} " in said}
    kept = [key for key, text in found.items() if not any(text != other and text in other for other in found.values())]
    return kept[0] if len(kept) == 1 else None


def published_choice(response: str, options: dict[str, str]) -> str | None:
    """The benchmark scorer's reading: the last standalone A-E letter, else the option text closest to the answer.

    So "B. A scratch on the neck" reads as A. None (dropped by the published aggregation) for a blank answer.
    """
    letters = re.findall(r"\b([A-E])\b", response or "")
    if letters:
        return letters[-1]
    if not (response or "").strip() or not options:
        return None
    closest = difflib.get_close_matches(response, list(options.values()), n=1, cutoff=0.0)
    return next(key for key, value in options.items() if value == closest[0]) if closest else None


def verdict_choice(verdict: bool | None, options: dict[str, str]) -> str | None:
    """The option the expert's verdict picks for an Anomaly Detection question: the one saying yes (anomalous) or no."""
    if verdict is None:
        return None
    word = "yes" if verdict else "no"
    return next((key for key, value in options.items() if _normal(value).split()[:1] == [word]), None)


# -- aggregation -----------------------------------------------------------------------------------------


def type_accuracy(scored_type: str, items: list[tuple[bool, bool]]) -> float:
    """Accuracy of (correct, normal) pairs; balanced over normal and anomalous images for Anomaly Detection."""
    if not items:
        return float("nan")
    if scored_type != "Anomaly Detection":
        return sum(correct for correct, _ in items) / len(items)
    from sklearn.metrics import balanced_accuracy_score

    truth = [not normal for _, normal in items]
    predicted = [t if correct else not t for (correct, _), t in zip(items, truth)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one kind of image only: the mean over the kind there is
        return float(balanced_accuracy_score(truth, predicted))


def _mean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def aggregate(records: list[dict]) -> dict:
    """MMAD's aggregation of ``{"dataset", "type", "normal", "correct"}`` records (``correct`` None: dropped).

    Accuracy per dataset and scored type (balanced accuracy for Anomaly Detection, Object Structure and Object
    Details pooled into Object Analysis); a dataset's average is the unweighted mean of its types; ``by_type`` is
    the mean over datasets of each type; ``overall`` the unweighted mean over datasets.
    """
    cells: dict[str, dict[str, list[tuple[bool, bool]]]] = {}
    for record in records:
        by_type = cells.setdefault(record["dataset"], {})
        items = by_type.setdefault(POOLED.get(record["type"], record["type"]), [])
        if record["correct"] is not None:
            items.append((bool(record["correct"]), bool(record["normal"])))
    by_dataset = {}
    for dataset in sorted(cells):
        types = {t: type_accuracy(t, cells[dataset][t]) for t in SCORED_TYPES if t in cells[dataset]}
        by_dataset[dataset] = {"average": _mean(types.values()), "by_type": types}
    by_type = {t: _mean(d["by_type"][t] for d in by_dataset.values() if t in d["by_type"]) for t in SCORED_TYPES}
    return {
        "overall": _mean(d["average"] for d in by_dataset.values()),
        "by_type": {t: v for t, v in by_type.items() if not math.isnan(v)},
        "by_dataset": by_dataset,
    }


# -- the task ------------------------------------------------------------------------------------------------


def find_json(data: Path) -> Path:
    if data.is_file():
        return data
    if (data / "mmad.json").is_file():
        return data / "mmad.json"
    raise DataError(f"no mmad.json in '{data}' (give the MMAD folder or its mmad.json)")


def question_problem(qa) -> str | None:
    """Why one conversation item cannot be scored, or None."""
    if not isinstance(qa, dict):
        return "a question is not an object"
    options = qa.get("Options")
    if not isinstance(qa.get("Question"), str) or not isinstance(options, dict) or not options:
        return "needs 'Question' and non-empty 'Options'"
    if not all(key in "ABCDE" and len(key) == 1 and isinstance(value, str) for key, value in options.items()):
        return f"options must be letters A-E with text, got {sorted(options)}"
    if qa.get("Answer") not in options:
        return f"answer {qa.get('Answer')!r} is not one of the options {sorted(options)}"
    if qa.get("type") not in QUESTION_TYPES:
        return f"unknown question type {qa.get('type')!r}"
    return None


class MMADTask(Task):
    name = "mmad"
    prompt = "(MMAD: the inspector instruction, the template to the expert, each question on its own)"
    shots = 1
    similar_template = False

    def load(self, data: Path, need_images: bool) -> Dataset:
        from data_prep.images import image_problem

        path = find_json(data)
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"cannot read '{path}' ({error})") from error
        if not isinstance(entries, dict):
            raise DataError(f"'{path}' must map image paths to entries, got a JSON {type(entries).__name__}")
        root = path.parent
        field = "similar_templates" if self.similar_template else "random_templates"
        dataset = Dataset(samples=[], n_entries=len(entries))
        for index, (key, entry) in enumerate(entries.items()):
            parts = Path(key).parts
            if not isinstance(entry, dict) or not isinstance(entry.get("conversation"), list) or len(parts) < 3:
                dataset.problems.append(f"{key}: not an MMAD entry (<dataset>/<class>/... with a 'conversation' list)")
                continue
            questions = []
            for number, qa in enumerate(entry["conversation"]):
                problem = question_problem(qa)
                if problem is not None:
                    dataset.problems.append(f"{key} question {number}: {problem}")
                    continue
                questions.append(
                    {
                        "index": number,
                        "question": qa["Question"],
                        "options": qa["Options"],
                        "answer": qa["Answer"],
                        "type": qa["type"],
                    }
                )
            if not questions:
                dataset.problems.append(f"{key}: no question to score")
                continue
            templates = entry.get(field) if isinstance(entry.get(field), list) else []
            templates = [t for t in templates if isinstance(t, str)][: self.shots]
            sample = Sample(
                key=key,
                index=index,
                image=str(root / key),
                label=0 if "good" in parts else 1,
                category=parts[1],
                extra={
                    "dataset": parts[0],
                    "questions": questions,
                    "templates": templates,
                    "references": [str(root / t) for t in templates],
                },
            )
            if need_images:  # a model must see them: what is missing becomes this sample's error, never a crash
                named = [("image", key), *(("template", t) for t in templates)]
                reasons = [f"{what} {name}: {why}" for what, name in named if (why := image_problem(root / name))]
                if len(templates) < self.shots:
                    reasons.append(f"{len(templates)} {field} listed, --shots {self.shots} needs {self.shots}")
                if reasons:
                    sample.extra["unusable"] = "; ".join(reasons)
                    dataset.problems.append(sample.extra["unusable"])
            dataset.samples.append(sample)
        if not dataset.samples:
            raise DataError(
                f"no scorable entry in '{path}'" + (f" ({dataset.problems[0]})" if dataset.problems else "")
            )
        return dataset

    def infer(self, adapter, sample: Sample, save_map) -> dict:
        from ..adapters import MissingResponse

        if sample.extra.get("unusable"):  # cached as this image's error: listed in results.json, never a crash
            return {"error": sample.extra["unusable"]}
        n_templates = len(sample.extra["templates"]) if adapter.has_expert else 0
        questions = sample.extra["questions"]
        try:
            answers = adapter.ask_each(
                sample, [build_prompt(q["question"], q["options"], n_templates) for q in questions]
            )
        except MissingResponse as error:  # a re-scored run that had failed on this image
            return {"error": str(error)}
        first = answers[0]
        prediction = {
            "questions": [q["index"] for q in questions],
            "responses": [a["response"] for a in answers],
            "verdict": first["verdict"],
            "score": first["score"],
            "templates": sample.extra["templates"] if n_templates else [],
        }
        if first["anomaly_map"] is not None:
            prediction["map"] = save_map(sample.key, first["anomaly_map"])
        return prediction

    def score(self, samples: list[Sample], predictions: dict[str, dict], options: dict) -> Scores:
        records = {rule: [] for rule in RULES}
        verdicts, lines = [], []
        unparsed = {rule: 0 for rule in RULES}
        verdict_missing = 0
        for sample in samples:
            prediction = predictions[sample.key]
            responses = dict(zip(prediction["questions"], prediction["responses"]))
            for q in sample.extra["questions"]:
                response = responses.get(q["index"])
                if response is None:
                    continue
                lines.append(
                    json.dumps({"image": sample.key, "question": q["index"], "response": response}, ensure_ascii=False)
                )
                base = {
                    "dataset": sample.extra["dataset"],
                    "class": sample.category,
                    "type": q["type"],
                    "normal": sample.label == 0,
                }
                for rule, choose in (("structured", structured_choice), ("published", published_choice)):
                    choice = choose(response, q["options"])
                    unparsed[rule] += choice is None
                    # unparsable: wrong for the structured rule, dropped (None) by the published one
                    dropped = None if rule == "published" else False
                    records[rule].append({**base, "correct": choice == q["answer"] if choice is not None else dropped})
                if q["type"] == "Anomaly Detection":
                    choice = verdict_choice(prediction.get("verdict"), q["options"])
                    verdict_missing += choice is None
                    verdicts.append({**base, "correct": choice == q["answer"]})
        sections = {rule: {**aggregate(records[rule]), "unparsed": unparsed[rule]} for rule in RULES}
        with_verdict = any(p.get("verdict") is not None for p in (predictions[s.key] for s in samples))
        if with_verdict:
            result = aggregate(verdicts)
            sections["verdict"] = {
                "Anomaly Detection": result["overall"],
                "by_dataset": {ds: v["average"] for ds, v in result["by_dataset"].items()},
                "missing": verdict_missing,
            }
        summary = {
            "n_images": len(samples),
            "n_questions": len(records["structured"]),
            "structured_overall": sections["structured"]["overall"],
            "published_overall": sections["published"]["overall"],
            "structured_unparsed": unparsed["structured"],
            "published_dropped": unparsed["published"],
        }
        if with_verdict:
            summary["verdict_AD"] = sections["verdict"]["Anomaly Detection"]
        notes = [
            (
                "structured: the option the answer states, unparsable answers wrong; published: the benchmark "
                "scorer's last standalone A-E letter, else the closest option text, unparsable answers dropped"
            ),
            "columns: " + ", ".join(f"{short} = {name}" for name, short in SHORT.items()) + "; AD is balanced accuracy",
        ]
        if with_verdict:
            notes.append(
                f"verdict_AD: Anomaly Detection answered by the expert's calibrated verdict "
                f"({verdict_missing} without one, counted wrong)"
            )
        if not any(predictions[s.key].get("templates") for s in samples):
            notes.append("no template reached the model (--shots 0, a predictions file, or a model without an expert)")
        rows = _rows(records, verdicts if with_verdict else None, samples)
        return Scores(
            summary, rows, notes, sections=sections, files={ANSWERS_FILE: "".join(line + "\n" for line in lines)}
        )


def _rows(records: dict[str, list[dict]], verdicts: list[dict] | None, samples: list[Sample]) -> list[dict]:
    """One row for all datasets, one per dataset, one per class: images, questions, each rule's type accuracies."""
    groups = [("all", "all", lambda r: True)]
    for dataset in sorted({s.extra["dataset"] for s in samples}):
        groups.append((dataset, "all", lambda r, d=dataset: r["dataset"] == d))
        for category in sorted({s.category for s in samples if s.extra["dataset"] == dataset}):
            groups.append((dataset, category, lambda r, d=dataset, c=category: r["dataset"] == d and r["class"] == c))
    rows = []
    for dataset, category, keep in groups:
        chosen = [s for s in samples if keep({"dataset": s.extra["dataset"], "class": s.category})]
        row = {
            "dataset": dataset,
            "class": category,
            "n_images": len(chosen),
            "n_questions": sum(keep(r) for r in records["structured"]),
        }
        for rule in RULES:
            result = aggregate([r for r in records[rule] if keep(r)])
            row[f"{rule}_average"] = result["overall"]  # the "all" row: means over datasets, as the headline
            for name, short in SHORT.items():
                row[f"{rule}_{short}"] = result["by_type"].get(name)  # None: no such question here
        if verdicts is not None:
            row["verdict_AD"] = aggregate([r for r in verdicts if keep(r)])["overall"]
        rows.append(row)
    return rows
