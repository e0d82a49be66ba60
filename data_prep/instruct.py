"""LLaVA-format instruction conversations from any (image, mask, defect type) source.

The conversations teach the assistant's behaviour: the verdict first; then where (the shared
location vocabulary of `assistant.localize`) and what; and multi-turn follow-ups on the defect's
appearance, severity and likely cause. Normal images are answered as normal. Each record also keeps
machine-readable fields (`label`, `defect_type`, `location`, `size`, `mask`, `category`) for training
and evaluation. Everything is deterministic from the seed and the images' paths relative to `image_base`.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from assistant.localize import location_words, relative_size

from . import phrasebook as pb
from .records import ANOMALOUS, NORMAL, ReadResult, Record
from .synth.families import all_families

IMAGE_TOKEN = "<image>"
MAX_FOLLOW_UPS = 3


#: with `generic_nouns`, a synthetic family is named by its kind only
GENERIC_NOUNS = {"texture": "surface", "object": "part"}


def object_noun(category: str, generic: bool = False) -> str:
    """How answers name the object: a family's noun ("wooden board"), or with `generic` its kind ("surface",
    "part"), or the category with underscores as spaces."""
    known = all_families()
    if category in known:
        return GENERIC_NOUNS[known[category].kind] if generic else known[category].noun
    noun = category.replace("_", " ").strip()
    return noun or "object"


def load_mask(path: str | Path) -> np.ndarray:
    """A ground-truth mask as a boolean array (any non-zero pixel is defective; VisA uses ids)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 0


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _bare(noun_phrase: str) -> str:
    """ "a thin scratch" → "thin scratch" (for "the {size} {kind_noun}")."""
    for article in ("a ", "an "):
        if noun_phrase.startswith(article):
            return noun_phrase[len(article) :]
    return noun_phrase


def _severity(size: str, kind: pb.DefectKind) -> str:
    step = min(pb.SIZE_STEPS[size] + kind.gravity, len(pb.SEVERITIES) - 1)
    return pb.SEVERITIES[step]


def conversation(
    record: Record,
    rng: random.Random,
    mask: np.ndarray | None = None,
    generic_nouns: bool = False,
    generic_defects: bool = False,
) -> tuple[list[dict], dict]:
    """(LLaVA turns, machine-readable fields) for one record; anomalous records need their `mask`. With
    `generic_defects` every defect is described in the generic kind's words, whatever its type."""
    noun = object_noun(record.category, generic_nouns)
    normal_detail = rng.choice(pb.NORMAL_DETAILS)
    slots = {"noun": noun, "normal": normal_detail, "normal_lower": _lower_first(normal_detail)}
    fields: dict = {"label": record.label, "defect_type": record.defect_type, "location": None, "size": None}
    anomalous = record.label == ANOMALOUS
    if anomalous:
        kind = pb.KINDS["generic" if generic_defects else pb.defect_kind(record.defect_type)]
        where, size = location_words(mask), relative_size(mask)
        slots.update(
            what=rng.choice(kind.names),
            where=where,
            size=size,
            percent=f"{max(mask.mean() * 100, 0.1):.1f}%",
            look=rng.choice(kind.looks),
            kind_noun=_bare(rng.choice(kind.names)),
        )
        slots["What"] = _capitalize(slots["what"])
        fields.update(location=where, size=size, severity=_severity(size, kind))
    yes_no = rng.random() < 0.6
    question = rng.choice(pb.DEFECT_QUESTIONS if yes_no else pb.OPEN_QUESTIONS).format(**slots)
    if anomalous:
        first = rng.choice(pb.ANOMALY_YES + pb.ANOMALY_PLAIN if yes_no else pb.ANOMALY_PLAIN)
    else:
        first = rng.choice(pb.NORMAL_NO + pb.NORMAL_PLAIN if yes_no else pb.NORMAL_PLAIN)
    question = f"{IMAGE_TOKEN}\n{question}" if rng.random() < 0.7 else f"{question}\n{IMAGE_TOKEN}"
    turns = [("human", question), ("gpt", _capitalize(first.format(**slots)))]
    pool = [f for f in pb.FOLLOW_UPS if (f.anomalous if anomalous else f.normal)]
    for follow_up in rng.sample(pool, rng.randint(0, min(MAX_FOLLOW_UPS, len(pool)))):
        answer = _follow_up_answer(follow_up.name, slots, fields, rng, kind if anomalous else None)
        turns += [("human", rng.choice(follow_up.questions).format(**slots)), ("gpt", _capitalize(answer))]
    return [{"from": who, "value": text} for who, text in turns], fields


def _follow_up_answer(name: str, slots: dict, fields: dict, rng: random.Random, kind: pb.DefectKind | None) -> str:
    if name == "describe":
        return rng.choice(pb.DESCRIBE_ANSWERS).format(**slots)
    if name == "severity":
        return rng.choice(pb.SEVERITY_ANSWERS[fields["severity"]]).format(**slots)
    if name == "cause":
        return rng.choice(kind.causes)
    if name == "where":
        return rng.choice(pb.WHERE_ANSWERS).format(**slots)
    if name == "confirm":
        return rng.choice(pb.CONFIRM_ANSWERS).format(**slots)
    return rng.choice(pb.NORMAL_DESCRIBE_ANSWERS).format(**slots)


def _relative(path: str | None, base: Path) -> str | None:
    if path is None:
        return None
    try:
        return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return str(Path(path).resolve())


def build_instructions(
    source: ReadResult,
    image_base: str | Path,
    seed: int = 0,
    generic_nouns: bool = False,
    generic_defects: bool = False,
) -> tuple[list[dict], ReadResult]:
    """LLaVA records for every labelled record of `source`, image/mask paths relative to `image_base`; with
    `generic_nouns` the answers name a synthetic family by its kind (`object_noun`); with `generic_defects` they
    describe every defect in the generic kind's words.

    Returns (records, accounting): the accounting's problems are the source's plus one per record that
    could not be turned into a conversation (no label, unreadable mask, empty mask).
    """
    base = Path(image_base)
    accounting = ReadResult(problems=list(source.problems))
    out: list[dict] = []
    for index, record in enumerate(source.records):
        # seeded by the path as written (relative to image_base), so the same data gives the same conversations
        # wherever it lives
        image = _relative(record.image, base)
        rng = random.Random(f"{seed}:{index}:{image}")
        record_id = f"{record.category}/{record.split}/{record.defect_type or 'good'}/{Path(record.image).stem}"
        if record.label not in (NORMAL, ANOMALOUS):
            accounting.drop(record.image, "no normal/anomaly label", record_id)
            continue
        mask = None
        if record.label == ANOMALOUS:
            if record.mask is None:
                accounting.drop(record.image, "anomalous image without a mask", record_id)
                continue
            mask = load_mask(record.mask)
            if not mask.any():
                accounting.drop(record.mask, "empty mask for an anomalous image", record_id)
                continue
        turns, fields = conversation(record, rng, mask, generic_nouns, generic_defects)
        accounting.n_seen += 1
        out.append(
            {
                "id": record_id,
                "image": image,
                "conversations": turns,
                **fields,
                "mask": _relative(record.mask, base),
                "category": record.category,
                "split": record.split,
            }
        )
    accounting.n_seen += source.n_seen - len(source.records)
    return out, accounting


def write_instructions(records: list[dict], out: str | Path, overwrite: bool = False) -> None:
    """Write the records as one JSON list; refuses an existing file unless `overwrite`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (use --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(records, handle, indent=1, ensure_ascii=False)
    partial.replace(out)
