"""Strict JSON for everything the project writes (results, calibration, reports).

Python's `json` writes NaN and Infinity by default, which most JSON readers (jq, JavaScript, pandas with
`engine="pyarrow"`) reject. A metric that is undefined on a set (AUROC with one class only, an answer rate
with no answers) is written as `null` instead.
"""

from __future__ import annotations

import json
import math


def finite(value):
    """`value` with every NaN or infinite float (also inside dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    if hasattr(value, "dtype") and getattr(value, "shape", None) == () and hasattr(value, "item"):
        return finite(value.item())  # numpy / torch scalars
    return value


def dumps(value, **kwargs) -> str:
    """`json.dumps` that writes undefined numbers as null and refuses anything else non-standard."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def answer_record(answer: str, evidence: dict, heatmap: str | None = None) -> dict:
    """One answer as `ask --json` prints it and the app shows it: the answer, the evidence
    (`AnomalyReport.evidence`) and where the overlay was written, if it was."""
    return {"answer": answer, **evidence, "heatmap": heatmap}
