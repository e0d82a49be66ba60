"""VisA-D&R (the Anomaly-OV detection and reasoning benchmark).

Detection, `test_data.json`: ``[{"image": "VisA/<class>/...", "anomaly": true|false, ...}]``.
Reasoning, `visa_dr.json`: ``[{"image": ..., "questions": [...], ...}]`` where a question is a string or
an object (``question``/``q``/``text``, with an optional ``answer``/``a``/``reference``), and reference
answers may instead come as a parallel top-level ``answers`` list.

Image paths are relative to `image_root` (default: the JSON file's folder); the class is the path
component after the leading ``VisA``. `parse_entry` is the one parser of an entry: these readers and the
evaluation tasks (`eval/tasks/visa_dr*.py`) both call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..images import image_problem
from ..records import ReadResult, Record, parse_label
from .jsonfile import entry_id, load_json_list

QUESTION_KEYS = ("question", "q", "text", "value", "prompt")
ANSWER_KEYS = ("answer", "a", "reference", "gt_answer", "ground_truth")


def category_from_image(image: str) -> str:
    """``VisA/<class>/...`` → ``<class>``; otherwise the first folder of the path."""
    parts = Path(image).parts
    if len(parts) >= 3 and parts[0].lower().startswith("visa"):
        return parts[1]
    return parts[0] if len(parts) >= 2 else ""


def parse_questions(entry: dict) -> tuple[list[str], list[str | None]] | str:
    """(questions, reference answers or None each) of a reasoning entry, or why they cannot be read."""
    questions = entry.get("questions")
    if isinstance(questions, str):
        questions = [questions]
    if not isinstance(questions, list) or not questions:
        return "'questions' must be a non-empty list"
    texts: list[str] = []
    answers: list[str | None] = []
    for number, question in enumerate(questions):
        if isinstance(question, dict):
            text = next((question[k] for k in QUESTION_KEYS if isinstance(question.get(k), str)), None)
            answer = next((question[k] for k in ANSWER_KEYS if isinstance(question.get(k), str)), None)
        else:
            text, answer = question, None
        if not isinstance(text, str) or not text.strip():
            return f"question {number} has no text"
        texts.append(text)
        answers.append(answer)
    top = entry.get("answers")
    if isinstance(top, list):
        if len(top) != len(texts):
            return f"{len(top)} answers for {len(texts)} questions"
        answers = [a if isinstance(a, str) else answers[i] for i, a in enumerate(top)]
    return texts, answers


@dataclass(frozen=True)
class VisaDREntry:
    """One usable benchmark entry; `image` is as the file writes it, relative to the image root."""

    image: str
    label: int | None  # 1 anomalous, 0 normal; None when a reasoning entry does not say
    category: str
    extra: dict  # detection: the entry's other fields; reasoning: {"questions": [...], "answers": [...]}


def parse_entry(entry, task: str) -> VisaDREntry | str:
    """A ``"detection"`` or ``"reasoning"`` entry, or why it cannot be used (its image is not looked at)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        return "entry has no 'image' path"
    category = category_from_image(entry["image"])
    if task == "detection":
        label = parse_label(entry.get("anomaly"))
        if label is None:
            return f"'anomaly' must be true or false, got {entry.get('anomaly')!r}"
        extra = {key: value for key, value in entry.items() if key not in ("image", "anomaly")}
        return VisaDREntry(entry["image"], label, category, extra)
    if task != "reasoning":
        raise ValueError(f"unknown VisA-D&R task {task!r}; 'detection' or 'reasoning'")
    parsed = parse_questions(entry)
    if isinstance(parsed, str):
        return parsed
    questions, answers = parsed
    label = parse_label(entry.get("anomaly", entry.get("label")))
    return VisaDREntry(entry["image"], label, category, {"questions": questions, "answers": answers})


def read_visa_dr(
    path: str | Path, task: str, image_root: str | Path | None = None, full_check: bool = False
) -> ReadResult:
    """Every usable entry of a detection or reasoning file as a record; the others are problems."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    result = ReadResult()
    for index, entry in enumerate(load_json_list(path, result) or []):
        record_id = entry_id(entry, index)
        parsed = parse_entry(entry, task)
        if isinstance(parsed, str):
            result.drop(str(path), parsed, record_id)
            continue
        image = root / parsed.image
        reason = image_problem(image, full_check)
        if reason is not None:
            result.drop(str(image), reason, record_id)
            continue
        result.keep(Record(str(image), parsed.label, None, parsed.category, "test", None, parsed.extra))
    return result


def read_visa_dr_detection(
    path: str | Path, image_root: str | Path | None = None, full_check: bool = False
) -> ReadResult:
    """Every detection entry as a record with a label; entries without a boolean ``anomaly`` are problems."""
    return read_visa_dr(path, "detection", image_root, full_check)


def read_visa_dr_reasoning(
    path: str | Path, image_root: str | Path | None = None, full_check: bool = False
) -> ReadResult:
    """Every reasoning entry as a record with ``extra["questions"]`` and ``extra["answers"]``."""
    return read_visa_dr(path, "reasoning", image_root, full_check)
