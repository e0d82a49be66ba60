"""The anomaly expert: scores every patch of every crop against learned normal/abnormal prompts.

Anomaly-OV's look-twice idea, with parameter names that load its released expert weights:

* first look — the base view's projector-layer features are pooled over patches (`pooling_layer`) into
  one global vector; `class_predictor` turns it into an image-conditioned class embedding that is
  concatenated with each learned prompt (`positive_embedding` = normal, `negative_embedding` =
  anomalous) and adapted per level (`prompt_adaptors`);
* second look — each chosen vision layer's patch features are adapted (`patch_adaptors`) and compared
  with the two prompts by cosine similarity; a softmax over 100·cos gives the per-patch probability of
  the anomalous prompt, averaged over levels.

`final_predictor` turns the look-twice tokens chosen by `assistant.selector` into the image score.
Per-image input (`input_norm="image"`, the default model's; off in Anomaly-OV's weights): the patch adaptors read
each crop's features relative to its own median patch (`relative_to_image`), so the map marks what is unusual within
the image rather than what is unfamiliar about the whole surface.
Zero-shot self-reference (`self_weight` > 0; off in Anomaly-OV's weights): each patch's distance to the
most similar patches of the *same* crop outside its 3×3 neighbourhood (one feature level), turned into
a probability by a learned scale and bias and blended into the map. Normal texture repeats itself and a
defect does not, so this cue carries over to families the expert never saw (MuSc's mutual scoring,
within one image).
Few-shot (AnomalyGPT's in-context mode): when normal reference images are given, each patch's distance
to its nearest reference patch (raw multi-level features, cosine) is fused into the map and the score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SCORE_INPUTS = ("tokens", "contrast")
INPUT_NORMS = ("absolute", "image")


@dataclass
class ExpertConfig:
    """Sizes of the anomaly expert. `feature_layers` index the vision tower's `hidden_states`."""

    feature_layers: list[int] = field(default_factory=lambda: [7, 13, 19, 25])
    embedding_dim: int = 512
    class_dim: int = 512
    predictor_dim: int = 512
    logit_scale: float = 100.0
    #: share of the distance to other images' patches in the map: the references' (few-shot) or, in the folder
    #: mode, the folder's other images' (the rest is the learned map)
    reference_weight: float = 0.5
    #: which crops the expert scores: "base" (the whole image in one view: the detection path runs the
    #: tower on one crop) or "all" (every anyres tile too, as Anomaly-OV: finer maps on large images)
    views: str = "base"
    #: weight of the self-reference map in the expert's map (0: off, the Anomaly-OV expert)
    self_weight: float = 0.0
    #: the feature level (index into `feature_layers`) the self-reference compares, and how many nearest
    #: patches it averages
    self_level: int = -1
    self_k: int = 3
    #: what the score head reads: "tokens" (Anomaly-OV: the pooled look-twice tokens) or "contrast" (the
    #: pooled tokens minus the image's normal-looking context, `normal_context`: the head judges how the
    #: suspicious region differs from the rest of the same image rather than what the image is)
    score_input: str = "tokens"
    #: what the patch adaptors read: "absolute" (the tower's features as they are) or "image" (each crop's
    #: features minus its median patch, over the crop's typical deviation: `relative_to_image`)
    input_norm: str = "absolute"
    #: a fine head (`FineHead`): the EfficientNet-Lite tower's stages it reads at their own resolution ([] : none;
    #: [1, 2]: the stride-4 and stride-8 stages on the stride-4 grid), its width, and its share of the map and the
    #: score (a mean in logit terms with the learned ones)
    fine_stages: list[int] = field(default_factory=list)
    fine_width: int = 32
    fine_weight: float = 0.25

    def __post_init__(self):
        if self.views not in ("base", "all"):
            raise ValueError(f"expert views must be 'base' or 'all', got {self.views!r}")
        if not 0.0 <= self.self_weight <= 1.0:
            raise ValueError(f"expert self_weight must be in [0, 1], got {self.self_weight}")
        if not -len(self.feature_layers) <= self.self_level < len(self.feature_layers):
            raise ValueError(
                f"expert self_level {self.self_level} does not index the {len(self.feature_layers)} feature layers"
            )
        if self.self_k < 1:
            raise ValueError("expert self_k must be ≥ 1")
        if self.score_input not in SCORE_INPUTS:
            raise ValueError(f"expert score_input must be one of {SCORE_INPUTS}, got {self.score_input!r}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"expert input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")
        if not 0.0 <= self.fine_weight <= 1.0:
            raise ValueError(f"expert fine_weight must be in [0, 1], got {self.fine_weight}")
        if self.fine_width < 1:
            raise ValueError(f"expert fine_width must be ≥ 1, got {self.fine_width}")
        if self.fine_stages and self.views != "base":
            raise ValueError("a fine head reads each image's whole view: it needs expert views 'base'")

    @classmethod
    def from_dict(cls, values: dict) -> ExpertConfig:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown expert config keys: {sorted(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def evenly_spaced_layers(num_hidden_layers: int, count: int = 4) -> list[int]:
    """`count` hidden-state indices spread evenly over the tower's blocks, the last block included (26 → 6, 13, 20, 26)."""
    return sorted({max(1, round(num_hidden_layers * (i + 1) / count)) for i in range(count)})


class FineHead(nn.Module):
    """Segments defects on the tower's finer stages (stride 4): dilated 3×3 convolutions over features relative to
    each crop (`relative_to_image`), a receptive field of about 120 pixels. The expert's own map lies on the 16×16
    patch grid; thin lines on busy surfaces hardly move it (docs/default_model_history.md)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=4, dilation=4),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, fine_features: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] → the anomaly probability [N, H, W]."""
        n, c, h, w = fine_features.shape
        relative = relative_to_image(fine_features.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(n, c, h, w)
        return torch.sigmoid(self.net(relative.to(self.net[0].weight.dtype))).squeeze(1)


def blend_fine(values: torch.Tensor, fine: torch.Tensor, weight: float) -> torch.Tensor:
    """Probabilities `values` and the fine head's `fine` (same shape) averaged in logit terms, `weight` for `fine`."""
    values_logit, fine_logit = torch.logit(values.clamp(1e-6, 1 - 1e-6)), torch.logit(fine.clamp(1e-6, 1 - 1e-6))
    return torch.sigmoid((1 - weight) * values_logit + weight * fine_logit.to(values_logit.dtype))


class AnomalyExpert(nn.Module):
    def __init__(self, config: ExpertConfig, vision_hidden_size: int, num_patches: int, fine_channels: int = 0):
        super().__init__()
        self.config = config
        e, c, h = config.embedding_dim, config.class_dim, vision_hidden_size
        levels = len(config.feature_layers)
        self.num_patches = num_patches
        self.positive_embedding = nn.Parameter(torch.randn(1, e))
        self.negative_embedding = nn.Parameter(torch.randn(1, e))
        self.pooling_layer = nn.Sequential(nn.Linear(num_patches, 1))
        self.class_predictor = nn.Sequential(nn.Linear(h, c), nn.GELU(), nn.Linear(c, c))
        self.patch_adaptors = nn.ModuleList(nn.Linear(h, e) for _ in range(levels))
        self.prompt_adaptors = nn.ModuleList(nn.Linear(e + c, e) for _ in range(levels))
        self.final_predictor = nn.Sequential(
            nn.Linear(h, config.predictor_dim), nn.GELU(), nn.Linear(config.predictor_dim, 1)
        )
        if config.fine_stages:
            if fine_channels < 1:
                raise ValueError("an expert with fine_stages needs the channels of those stages (fine_channels)")
            self.fine_head = FineHead(fine_channels, config.fine_width)
        if config.self_weight > 0:
            # probability = sigmoid(scale · distance + bias); distances of a trained tower lie around 0.05–0.3
            self.self_calibration = nn.Parameter(torch.tensor([20.0, -3.0]))

    def set_self_reference(
        self, weight: float, scale: float, bias: float, level: int | None = None, k: int | None = None
    ) -> None:
        """Turn the self-reference on (or re-fit it) after training: blend weight, the fitted scale and bias."""
        values = {**self.config.to_dict(), "self_weight": float(weight)}
        if level is not None:
            values["self_level"] = int(level)
        if k is not None:
            values["self_k"] = int(k)
        self.config = ExpertConfig.from_dict(values)  # validates
        reference = self.positive_embedding
        self.self_calibration = nn.Parameter(
            torch.tensor([float(scale), float(bias)], dtype=reference.dtype, device=reference.device)
        )

    def prompts(self, base_features: torch.Tensor) -> list[torch.Tensor]:
        """First look. base_features [N, P, H] → per level, unit prompts [N, E, 2] (normal, anomalous)."""
        pooled = self.pooling_layer(base_features.transpose(1, 2)).squeeze(-1)  # [N, H]
        class_embedding = self.class_predictor(pooled)  # [N, C]
        n = base_features.shape[0]
        normal = torch.cat([self.positive_embedding.expand(n, -1), class_embedding], dim=-1)
        abnormal = torch.cat([self.negative_embedding.expand(n, -1), class_embedding], dim=-1)
        out = []
        for adaptor in self.prompt_adaptors:
            pair = torch.stack([F.normalize(adaptor(normal), dim=-1), F.normalize(adaptor(abnormal), dim=-1)], dim=-1)
            out.append(pair)
        return out

    def forward(
        self, multi_level: list[torch.Tensor], base_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Second look. multi_level: L tensors [N, P, H]; base_features [N, P, H] (each crop's image's base view).

        Returns the anomaly probability per patch [N, P] (averaged over levels, with the self-reference blended
        in when it is on), each crop's mean probability [N] (Anomaly-OV's patch significance) and the learned
        map alone [N, P]: the look-twice selector and the score head read the map they were trained on, so a
        self-reference added after training (`train.self_reference`) sharpens the map without shifting the
        score's inputs (held-out image AUROC of the default model 0.926 → 0.933 when it kept the score on the
        learned map).
        """
        if len(multi_level) != len(self.patch_adaptors):
            raise ValueError(f"expert expects {len(self.patch_adaptors)} feature levels, got {len(multi_level)}")
        prompts = self.prompts(base_features)
        maps = []
        for features, adaptor, prompt in zip(multi_level, self.patch_adaptors, prompts):
            if self.config.input_norm == "image":
                features = relative_to_image(features)
            patches = F.normalize(adaptor(features), dim=-1)  # [N, P, E]
            logits = self.config.logit_scale * torch.bmm(patches, prompt)  # [N, P, 2]
            maps.append(logits.softmax(dim=-1)[..., 1])
        learned = anomaly_map = torch.stack(maps).mean(0)
        if self.config.self_weight > 0:
            distance = self_distance(multi_level[self.config.self_level], self.config.self_k)
            scale, bias = self.self_calibration.to(distance.dtype)
            w = self.config.self_weight
            anomaly_map = (1 - w) * learned + w * torch.sigmoid(scale * distance + bias).to(learned.dtype)
        return anomaly_map, learned.mean(dim=-1), learned

    def score(
        self, tokens: torch.Tensor, weights: torch.Tensor, features: torch.Tensor, anomaly_map: torch.Tensor
    ) -> torch.Tensor:
        """Image probability from one image's look-twice tokens [T, H] and their significances [T].

        `features` [N, P, H] and `anomaly_map` [N, P] are the image's crops and the map the tokens were chosen
        by: with `score_input="contrast"` the head reads the pooled tokens minus their `normal_context`.
        """
        weights = weights.clamp_min(1e-12)
        pooled = (tokens * weights[:, None]).sum(0) / weights.sum()
        if self.config.score_input == "contrast":
            pooled = pooled - normal_context(features, anomaly_map).to(pooled.dtype)
        return torch.sigmoid(self.final_predictor(pooled)).squeeze(-1)


def relative_to_image(features: torch.Tensor) -> torch.Tensor:
    """Each crop's patch features [N, P, H] minus the crop's median patch (per channel), divided by the crop's
    root-mean-square deviation from it: what is unusual within the image, on one scale for every surface."""
    centred = features - features.median(dim=1, keepdim=True).values
    spread = centred.float().pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-6)
    return centred / spread.to(centred.dtype)


def normal_context(features: torch.Tensor, anomaly_map: torch.Tensor) -> torch.Tensor:
    """One image's normal-looking features: its crops' patch features [N, P, H] averaged with weights
    1 − anomaly_map [N, P] (the patches the expert finds least suspicious count most). Returns [H]."""
    weights = (1.0 - anomaly_map).clamp_min(0.0).to(features.dtype)
    return (features * weights[..., None]).sum((0, 1)) / weights.sum().clamp_min(1e-6)


def self_distance(features: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Per patch, (1 − mean cosine similarity of its k most similar patches outside its 3×3 neighbourhood) / 2.

    features [N, P, H] on a square patch grid; returns [N, P] in [0, 1].
    """
    n, p, _ = features.shape
    side = int(round(p**0.5))
    if side * side != p:
        raise ValueError(f"self-reference needs a square patch grid, got {p} patches")
    unit = F.normalize(features.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)  # [N, P, P]
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    cells = torch.stack([rows.flatten(), cols.flatten()], dim=-1).to(features.device)
    near = (cells[:, None] - cells[None]).abs().amax(-1) <= 1  # itself and its 8 neighbours
    similarity = similarity.masked_fill(near, -1.0)
    k = min(k, p - int(near.sum(-1).max()))
    if k < 1:  # a grid too small to have patches outside the neighbourhood
        return torch.zeros(n, p, device=features.device)
    return (1.0 - similarity.topk(k, dim=-1).values.mean(-1)) / 2.0


def reference_distance(multi_level: list[torch.Tensor], bank: list[torch.Tensor]) -> torch.Tensor:
    """Few-shot map: per patch, (1 − cosine similarity to the nearest reference patch) / 2, averaged over levels.

    multi_level: L tensors [N, P, H] of the query's crops; bank: L tensors [R, H] of the references'
    patches (unit-normalised). Returns [N, P] in [0, 1].
    """
    distances = []
    for features, reference in zip(multi_level, bank):
        query = F.normalize(features.float(), dim=-1)
        similarity = query @ reference.float().T  # [N, P, R]
        distances.append((1.0 - similarity.max(dim=-1).values) / 2.0)
    return torch.stack(distances).mean(0)
