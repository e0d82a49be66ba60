"""Records → `datasets.Dataset` with `Image` features. `datasets` is imported here, lazily."""

from __future__ import annotations

import json
from collections.abc import Iterable

from .records import Record

BASE_COLUMNS = ("image", "mask", "label", "category", "split", "defect_type")


def to_dataset(records: Iterable[Record]):
    """A `datasets.Dataset` with columns image (Image), mask (Image, None when absent), label,
    category, split, defect_type, plus one column per ``extra`` key.

    Extra values that are lists of strings stay lists; anything else (conversations, question
    objects) is stored as a JSON string so every row has the same type.
    """
    import datasets

    records = list(records)
    extra_keys = sorted({key for record in records for key in record.extra})
    columns: dict[str, list] = {name: [] for name in (*BASE_COLUMNS, *extra_keys)}
    for record in records:
        columns["image"].append(record.image)
        columns["mask"].append(record.mask)
        columns["label"].append(record.label)
        columns["category"].append(record.category)
        columns["split"].append(record.split)
        columns["defect_type"].append(record.defect_type)
        for key in extra_keys:
            columns[key].append(record.extra.get(key))
    features = {
        "image": datasets.Image(),
        "mask": datasets.Image(),
        "label": datasets.Value("int8"),
        "category": datasets.Value("string"),
        "split": datasets.Value("string"),
        "defect_type": datasets.Value("string"),
    }
    for key in extra_keys:
        if all(v is None or _is_str_list(v) for v in columns[key]):
            features[key] = datasets.List(datasets.Value("string"))
        else:
            features[key] = datasets.Value("string")
            columns[key] = [v if v is None or isinstance(v, str) else json.dumps(v) for v in columns[key]]
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(v is None or isinstance(v, str) for v in value)
