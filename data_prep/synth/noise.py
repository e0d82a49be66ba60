"""Vectorised noise: Perlin gradient noise, its fractal sum, and cheap smooth value noise."""

from __future__ import annotations

import numpy as np


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin(shape: tuple[int, int], cells: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise of `shape` with `cells` lattice cells per axis; values in about [-0.7, 0.7]."""
    height, width = shape
    cy, cx = max(cells[0], 1e-3), max(cells[1], 1e-3)
    ny, nx = int(np.ceil(cy)) + 1, int(np.ceil(cx)) + 1
    angles = rng.uniform(0, 2 * np.pi, size=ny * nx)
    gy, gx = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)
    y = (np.arange(height, dtype=np.float32) + 0.5) * (cy / height)
    x = (np.arange(width, dtype=np.float32) + 0.5) * (cx / width)
    iy, ix = y.astype(np.int32), x.astype(np.int32)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]
    index = (iy * nx)[:, None] + ix[None, :]
    n00 = gy[index] * fy + gx[index] * fx
    n01 = gy[index + 1] * fy + gx[index + 1] * (fx - 1)
    n10 = gy[index + nx] * (fy - 1) + gx[index + nx] * fx
    n11 = gy[index + nx + 1] * (fy - 1) + gx[index + nx + 1] * (fx - 1)
    uy, ux = _fade(fy), _fade(fx)
    top = n00 + ux * (n01 - n00)
    bottom = n10 + ux * (n11 - n10)
    return top + uy * (bottom - top)


def fractal(
    shape: tuple[int, int], cells: float, rng: np.random.Generator, octaves: int = 3, persistence: float = 0.5
) -> np.ndarray:
    """Sum of `octaves` Perlin layers, each with twice the cells and `persistence` times the amplitude."""
    total = np.zeros(shape, dtype=np.float32)
    amplitude, frequency = 1.0, float(cells)
    for _ in range(octaves):
        total += amplitude * perlin(shape, (frequency, frequency), rng)
        amplitude *= persistence
        frequency *= 2
    return total


def _interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights that resample n_in lattice values to n_out pixels with smoothstep easing."""
    position = (np.arange(n_out, dtype=np.float32) + 0.5) * ((n_in - 1) / n_out)
    low = np.minimum(position.astype(np.int64), n_in - 2)
    t = _fade(position - low)
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    weights[rows, low] = 1 - t
    weights[rows, low + 1] += t
    return weights


def value_noise(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [0, 1]: a random `cells` lattice eased up to `shape` (two small matrix products)."""
    grid = rng.random((max(int(cells[0]), 1) + 1, max(int(cells[1]), 1) + 1), dtype=np.float32)
    return _interpolation_matrix(shape[0], grid.shape[0]) @ grid @ _interpolation_matrix(shape[1], grid.shape[1]).T


def normalize(values: np.ndarray) -> np.ndarray:
    """Rescale to [0, 1] (a constant array becomes zeros)."""
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-12:
        return np.zeros_like(values)
    return (values - low) / (high - low)
