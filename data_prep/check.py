"""Detect a dataset's format from a path and read it with every check on.

Supported: an MVTec-layout folder (also the synthetic generator's output, and images sorted into good/ and a
folder per defect), a VisA root with `split_csv/1cls.csv` (or the CSV itself), a LLaVA conversation JSON, VisA-D&R
`test_data.json` and `visa_dr.json`. JSON files are recognised by their content, falling back to the file name.
"""

from __future__ import annotations

import json
from pathlib import Path

from .readers import read_llava, read_mvtec, read_visa, read_visa_dr_detection, read_visa_dr_reasoning
from .readers.mvtec import class_dirs
from .readers.visa import DEFAULT_CSV
from .records import ReadResult

FORMATS = ("mvtec", "visa", "llava", "visa_dr_detection", "visa_dr_reasoning")
_BY_NAME = {"test_data.json": "visa_dr_detection", "visa_dr.json": "visa_dr_reasoning"}


class UnknownFormat(ValueError):
    """The path is not in any supported format."""


def detect_format(path: str | Path) -> str:
    """One of `FORMATS` for `path`; raises `UnknownFormat` (with the reason) otherwise."""
    path = Path(path)
    if not path.exists():
        raise UnknownFormat(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / DEFAULT_CSV).is_file():
            return "visa"
        if class_dirs(path):
            return "mvtec"
        raise UnknownFormat(
            f"{path}: a folder that is neither MVTec layout (<class>/train, <class>/test), label folders "
            f"(<class>/good and a folder per defect) nor a VisA root ({DEFAULT_CSV})"
        )
    if path.suffix.lower() == ".csv":
        return "visa"
    if path.suffix.lower() == ".json":
        return _json_format(path)
    raise UnknownFormat(f"{path}: unsupported file type (expected a folder, a .json or a split .csv)")


def _json_format(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        if path.name in _BY_NAME:
            return _BY_NAME[path.name]
        return "llava"  # the reader reports the bad JSON with its position
    first = next((entry for entry in data if isinstance(entry, dict)), None) if isinstance(data, list) else None
    if first is not None:
        if "conversations" in first:
            return "llava"
        if "questions" in first:
            return "visa_dr_reasoning"
        if "anomaly" in first:
            return "visa_dr_detection"
    if path.name in _BY_NAME:
        return _BY_NAME[path.name]
    raise UnknownFormat(
        f"{path}: JSON with neither 'conversations' (LLaVA), 'questions' (visa_dr.json) nor 'anomaly' (test_data.json) records"
    )


def read_any(path: str | Path, full_check: bool = True, masks_required: bool = True) -> tuple[str, ReadResult]:
    """(format, result) for `path`, with every image decoded when ``full_check``. ``masks_required=False`` reads
    MVTec-layout and VisA data as `eval.run ad` and `train.calibrate --all-images` do: a defective image without a
    mask is a record (image-level label), not a problem."""
    path = Path(path)
    fmt = detect_format(path)
    masks = {} if masks_required else {"masks_required": False}
    if fmt == "visa":
        if path.is_dir():
            return fmt, read_visa(path, full_check=full_check, **masks)
        root = path.parent.parent if path.parent.name == DEFAULT_CSV.parent.name else path.parent
        return fmt, read_visa(root, path, full_check=full_check, **masks)
    if fmt == "mvtec":
        return fmt, read_mvtec(path, full_check=full_check, **masks)
    reader = {
        "llava": read_llava,
        "visa_dr_detection": read_visa_dr_detection,
        "visa_dr_reasoning": read_visa_dr_reasoning,
    }[fmt]
    return fmt, reader(path, full_check=full_check)
