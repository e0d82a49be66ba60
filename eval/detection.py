"""VisA-D&R detection scoring: is each image anomalous, per class and macro-averaged.

A record is ``(image, truth, verdict, response)``: the image path as written in the benchmark
(``VisA/<class>/...``), the ground truth (True = anomalous), the assistant's structured verdict
(True / False, or None when it gave none) and its answer text. Two prediction columns are scored:

- ``verdict``: the structured verdict (the expert's calibrated decision). A missing verdict (None)
  counts as wrong: it is taken as the opposite of the truth, and counted in ``verdict_missing``.
- ``text``: the published VisA-D&R rule, positive when the substring "Yes" or "yes" appears anywhere
  in the answer text (so "eyes" counts and "YES" does not, exactly as published).

``disagreement_rate`` is the fraction of records with a verdict where the two columns differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sklearn.metrics import accuracy_score, precision_recall_fscore_support

__all__ = ["DETECTION_METRICS", "image_class", "score_detection", "text_says_yes"]

DETECTION_METRICS = ("accuracy", "precision", "recall", "f1")
_COLUMNS = ("verdict", "text")
# mapping keys accepted for each record field, first preferred
_KEYS = (("image", "image_path"), ("truth",), ("verdict",), ("response", "response_text"))


def text_says_yes(response: str) -> bool:
    """The published VisA-D&R rule: "Yes" or "yes" appears in the answer text."""
    return "Yes" in response or "yes" in response


def image_class(image: str) -> str:
    """The class of a benchmark image: the second component of ``VisA/<class>/...``."""
    parts = [p for p in str(image).replace("\\", "/").split("/") if p]
    if len(parts) < 3:
        raise ValueError(f"image path {image!r} is not of the form <dataset>/<class>/<file>")
    return parts[1]


def _as_record(record, index: int) -> tuple[str, bool, bool | None, str]:
    if isinstance(record, Mapping):
        fields = []
        for names in _KEYS:
            name = next((n for n in names if n in record), None)
            if name is None:
                raise ValueError(f"record {index} lacks key {names[0]!r} (need image, truth, verdict, response)")
            fields.append(record[name])
        record = fields
    if len(record) != 4:
        raise ValueError(f"record {index} has {len(record)} fields; need (image, truth, verdict, response)")
    image, truth, verdict, response = record
    if not isinstance(truth, bool) and truth not in (0, 1):
        raise ValueError(f"record {index}: truth must be a bool, got {truth!r}")
    if verdict is not None and not isinstance(verdict, bool) and verdict not in (0, 1):
        raise ValueError(f"record {index}: verdict must be a bool or None, got {verdict!r}")
    if not isinstance(response, str):
        raise ValueError(f"record {index}: response must be a string, got {type(response).__name__}")
    return str(image), bool(truth), None if verdict is None else bool(verdict), response


def _binary_scores(truth: list[bool], predicted: list[bool]) -> dict[str, float]:
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, predicted, average="binary", pos_label=True, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }


def score_detection(records: Iterable) -> tuple[dict, list[dict]]:
    """Score yes/no detection records per class; returns ``(summary, rows)``.

    ``records``: tuples ``(image, truth, verdict, response)`` or mappings with those keys
    (``image_path`` and ``response_text`` also accepted).
    ``rows``: one flat dict per class (sorted by name) with ``class, n, n_anomalous,
    verdict_{accuracy,precision,recall,f1}, text_{...}, disagreement_rate, verdict_missing``, ready
    for ``csv.DictWriter`` or a Markdown table. Precision (or recall) of a class with no predicted
    (or no actual) positives is 0. ``summary``: the macro mean over classes of every metric
    (``verdict_f1``, ``text_accuracy``, ...), ``disagreement_rate`` over all records with a verdict,
    ``verdict_missing`` and ``n`` totals, ``n_classes``.
    """
    by_class: dict[str, list[tuple[bool, bool | None, bool]]] = {}
    for index, record in enumerate(records):
        image, truth, verdict, response = _as_record(record, index)
        by_class.setdefault(image_class(image), []).append((truth, verdict, text_says_yes(response)))
    if not by_class:
        raise ValueError("no detection records to score")

    rows = []
    for name in sorted(by_class):
        items = by_class[name]
        truth = [t for t, _, _ in items]
        predictions = {
            "verdict": [(not t) if v is None else v for t, v, _ in items],
            "text": [text for _, _, text in items],
        }
        with_verdict = [(v, text) for _, v, text in items if v is not None]
        row = {"class": name, "n": len(items), "n_anomalous": sum(truth)}
        for column in _COLUMNS:
            for metric, value in _binary_scores(truth, predictions[column]).items():
                row[f"{column}_{metric}"] = value
        row["disagreement_rate"] = (
            sum(v != text for v, text in with_verdict) / len(with_verdict) if with_verdict else float("nan")
        )
        row["verdict_missing"] = len(items) - len(with_verdict)
        rows.append(row)

    summary: dict = {"n": sum(r["n"] for r in rows), "n_classes": len(rows)}
    for column in _COLUMNS:
        for metric in DETECTION_METRICS:
            key = f"{column}_{metric}"
            summary[key] = sum(r[key] for r in rows) / len(rows)
    all_items = [item for items in by_class.values() for item in items]
    with_verdict = [(v, text) for _, v, text in all_items if v is not None]
    summary["disagreement_rate"] = (
        sum(v != text for v, text in with_verdict) / len(with_verdict) if with_verdict else float("nan")
    )
    summary["verdict_missing"] = len(all_items) - len(with_verdict)
    return summary, rows
