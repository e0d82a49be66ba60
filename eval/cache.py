"""The run folder: its manifest, the per-sample prediction cache (JSONL) and the stored anomaly maps.

    <out>/run.json                          what this folder holds (task, data, model or predictions file)
    <out>/predictions.jsonl                 one JSON object per inferred sample (unsharded run)
    <out>/predictions.shard-<i>-of-<n>.jsonl   the same, one file per shard
    <out>/maps/<sha1 of sample id>.npy      float16 anomaly map per sample, longest side <= map_size

A prediction line is appended and flushed as soon as its sample is done, after its map file is in
place, so a killed run loses at most the sample it was working on. On start the cache is read back,
a truncated last line (the kill came mid-write) is cut off, and samples already there are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

MANIFEST = "run.json"
MAPS = "maps"
PREDICTIONS_GLOB = "predictions*.jsonl"


class RunFolderError(ValueError):
    """The output folder cannot be used for this run (it belongs to another run or to the user)."""


# -- manifest -------------------------------------------------------------------------------------


def read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise RunFolderError(f"'{path}' is not a readable run manifest ({error})") from error


def claim(out: Path, manifest: dict) -> None:
    """Make `out` this run's folder, or refuse when it holds something else.

    A new or empty folder is claimed (``run.json`` written); a folder with a manifest is reused
    only when task, data and model (or predictions file) are the same; any other non-empty folder
    belongs to the user and is left alone.
    """
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out '{out}' is a file, not a folder")
    existing = read_manifest(out) if out.is_dir() else None
    if existing is None:
        if out.is_dir() and any(not _is_partial(p) for p in out.iterdir()):
            raise RunFolderError(f"--out '{out}' is not empty and holds no eval run; choose a new or empty folder")
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return
    for key in ("task", "data", "model", "predictions"):
        if existing.get(key) != manifest.get(key):
            raise RunFolderError(
                f"--out '{out}' holds another run ({key} {existing.get(key)!r}, not {manifest.get(key)!r}); choose another folder"
            )
    for key, default in (("shots", 0), ("shot_seed", None), ("templates", None), ("zero_shot", None)):
        if existing.get(key, default) != manifest.get(key, default):
            raise RunFolderError(
                f"--out '{out}' holds a run with {key} {existing.get(key, default)!r}, not {manifest.get(key, default)!r}; choose another folder"
            )
    if (
        existing.get("model_fingerprint")
        and manifest.get("model_fingerprint")
        and existing["model_fingerprint"] != manifest["model_fingerprint"]
    ):
        raise RunFolderError(
            f"the model at {manifest.get('model')!r} changed since --out '{out}' cached its predictions (weights or config differ); "
            "choose another folder"
        )


def model_fingerprint(folder: Path, chunk: int = 1 << 20) -> str:
    """A cheap identity for a model folder: config files in full, weight files by size and three 1 MiB samples.

    Training changes nearly every byte of a weight file, so samples from its start, middle and end tell a retrained
    or re-calibrated checkpoint from the one a cache was made with, without reading gigabytes; a copy keeps it.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        if path.suffix in (".safetensors", ".bin", ".pth", ".pt"):
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with open(path, "rb") as handle:
                for offset in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
                    handle.seek(offset)
                    digest.update(handle.read(chunk))
        elif path.name in (
            "config.json",
            "calibration.json",
            "generation_config.json",
            "preprocessor_config.json",
            "chat_template.jinja",
        ):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _is_partial(path: Path) -> bool:
    """Another process's manifest being written (torchrun ranks claim the folder at the same time)."""
    return path.name.startswith(f".{MANIFEST}.") and path.name.endswith(".partial")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# -- predictions ------------------------------------------------------------------------------------


def predictions_file(out: Path, shard: tuple[int, int]) -> Path:
    index, count = shard
    return out / ("predictions.jsonl" if count == 1 else f"predictions.shard-{index}-of-{count}.jsonl")


def _read_lines(path: Path, repair: bool) -> list[dict]:
    """The objects of one JSONL file; a truncated last line is dropped (and cut off when `repair`)."""
    data = path.read_bytes()
    records, offset, good_end = [], 0, 0
    for line in data.splitlines(keepends=True):
        complete = line.endswith(b"\n")
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        offset += len(line)
        if obj is None or not complete:
            if complete:  # a damaged line in the middle: skip it, keep going
                print(f"warning: {path}: skipping an unreadable line", file=sys.stderr)
                good_end = offset
            continue
        if isinstance(obj, dict) and "id" in obj:
            records.append(obj)
        good_end = offset
    if repair and good_end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(good_end)
    return records


def read_predictions(out: Path) -> dict[str, dict]:
    """Every cached prediction in `out`, from all shard files, by sample id (first one wins)."""
    merged: dict[str, dict] = {}
    for path in sorted(out.glob(PREDICTIONS_GLOB)):
        for record in _read_lines(path, repair=False):
            merged.setdefault(str(record["id"]), record)
    return merged


class PredictionWriter:
    """Appends one prediction per line to this shard's file, flushing and syncing each one."""

    def __init__(self, path: Path):
        self.path = path
        if path.exists():
            _read_lines(path, repair=True)  # cut a half-written last line before appending after it
        self._handle = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- anomaly maps -----------------------------------------------------------------------------------


def map_name(sample_id: str) -> str:
    return f"{MAPS}/{hashlib.sha1(sample_id.encode('utf-8')).hexdigest()}.npy"


def downsample(anomaly_map: np.ndarray, map_size: int) -> np.ndarray:
    """The map with its longest side at most `map_size` (bilinear), as float32."""
    from PIL import Image

    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    height, width = anomaly_map.shape
    scale = map_size / max(height, width)
    if scale >= 1:
        return anomaly_map
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(anomaly_map, mode="F").resize(size, Image.BILINEAR), dtype=np.float32)


def save_map(out: Path, sample_id: str, anomaly_map: np.ndarray, map_size: int) -> str:
    """Store the map (float16, downsampled) and return its path relative to `out`."""
    name = map_name(sample_id)
    path = out / name
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial.npy")
    np.save(tmp, downsample(anomaly_map, map_size).astype(np.float16))
    os.replace(tmp, path)
    return name


def load_map(out: Path, name: str) -> np.ndarray:
    return np.load(out / name).astype(np.float32)
