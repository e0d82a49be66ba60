"""The common record and problem types every reader returns.

A reader never drops an input entry silently: each entry it sees either becomes a `Record` or is
reported as a `Problem` that names the entry (``record`` is set). Problems about a whole file (a
missing CSV, bad JSON, a mask with no image) have ``record=None``. So for every `ReadResult`:
``n_seen == len(records) + len(dropped problems)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NORMAL, ANOMALOUS = 0, 1
#: the problem a reader reports for a defective image without its mask (training needs masks; `data_prep check
#: --labels-only` and the evaluation do not)
MISSING_MASK = "missing ground-truth mask"
_LABEL_WORDS = {"normal": NORMAL, "good": NORMAL, "anomaly": ANOMALOUS, "anomalous": ANOMALOUS, "abnormal": ANOMALOUS}


def parse_label(value) -> int | None:
    """1/0 from a bool, 0/1 or a word (normal/good, anomaly/anomalous/abnormal); None otherwise."""
    if isinstance(value, bool):
        return ANOMALOUS if value else NORMAL
    if isinstance(value, int) and value in (NORMAL, ANOMALOUS):
        return value
    if isinstance(value, str):
        return _LABEL_WORDS.get(value.strip().lower())
    return None


@dataclass(frozen=True)
class Record:
    """One image of a dataset.

    ``label`` is 1 for anomalous, 0 for normal and None when the source does not say; ``mask`` is the
    ground-truth mask path (None for normal images or when the format has none); ``extra`` holds
    format-specific fields (``conversations``, ``questions``, ``answers``, ...).
    """

    image: str
    label: int | None
    mask: str | None
    category: str
    split: str
    defect_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Problem:
    """Something wrong in a dataset: the file it concerns, why, and the entry dropped because of it."""

    file: str
    reason: str
    record: str | None = None

    def __str__(self) -> str:
        where = f"{self.file} [{self.record}]" if self.record is not None else self.file
        return f"{where}: {self.reason}"


@dataclass
class ReadResult:
    """What a reader returns: records kept, problems found, and how many entries it saw."""

    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    n_seen: int = 0

    def keep(self, record: Record) -> None:
        """Count an entry and keep it."""
        self.n_seen += 1
        self.records.append(record)

    def drop(self, file: str, reason: str, record: str) -> None:
        """Count an entry and report it instead of keeping it."""
        self.n_seen += 1
        self.problems.append(Problem(str(file), reason, record))

    def report(self, file: str, reason: str) -> None:
        """Report a problem with a whole file (no single entry is dropped)."""
        self.problems.append(Problem(str(file), reason))

    @property
    def dropped(self) -> list[Problem]:
        """The problems that each stand for one dropped entry."""
        return [p for p in self.problems if p.record is not None]

    def extend(self, other: ReadResult) -> None:
        """Merge another result into this one."""
        self.records.extend(other.records)
        self.problems.extend(other.problems)
        self.n_seen += other.n_seen

    def to_dataset(self):
        """The records as a `datasets.Dataset` with `Image` features (see `data_prep.hf.to_dataset`)."""
        from .hf import to_dataset

        return to_dataset(self.records)
