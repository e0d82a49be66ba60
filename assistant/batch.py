"""Batch inspection: score every image of a folder and write a browsable report.

    <out>/scores.csv      path, score, label, overlay, error, threshold, location, out_of_domain, map (one row per
                          image file, unreadable ones too)
    <out>/reports.jsonl   one JSON object per image file: its path and its report's evidence (`AnomalyReport.evidence`:
                          score, verdict, threshold, boxes, location, out_of_domain, warnings), overlay, map, error
    <out>/overlays/       the evidence overlay of each readable image (heatmap, contours, boxes, verdict)
    <out>/maps/           with `save_maps`: each readable image's anomaly map at the image's size, as a 16-bit
                          grey PNG (the map's value in [0, 1] times 65535)
    <out>/problems.txt    each unreadable file and why (empty when there is none)
    <out>/warnings.txt    each image's report warnings (a kind of surface new to the model, references that vary or
                          do not look like the part), a line each (empty when there is none)
    <out>/index.html      the overlays as a gallery, most anomalous first, then the unreadable files

An unreadable file is reported and skipped; it never stops the run. Uses the detection-only path
(`AnomalyAssistant.detect_batch`), so no text is generated.
"""

from __future__ import annotations

import csv
import html
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .imageio import ImageInputError, load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
OVERLAYS = "overlays"
MAPS = "maps"
#: a saved map's grey level for a map value of 1 (16-bit PNG)
MAP_SCALE = 65535


@dataclass
class Inspected:
    path: str  # relative to the inspected folder, with '/' separators
    evidence: dict | None = None  # the report's `AnomalyReport.evidence`; None for an unreadable file
    overlay: str | None = None  # relative to the output folder
    map: str | None = None  # the saved map, relative to the output folder
    error: str | None = None

    @property
    def score(self) -> float | None:
        return None if self.evidence is None else self.evidence["score"]

    @property
    def label(self) -> bool | None:
        return None if self.evidence is None else self.evidence["anomalous"]

    @property
    def warnings(self) -> list[str]:
        return [] if self.evidence is None else self.evidence["warnings"]


def find_images(folder: Path, recursive: bool = False, exclude: Path | None = None) -> list[Path]:
    """Files under `folder` with an image suffix, sorted; `exclude` (the output folder) is left out."""
    pattern = "**/*" if recursive else "*"
    exclude = exclude.resolve() if exclude is not None else None
    found = []
    for path in folder.glob(pattern):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if exclude is not None and exclude in path.resolve().parents:
            continue
        found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


#: the folder (batch) zero-shot mode scores groups of at most this many images, held in memory together with their
#: maps (the cost grows linearly past `assistant.patch_memory.MAX_PEERS` images)
BATCH_MODE_MAX_IMAGES = 256


def choose_zero_shot(requested: str, n_images: int, has_references: bool) -> tuple[str, str | None]:
    """The mode a folder is scored in, and a note for the user when it differs from what was asked."""
    from .inference import BATCH_MODE_MIN_IMAGES

    if has_references:
        return "single", None if requested in (
            "auto",
            "single",
        ) else "normal references given: each image is scored against them"
    if requested == "auto":
        return ("batch", None) if n_images >= BATCH_MODE_MIN_IMAGES else ("single", None)
    if requested == "batch" and n_images < 2:
        return "single", "one image: scored on its own (the batch mode needs at least 2)"
    return requested, None


def inspect_folder(
    assistant,
    folder: Path,
    out: Path,
    references=(),
    recursive: bool = False,
    log=None,
    batch_size: int = 8,
    zero_shot: str = "single",
    save_maps: bool = False,
) -> list[Inspected]:
    """Score each image of `folder` with `assistant` (normal `references` optional) and write the report to `out`.

    Images go through the tower and the expert `batch_size` at a time (`AnomalyAssistant.detect_batch`). `zero_shot`
    ("single", "batch" or "auto", `choose_zero_shot`) says how images are scored without references; in the batch
    mode the images are scored against each other in groups of at most `BATCH_MODE_MAX_IMAGES`. `save_maps` also
    writes each anomaly map (`save_map`).
    """
    folder, out = Path(folder), Path(out)
    log = log if log is not None else sys.stderr
    images = find_images(folder, recursive, exclude=out)
    (out / OVERLAYS).mkdir(parents=True, exist_ok=True)
    if save_maps:
        (out / MAPS).mkdir(exist_ok=True)
    references = list(references) or None
    mode, note = choose_zero_shot(zero_shot, len(images), bool(references))
    print(
        f"scoring {len(images)} images: "
        + (
            "against the normal references"
            if references
            else "each against the folder's other images"
            if mode == "batch"
            else "each on its own"
        )
        + (f" ({note})" if note else ""),
        file=log,
        flush=True,
    )
    groups = (
        _groups(images) if mode == "batch" else [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    )
    results, start = [], 1
    for group in groups:
        items, loaded = _load_group(folder, group, start)
        # the batch mode scores the whole group against itself; the single mode a chunk of batch_size
        group_mode = "batch" if mode == "batch" and len(loaded) >= 2 else "single"
        images_loaded = [image for *_, image in loaded]
        reports = (
            assistant.detect_batch(images_loaded, references=references, batch_size=batch_size, zero_shot=group_mode)
            if loaded
            else []
        )
        for (number, path, item, _), report in zip(loaded, reports):
            item.evidence = report.evidence()
            item.overlay = f"{OVERLAYS}/{number:05d}-{_safe_stem(path)}.png"
            assistant.visualize(report).save(out / item.overlay)
            if save_maps and report.anomaly_map is not None:
                item.map = f"{MAPS}/{number:05d}-{_safe_stem(path)}.png"
                save_map(report.anomaly_map, out / item.map)
        for number, item in enumerate(items, start=start):
            state = item.error if item.error else f"score {item.score:.3f}{' ANOMALOUS' if item.label else ''}"
            print(f"[{number}/{len(images)}] {item.path}: {state}", file=log, flush=True)
        results.extend(items)
        start += len(group)
    write_csv(results, out / "scores.csv")
    write_reports(results, out / "reports.jsonl")
    write_problems(results, out / "problems.txt")
    write_warnings(results, out / "warnings.txt")
    (out / "index.html").write_text(gallery(results, folder), encoding="utf-8")
    return results


def _groups(images: list[Path]) -> list[list[Path]]:
    """The batch mode's groups: as few as keep each under `BATCH_MODE_MAX_IMAGES`, of near-equal sizes."""
    count = max(1, -(-len(images) // BATCH_MODE_MAX_IMAGES))
    size = -(-len(images) // count)
    return [images[i : i + size] for i in range(0, len(images), size)]


def _load_group(folder: Path, group: list[Path], start: int):
    """(an `Inspected` per file, (number, path, item, image) per readable file): unreadable files are noted, not fatal."""
    items, loaded = [], []
    for number, path in enumerate(group, start=start):
        item = Inspected(path.relative_to(folder).as_posix())
        try:
            loaded.append((number, path, item, load_image(path, name=item.path)))
        except ImageInputError as error:
            item.error = error.reason
        items.append(item)
    return items, loaded


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:60] or "image"


def save_map(anomaly_map, path: Path) -> None:
    """An anomaly map [H, W] in [0, 1] as a 16-bit grey PNG: read it back with ``np.asarray(Image.open(path)) /
    MAP_SCALE`` (a step of 1/65535)."""
    import numpy as np
    from PIL import Image

    values = np.clip(np.asarray(anomaly_map, dtype=np.float64), 0.0, 1.0)
    Image.fromarray(np.rint(values * MAP_SCALE).astype(np.uint16)).save(path)


def write_csv(results: list[Inspected], path: Path) -> None:
    """One row per file; the columns after ``error`` came later, so readers by position keep working."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score", "label", "overlay", "error", "threshold", "location", "out_of_domain", "map"])
        for item in results:
            label = "" if item.label is None else ("anomalous" if item.label else "normal")
            score = "" if item.score is None else f"{item.score:.6f}"
            evidence = item.evidence or {}
            threshold = "" if evidence.get("threshold") is None else f"{evidence['threshold']:.6f}"
            domain = evidence.get("out_of_domain")
            writer.writerow(
                [
                    item.path,
                    score,
                    label,
                    item.overlay or "",
                    item.error or "",
                    threshold,
                    evidence.get("location") or "",
                    "" if domain is None else str(bool(domain)).lower(),
                    item.map or "",
                ]
            )


def write_reports(results: list[Inspected], path: Path) -> None:
    """One strict-JSON line per file: its path, its report's evidence, where its overlay and map went, or its error."""
    from .jsonutil import dumps

    with open(path, "w", encoding="utf-8") as handle:
        for item in results:
            record = {"path": item.path, **(item.evidence or {})}
            record.update(overlay=item.overlay, map=item.map, error=item.error)
            handle.write(dumps(record) + "\n")


def write_problems(results: list[Inspected], path: Path) -> None:
    path.write_text("".join(f"{item.path}: {item.error}\n" for item in results if item.error), encoding="utf-8")


def write_warnings(results: list[Inspected], path: Path) -> None:
    path.write_text("".join(f"{item.path}: {w}\n" for item in results for w in item.warnings), encoding="utf-8")


def gallery(results: list[Inspected], folder: Path) -> str:
    """The HTML page: readable images by descending score, then the unreadable files with reasons."""
    scored = sorted((r for r in results if r.error is None), key=lambda r: -r.score)
    failed = [r for r in results if r.error is not None]
    n_anomalous = sum(bool(r.label) for r in scored)
    cards = []
    for item in scored:
        verdict = "ANOMALOUS" if item.label else "normal"
        cards.append(
            f'<figure class="{verdict.lower()}"><a href="{quote(item.overlay)}"><img src="{quote(item.overlay)}" '
            f'alt="{html.escape(item.path)}" loading="lazy"></a><figcaption>{html.escape(item.path)}<br>'
            f"<b>{verdict}</b> {item.score:.3f}</figcaption></figure>"
        )
    problems = "".join(f"<li>{html.escape(r.path)}: {html.escape(r.error)}</li>" for r in failed)
    title = html.escape(f"Inspection of {folder}")
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{title}</title><style>"
        "body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:6px;width:260px;vertical-align:top}"
        "img{max-width:256px;max-height:256px}figure.anomalous figcaption b{color:#c00}figcaption{font-size:12px;word-break:break-all}"
        "</style></head><body>\n"
        f"<h1>{title}</h1>\n<p>{len(scored)} images scored, {n_anomalous} anomalous; {len(failed)} unreadable. "
        "Most anomalous first.</p>\n"
        + "\n".join(cards)
        + (f'\n<h2 id="problems">Unreadable files</h2>\n<ul>{problems}</ul>' if failed else "")
        + "\n</body></html>\n"
    )
