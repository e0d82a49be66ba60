"""Write a synthetic dataset in the MVTec AD layout, plus `metadata.jsonl`.

<out>/<family>/train/good/000.png
<out>/<family>/test/good/000.png
<out>/<family>/test/<defect_type>/000.png
<out>/<family>/ground_truth/<defect_type>/000_mask.png
<out>/metadata.jsonl        one line per image: paths, split, label, defect_type, bbox, area, location, size
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from assistant.localize import location_words, relative_size

from ..images import is_image_file
from ..parallel import ordered_map
from .defects import DEFECT_TYPES
from .families import FAMILIES
from .generate import Sample, make_sample, sample_rng

TEST_GOOD_FRACTION = 0.25
METADATA = "metadata.jsonl"


@dataclass
class SynthPlan:
    """What to generate: `n` images per family, `anomaly_ratio` of them anomalous test images."""

    n: int
    families: tuple[str, ...] = tuple(FAMILIES)
    size: int = 256
    seed: int = 0
    anomaly_ratio: float = 0.5
    defect_types: tuple[str, ...] = DEFECT_TYPES
    normals: list[Path] = field(default_factory=list)

    def roles(self) -> list[tuple[str, str | None]]:
        """(split, defect_type or None) for every index of one family."""
        n_anomalous = int(round(self.n * self.anomaly_ratio))
        n_normal = self.n - n_anomalous
        n_test_good = int(round(n_normal * TEST_GOOD_FRACTION)) if n_anomalous else 0
        if n_anomalous and n_normal >= 2:
            n_test_good = max(n_test_good, 1)
        roles: list[tuple[str, str | None]] = [("train", None)] * (n_normal - n_test_good) + [
            ("test", None)
        ] * n_test_good
        roles += [("test", self.defect_types[j % len(self.defect_types)]) for j in range(n_anomalous)]
        return roles


def list_normals(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive, sorted)."""
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def load_normal(path: Path, size: int) -> np.ndarray:
    """A normal image centre-cropped to a square and resized to `size`×`size` RGB uint8."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def _custom_source(plan: SynthPlan, family: str, index: int, split: str) -> np.ndarray:
    """The user's normal image for one index: test images draw from a held-out quarter of the normals."""
    order = sample_rng(plan.seed, family, 0, stream=1).permutation(len(plan.normals))
    n_test = min(max(1, len(order) // 4), len(order) - 1) if len(order) > 1 else 0
    pool = order[:n_test] if split == "test" and n_test else order[n_test:] if n_test else order
    return load_normal(plan.normals[pool[index % len(pool)]], plan.size)


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def _plan_files(plan: SynthPlan, family: str) -> list[tuple[int, str, str | None, str]]:
    """(index, split, defect type or None, file stem) of every image of `family`: stems count up per (split, folder)."""
    counters: dict[tuple[str, str], int] = {}
    files = []
    for index, (split, defect_type) in enumerate(plan.roles()):
        key = (split, defect_type or "good")
        counters[key] = counters.get(key, 0) + 1
        files.append((index, split, defect_type, f"{counters[key] - 1:03d}"))
    return files


def _write_one(
    out: Path, plan: SynthPlan, family: str, index: int, split: str, defect_type: str | None, name: str
) -> dict:
    """Generate and save one image (and its mask); returns its metadata line."""
    normal = _custom_source(plan, family, index, split) if plan.normals else None
    # foreign textures only from this run's families: a family left out of the run stays unseen
    donors = None if plan.normals else plan.families
    sample = make_sample(family, index, plan.seed, plan.size, defect_type, normal=normal, donors=donors)
    folder = defect_type or "good"
    image_path = out / family / split / folder / f"{name}.png"
    _save_png(sample.image, image_path)
    mask_path = None
    if sample.mask is not None:
        mask_path = out / family / "ground_truth" / folder / f"{name}_mask.png"
        _save_png(sample.mask.astype(np.uint8) * 255, mask_path)
    return _metadata(out, family, split, image_path, mask_path, sample)


def write_dataset(out: str | Path, plan: SynthPlan, overwrite: bool = False, workers: int = 1) -> dict[str, int]:
    """Write every family of `plan` under `out`; returns the number of images per family.

    Refuses a non-empty `out` unless `overwrite`, which replaces the family folders and metadata.
    `workers` > 1 generates in that many forked processes (where the platform can fork); every sample
    depends only on (seed, family, index), so the files and metadata are the same as with one.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty (use --overwrite to replace its synthetic data)")
    out.mkdir(parents=True, exist_ok=True)
    for family in plan.families:
        if (out / family).is_dir() and overwrite:
            shutil.rmtree(out / family)
    jobs = [(family, *entry) for family in plan.families for entry in _plan_files(plan, family)]
    with open(out / METADATA, "w", encoding="utf-8") as metadata:
        for line in ordered_map(lambda job: _write_one(out, plan, *job), jobs, workers):
            metadata.write(json.dumps(line) + "\n")
    return {family: len(plan.roles()) for family in plan.families}


def _metadata(out: Path, family: str, split: str, image: Path, mask: Path | None, sample: Sample) -> dict:
    line = {
        "image": image.relative_to(out).as_posix(),
        "mask": mask.relative_to(out).as_posix() if mask is not None else None,
        "family": family,
        "split": split,
        "label": 0 if sample.mask is None else 1,
        "defect_type": sample.defect_type,
        "bbox": sample.bbox,
        "area": sample.area,
    }
    if sample.mask is not None:
        line["area_fraction"] = round(sample.area / sample.mask.size, 6)
        line["location"] = location_words(sample.mask)
        line["size"] = relative_size(sample.mask)
    return line
