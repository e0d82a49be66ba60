"""What every task shares: the `Sample` it hands to an adapter, the `Dataset` it reads, the `Task` shape.

A task is a dataset reader, a prompt and a metric:

- ``load(data, need_images)`` reads the benchmark into samples (``need_images`` is False when a
  predictions file answers, so the images need not be there);
- ``infer(adapter, sample, save_map)`` asks the adapter and returns the JSON-able prediction that
  is cached for the sample (``save_map(key, array)`` stores an anomaly map and returns its name);
- ``score(samples, predictions, options)`` turns cached predictions into a `Scores`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Sample:
    """One benchmark item: ``key`` names it in the cache (the benchmark's own image path when it has
    one), ``index`` is its position in the benchmark file, ``image`` the path to open."""

    key: str
    index: int
    image: str
    label: int | None
    category: str
    mask: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Dataset:
    samples: list[Sample]
    problems: list[str] = field(default_factory=list)  # entries that could not become samples, and why
    n_entries: int = 0  # entries in the benchmark file, problems included


@dataclass
class Scores:
    summary: dict  # the headline numbers (macro means, counts)
    rows: list[dict]  # one per class, for the CSV and the Markdown table
    notes: list[str] = field(default_factory=list)  # what the numbers leave out, in words
    sections: dict = field(default_factory=dict)  # task-specific blocks written at the top level of results.json
    files: dict[str, str] = field(default_factory=dict)  # more files for the run folder, name -> text


class Task:
    name = ""
    prompt = ""
    needs_model = False  # True when a predictions file cannot answer (anomaly maps are needed)
    shots: int | None = None  # normal references per query by default; None: the task takes no --shots

    def load(self, data: Path, need_images: bool) -> Dataset:
        raise NotImplementedError

    def infer(self, adapter, sample: Sample, save_map) -> dict:
        raise NotImplementedError

    def score(self, samples: list[Sample], predictions: dict[str, dict], options: dict) -> Scores:
        raise NotImplementedError


class DataError(ValueError):
    """The benchmark data cannot be read at all (missing file, wrong layout)."""


def unique_keys(images: list[str]) -> list[str]:
    """The benchmark image paths as cache keys, a repeated path getting ``#2``, ``#3``, ..."""
    seen: dict[str, int] = {}
    keys = []
    for image in images:
        seen[image] = seen.get(image, 0) + 1
        keys.append(image if seen[image] == 1 else f"{image}#{seen[image]}")
    return keys
