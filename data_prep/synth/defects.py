"""Synthetic defects (DRAEM / AnomalyGPT style) and the contract that makes their masks exact.

Each defect function returns a candidate image plus two regions: ``core`` (the designed defect,
always in the mask) and ``support`` (where the candidate may differ softly, e.g. a stain's fringe or a
Poisson solve's halo). `finalize` then keeps the candidate only on
``mask = core | (support & changed by more than HALO_TOLERANCE)``, restores every other pixel to the
normal image, and nudges by one grey level any masked pixel that happens to be unchanged. So outside
the mask the output equals the normal image exactly, and every masked pixel differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .noise import fractal, normalize, perlin
from .poisson import poisson_blend
from .shapes import bbox, draw_path, ellipse, pick_center

HALO_TOLERANCE = 2  # grey levels a soft fringe may change and still be restored to normal
MIN_MEAN_CHANGE = 6.0  # a defect whose mean change is below this is redrawn (invisible otherwise)
MAX_ATTEMPTS = 12


@dataclass
class DefectContext:
    """What a defect may use besides the image: the object's foreground and a donor image source."""

    foreground: np.ndarray | None = None
    donor: Callable[[int], np.ndarray] | None = None  # side in pixels -> foreign uint8 image


@dataclass
class Defect:
    """A defective image with its exact mask, the defect type, bbox ``[x0, y0, x1, y1]`` and area."""

    image: np.ndarray
    mask: np.ndarray
    defect_type: str
    bbox: list[int] = field(default_factory=list)
    area: int = 0


def _donor(image: np.ndarray, rng: np.random.Generator, ctx: DefectContext, height: int, width: int) -> np.ndarray:
    """A (height, width, 3) float patch of foreign texture: the context's donor, or without one `noise_texture`."""
    if ctx.donor is not None:
        return ctx.donor(max(height, width))[:height, :width].astype(np.float32)
    return noise_texture(rng, height, width)


def noise_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A foreign texture that belongs to no family: fractal noise between two random colours, (height, width, 3)
    float. It stands in for DRAEM's texture set when a run has no other family to draw from. The image itself,
    rotated, had stood in before: on a busy surface such a patch is the same texture, so the model scored those
    defects at chance (a tissue-only set: foreign texture 0.43, Poisson patch 0.34 image AUROC against its normal
    images; docs/default_model_history.md)."""
    values = normalize(fractal((height, width), float(rng.uniform(2.0, 6.0)), rng, octaves=4))[..., None]
    first, second = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return (values * first + (1 - values) * second).astype(np.float32)


def foreign_texture(image, rng, ctx):
    """DRAEM: a Perlin-noise-shaped blob of a foreign texture, alpha-blended in."""
    size = image.shape[0]
    cy, cx = pick_center(rng, size, ctx.foreground)
    radius = size * rng.uniform(0.08, 0.2)
    y0, y1 = int(max(cy - radius, 0)), int(min(cy + radius + 1, size))
    x0, x1 = int(max(cx - radius, 0)), int(min(cx + radius + 1, size))
    cells = rng.uniform(1.5, 3.5)
    noise = perlin((y1 - y0, x1 - x0), (cells, cells), rng)
    yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - cy) / radius
    xx = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / radius
    blob = noise + 0.6 * (1 - np.sqrt(yy**2 + xx**2)) - 0.25 > 0
    region = np.zeros(image.shape[:2], dtype=bool)
    region[y0:y1, x0:x1] = blob
    beta = rng.uniform(0.55, 0.95)
    candidate = image.copy()
    window = candidate[y0:y1, x0:x1]
    window[blob] = (1 - beta) * window[blob] + beta * _donor(image, rng, ctx, y1 - y0, x1 - x0)[blob]
    return candidate, region, region


def cut_paste(image, rng, ctx):
    """CutPaste: a patch of the same image, flipped and re-lit, pasted somewhere else."""
    size = image.shape[0]
    hh, ww = (int(size * rng.uniform(0.07, 0.2)) + 2 for _ in range(2))
    sy, sx = pick_center(rng, size, ctx.foreground)
    sy, sx = int(np.clip(sy - hh / 2, 0, size - hh)), int(np.clip(sx - ww / 2, 0, size - ww))
    patch = image[sy : sy + hh, sx : sx + ww]
    if rng.random() < 0.5:
        patch = patch[::-1]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    patch = patch * rng.uniform(0.7, 1.3) + rng.uniform(-20, 20, 3).astype(np.float32)
    dy, dx = pick_center(rng, size, ctx.foreground)
    dy, dx = int(np.clip(dy - hh / 2, 0, size - hh)), int(np.clip(dx - ww / 2, 0, size - ww))
    candidate = image.copy()
    candidate[dy : dy + hh, dx : dx + ww] = patch
    region = np.zeros(image.shape[:2], dtype=bool)
    region[dy : dy + hh, dx : dx + ww] = True
    return candidate, region, region


def _walk(rng, start, angle, length, jitter, steps):
    """Vertices of a path from `start` heading `angle`, bending by `jitter` radians per step."""
    angles = angle + np.cumsum(rng.normal(0, jitter, steps))
    step = length / steps
    ys = start[0] + np.concatenate([[0.0], np.cumsum(np.sin(angles) * step)])
    xs = start[1] + np.concatenate([[0.0], np.cumsum(np.cos(angles) * step)])
    return ys, xs


def scratch(image, rng, ctx):
    """A thin, gently curved bright or dark line."""
    size = image.shape[0]
    center = pick_center(rng, size, ctx.foreground)
    angle, length = rng.uniform(0, 2 * np.pi), size * rng.uniform(0.15, 0.45)
    start = (center[0] - np.sin(angle) * length / 2, center[1] - np.cos(angle) * length / 2)
    ys, xs = _walk(rng, start, angle, length, 0.06, 12)
    region = draw_path(image.shape[:2], ys, xs, width=int(rng.integers(1, 3)))
    sign = 1.0 if rng.random() < 0.6 else -1.0
    candidate = image.copy()
    candidate[region] += sign * rng.uniform(50, 110) * rng.uniform(0.8, 1.0, (int(region.sum()), 1)).astype(np.float32)
    return candidate, region, region


def crack(image, rng, ctx):
    """A jagged dark fracture line with one or two branches."""
    size = image.shape[0]
    center = pick_center(rng, size, ctx.foreground)
    angle, length = rng.uniform(0, 2 * np.pi), size * rng.uniform(0.15, 0.4)
    start = (center[0] - np.sin(angle) * length / 2, center[1] - np.cos(angle) * length / 2)
    ys, xs = _walk(rng, start, angle, length, 0.45, int(rng.integers(10, 18)))
    region = draw_path(image.shape[:2], ys, xs, width=2)
    for _ in range(int(rng.integers(1, 3))):
        k = int(rng.integers(1, len(ys) - 1))
        by, bx = _walk(
            rng,
            (ys[k], xs[k]),
            angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2),
            length * rng.uniform(0.2, 0.4),
            0.5,
            6,
        )
        region |= draw_path(image.shape[:2], by, bx, width=1)
    candidate = image.copy()
    candidate[region] *= rng.uniform(0.1, 0.35)
    return candidate, region, region


STAIN_COLOURS = np.array([(95, 65, 35), (35, 32, 28), (150, 75, 35), (225, 225, 210), (70, 90, 40)], np.float32)


def stain(image, rng, ctx):
    """A soft-edged irregular blot of liquid, oil, rust or residue."""
    size = image.shape[0]
    cy, cx = pick_center(rng, size, ctx.foreground)
    radius = size * rng.uniform(0.05, 0.13)
    sigma = max(radius * 0.15, 1.0)
    reach = radius * 1.6 + 4 * sigma
    y0, y1 = int(max(cy - reach, 0)), int(min(cy + reach + 1, size))
    x0, x1 = int(max(cx - reach, 0)), int(min(cx + reach + 1, size))
    y = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    x = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    theta = np.arctan2(y, x)
    k = np.arange(2, 6)[:, None, None]
    wobble = (rng.uniform(0, 0.15, (4, 1, 1)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi, (4, 1, 1)))).sum(0)
    blob = np.sqrt(y**2 + x**2) <= radius * (1 + wobble)
    alpha = np.zeros(image.shape[:2], dtype=np.float32)
    alpha[y0:y1, x0:x1] = ndimage.gaussian_filter(blob.astype(np.float32), sigma=sigma, mode="constant")
    alpha *= rng.uniform(0.5, 0.85)
    colour = STAIN_COLOURS[rng.integers(len(STAIN_COLOURS))] + rng.uniform(-15, 15, 3).astype(np.float32)
    candidate = image.copy()
    window = (slice(y0, y1), slice(x0, x1))
    a = alpha[window][..., None]
    candidate[window] = image[window] * (1 - a) + colour * a
    return candidate, alpha > 0.25, alpha > 0


def hole(image, rng, ctx):
    """A hole or missing piece: a dark shaded pit with a lit and a shadowed rim."""
    size = image.shape[0]
    center = pick_center(rng, size, ctx.foreground)
    radii = (size * rng.uniform(0.025, 0.08), size * rng.uniform(0.025, 0.08))
    angle = rng.uniform(0, np.pi)
    pit = ellipse(image.shape[:2], center, radii, angle)
    outer = ellipse(image.shape[:2], center, (radii[0] + 2, radii[1] + 2), angle)
    rim = outer & ~pit
    y = np.arange(size, dtype=np.float32)[:, None] - center[0]
    x = np.arange(size, dtype=np.float32)[None, :] - center[1]
    light = rng.uniform(0, 2 * np.pi)
    lit = (x * np.cos(light) + y * np.sin(light)) > 0
    depth = rng.uniform(10, 35) + 20 * np.clip((x * np.cos(light) + y * np.sin(light)) / max(radii), -1, 1)
    candidate = image.copy()
    candidate[pit] = depth[pit][:, None] * np.array([1.0, 0.97, 0.95], np.float32)
    candidate[rim & lit] += 45
    candidate[rim & ~lit] *= 0.5
    return candidate, outer, outer


def poisson_patch(image, rng, ctx):
    """A natural patch from another image, seamlessly cloned (Poisson blending) into this one."""
    size = image.shape[0]
    hh, ww = (int(size * rng.uniform(0.12, 0.3)) + 6 for _ in range(2))
    cy, cx = pick_center(rng, size, ctx.foreground)
    y0, x0 = int(np.clip(cy - hh / 2, 0, size - hh)), int(np.clip(cx - ww / 2, 0, size - ww))
    donor = _donor(image, rng, ctx, hh, ww)
    shape = ellipse((hh, ww), ((hh - 1) / 2, (ww - 1) / 2), (hh / 2 - 3, ww / 2 - 3))
    target = image[y0 : y0 + hh, x0 : x0 + ww]
    blended = poisson_blend(target, donor, shape)
    candidate = image.copy()
    candidate[y0 : y0 + hh, x0 : x0 + ww] = blended
    core = np.zeros(image.shape[:2], dtype=bool)
    support = np.zeros(image.shape[:2], dtype=bool)
    core[y0 : y0 + hh, x0 : x0 + ww] = shape
    support[y0 : y0 + hh, x0 : x0 + ww] = True
    return candidate, core, support


def shading(image, rng, ctx):
    """A large soft-edged region, a tenth to a half of the image, darker or brighter than the rest: an inactive
    area, uneven coating or lighting, a discoloration. Every other type covers at most about a tenth of the image,
    and a model trained on them alone passed such regions on surfaces it never saw (docs/default_model_history.md)."""
    size = image.shape[0]
    cy, cx = pick_center(rng, size, ctx.foreground, margin=0.15)
    radius = size * rng.uniform(0.18, 0.36)
    sigma = size * 0.03
    y = np.arange(size, dtype=np.float32)[:, None] - cy
    x = np.arange(size, dtype=np.float32)[None, :] - cx
    theta = np.arctan2(y, x)
    k = np.arange(2, 5)[:, None, None]
    wobble = (rng.uniform(0, 0.12, (3, 1, 1)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi, (3, 1, 1)))).sum(0)
    region = np.sqrt(y**2 + x**2) <= radius * (1 + wobble)
    alpha = ndimage.gaussian_filter(region.astype(np.float32), sigma=sigma, mode="constant")
    if rng.random() < 0.6:  # darker: inactive or shadowed
        target = image * rng.uniform(0.3, 0.65)
    else:  # brighter: bleached or over-lit
        target = image + (rng.uniform(215, 250) - image) * rng.uniform(0.4, 0.7)
    candidate = image * (1 - alpha[..., None]) + target * alpha[..., None]
    return candidate, alpha > 0.5, alpha > 0.02


#: defect type → function(image float32, rng, ctx) -> (candidate, core, support)
DEFECTS = {
    "foreign_texture": foreign_texture,
    "cut_paste": cut_paste,
    "scratch": scratch,
    "crack": crack,
    "stain": stain,
    "hole": hole,
    "poisson_patch": poisson_patch,
    "shading": shading,
}
#: types drawn only where asked (`data.synth.defect_types`, `--defects`): the large region, which the default recipe
#: leaves out (docs/default_model_history.md)
ON_REQUEST = ("shading",)
#: the standard types: what a synthetic set and the default model's quality tables draw unless told otherwise
DEFECT_TYPES = tuple(name for name in DEFECTS if name not in ON_REQUEST)
ALL_DEFECT_TYPES = tuple(DEFECTS)
#: defect types that stay on the object when the image has a foreground (a misplaced patch may not)
_ON_OBJECT = {"foreign_texture", "scratch", "crack", "stain", "hole", "poisson_patch", "shading"}


def finalize(
    normal: np.ndarray, candidate: np.ndarray, core: np.ndarray, support: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) with the mask exactly the changed pixels (see the module docstring)."""
    rounded = np.clip(np.rint(candidate), 0, 255).astype(np.uint8)
    change = np.abs(rounded.astype(np.int16) - normal.astype(np.int16)).max(axis=-1)
    mask = core | (support & (change > HALO_TOLERANCE))
    out = np.where(mask[..., None], rounded, normal)
    same = mask & (change == 0)
    if same.any():
        channel = out[..., 1]
        channel[same] = np.where(channel[same] < 255, channel[same] + 1, channel[same] - 1)
    return out, mask


class InvisibleDefectError(RuntimeError):
    """No attempt drew a visible defect: the image is too flat or too dark to show this type."""


def apply_defect(
    normal: np.ndarray, defect_type: str, rng: np.random.Generator, ctx: DefectContext | None = None
) -> Defect:
    """Draw `defect_type` on the uint8 `normal` image; redrawn until it is visible and non-empty."""
    if defect_type not in DEFECTS:
        raise KeyError(f"unknown defect type {defect_type!r}; choose from {', '.join(ALL_DEFECT_TYPES)}")
    ctx = ctx or DefectContext()
    image = normal.astype(np.float32)
    min_area = max(8, normal.shape[0] * normal.shape[1] // 2000)
    for _ in range(MAX_ATTEMPTS):
        candidate, core, support = DEFECTS[defect_type](image, rng, ctx)
        if ctx.foreground is not None and defect_type in _ON_OBJECT:
            core, support = core & ctx.foreground, support & ctx.foreground
        out, mask = finalize(normal, candidate, core, support)
        area = int(mask.sum())
        if area < min_area:
            continue
        change = np.abs(out[mask].astype(np.float32) - normal[mask]).max(axis=-1).mean()
        if change >= MIN_MEAN_CHANGE:
            return Defect(out, mask, defect_type, bbox(mask), area)
    raise InvisibleDefectError(f"could not draw a visible {defect_type} in {MAX_ATTEMPTS} attempts")
