"""Reading the VisA-D&R benchmark files as the published scripts do.

The published layout is ``<data_dir>/VisA/test_data.json`` (detection) or ``visa_dr.json``
(reasoning) with image paths ``VisA/<class>/...`` relative to ``<data_dir>``. `--data` may name the
JSON file, ``<data_dir>`` or the ``VisA`` folder itself.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.images import image_problem
from data_prep.readers.jsonfile import entry_id, load_json_list
from data_prep.records import ReadResult

from .base import DataError


def find_json(data: Path, name: str) -> Path:
    if data.is_file():
        return data
    for candidate in (data / "VisA" / name, data / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"no {name} under '{data}' (expected {data / 'VisA' / name} or {data / name})")


def image_root(json_path: Path, images: list[str]) -> Path:
    """The folder the benchmark's image paths are relative to: the JSON's parent or grandparent."""
    candidates = [json_path.parent.parent, json_path.parent]
    for image in images[:1]:
        for root in candidates:
            if (root / image).is_file():
                return root
        first = Path(image).parts[0] if Path(image).parts else ""
        if first == json_path.parent.name:
            return json_path.parent.parent
    return json_path.parent


def load_entries(json_path: Path) -> list:
    result = ReadResult()
    entries = load_json_list(json_path, result)
    if entries is None:
        raise DataError(str(result.problems[0]))
    return entries


def entry_problem(entry, index: int, root: Path, need_images: bool) -> str | None:
    """Why an entry cannot be a sample (no image path, missing image when a model must see it)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        return f"{entry_id(entry, index)}: entry has no 'image' path"
    if need_images:
        reason = image_problem(root / entry["image"])
        if reason is not None:
            return f"{entry_id(entry, index)} {entry['image']}: {reason}"
    return None
