"""Nearest-neighbour patch scoring against other images: the few-shot memory bank and the folder (batch) mode.

* Few-shot (PatchCore): the normal references' patch features form a memory bank; a large bank is cut to a greedy
  coreset (each new member the patch farthest from those already kept, on a random projection), which keeps the
  nearest-neighbour distances of the whole bank within a small error at a fraction of the search.
* Folder zero-shot (MuSc): with no normal reference, each image's patches are scored against the other images of the
  same run. A patch's distance to image j is its distance to j's nearest patch; its score is the mean of its lowest
  `lowest` fraction of those distances over the other images. Defects are rare and differ from image to image, so a
  defective patch finds no close match in most images, while a normal one finds one in nearly every image; the low
  interval ignores the few images that share a defect or lack the normal part. Cost: N · M · P² · H multiply-adds for
  N images of P patches of H channels, each compared with M other images: all of them (M = N − 1) up to
  `MAX_PEERS` + 1 images, beyond that the same `MAX_PEERS` images of the folder, drawn at random (seeded, so a rerun
  scores alike). The cost then grows linearly with the folder instead of with its square, and memory stays
  O(P · M · P) per block of images. MuSc splits a large test set into subsets for the same reason; one shared
  sample keeps every image on the same comparison set.

Distances are (1 − cosine similarity) / 2, in [0, 1] like the expert's map, averaged over feature levels.

How far a normal patch sits from its nearest match depends on the surface (a grass photo's patches are far less alike
than a machined plate's), so a threshold on raw folder distances fitted on some surfaces flags most images of another.
`folder_relative` puts every folder on one scale: each distance relative to the folder's own typical patch distance
(the upper quartile of all its patches), which defects barely move since they cover a small share of the patches even
when many images are defective.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

#: the default share of the other images whose distances a patch's folder score averages (the lowest ones)
LOWEST = 0.2
#: the folder's typical patch distance: this quantile of all its patches' distances (`folder_relative`)
TYPICAL = 0.75
#: the folder mode's image score: this share of the expert's learned image score (absolute, on the zero-shot scale)
#: and the rest the fused map's maximum. Chosen on the training surfaces' images (docs/default_model_history.md):
#: the learned score ranks real surfaces' defects better than any map's maximum, and being absolute, it does not
#: move with the folder's other images
LEARNED_SCORE_SHARE = 0.25
#: a reference bank of up to this many patches (256 references of 256 patches) is searched whole: up to there an exact
#: search costs less than building a coreset, which takes one pass over the bank per row it keeps
MAX_BANK = 65536
#: a larger bank is cut to a greedy coreset of this many patches
CORESET_SIZE = 16384
#: the folder mode compares each image with at most this many other images (a fixed random sample of the folder),
#: so its cost grows linearly beyond `MAX_PEERS` + 1 images. On 200-image folders, 128 sampled peers ranked within
#: 0.001 image AUROC of all 199, 64 within 0.009 (docs/default_model_history.md)
MAX_PEERS = 128


def unit(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.float(), dim=-1)


def greedy_coreset(bank: torch.Tensor, size: int, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of `size` rows of `bank` [M, H] chosen greedily (k-center): each new row is the one farthest from
    those chosen, measured on a random Gaussian projection to `projection_dim` channels (PatchCore's approximation)."""
    m = bank.shape[0]
    if size >= m:
        return torch.arange(m)
    generator = torch.Generator().manual_seed(seed)
    x = bank.float()
    if x.shape[1] > projection_dim:
        x = x @ torch.randn(x.shape[1], projection_dim, generator=generator) / math.sqrt(projection_dim)
    norms = (x * x).sum(-1)
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = int(torch.randint(m, (1,), generator=generator))
    nearest = torch.full((m,), float("inf"))
    for i in range(size):
        if i:
            chosen[i] = torch.argmax(nearest)
        centre = x[chosen[i]]
        nearest = torch.minimum(nearest, norms - 2 * (x @ centre) + norms[chosen[i]])  # squared distances
    return chosen


def bank_keep(bank: list[torch.Tensor], max_size: int = MAX_BANK, size: int = CORESET_SIZE) -> torch.Tensor | None:
    """The rows of a multi-level reference bank (per level [M, H], rows aligned across levels) that `reduce_bank`
    keeps: None when it has at most `max_size` rows (kept whole), else `size` of them by `greedy_coreset` on the
    levels concatenated."""
    if bank[0].shape[0] <= max_size:
        return None
    return greedy_coreset(torch.cat([unit(level) for level in bank], dim=-1), min(size, max_size))


def reduce_bank(bank: list[torch.Tensor], max_size: int = MAX_BANK, size: int = CORESET_SIZE) -> list[torch.Tensor]:
    """A multi-level reference bank cut to `size` rows when it has more than `max_size` (`bank_keep`); unchanged
    otherwise. Building the coreset costs far more than one search of the whole bank (`size` passes over it), so a
    caller scoring many images against one set of references reduces its bank once
    (`AnomalyAssistantModel.reference_set`)."""
    keep = bank_keep(bank, max_size, size)
    return bank if keep is None else [level[keep] for level in bank]


def peer_sample(n: int, peers: int = MAX_PEERS, seed: int = 0) -> torch.Tensor:
    """Which images of a folder of `n` the folder mode compares every image with: all when `n` ≤ `peers` + 1,
    otherwise `peers` of them drawn at random with `seed` (sorted indices)."""
    if peers < 1:
        raise ValueError(f"peers must be at least 1, got {peers}")
    if n <= peers + 1:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:peers].sort().values


def mutual_distance(
    levels: list[torch.Tensor], lowest: float = LOWEST, block: int = 8, peers: int = MAX_PEERS
) -> torch.Tensor:
    """Folder zero-shot map: levels are L tensors [N, P, H] (one row per image); returns [N, P] in [0, 1].

    For each image, each patch's distance to every peer image's nearest patch (`peer_sample`: the other images, or
    at most `peers` of them in a large folder), averaged over its lowest `lowest` share of the peers (at least
    one), then over levels. Needs N ≥ 2.
    """
    n = levels[0].shape[0]
    if n < 2:
        raise ValueError("mutual scoring needs at least two images")
    if not 0.0 < lowest <= 1.0:
        raise ValueError(f"lowest must be in (0, 1], got {lowest}")
    chosen = peer_sample(n, peers)
    others = min(n - 1, len(chosen))  # an image among the peers has one fewer to compare with
    k = max(1, round(lowest * others))
    position = torch.full((n,), -1, dtype=torch.long)
    position[chosen] = torch.arange(len(chosen))  # each image's column among the peers (−1: not a peer)
    out = torch.zeros(n, levels[0].shape[1])
    for features in levels:
        x = unit(features)  # [N, P, H]
        keys = x[chosen]  # [M, P, H]
        for start in range(0, n, block):
            query = x[start : start + block]  # [b, P, H]
            # [b, M, P]: for each query patch, its best similarity within each peer image
            best = torch.einsum("bph,mqh->bmpq", query, keys).amax(-1)
            distance = (1.0 - best) / 2.0
            rows = torch.arange(query.shape[0])
            own = position[start : start + query.shape[0]]
            distance[rows[own >= 0], own[own >= 0]] = float("inf")  # never compare an image with itself
            out[start : start + query.shape[0]] += distance.topk(k, dim=1, largest=False).values.mean(1)
    return (out / len(levels)).clamp(0.0, 1.0)


def typical_patch(maps: torch.Tensor, typical: float = TYPICAL) -> float:
    """The typical patch of some maps: the `typical` quantile of all their values."""
    return float(torch.quantile(maps.float().flatten(), typical))


def relative_to(maps: torch.Tensor, q: float) -> torch.Tensor:
    """Maps relative to a typical patch value `q`: d / (d + q), in [0, 1), 0.5 at `q`, order kept."""
    return maps / (maps + max(float(q), 1e-6))


def folder_relative(maps: torch.Tensor, typical: float = TYPICAL) -> torch.Tensor:
    """A folder's mutual-distance maps [N, P] relative to its own typical patch (`typical_patch`, `relative_to`).
    Measured on held-out folders (docs/default_model_history.md): one threshold on raw distances flagged 80% of grass
    photos' normal images while passing 45% of procedural pills' defects; on this scale neither happens."""
    return relative_to(maps, typical_patch(maps, typical))


class ReferenceSet(NamedTuple):
    """What `AnomalyAssistantModel.reference_set` computes once per set of normal references: the leave-one-out
    `floor` for the verdict threshold (None with one reference), their `typical` (`ReferenceTypical`), and their
    memory `bank` (per expert level, unit patch rows, cut to a coreset of `CORESET_SIZE` above `MAX_BANK` rows)."""

    floor: float | None
    typical: ReferenceTypical | None
    bank: list[torch.Tensor] | None


class ReferenceTypical(NamedTuple):
    """How a set of normal references scores on its own (`AnomalyAssistantModel.reference_typical`): the median of
    their learned image scores (`Calibration.anchor`) and the typical patch of their learned maps (`typical_patch`),
    relative to which the few-shot mode reads an image's learned map, as the folder mode reads it relative to the
    folder's."""

    score: float
    patch: float

    @classmethod
    def of(cls, scores: torch.Tensor, maps: list[torch.Tensor]) -> ReferenceTypical:
        """From the references' learned scores [N] and learned crop maps."""
        return cls(float(scores.float().median()), typical_patch(torch.cat([m.flatten() for m in maps])))
