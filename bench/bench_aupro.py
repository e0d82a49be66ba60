"""AUPRO: eval.metrics.aupro (one partial sort + cumulative sums) vs a plain per-threshold loop.

    python bench/bench_aupro.py                  # 100 images of 256x256, 200 baseline thresholds
    python bench/bench_aupro.py --images 200 --thresholds 500

The baseline is the textbook implementation: ground-truth regions labelled once (8-connectivity),
then for each of N thresholds evenly spaced between the lowest and highest score, binarise every
map, count false-positive pixels and each region's overlap (vectorised over the stack with
``np.bincount``, so it is a fair baseline, not a Python loop over regions), and integrate the
resulting PRO curve up to FPR 0.3 with the same interpolation at the limit. Its value approximates
the exact one (a grid of thresholds), so the two are checked to agree within ``--tolerance``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.metrics import aupro  # noqa: E402


def synthetic_set(n_images: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Blob masks on ~60% of the images; maps = smooth noise + a blurred, noisy bump on the blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n_images, size, size), dtype=bool)
    for i in range(n_images):
        if rng.random() < 0.4:
            continue
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.uniform(4, size / 8, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    noise = ndimage.gaussian_filter(rng.normal(size=masks.shape), sigma=(0, 3, 3))
    signal = ndimage.gaussian_filter(masks.astype(float), sigma=(0, 4, 4)) * rng.uniform(0.02, 0.3, (n_images, 1, 1))
    maps = (noise + signal).astype(np.float32)
    return masks, maps


def plain_aupro(masks: np.ndarray, maps: np.ndarray, n_thresholds: int, fpr_limit: float = 0.3) -> float:
    structure = np.zeros((3, 3, 3), dtype=int)
    structure[1] = 1  # 8-connectivity inside each image, none across images
    region_ids, n_regions = ndimage.label(masks, structure=structure)
    region_size = np.bincount(region_ids.ravel(), minlength=n_regions + 1)[1:]
    normal = ~masks
    n_normal = normal.sum()
    fprs, pros = [0.0], [0.0]
    for t in np.linspace(maps.max(), maps.min(), n_thresholds):
        predicted = maps >= t
        fprs.append((predicted & normal).sum() / n_normal)
        hits = np.bincount(region_ids[predicted], minlength=n_regions + 1)[1:]
        pros.append(np.mean(hits / region_size))
    fprs, pros = np.array(fprs), np.array(pros)
    inside = fprs <= fpr_limit
    x, y = fprs[inside], pros[inside]
    after = np.flatnonzero(~inside)[0]
    x0, x1, y0, y1 = fprs[after - 1], fprs[after], pros[after - 1], pros[after]
    x = np.append(x, fpr_limit)
    y = np.append(y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return float(np.trapezoid(y, x)) / fpr_limit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--thresholds", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="best-of for the fast implementation")
    parser.add_argument("--tolerance", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    masks, maps = synthetic_set(args.images, args.size, args.seed)
    n_regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    print(f"{args.images} maps of {args.size}x{args.size}, {n_regions} ground-truth regions, {maps.size:,} pixels")

    fast_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fast = aupro(masks, maps)
        fast_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    plain = plain_aupro(masks, maps, args.thresholds)
    plain_time = time.perf_counter() - start

    fast_time = min(fast_times)
    print(f"eval.metrics.aupro (exact, every distinct score): {fast:.5f} in {fast_time:.3f} s (best of {args.repeats})")
    print(f"plain per-threshold ({args.thresholds} thresholds):       {plain:.5f} in {plain_time:.3f} s")
    print(f"speed-up: {plain_time / fast_time:.1f}x   |difference|: {abs(fast - plain):.2e}")
    if abs(fast - plain) > args.tolerance:
        raise SystemExit(f"values differ by more than {args.tolerance}")


if __name__ == "__main__":
    main()
