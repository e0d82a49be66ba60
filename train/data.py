"""Training data: the records both stages read, and where each stage's datasets live.

Records come from `data_prep`'s readers with a full decode check, so a missing or broken image is
reported and counted once, up front, and never reaches a batch. This module reads and splits them;
`train.data_stage1` holds stage 1's masked-image dataset, augmentation and collator, and
`train.data_stage2` stage 2's tokenised conversations and collator. Their names are also reachable
from here (`from train.data import MaskedImages` keeps working).
"""

from __future__ import annotations

import importlib
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_prep.records import ReadResult, Record


@dataclass
class Skipped:
    """Inputs left out of training, with the reason for each (printed once and counted)."""

    problems: list
    seen: int

    def report(self, what: str, stream=None) -> None:
        stream = stream or sys.stderr
        for problem in self.problems:
            print(f"skipped: {problem}", file=stream)
        if self.problems:
            print(f"{what}: skipped {len(self.problems)} of {self.seen} entries (listed above)", file=stream)


def read_masked(root: str | Path, full_check: bool = True, masks_required: bool = True) -> tuple[list[Record], Skipped]:
    """Labelled images with masks from an MVTec-layout folder (synthetic output too) or a VisA root (defective images
    without a mask too, as `mask=None`, with `masks_required=False`).

    `full_check=False` opens only the headers (missing, unreadable or empty files, mask sizes); `decode_checked`
    then decodes the records that are used. Held-out splits are drawn from this list (`split_records`), so the split
    of a source does not depend on which of its images decode: a command that needs only the held-out part decodes
    only that part, and gets the part training held out."""
    from data_prep.readers import read_mvtec, read_visa

    root = Path(root)
    if (root / "split_csv").is_dir():
        result: ReadResult = read_visa(root, full_check=full_check, masks_required=masks_required)
    else:
        result = read_mvtec(root, full_check=full_check, masks_required=masks_required)
    records = [r for r in result.records if r.label is not None]
    problems = [str(p) for p in result.dropped] + [f"{r.image}: no label" for r in result.records if r.label is None]
    return records, Skipped(problems, result.n_seen)


def decode_checked(records: list[Record]) -> tuple[list[Record], list[str]]:
    """The records whose image and mask decode completely (in one process per core from `PARALLEL_CHECK_FROM`), and a
    problem line for each of the others."""
    from data_prep.images import pair_problems

    reasons = pair_problems([(r.image, r.mask) for r in records], full=True)
    kept = [r for r, reason in zip(records, reasons) if reason is None]
    return kept, [f"{r.image}: {reason}" for r, reason in zip(records, reasons) if reason is not None]


def read_held_out(root: str | Path, val_fraction: float, seed: int) -> tuple[list[Record], Skipped, int]:
    """The held-out split of a masked-image source as stage 1 draws it (`split_records` of the header-checked records,
    then only the ones that decode), for `train.self_reference`: only that split is decoded (the default model's 800
    of 32,000 images). Returns (held-out records, skipped, records found); the skipped images are reported, and an
    unreadable or empty source is a ValueError with a one-line message (`read_masked_or_fail`)."""
    records, skipped = read_masked_or_fail(root, full_check=False)
    _, held_out = split_records(records, val_fraction, seed)
    held_out, problems = decode_checked(held_out)
    Skipped(problems, len(held_out) + len(problems)).report(f"{root} (held-out part, decoded)")
    return held_out, Skipped(skipped.problems + problems, skipped.seen), len(records)


def read_masked_or_fail(
    root: str | Path, full_check: bool = True, masks_required: bool = True
) -> tuple[list[Record], Skipped]:
    """`read_masked` for the post-training commands (`train.fit_check`): the skipped images are reported, and an
    unreadable or empty source is a ValueError with a one-line message."""
    try:
        records, skipped = read_masked(root, full_check, masks_required)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read masked images from {root}: {error}") from None
    skipped.report(str(root))
    if not records:
        from data_prep.check import UnknownFormat, detect_format

        try:  # a folder of another layout gets the layout's message (and where sorted images go)
            detect_format(root)
        except UnknownFormat as error:
            raise ValueError(str(error)) from None
        what = "masked images" if masks_required else "labelled images"
        raise ValueError(
            f"no {what} in {root} (an MVTec-layout folder, the synthetic generator's output or a VisA root)"
        )
    return records, skipped


def read_conversations(path: str | Path) -> tuple[list[Record], Skipped]:
    """LLaVA-format conversations (`data_prep instruct` output); malformed entries and bad images are skipped."""
    from data_prep.readers import read_llava

    result = read_llava(path, full_check=True)
    return list(result.records), Skipped([str(p) for p in result.dropped], result.n_seen)


def split_records(records: list[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A held-out split stratified by label (every label present in both parts when it has ≥ 2 records)."""
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted({r.label for r in records}, key=lambda v: (v is None, v)):
        group = [r for r in records if r.label == label]
        rng.shuffle(group)
        n_val = int(round(len(group) * val_fraction))
        if len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        val += group[:n_val]
        train += group[n_val:]
    key = lambda r: r.image  # noqa: E731 - a stable order independent of the label grouping
    return sorted(train, key=key), sorted(val, key=key)


def load_rgb(path: str) -> Image.Image:
    from assistant.imageio import load_image

    return load_image(path)


def load_mask(path: str | None, size: tuple[int, int]) -> torch.Tensor:
    """Ground-truth mask as float [H, W] in {0, 1} (zeros for a normal image)."""
    if path is None:
        return torch.zeros(size)
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("L")) > 0).float()


#: the names each stage's module holds, reachable from here for the code that imports them from `train.data`
_STAGE_NAMES = {
    "data_stage1": (
        "mask_at",
        "mask_coverage",
        "MASK_TARGETS",
        "MaskedImages",
        "Augment",
        "grain_field",
        "enlarge_window",
        "hue_rotation",
        "collate_masked",
    ),
    "data_stage2": (
        "IGNORE_INDEX",
        "ROLE",
        "chat_messages",
        "level_for",
        "where_for",
        "encode_conversation",
        "PARALLEL_ENCODE_FROM",
        "Conversations",
        "ConversationCollator",
    ),
}


def __getattr__(name):  # imported on first use: each stage module imports this one
    for module, names in _STAGE_NAMES.items():
        if name in names:
            return getattr(importlib.import_module(f".{module}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
