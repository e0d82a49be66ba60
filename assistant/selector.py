"""Look twice: choose the most suspicious visual tokens, guided by the expert's anomaly map.

Two modes:

* ``pool`` (Anomaly-OV): each crop's projector-layer features are weighted by the map and pooled into a
  `grid`×`grid` set of queries; single-head attention (`query_proj`, `key_proj`) over the crop's tokens
  turns them into `grid²` tokens per crop. Their significance is the pooled map times the crop's mean.
* ``topk``: the `num_tokens` patches with the highest map values over all crops of the image.

The chosen tokens go through the same projector as the ordinary image tokens and are appended after
them; `assistant.processing` puts the marker text and the placeholders in front of them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SelectorConfig:
    mode: str = "pool"
    #: pool mode: queries per crop side (2 → 4 tokens per crop)
    grid: int = 2
    #: topk mode: tokens per image
    num_tokens: int = 8
    attention_dim: int = 512

    def __post_init__(self):
        if self.mode not in ("pool", "topk"):
            raise ValueError(f"selector mode must be 'pool' or 'topk', got {self.mode!r}")
        if self.grid < 1 or self.num_tokens < 1:
            raise ValueError("selector grid and num_tokens must be ≥ 1")

    @classmethod
    def from_dict(cls, values: dict) -> SelectorConfig:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown selector config keys: {sorted(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def tokens_per_image(self, num_crops: int) -> int:
        """Look-twice tokens for an image whose expert scored `num_crops` crops."""
        return num_crops * self.grid**2 if self.mode == "pool" else self.num_tokens


class LookTwiceSelector(nn.Module):
    def __init__(self, config: SelectorConfig, vision_hidden_size: int):
        super().__init__()
        self.config = config
        if config.mode == "pool":
            self.query_proj = nn.Linear(vision_hidden_size, config.attention_dim)
            self.key_proj = nn.Linear(vision_hidden_size, config.attention_dim)

    def forward(self, features: torch.Tensor, anomaly_map: torch.Tensor, crop_significance: torch.Tensor):
        """One image. features [N, P, H] (its N crops), anomaly_map [N, P], crop_significance [N].

        Returns tokens [T, H] and their significance weights [T].
        """
        if self.config.mode == "topk":
            k = min(self.config.num_tokens, anomaly_map.numel())
            values, index = anomaly_map.flatten().topk(k)
            tokens = features.flatten(0, 1)[index]
            if k < self.config.num_tokens:  # a tiny tower with fewer patches than tokens: repeat the best
                pad = self.config.num_tokens - k
                tokens = torch.cat([tokens, tokens[:1].expand(pad, -1)])
                values = torch.cat([values, values[:1].expand(pad)])
            return tokens, values
        n, p, h = features.shape
        side = math.isqrt(p)
        if side * side != p:
            raise ValueError(f"pool selector needs a square patch grid, got {p} patches")
        grid_map = anomaly_map.view(n, 1, side, side)
        grid_features = features.transpose(1, 2).reshape(n, h, side, side)
        pooled_map = F.adaptive_avg_pool2d(grid_map, self.config.grid)  # [N, 1, g, g]
        queries = F.adaptive_avg_pool2d(grid_features * grid_map, self.config.grid) / pooled_map.clamp_min(1e-12)
        queries = queries.flatten(2).transpose(1, 2)  # [N, g², H]
        q, k = self.query_proj(queries), self.key_proj(features)
        attention = (q @ k.transpose(1, 2) / math.sqrt(k.shape[-1])).softmax(dim=-1)
        tokens = attention @ features  # [N, g², H]
        weights = pooled_map.flatten(1) * crop_significance[:, None]  # [N, g²]
        return tokens.flatten(0, 1), weights.flatten()
