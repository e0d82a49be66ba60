"""Procedural normal images, in named families a training run can hold out one at a time.

Each family draws a fresh normal image from a seed: same kind of surface or object, varied phase,
orientation and colour. Object families also return the object's foreground mask, so defects land on
the object. `FAMILIES` maps each name to its `Family`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .noise import value_noise

FloatImage = np.ndarray  # float32 H×W×3 in [0, 255]


@dataclass(frozen=True)
class Family:
    """A named kind of normal image: ``make(size, rng) -> (image float32 H×W×3, foreground or None)``."""

    name: str
    noun: str
    kind: str  # "texture" or "object"
    make: Callable[[int, np.random.Generator], tuple[FloatImage, np.ndarray | None]]


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.arange(size, dtype=np.float32)
    return axis[:, None], axis[None, :]


def _colorize(shade: np.ndarray, dark: np.ndarray, light: np.ndarray) -> FloatImage:
    """Map a shade in [0, 1] linearly between two RGB colours."""
    shade = np.clip(shade, 0, 1, dtype=np.float32)
    out = np.empty((*shade.shape, 3), dtype=np.float32)
    for channel in range(3):
        np.multiply(shade, light[channel] - dark[channel], out=out[..., channel])
        out[..., channel] += dark[channel]
    return out


def _jitter(rng: np.random.Generator, rgb, spread: float = 18.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float32) + rng.uniform(-spread, spread, 3), 0, 255)


def _grain(rng: np.random.Generator, size: int, amount: float) -> np.ndarray:
    return rng.standard_normal((size, size), dtype=np.float32) * amount


def make_wood(size: int, rng: np.random.Generator):
    """Wood: growth rings bent by smooth noise, with fine grain along the fibre."""
    y, x = _coords(size)
    angle = rng.uniform(-0.3, 0.3) + (np.pi / 2 if rng.random() < 0.5 else 0.0)
    along = (x * np.cos(angle) + y * np.sin(angle)) / size
    across = (-x * np.sin(angle) + y * np.cos(angle)) / size
    warp = value_noise((size, size), (3, 3), rng)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (across * rng.uniform(6, 12) + warp * rng.uniform(1.5, 3.0) + 0.2 * along))
    fibre = ndimage.uniform_filter1d(_grain(rng, size, 1.0), size=15, axis=1 if abs(np.cos(angle)) > 0.5 else 0)
    shade = 0.25 + 0.55 * rings**1.5 + 0.12 * fibre
    return _colorize(shade, _jitter(rng, (95, 55, 25)), _jitter(rng, (205, 150, 95))), None


def make_fabric(size: int, rng: np.random.Generator):
    """Fabric: a plain over/under weave of warp and weft threads."""
    y, x = _coords(size)
    period = rng.uniform(6, 11)
    phase_y, phase_x = rng.uniform(0, period, 2)
    ty, tx = (y + phase_y) / period, (x + phase_x) / period
    warp = np.abs(np.sin(np.pi * tx)) ** 0.6  # vertical thread profile
    weft = np.abs(np.sin(np.pi * ty)) ** 0.6
    over = (np.floor(ty) + np.floor(tx)) % 2 == 0
    shade = np.where(over, 0.35 + 0.6 * warp * (0.75 + 0.25 * weft), 0.35 + 0.6 * weft * (0.75 + 0.25 * warp))
    shade = shade + _grain(rng, size, 0.04)
    return _colorize(shade, _jitter(rng, (40, 50, 80), 30), _jitter(rng, (150, 165, 210), 30)), None


def make_metal(size: int, rng: np.random.Generator):
    """Brushed metal: streaks along one direction over a soft illumination gradient."""
    y, x = _coords(size)
    axis = int(rng.integers(2))
    streaks = ndimage.uniform_filter1d(_grain(rng, size, 1.0), size=int(rng.integers(25, 60)), axis=axis)
    light = (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)) / size
    shade = 0.55 + 0.35 * streaks * 3.0 + 0.15 * light + _grain(rng, size, 0.015)
    base = rng.uniform(140, 190)
    tint = _jitter(rng, (base, base + 4, base + 10), 8)
    return _colorize(shade, tint * 0.45, np.minimum(tint * 1.25, 255)), None


def make_carpet(size: int, rng: np.random.Generator):
    """Carpet: dense fibre noise over blotchy pile, in one saturated colour."""
    fibres = ndimage.gaussian_filter(_grain(rng, size, 1.0), 0.8)
    pile = value_noise((size, size), (10, 10), rng)
    shade = 0.5 + 0.45 * fibres + 0.25 * (pile - 0.5)
    colour = rng.uniform(30, 200, 3)
    return _colorize(shade, colour * 0.35, np.minimum(colour * 1.3 + 20, 255)), None


def _background(size: int, rng: np.random.Generator) -> FloatImage:
    level = rng.uniform(15, 60)
    shade = value_noise((size, size), (2, 2), rng) * 12 + _grain(rng, size, 2.0) + level
    return np.repeat(shade[..., None], 3, axis=2)


def make_pill(size: int, rng: np.random.Generator):
    """Pill: an elongated capsule tablet with speckles, lit from one side, on a dark background."""
    y, x = _coords(size)
    cy, cx = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    half, radius = size * rng.uniform(0.18, 0.26), size * rng.uniform(0.15, 0.2)
    dx = np.clip(np.abs(x - cx) - half, 0, None)
    distance = np.sqrt(dx**2 + (y - cy) ** 2) / radius
    foreground = distance <= 1.0
    shading = 1.0 - 0.35 * distance**2 - 0.1 * (y - cy) / radius
    colour = _jitter(rng, (235, 225, 205), 12)
    pill = _colorize(shading, np.zeros(3, np.float32), colour)
    speckles = ndimage.binary_dilation(rng.random((size, size)) < 0.003) & foreground
    pill[speckles] -= np.array([20, 90, 90], np.float32)
    image = _background(size, rng)
    image[foreground] = pill[foreground]
    return image, foreground


def make_cap(size: int, rng: np.random.Generator):
    """Bottle cap seen from above: a disc with a knurled rim and a shaded inner face."""
    y, x = _coords(size)
    cy, cx = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    radius = size * rng.uniform(0.33, 0.42)
    r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / radius
    theta = np.arctan2(y - cy, x - cx)
    foreground = r <= 1.0
    ridges = 0.5 + 0.5 * np.sin(theta * int(rng.integers(40, 80)) + rng.uniform(0, 2 * np.pi))
    rim = (r > 0.82) & foreground
    face = 0.8 + 0.15 * np.cos(theta - rng.uniform(0, 2 * np.pi)) * r - 0.1 * r**2
    shade = np.where(rim, 0.55 + 0.35 * ridges, face)
    shade = np.where((r > 0.78) & (r <= 0.82), 0.4, shade)
    colour = _jitter(rng, rng.choice([(200, 40, 40), (40, 90, 190), (220, 220, 215), (40, 140, 60)]), 15)
    image = _background(size, rng)
    image[foreground] = np.minimum(colour * np.clip(shade[foreground], 0, 1.1)[:, None], 255)
    return image, foreground


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("wood", "wooden board", "texture", make_wood),
        Family("fabric", "woven fabric", "texture", make_fabric),
        Family("metal", "brushed metal plate", "texture", make_metal),
        Family("carpet", "carpet", "texture", make_carpet),
        Family("pill", "pill", "object", make_pill),
        Family("cap", "bottle cap", "object", make_cap),
    )
}


def all_families() -> dict:
    """Every family a run can name: the procedural ones (`FAMILIES`) and the photographed surfaces
    (`data_prep.synth.photos.PHOTOS`)."""
    from .photos import PHOTOS

    return {**FAMILIES, **PHOTOS}


def family(name: str):
    """The family called `name` (procedural or photographed); KeyError naming the choices otherwise."""
    known = all_families()
    if name not in known:
        raise KeyError(f"unknown family {name!r}; choose from {', '.join(known)}")
    return known[name]


def make_normal(name: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """A normal uint8 image of family `name` and its foreground mask (None for textures)."""
    image, foreground = family(name).make(size, rng)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), foreground
