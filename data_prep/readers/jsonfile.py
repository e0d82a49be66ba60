"""Loading a JSON file that must hold a list of objects, with problems reported, not raised."""

from __future__ import annotations

import json
from pathlib import Path

from ..records import ReadResult


def load_json_list(path: Path, result: ReadResult) -> list | None:
    """The top-level list of `path`, or None after reporting why it cannot be read."""
    if not path.is_file():
        result.report(str(path), "file not found")
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        result.report(str(path), f"bad JSON: {error.msg} at line {error.lineno} column {error.colno}")
        return None
    except (OSError, UnicodeDecodeError) as error:
        result.report(str(path), f"unreadable file ({error})")
        return None
    if not isinstance(data, list):
        result.report(str(path), f"expected a JSON list of records, got {type(data).__name__}")
        return None
    return data


def entry_id(entry, index: int) -> str:
    """How a problem names an entry: its ``id`` when it has one, else its position."""
    if isinstance(entry, dict) and isinstance(entry.get("id"), (str, int)):
        return f"#{index} id={entry['id']}"
    return f"#{index}"
