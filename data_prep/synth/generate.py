"""One synthetic sample at a time, reproducible from (seed, family, index) and its donor families."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .defects import DefectContext, InvisibleDefectError, apply_defect
from .families import FAMILIES, all_families, make_normal


@dataclass
class Sample:
    """A generated image: the normal source, the output, and for an anomaly its mask, type, bbox, area."""

    family: str
    normal: np.ndarray
    image: np.ndarray
    mask: np.ndarray | None = None
    defect_type: str | None = None
    bbox: list[int] | None = None
    area: int = 0


def sample_rng(seed: int, family: str, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of one sample (`stream` 0) or of a per-family draw (other streams): independent of
    every other sample and of the family list."""
    return np.random.default_rng([seed, zlib.crc32(family.encode()), index, stream])


def donor_source(family: str | None, size: int, rng: np.random.Generator, donors: Sequence[str] | None = None):
    """A callable drawing a foreign texture: a normal image of another procedural family in `donors`
    (default: every family), or None when there is no other (defects then take a texture of no family,
    `defects.noise_texture`).

    A training run passes its own families, so a family it holds out never appears in it, not even as the
    foreign texture of a defect (which would teach the model that the held-out family *is* an anomaly).
    """
    known = all_families()
    others = [name for name in (FAMILIES if donors is None else donors) if name != family and name in known]
    if not others:
        return None

    def donor(side: int) -> np.ndarray:
        """A `side`×`side` foreign texture: at the scale it would have in a `size` image, cropped."""
        full = make_normal(others[int(rng.integers(len(others)))], max(min(size, 2 * side), side), rng)[0]
        return full[:side, :side]

    return donor


#: a generated normal on which a defect type cannot be drawn visibly is drawn again this many times
NORMAL_REDRAWS = 4


def make_sample(
    family: str,
    index: int,
    seed: int,
    size: int = 256,
    defect_type: str | None = None,
    normal: np.ndarray | None = None,
    foreground: np.ndarray | None = None,
    donors: Sequence[str] | None = None,
) -> Sample:
    """Sample `index` of `family`: a procedural normal (or the given `normal`), with `defect_type` applied when set;
    foreign textures come from the families in `donors` (default: all of them)."""
    rng = sample_rng(seed, family, index)
    redraws = 0 if normal is not None else NORMAL_REDRAWS
    if normal is None:
        normal, foreground = make_normal(family, size, rng)
    if defect_type is None:
        return Sample(family, normal, normal)
    for attempt in range(redraws + 1):
        ctx = DefectContext(foreground=foreground, donor=donor_source(family, normal.shape[0], rng, donors))
        try:
            defect = apply_defect(normal, defect_type, rng, ctx)
            break
        except InvisibleDefectError:
            if attempt == redraws:
                raise
            normal, foreground = make_normal(family, size, rng)  # e.g. a crop of a photo's empty sky
    return Sample(family, normal, defect.image, defect.mask, defect_type, defect.bbox, defect.area)
