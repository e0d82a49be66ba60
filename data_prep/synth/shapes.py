"""Small geometry helpers for defect shapes: centres, ellipses, rasterised paths."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def pick_center(
    rng: np.random.Generator, size: int, foreground: np.ndarray | None, margin: float = 0.08
) -> tuple[float, float]:
    """A (y, x) centre: on the foreground when one is given, else anywhere `margin`·size from the border."""
    if foreground is not None and foreground.any():
        flat = np.flatnonzero(foreground)
        y, x = divmod(int(flat[rng.integers(flat.size)]), foreground.shape[1])
        return float(y), float(x)
    low, high = margin * size, (1 - margin) * size
    return float(rng.uniform(low, high)), float(rng.uniform(low, high))


def ellipse(
    shape: tuple[int, int], center: tuple[float, float], radii: tuple[float, float], angle: float = 0.0
) -> np.ndarray:
    """Boolean mask of a rotated ellipse."""
    y = np.arange(shape[0], dtype=np.float32)[:, None] - center[0]
    x = np.arange(shape[1], dtype=np.float32)[None, :] - center[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = x * c + y * s, -x * s + y * c
    return (u / max(radii[1], 0.5)) ** 2 + (v / max(radii[0], 0.5)) ** 2 <= 1.0


def draw_path(shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray, width: int = 1) -> np.ndarray:
    """Boolean mask of a polyline through (ys, xs) vertices, `width` pixels thick (1, 2 or 3...)."""
    mask = np.zeros(shape, dtype=bool)
    segments = np.hypot(np.diff(ys), np.diff(xs))
    steps = np.maximum(np.ceil(segments * 2).astype(int), 1)
    fy = np.concatenate(
        [np.linspace(ys[i], ys[i + 1], steps[i], endpoint=False) for i in range(len(steps))] + [ys[-1:]]
    )
    fx = np.concatenate(
        [np.linspace(xs[i], xs[i + 1], steps[i], endpoint=False) for i in range(len(steps))] + [xs[-1:]]
    )
    iy, ix = np.rint(fy).astype(int), np.rint(fx).astype(int)
    inside = (iy >= 0) & (iy < shape[0]) & (ix >= 0) & (ix < shape[1])
    mask[iy[inside], ix[inside]] = True
    if width > 1 and mask.any():
        box = bounding_slices(mask, pad=width)
        mask[box] = ndimage.binary_dilation(mask[box], iterations=width - 1)
    return mask


def bounding_slices(mask: np.ndarray, pad: int = 0) -> tuple[slice, slice]:
    """Slices of the bounding box of `mask`'s True pixels, grown by `pad` and clipped to the array."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (
        slice(max(rows[0] - pad, 0), min(rows[-1] + 1 + pad, mask.shape[0])),
        slice(max(cols[0] - pad, 0), min(cols[-1] + 1 + pad, mask.shape[1])),
    )


def bbox(mask: np.ndarray) -> list[int] | None:
    """``[x0, y0, x1, y1]`` (exclusive x1/y1) of `mask`'s True pixels, None when empty."""
    if not mask.any():
        return None
    ys, xs = bounding_slices(mask)
    return [int(xs.start), int(ys.start), int(xs.stop), int(ys.stop)]
