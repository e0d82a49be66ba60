"""From per-crop patch maps to one anomaly map at the input image's size.

The base view covers the whole image (squashed to a square); the anyres tiles cover it at higher
resolution with padding. The tiles' maps are laid out on their grid, the padding is cut away exactly
as the projector's packing does, and both views are resized to the input size and averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .projector import grid_shape, unpadded_extent


def image_anomaly_map(
    crop_maps: torch.Tensor, image_size: tuple[int, int], grid_pinpoints: list, tile_size: int
) -> torch.Tensor:
    """crop_maps [crops, P] (patch probabilities) → [height, width] float map for the (height, width) input."""
    height, width = int(image_size[0]), int(image_size[1])
    crops, patches = crop_maps.shape
    side = int(round(patches**0.5))
    maps = crop_maps.float().view(crops, side, side)
    views = [F.interpolate(maps[:1, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]]
    if crops > 1:
        rows, cols = grid_shape(image_size, grid_pinpoints, tile_size)
        tiles = maps[1:].view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(rows * side, cols * side)
        top, bottom, left, right = unpadded_extent(image_size, tiles.shape[0], tiles.shape[1])
        tiles = tiles[top:bottom, left:right]
        if tiles.numel() == 0:  # extreme aspect ratios leave no tile row (or column) after unpadding
            return views[0].clamp(0.0, 1.0)
        views.append(F.interpolate(tiles[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(views).mean(0).clamp(0.0, 1.0)
