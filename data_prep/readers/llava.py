"""LLaVA conversation JSON (the Anomaly-Instruct-125k format; also `data_prep.instruct`'s output).

    [{"id": ..., "image": "relative/path.png",
      "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}]

Image paths are relative to `image_root` (default: the JSON file's folder). Extra machine-readable
fields written by `data_prep.instruct` (``label``, ``defect_type``, ``mask``, ``location``, ...) are
read back when present.
"""

from __future__ import annotations

from pathlib import Path

from ..images import pair_problems
from ..records import ReadResult, Record, parse_label
from .jsonfile import entry_id, load_json_list

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")
KNOWN_EXTRAS = ("location", "size", "id")


def conversation_problem(conversations) -> str | None:
    """Why a conversation list is malformed, or None."""
    if not isinstance(conversations, list) or not conversations:
        return "'conversations' must be a non-empty list"
    for turn, message in enumerate(conversations):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            return f"turn {turn} must be an object with a string 'value'"
        expected = ROLES[turn % 2]
        if message.get("from") != expected:
            return f"turn {turn} is from {message.get('from')!r}, expected {expected!r} (turns alternate human/gpt)"
        if not message["value"].strip():
            return f"turn {turn} is empty"
    if len(conversations) % 2:
        return "the last human turn has no answer"
    if IMAGE_TOKEN not in conversations[0]["value"]:
        return f"first human turn has no {IMAGE_TOKEN} token"
    if sum(m["value"].count(IMAGE_TOKEN) for m in conversations) != 1:
        return f"{IMAGE_TOKEN} must appear exactly once"
    return None


def read_llava(path: str | Path, image_root: str | Path | None = None, full_check: bool = False) -> ReadResult:
    """Every conversation as a record (``extra["conversations"]``); malformed entries are problems."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    result = ReadResult()
    entries = load_json_list(path, result)
    pending = []  # (image, mask, record id, entry), the files checked together below
    for index, entry in enumerate(entries or []):
        record_id = entry_id(entry, index)
        if not isinstance(entry, dict):
            result.drop(str(path), "entry is not an object", record_id)
            continue
        if not isinstance(entry.get("image"), str) or not entry["image"]:
            result.drop(str(path), "no 'image' path", record_id)
            continue
        reason = conversation_problem(entry.get("conversations"))
        if reason is not None:
            result.drop(str(path), reason, record_id)
            continue
        image = root / entry["image"]
        mask = root / entry["mask"] if isinstance(entry.get("mask"), str) and entry["mask"] else None
        pending.append((image, mask, record_id, entry))
    reasons = pair_problems([(image, mask) for image, mask, _, _ in pending], full_check)
    for (image, mask, record_id, entry), reason in zip(pending, reasons):
        if reason is not None:
            result.drop(str(image), reason, record_id)
            continue
        extra = {"conversations": entry["conversations"]}
        extra.update({key: entry[key] for key in KNOWN_EXTRAS if key in entry})
        result.keep(
            Record(
                image=str(image),
                label=parse_label(entry.get("label")),
                mask=str(mask) if mask is not None else None,
                category=str(entry.get("category") or entry.get("class") or ""),
                split=str(entry.get("split") or "train"),
                defect_type=entry.get("defect_type") or None,
                extra=extra,
            )
        )
    return result
