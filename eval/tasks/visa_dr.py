"""Reading the VisA-D&R benchmark files as the published scripts do.

The published layout is ``<data_dir>/VisA/test_data.json`` (detection) or ``visa_dr.json``
(reasoning) with image paths ``VisA/<class>/...`` relative to ``<data_dir>``. `--data` may name the
JSON file, ``<data_dir>`` or the ``VisA`` folder itself. Each entry is parsed by the dataset reader's
`data_prep.readers.visa_dr.parse_entry`, the one parser of the format.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.images import image_problem
from data_prep.readers.jsonfile import entry_id, load_json_list
from data_prep.readers.visa_dr import parse_entry
from data_prep.records import ReadResult

from .base import DataError, Dataset, Sample, unique_keys


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


def load_dataset(data: Path, name: str, task: str, need_images: bool) -> Dataset:
    """The samples of the benchmark file `name` under `data` for `task` ("detection" or "reasoning").

    An entry that cannot be used (no image path, a bad label or questions, a missing image when a model
    must see it) is a problem, named by its position (and id) in the file.
    """
    path = find_json(data, name)
    entries = load_entries(path)
    images = [e["image"] if isinstance(e, dict) and isinstance(e.get("image"), str) else "" for e in entries]
    root = image_root(path, [i for i in images if i])
    dataset = Dataset(samples=[], n_entries=len(entries))
    for index, (entry, key) in enumerate(zip(entries, unique_keys(images))):
        parsed = parse_entry(entry, task)
        if isinstance(parsed, str):
            dataset.problems.append(f"{entry_id(entry, index)}: {parsed}")
            continue
        reason = image_problem(root / parsed.image) if need_images else None
        if reason is not None:
            dataset.problems.append(f"{entry_id(entry, index)} {parsed.image}: {reason}")
            continue
        extra = parsed.extra if task == "reasoning" else {}
        dataset.samples.append(Sample(key, index, str(root / parsed.image), parsed.label, parsed.category, extra=extra))
    return dataset
