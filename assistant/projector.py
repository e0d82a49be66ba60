"""The projector from vision features to LLM embeddings, and LLaVA-OneVision's anyres packing.

`pack_image_features` lays the high-resolution tiles out on their grid, removes the padding the image
processor added, shrinks grids larger than `anyres_max_N`, appends the image-newline embedding after
every row and puts the base view first: the same token sequence `LlavaOnevisionModel` builds (the parity
test checks it token for token against transformers).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.image_processing_utils import select_best_resolution


class Projector(nn.Module):
    """Two-layer MLP with LLaVA's parameter names (`linear_1`, `linear_2`)."""

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden_size, text_hidden_size, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(text_hidden_size, text_hidden_size, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


def pool_crops(crop_features: torch.Tensor, side: int, stride: int) -> torch.Tensor:
    """Crops [N, side², D] → [N, ceil(side/stride)², D]: each crop's grid resized bilinearly (LLaVA-OneVision's video pooling)."""
    if stride == 1:
        return crop_features
    n, patches, dim = crop_features.shape
    if patches != side * side:
        raise ValueError(f"expected {side * side} patches per crop, got {patches}")
    grid = crop_features.view(n, side, side, dim).permute(0, 3, 1, 2)
    pooled = -(-side // stride)
    grid = nn.functional.interpolate(grid, size=(pooled, pooled), mode="bilinear")
    return grid.permute(0, 2, 3, 1).reshape(n, pooled * pooled, dim)


def grid_shape(image_size: tuple[int, int], grid_pinpoints: list, tile_size: int) -> tuple[int, int]:
    """Tiles (rows, columns) the image processor cuts an image of (height, width) into."""
    height, width = select_best_resolution([int(image_size[0]), int(image_size[1])], grid_pinpoints)
    return height // tile_size, width // tile_size


def num_crops(image_size: tuple[int, int], grid_pinpoints: list, tile_size: int) -> int:
    """Crops fed to the vision tower for one image: the base view plus the anyres tiles."""
    rows, cols = grid_shape(image_size, grid_pinpoints, tile_size)
    return rows * cols + 1


def unpadded_extent(image_size: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """Rows/columns (top, bottom, left, right) of a padded (height, width) grid that hold the image."""
    original_height, original_width = int(image_size[0]), int(image_size[1])
    if original_width / original_height > width / height:
        new_height = int(round(original_height * (width / original_width), 7))
        padding = (height - new_height) // 2
        return padding, height - padding, 0, width
    new_width = int(round(original_width * (height / original_height), 7))
    padding = (width - new_width) // 2
    return 0, height, padding, width - padding


def max_tiles(vision_aspect_ratio: str) -> int:
    if not vision_aspect_ratio.startswith("anyres_max_"):
        raise ValueError(f"unsupported vision_aspect_ratio {vision_aspect_ratio!r}; expected 'anyres_max_N'")
    return int(vision_aspect_ratio[len("anyres_max_") :])


def pack_image_features(
    crop_features: torch.Tensor,
    image_size: tuple[int, int],
    image_newline: torch.Tensor | None,
    grid_pinpoints: list,
    tile_size: int,
    patches_per_side: int,
    vision_aspect_ratio: str = "anyres_max_9",
) -> torch.Tensor:
    """One image's projected crop features [crops, P, D] → its token sequence [T, D]."""
    base = crop_features[0]
    if crop_features.shape[0] == 1:
        if image_newline is None:
            return base
        return torch.cat([base, image_newline[None].to(base)], dim=0)
    side = patches_per_side
    if side * side != base.shape[0]:
        raise ValueError(f"expected {side * side} patches per crop, got {base.shape[0]}")
    rows, cols = grid_shape(image_size, grid_pinpoints, tile_size)
    tiles = crop_features[1:].view(rows, cols, side, side, -1)
    tiles = tiles.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # [D, rows*side, cols*side]
    top, bottom, left, right = unpadded_extent(image_size, tiles.shape[1], tiles.shape[2])
    tiles = tiles[:, top:bottom, left:right]
    _, height, width = tiles.shape
    ratio = math.sqrt(height * width / (max_tiles(vision_aspect_ratio) * side**2))
    if ratio > 1.1:
        tiles = nn.functional.interpolate(tiles[None], [int(height // ratio), int(width // ratio)], mode="bilinear")[0]
    if image_newline is not None:
        newline = image_newline[:, None, None].expand(*tiles.shape[:-1], 1).to(tiles)
        tiles = torch.cat([tiles, newline], dim=-1)
    return torch.cat([base, tiles.flatten(1, 2).transpose(0, 1)], dim=0)


def num_image_tokens(
    image_size: tuple[int, int],
    grid_pinpoints: list,
    tile_size: int,
    patches_per_side: int,
    vision_aspect_ratio: str = "anyres_max_9",
    newline: bool = True,
) -> int:
    """Length of `pack_image_features`' output, computed from sizes alone (for the processor)."""
    base = patches_per_side**2
    rows, cols = grid_shape(image_size, grid_pinpoints, tile_size)
    top, bottom, left, right = unpadded_extent(image_size, rows * patches_per_side, cols * patches_per_side)
    height, width = bottom - top, right - left
    ratio = math.sqrt(height * width / (max_tiles(vision_aspect_ratio) * patches_per_side**2))
    if ratio > 1.1:
        height, width = int(height // ratio), int(width // ratio)
    return base + height * width + (height if newline else 0)
