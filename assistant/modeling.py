"""The composed model: vision tower, anomaly expert, look-twice selector, projector and a causal LM.

Composed the way transformers composes `LlavaOnevisionModel` — parts held side by side, image features
scattered into the text embeddings at placeholder positions with the count checked — never by
subclassing or patching the LLM. Generation is the language model's own `generate` on the merged
embeddings, so decoding, KV cache and streaming are transformers'.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import AnomalyAssistantConfig, zoom_geometry
from .expert import AnomalyExpert, ExpertConfig, blend_fine, reference_distance
from .loss import fused_loss_applies, linear_cross_entropy
from .patch_memory import (
    LEARNED_SCORE_SHARE,
    LOWEST,
    MAX_PEERS,
    ReferenceSet,
    ReferenceTypical,
    bank_keep,
    folder_relative,
    mutual_distance,
    reduce_bank,
    relative_to,
)
from .processing import enlarge
from .projector import Projector, num_crops, pack_image_features, pool_crops
from .selector import LookTwiceSelector, SelectorConfig


def _cache_kwarg(module) -> str:
    """A transformers module's name for its KV cache argument (5.24 renamed `past_key_values` to `cache`)."""
    return _cache_kwarg_of(type(module))


@functools.cache  # once per class: it is asked on every forward
def _cache_kwarg_of(cls) -> str:
    parameters = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in parameters and "past_key_values" not in parameters else "past_key_values"


def output_cache(output):
    """The KV cache a transformers output carries (`cache` since 5.24, `past_key_values` before), without the BC warning."""
    fields = getattr(output, "__dataclass_fields__", {})
    return getattr(output, "cache" if "cache" in fields else "past_key_values", None)


#: the (quarter turns, mirrored) views `config.detection_views` averages, in order: the image, its mirror, the half
#: turn and its mirror (a vertical flip), then the quarter turns and their mirrors
DETECTION_VIEWS = [(0, False), (0, True), (2, False), (2, True), (1, False), (1, True), (3, False), (3, True)]


def bank_rows(level: torch.Tensor) -> torch.Tensor:
    """One expert level's crops [N, P, H] as few-shot memory rows: their unit patch features [N·P, H]
    (`reference_bank` joins and may subsample them; `reference_floor` keeps them per reference)."""
    return nn.functional.normalize(level.flatten(0, 1), dim=-1)


def view_of(crops: torch.Tensor, turns: int, mirrored: bool) -> torch.Tensor:
    """Crops [N, C, S, S] seen in one of `DETECTION_VIEWS`."""
    crops = torch.rot90(crops, turns, dims=(-2, -1)) if turns else crops
    return crops.flip(-1) if mirrored else crops


def map_back(maps: torch.Tensor, turns: int, mirrored: bool) -> torch.Tensor:
    """Per-patch maps [N, P] of a view (`view_of`) on the square patch grid of the crops as given."""
    side = int(round(maps.shape[-1] ** 0.5))
    grid = maps.reshape(*maps.shape[:-1], side, side)
    grid = grid.flip(-1) if mirrored else grid
    grid = torch.rot90(grid, -turns, dims=(-2, -1)) if turns else grid
    return grid.reshape(maps.shape)


#: the weight of the zoomed view (`config.detection_zoom`) in the learned score and map, in logit terms
ZOOM_WEIGHT = 0.5
#: crops read by the tower at a time without gradients (`_tower`), which bounds the memory of a large reference set
TOWER_CHUNK = 32


def zoom_tiles(
    crops: torch.Tensor, zoom: float, patches: int, source: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[int], int]:
    """Crops [N, C, S, S] enlarged about `zoom` times (`config.zoom_geometry`: the growth rounded to whole patches of
    S // `patches` pixels, so the tiles' patch grids line up) and cut into tiles of the crop's size at both ends of
    each axis (overlapping below 2x): (tiles [N·T, C, S, S], each tile's offset in patches along one axis, the enlarged
    grid's side in patches). Four tiles for any zoom in (1, 2]. `source` [N, C, side, side], when given, is the
    enlarged view already made (`AssistantProcessor.zoom_views`, from the images themselves), and its side sets the
    zoom (up to `config.detection_zoom_max` for a large image); otherwise the crops are enlarged `zoom` times
    (`enlarge`, bicubic)."""
    size = crops.shape[-1]
    stride = size // patches  # a tower whose patches do not fill the crop (SigLIP: 27 x 14 of 384) drops the rest
    extra, side = zoom_geometry(size, zoom, patches)
    if source is None:
        big = enlarge(crops, side).float()
    else:
        side = int(source.shape[-1])
        extra = (side - size) // stride
        if (
            tuple(source.shape) != (crops.shape[0], crops.shape[1], side, side)
            or side != size + extra * stride
            or not 0 <= extra <= size // stride
        ):
            raise ValueError(
                f"the zoom's views are {tuple(source.shape)}, expected {tuple(crops.shape[:2])} views whose side is "
                f"{size} plus up to {size // stride} whole patches of {stride} pixels"
            )
        big = source.to(crops.device).float()
    starts = sorted({0, extra * stride})
    tiles = [big[..., y : y + size, x : x + size] for y in starts for x in starts]
    return torch.stack(tiles, 1).flatten(0, 1).to(crops.dtype), sorted({0, extra}), patches + extra


def stitch_tiles(maps: torch.Tensor, offsets: list[int], side: int, patches: int) -> torch.Tensor:
    """Tile maps [N·T, P] from `zoom_tiles` laid back on the enlarged grid (the maximum where tiles overlap) and
    max-pooled to the crop's grid [N, P], so a defect a tile sees stays as high on the crop's map."""
    tiles = maps.float().reshape(-1, len(offsets) ** 2, patches, patches)
    canvas = torch.zeros(tiles.shape[0], side, side, device=maps.device)
    corners = [(y, x) for y in offsets for x in offsets]
    for t, (y, x) in enumerate(corners):
        window = canvas[:, y : y + patches, x : x + patches]
        canvas[:, y : y + patches, x : x + patches] = torch.maximum(window, tiles[:, t])
    return nn.functional.adaptive_max_pool2d(canvas[:, None], patches).flatten(1).to(maps.dtype)


@dataclass
class VisualEncoding:
    """Everything the vision side computed for a batch of images, reusable across chat turns."""

    image_embeds: list[torch.Tensor]  # per image [T_i, D]: ordinary image tokens (LLaVA-OV layout)
    image_sizes: list[tuple[int, int]]  # (height, width) of each input image
    anomaly_embeds: list[torch.Tensor] | None = None  # per image [M_i, D]: look-twice tokens
    crop_maps: list[torch.Tensor] | None = None  # per image [crops, P]: anomaly probability per patch
    scores: torch.Tensor | None = None  # [B] image anomaly probability
    domain_distances: torch.Tensor | None = None  # [B] distance to the training images (`domain_distance`), or None
    extras: dict = field(default_factory=dict)

    def placeholder_embeds(self, look_twice: bool) -> torch.Tensor:
        parts = []
        for i, embeds in enumerate(self.image_embeds):
            parts.append(embeds)
            if look_twice:
                parts.append(self.anomaly_embeds[i])
        return torch.cat(parts, dim=0)


class AnomalyAssistantModel(PreTrainedModel):
    config_class = AnomalyAssistantConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _skip_keys_device_placement = ["past_key_values"]
    _no_split_modules = []
    #: with labels and gradients on, compute the loss chunk by chunk on supervised positions only (`assistant.loss`;
    #: `logits` is then None); set False for the stock `lm_head` + cross-entropy path
    chunked_loss: bool = True

    def __init__(self, config: AnomalyAssistantConfig):
        super().__init__(config)
        vision, text = config.vision_config, config.text_config
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        self.vision_tower = AutoModel.from_config(vision)
        self.multi_modal_projector = Projector(
            vision.hidden_size * layers, text.hidden_size, config.projector_hidden_act, config.multimodal_projector_bias
        )
        self.image_newline = nn.Parameter(torch.randn(text.hidden_size) / text.hidden_size**0.5)
        self.language_model = AutoModelForCausalLM.from_config(text)
        if config.has_expert:
            if layers != 1:
                raise ValueError("the anomaly expert needs a single vision_feature_layer")
            expert_config = ExpertConfig.from_dict(config.expert_config)
            self.expert = AnomalyExpert(
                expert_config,
                vision.hidden_size,
                config.patches_per_side**2,
                expert_fine_channels(vision, expert_config),
            )
            self.selector = LookTwiceSelector(
                SelectorConfig.from_dict(config.selector_config or {}), vision.hidden_size
            )
        else:
            self.expert = None
            self.selector = None
        #: unit image embeddings of training images (`domain_embedding`), read from `domain_bank.safetensors` by
        #: `assistant.checkpoint.load`; None: no out-of-domain check
        self.domain_bank: torch.Tensor | None = None
        self.post_init()

    def set_self_reference(
        self, weight: float, scale: float, bias: float, level: int | None = None, k: int | None = None
    ):
        """Turn the expert's self-reference map on (`AnomalyExpert.set_self_reference`); the config that a checkpoint
        saves (`config.expert_config`) is the expert's own, so the two never disagree."""
        self.expert.set_self_reference(weight, scale, bias, level, k)
        self.config.expert_config = self.expert.config.to_dict()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, plus the domain bank (`assistant.domain`) when the model has one."""
        from .domain import save_bank

        super().save_pretrained(save_directory, *args, **kwargs)
        save_bank(self, save_directory)

    # -- embeddings -------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self:
            nn.init.normal_(self.image_newline, std=self.config.text_config.hidden_size**-0.5)
        if isinstance(module, AnomalyExpert):
            nn.init.normal_(module.positive_embedding)
            nn.init.normal_(module.negative_embedding)

    @property
    def selector_config(self) -> SelectorConfig | None:
        return self.selector.config if self.selector is not None else None

    # -- vision side ------------------------------------------------------------------------------
    def _select(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, 1:] if self.config.vision_feature_select_strategy == "default" else hidden

    def crops_per_image(self, image_sizes) -> list[int]:
        tile = self.config.vision_config.image_size
        return [num_crops(tuple(size), self.config.image_grid_pinpoints, tile) for size in image_sizes]

    def vision_features(
        self, pixel_values: torch.Tensor, image_sizes, with_fine: bool = False, distinct: bool = False
    ) -> tuple:
        """Run the tower once. Returns the projector-layer features [N, P, H], the expert's levels and crops per image;
        `with_fine`: also the fine head's maps [N, h, w] (None without a fine head). `distinct`: only the crops that
        differ (`_distinct_crops`), with the counts of those per image: a tile that repeats its image's base view adds
        rows a reference bank's nearest-neighbour search would find twice."""
        counts = self.crops_per_image(image_sizes)
        crops = self._flat_crops(pixel_values, counts)
        read, index = self._distinct_crops(crops, counts)
        if read is not None and distinct:
            projector_input, levels, fine = self._tower(crops[read], with_fine)
            owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(read.device)
            counts = torch.bincount(owner[read], minlength=len(counts)).tolist()
        elif read is None:
            projector_input, levels, fine = self._tower(crops, with_fine)
        else:  # the same features as reading every crop, and the same gradients (indexing sums them back)
            projector_input, levels, fine = self._tower(crops[read], with_fine)
            projector_input, levels = projector_input[index], [level[index] for level in levels]
            fine = fine[index] if fine is not None else None
        return (projector_input, levels, counts, fine) if with_fine else (projector_input, levels, counts)

    @staticmethod
    def _distinct_crops(crops: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The crops the tower has to read, and where each crop's features come from.

        An image that fits one tile (a square one, when the grid allows a single tile) gets a tile that
        repeats its base view pixel for pixel; the tower reads it once (for the embedded default model's
        128 px images: half the tower's work in stage 2 and at inference). Only images of one tile are
        compared (a grid of several tiles never repeats the whole image), so larger images pay nothing.
        Returns (None, None) when every crop is distinct, and under torch.compile (data-dependent shapes
        would break the graph).
        """
        if 2 not in counts or torch.compiler.is_compiling():
            return None, None
        read, index, start = [], [], 0
        for n in counts:
            repeated = n == 2 and torch.equal(crops[start], crops[start + 1])
            index.extend(range(len(read), len(read) + n - repeated))
            if repeated:
                index.append(len(read))
            read.extend(range(start, start + n - repeated))
            start += n
        if len(read) == len(crops):
            return None, None
        return torch.tensor(read, device=crops.device), torch.tensor(index, device=crops.device)

    @staticmethod
    def _flat_crops(pixel_values: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Padded [B, max_crops, 3, S, S] or flat [N, 3, S, S] crops → flat crops, checked against `counts`."""
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must have 4 or 5 dimensions, got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] != sum(counts):
            raise ValueError(f"got {pixel_values.shape[0]} crops for images that need {sum(counts)}")
        return pixel_values

    def _tower(
        self, pixel_values: torch.Tensor, with_fine: bool = True
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """Crops [N, 3, S, S] → projector-layer features [N, P, H], the expert's feature levels and the fine head's
        maps [N, h, w] (None without a fine head, or without `with_fine`: a reference bank has no use for them).

        Without gradients, at most `TOWER_CHUNK` crops go through the tower at a time, so a large set of references
        (or the zoom's four tiles of each) holds one chunk's activations, not all of them."""
        if not torch.is_grad_enabled() and pixel_values.shape[0] > TOWER_CHUNK:
            parts = [self._tower(chunk, with_fine) for chunk in pixel_values.split(TOWER_CHUNK)]
            fine = torch.cat([part[2] for part in parts]) if parts[0][2] is not None else None
            levels = [torch.cat(level) for level in zip(*(part[1] for part in parts))]
            return torch.cat([part[0] for part in parts]), levels, fine
        pixel_values = pixel_values.to(device=self.vision_tower.device, dtype=self.vision_tower.dtype)
        fine_stages = self.expert.config.fine_stages if self.expert is not None and with_fine else []
        extra = {"fine_stages": fine_stages} if fine_stages else {}
        output = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True, **extra)
        hidden = output.hidden_states
        fine = self.expert.fine_head(output.fine_features) if fine_stages else None
        layer = self.config.vision_feature_layer
        if isinstance(layer, int):
            projector_input = self._select(hidden[layer])
        else:
            projector_input = self._select(torch.cat([hidden[i] for i in layer], dim=-1))
        levels = [self._select(hidden[i]) for i in self.expert.config.feature_layers] if self.expert is not None else []
        return projector_input, levels, fine

    def encode_images(
        self,
        pixel_values: torch.Tensor,
        image_sizes,
        reference_pixel_values: torch.Tensor | None = None,
        reference_image_sizes=None,
        reference_typical=None,
        reference_bank=None,
        zoom_pixel_values=None,
    ) -> VisualEncoding:
        """Image tokens for the LLM, and — with an expert — anomaly maps, scores and look-twice tokens.

        `reference_*` are normal images of the same object (the few-shot mode); they apply to every image
        in the batch (`reference_typical` and `reference_bank`: theirs, as `reference_set` gives them, computed when
        not given). `zoom_pixel_values`: the images' enlarged base views for the zoom, as the processor makes them.
        """
        image_sizes = [tuple(int(v) for v in size) for size in image_sizes]
        features, levels, counts, fine = self.vision_features(pixel_values, image_sizes, with_fine=True)
        projected = self.multi_modal_projector(features)
        projected = pool_crops(projected, self.config.patches_per_side, self.config.image_token_pooling).split(counts)
        tile, side = self.config.vision_config.image_size, self.config.llm_patches_per_side
        image_embeds = [
            pack_image_features(
                crops,
                size,
                self.image_newline,
                self.config.image_grid_pinpoints,
                tile,
                side,
                self.config.vision_aspect_ratio,
            )
            for crops, size in zip(projected, image_sizes)
        ]
        encoding = VisualEncoding(image_embeds=image_embeds, image_sizes=image_sizes)
        if self.expert is None:
            return encoding
        crops = self._flat_crops(pixel_values, counts) if self._needs_crops() else None  # re-read for views or a zoom
        first = torch.tensor([0] + counts[:-1]).cumsum(0).to(features.device)
        encoding.domain_distances = self.domain_distance(features[first])
        if self.expert.config.views == "base":  # the expert sees each image's first crop, the whole image
            features, levels, counts = features[first], [level[first] for level in levels], [1] * len(counts)
            crops = crops[first.to(crops.device)] if crops is not None else None
            fine = fine[first] if fine is not None else None
        tokens, encoding.scores, encoding.crop_maps = self._look_twice(
            features,
            levels,
            counts,
            reference_pixel_values,
            reference_image_sizes,
            crops,
            bank=reference_bank,
            typical=reference_typical,
            fine=fine,
            zoomed=self._zoom_of(crops, zoom_pixel_values),
        )
        encoding.anomaly_embeds = [self.multi_modal_projector(t) for t in tokens]
        return encoding

    def crop_layout(self) -> tuple[list, int]:
        """(grid pinpoints, tile size): how `assistant.maps.image_anomaly_map` lays this model's crop maps out."""
        return self.config.image_grid_pinpoints, self.config.vision_config.image_size

    def reference_bank(self, reference_pixel_values: torch.Tensor, reference_image_sizes) -> list[torch.Tensor]:
        """The few-shot memory of normal images: per expert feature level, their crops' unit patch features [N·P, H].

        Row-wise, so the bank of several references is the concatenation of their banks, level by level: a caller
        scoring many images against references drawn from one pool computes each reference's bank once.
        """
        _, reference_levels, _ = self.vision_features(reference_pixel_values, reference_image_sizes, distinct=True)
        return reduce_bank([bank_rows(level) for level in reference_levels])

    @torch.no_grad()
    def reference_typical(self, reference_pixel_values: torch.Tensor, reference_image_sizes, zoom_pixel_values=None):
        """How the few-shot references score on their own (`ReferenceTypical`: their median zero-shot learned score,
        for `Calibration.anchor`, and their learned maps' typical patch); None without an expert. One tower pass
        over the references."""
        if self.expert is None:
            return None
        return ReferenceTypical.of(
            *self.reference_learned(reference_pixel_values, reference_image_sizes, zoom_pixel_values)
        )

    @torch.no_grad()
    def reference_learned(self, reference_pixel_values: torch.Tensor, reference_image_sizes, zoom_pixel_values=None):
        """The references' zero-shot learned scores [N] and crop maps, as `detect` gives them without references
        (`zoom_pixel_values`: their enlarged base views, as the processor makes them)."""
        sizes = [tuple(int(v) for v in size) for size in reference_image_sizes]
        features, levels, counts, crops, fine = self._detection_features(reference_pixel_values, sizes)
        zoomed = self._zoom_of(crops, zoom_pixel_values)
        _, scores, maps = self._look_once(features, levels, counts, fine=fine, crops=crops, zoomed=zoomed)
        return scores, maps

    @torch.no_grad()
    def reference_set(
        self, reference_pixel_values: torch.Tensor, reference_image_sizes, zoom_pixel_values=None
    ) -> ReferenceSet:
        """What scoring against one set of normal references needs, computed once (`ReferenceSet`): `floor`, the
        highest few-shot score a reference gets against the other references (leave-one-out), on the zero-shot
        scale, or None with fewer than two references: references that score high against each other vary more
        than the held-out normal images the few-shot threshold was fitted on (`Calibration.raise_to`); `typical`,
        `reference_typical` of them all (each reference's leave-one-out score reads the others' own); and `bank`,
        their memory bank as `reference_bank` gives it, for `detect` and `encode_images`.

        Two tower passes over the references: their banks and their scored crops. Each reference is scored against
        the others' rows of the bank. Above `MAX_BANK` rows the coreset is built once for the whole set, and each
        reference is scored against the others' rows in it. Building a coreset for each reference instead took
        minutes for 40 references of several crops each."""
        sizes = [tuple(int(v) for v in size) for size in reference_image_sizes]
        if self.expert is None:
            return ReferenceSet(None, None, None)
        features, levels, counts, crops, fine = self._detection_features(reference_pixel_values, sizes)
        zoomed = self._zoom_of(crops, zoom_pixel_values)  # read once, used twice
        _, learned, learned_maps = self._look_once(features, levels, counts, fine=fine, crops=crops, zoomed=zoomed)
        typical = ReferenceTypical.of(learned, learned_maps)
        _, bank_levels, bank_counts = self.vision_features(reference_pixel_values, sizes, distinct=True)
        bank = [bank_rows(level) for level in bank_levels]
        rows = bank_levels[0].shape[1]  # patches per crop
        owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(bank_counts) * rows).to(bank[0].device)
        keep = bank_keep(bank)
        if keep is not None:
            bank, owner = [level[keep] for level in bank], owner[keep]
        if len(sizes) < 2:
            return ReferenceSet(None, typical, bank)
        per_features, per_levels = features.split(counts), [level.split(counts) for level in levels]
        per_crops = crops.split(counts) if crops is not None else [None] * len(sizes)
        per_fine = fine.split(counts) if fine is not None else [None] * len(sizes)
        per_zoomed = list(zip(*(part.split(counts) for part in zoomed))) if zoomed is not None else [None] * len(sizes)
        scores = []
        for i in range(len(sizes)):
            others = [level[owner != i] for level in bank]
            own = [level[i] for level in per_levels]
            rest = [j for j in range(len(sizes)) if j != i]  # the others, as `detect` reads them for this reference
            rest_typical = ReferenceTypical.of(learned[rest], [learned_maps[j] for j in rest])
            _, score, _ = self._look_twice(
                per_features[i],
                own,
                [counts[i]],
                crops=per_crops[i],
                bank=others,
                typical=rest_typical,
                fine=per_fine[i],
                zoomed=per_zoomed[i],
            )
            scores.append(float(score[0]))
        return ReferenceSet(max(scores), typical, bank)

    def reference_floor(self, reference_pixel_values: torch.Tensor, reference_image_sizes) -> float | None:
        """The floor of `reference_set`."""
        return self.reference_set(reference_pixel_values, reference_image_sizes).floor

    def _look_twice(
        self,
        features,
        levels,
        counts,
        reference_pixel_values=None,
        reference_image_sizes=None,
        crops=None,
        bank=None,
        typical=None,
        fine=None,
        zoomed=None,
    ):
        """Expert map, look-twice tokens and score for crops [N, P, H] grouped per image by `counts`; `fine`: the fine
        head's maps of the crops [N, h, w], as `_tower` gives them; `zoomed`: their `_zoomed` when already read.

        In eval mode with `config.detection_views` > 1 and the `crops` [N, 3, S, S] the features came from,
        the maps and scores are averaged over that many views of the crops (`DETECTION_VIEWS`); the tokens
        are always those of the crops as given. `bank` (`reference_bank`) and `typical` (`reference_typical`)
        replace the reference pixels; `typical` is computed from the pixels when not given.
        """
        if bank is None and reference_pixel_values is not None:
            bank = self.reference_bank(reference_pixel_values, reference_image_sizes)
            if typical is None:
                typical = self.reference_typical(reference_pixel_values, reference_image_sizes)
        elif bank is not None:
            bank = reduce_bank(bank)
        tokens, scores, crop_maps = self._look_once(features, levels, counts, bank, typical, fine, crops, zoomed)
        if crops is None or not self._scores_views():
            return tokens, scores, crop_maps
        views = self.config.detection_views
        crop_maps = [maps.float() for maps in crop_maps]
        scores = scores.float()
        for turns, mirrored in DETECTION_VIEWS[1:views]:
            view_crops = view_of(crops, turns, mirrored)
            view_features, view_levels, view_fine = self._tower(view_crops)
            _, view_scores, view_maps = self._look_once(
                view_features, view_levels, counts, bank, typical, view_fine, view_crops
            )
            scores = scores + view_scores.float()
            crop_maps = [total + map_back(maps.float(), turns, mirrored) for total, maps in zip(crop_maps, view_maps)]
        dtype = view_maps[0].dtype
        return tokens, (scores / views).to(dtype), [(total / views).to(dtype) for total in crop_maps]

    def _scores_views(self) -> bool:
        """Whether the expert averages more views than the crops as given (`config.detection_views`, not in training)."""
        return self.config.detection_views > 1 and not self.training

    def _look_once(self, features, levels, counts, bank=None, typical=None, fine=None, crops=None, zoomed=None):
        """`_look_twice` on one view: `bank` holds the few-shot references' unit patch features per level, `typical`
        how they score on their own (`ReferenceTypical`): the learned map joins the reference distance relative to
        their typical patch, and the learned score is shifted back when their median is above the training
        surfaces' (`Calibration.anchor`). With a fine head, its maps `fine` [N, h, w] join the learned map (each patch
        its cell's maximum) and the learned score (the image's maximum), `blend_fine`; the look-twice tokens keep the
        expert's own selection. With `config.detection_zoom` > 1 (not in training) and the `crops` [N, 3, S, S]
        the features came from, the learned map and score join those of the crops enlarged (`_zoomed`, or `zoomed`
        when the caller has it already), before the references or the folder are read."""
        per_image = features.split(counts)
        base = torch.cat([image[:1].expand(n, -1, -1) for image, n in zip(per_image, counts)])
        crop_map, crop_significance, selection_map = self.expert(levels, base)
        fine_weight = self.expert.config.fine_weight
        if fine is not None:
            side = self.config.patches_per_side
            fine_cells = nn.functional.adaptive_max_pool2d(fine[:, None].float(), side).flatten(1).to(crop_map.dtype)
            crop_map = blend_fine(crop_map, fine_cells, fine_weight).to(crop_map.dtype)
            fine_max = fine.flatten(1).amax(-1).split(counts)
        else:
            fine_max = [None] * len(counts)
        zoomed_scores = [None] * len(counts)
        if zoomed is None and crops is not None and self._zooms():
            zoomed = self._zoomed(crops)
        if zoomed is not None:
            crop_map = blend_fine(crop_map, zoomed[0], ZOOM_WEIGHT).to(crop_map.dtype)
            zoomed_scores = zoomed[1].split(counts)
        weight = self.expert.config.reference_weight
        reference_map = None
        if bank is not None:
            reference_map = reference_distance(levels, bank).to(crop_map.dtype)
            learned_map = crop_map if typical is None else relative_to(crop_map, typical.patch)
            crop_map = (1 - weight) * learned_map + weight * reference_map
            # the look-twice tokens and the learned score keep the expert's own selection: choosing them by the fused
            # map let a surface the references cover badly pick the tokens (docs/default_model_history.md)
        tokens, scores, crop_maps = [], [], []
        per_crop = zip(
            per_image,
            crop_map.split(counts),
            selection_map.split(counts),
            crop_significance.split(counts),
            fine_max,
            zoomed_scores,
        )
        for feats, maps, selection, significance, image_fine, image_zoomed in per_crop:
            chosen, weights = self.selector(feats, selection, significance)
            score = self.expert.score(chosen, weights, feats, selection)
            if image_fine is not None:
                score = blend_fine(score, image_fine.amax(), fine_weight).to(score.dtype)
            if image_zoomed is not None:  # the image's score at the larger scale: its highest tile's
                score = blend_fine(score, image_zoomed.amax(), ZOOM_WEIGHT).to(score.dtype)
            if (
                reference_map is not None
            ):  # few-shot: on the zero-shot scale when calibrated (config.few_shot_thresholds)
                if typical is not None:
                    score = self.config.calibration.anchor(score, typical.score)
                score = self.config.few_shot_rescale((1 - weight) * score + weight * maps.max())
                maps = self.config.few_shot_rescale(maps, pixel=True)
            tokens.append(chosen)
            scores.append(score)
            crop_maps.append(maps)
        return tokens, torch.stack(scores), crop_maps

    def _zooms(self) -> bool:
        """Whether the expert also reads each crop enlarged (`config.detection_zoom` > 1, not in training)."""
        return self.config.detection_zoom > 1.0 and not self.training

    def _zoom_of(self, crops, source=None):
        """`_zoomed` of the scored crops when the zoom applies (None otherwise), from `source`, the images' own
        enlarged base views (`zoom_pixel_values`), when given."""
        return self._zoomed(crops, source) if crops is not None and self._zooms() else None

    def _needs_crops(self) -> bool:
        """Whether detection re-reads the crops' pixels: more views (`_scores_views`) or a zoom (`_zooms`)."""
        return self._scores_views() or self._zooms()

    def _zoomed(self, crops: torch.Tensor, source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned map [N, P] and score [N] of crops [N, 3, S, S] enlarged `config.detection_zoom` times, in four
        tiles of the crop's size (`zoom_tiles`): each tile is read as a crop of its own (expert, fine head and
        look-twice score, no references), the map is the tiles' maps laid back and max-pooled to the crop's grid
        (`stitch_tiles`), the score the highest tile's. Thin lines one or two pixels wide become features the
        stride-8 and stride-16 stages see; four more tower passes per crop."""
        if isinstance(source, (list, tuple)):  # images of different sizes take different zooms: one pass per side
            maps = scores = None
            for side in sorted({int(view.shape[-1]) for view in source}):
                index = [i for i, view in enumerate(source) if int(view.shape[-1]) == side]
                group_maps, group_scores = self._zoomed(crops[index], torch.stack([source[i] for i in index]))
                if maps is None:
                    maps = group_maps.new_zeros((crops.shape[0], *group_maps.shape[1:]))
                    scores = group_scores.new_zeros(crops.shape[0])
                maps[index], scores[index] = group_maps, group_scores
            return maps, scores
        patches = self.config.patches_per_side
        tiles, offsets, side = zoom_tiles(crops, self.config.detection_zoom, patches, source)
        features, levels, fine = self._tower(tiles)
        _, scores, maps = self._look_once(features, levels, [1] * tiles.shape[0], fine=fine)
        maps = stitch_tiles(torch.cat(maps), offsets, side, patches)
        return maps, scores.reshape(crops.shape[0], -1).amax(-1)

    def _detection_features(self, pixel_values, image_sizes):
        """(projector-layer features, expert levels, crop counts, crops for more views or None, the fine head's maps or
        None) of the crops the expert scores: each image's base crop with `views="base"`, every crop otherwise."""
        image_sizes = [tuple(int(v) for v in size) for size in image_sizes]
        if self.expert.config.views == "base":
            counts = self.crops_per_image(image_sizes)
            if pixel_values.dim() == 5:
                base = pixel_values[:, 0]
            else:
                first = torch.tensor([0] + counts[:-1]).cumsum(0)
                base = pixel_values[first]
            features, levels, fine = self._tower(base)
            return features, levels, [1] * len(image_sizes), base if self._needs_crops() else None, fine
        features, levels, counts, fine = self.vision_features(pixel_values, image_sizes, with_fine=True)
        crops = self._flat_crops(pixel_values, counts) if self._needs_crops() else None
        return features, levels, counts, crops, fine

    def detect(
        self,
        pixel_values,
        image_sizes,
        reference_pixel_values=None,
        reference_image_sizes=None,
        reference_bank=None,
        with_domain: bool = False,
        reference_typical=None,
        with_fine: bool = False,
        zoom_pixel_values=None,
    ):
        """The detection-only path: vision tower + expert + selector, no projector, no LLM.

        With `views="base"` the tower runs on each image's base crop alone. Returns (crop_maps, scores), the same
        values `encode_images` gives, and with `with_domain` also each image's `domain_distance` (None without a
        domain bank). The few-shot references come as pixels or as their `reference_bank` and `reference_typical`.
        `with_fine` (stage 1's loss): (crop_maps, scores, the fine head's maps [N, h, w] or None) instead.
        `zoom_pixel_values`: the images' enlarged base views for the zoom, as the processor makes them.
        """
        if self.expert is None:
            raise ValueError("this model has no anomaly expert, so it cannot score images")
        features, levels, counts, crops, fine = self._detection_features(pixel_values, image_sizes)
        _, scores, crop_maps = self._look_twice(
            features,
            levels,
            counts,
            reference_pixel_values,
            reference_image_sizes,
            crops,
            reference_bank,
            reference_typical,
            fine,
            zoomed=self._zoom_of(crops, zoom_pixel_values),
        )
        if with_fine:
            return crop_maps, scores, fine
        if not with_domain:
            return crop_maps, scores
        first = torch.tensor([0] + counts[:-1]).cumsum(0).to(features.device)
        return crop_maps, scores, self.domain_distance(features[first])

    def detect_folder(
        self, chunks, lowest: float = LOWEST, score_share: float = LEARNED_SCORE_SHARE, peers: int = MAX_PEERS
    ):
        """Folder zero-shot (`assistant.patch_memory.mutual_distance`): every image's patches scored against the other
        images' (MuSc; in a folder of more than `peers` + 1 images, against the same `peers` of them). `chunks` are
        (pixel_values, image_sizes[, zoom_pixel_values]) batches as the processor makes them (the third, when given
        and not None, the images' own enlarged views for the zoom), read through the tower and the expert one at a
        time; the images together need ≥ 2. Returns (crop_maps, scores, domain distances) like
        `detect`: each image's map on its scored crop fuses, as the few-shot mode does (`reference_weight`), the
        mutual distance and the expert's learned map, each relative to the folder's typical patch
        (`folder_relative`); the score is `score_share` of the expert's learned image score (as zero-shot, absolute)
        and the rest the map's maximum, on the zero-shot scale when the "batch" mode is calibrated
        (`Calibration.rescale`). The learned scores are first shifted down when the folder's typical image scores
        above every training surface's (`Calibration.anchor_folder`): the expert calls most images of a surface
        far from its training anomalous. The learned map and score rank the defects of textures whose images differ from
        each other (real photographed surfaces) far better than the mutual distance alone
        (docs/default_model_history.md)."""
        if self.expert is None:
            raise ValueError("this model has no anomaly expert, so it cannot score images")
        levels, learned, learned_scores, distances = [], [], [], []
        for pixel_values, image_sizes, *zoom_source in chunks:
            chunk_features, chunk_levels, counts, crops, fine = self._detection_features(pixel_values, image_sizes)
            first = torch.tensor([0] + counts[:-1]).cumsum(0).to(chunk_features.device)  # each image's whole view
            chunk_features, chunk_levels = chunk_features[first], [level[first] for level in chunk_levels]
            fine = fine[first] if fine is not None else None
            crops = crops[first.to(crops.device)] if crops is not None else None
            # each image's own zero-shot map [P] and learned score, as the single-image mode gives them
            zoomed = self._zoom_of(crops, zoom_source[0] if zoom_source else None)
            _, chunk_scores, chunk_maps = self._look_once(
                chunk_features, chunk_levels, [1] * len(first), fine=fine, crops=crops, zoomed=zoomed
            )
            levels.append(chunk_levels)  # the projector-layer features are read here and not kept
            learned.extend(chunk_maps)
            learned_scores.append(chunk_scores)
            distances.append(self.domain_distance(chunk_features))
        levels = [torch.cat(level) for level in zip(*levels)]
        calibration = self.config.calibration
        learned_scores = calibration.anchor_folder(torch.cat(learned_scores).float())
        weight = self.expert.config.reference_weight
        maps = (1 - weight) * folder_relative(torch.cat(learned).float()) + weight * folder_relative(
            mutual_distance(levels, lowest, peers=peers)
        )
        maps = maps.to(levels[0].device)
        scores = score_share * learned_scores.to(maps.device) + (1 - score_share) * maps.amax(-1)
        scores = calibration.rescale(scores, "batch")
        maps = calibration.rescale(maps, "batch", pixel=True)
        return [m[None] for m in maps], scores, None if distances[0] is None else torch.cat(distances)

    def domain_embedding(self, features: torch.Tensor) -> torch.Tensor:
        """One unit vector per crop [N, P, H] → [N, H]: its patch features averaged, what the domain check compares."""
        return nn.functional.normalize(features.float().mean(dim=1), dim=-1)

    def domain_distance(self, features: torch.Tensor) -> torch.Tensor | None:
        """Per crop [N, P, H], (1 − cosine similarity to the nearest training image in `domain_bank`) / 2, or None."""
        if self.domain_bank is None:
            return None
        bank = self.domain_bank.to(features.device, torch.float32)
        return (1.0 - (self.domain_embedding(features) @ bank.T).amax(-1)) / 2.0

    # -- language side ----------------------------------------------------------------------------
    def merge_embeddings(self, input_ids: torch.Tensor, visual: VisualEncoding | None) -> torch.Tensor:
        """Text embeddings with the visual embeddings scattered into the `<image>` placeholders (count checked)."""
        embeds = self.get_input_embeddings()(input_ids)
        mask = input_ids == self.config.image_token_index
        n_placeholders = int(mask.sum())
        if visual is None:
            if n_placeholders:
                raise ValueError(f"the text has {n_placeholders} image placeholders but no image was given")
            return embeds
        n_image = sum(e.shape[0] for e in visual.image_embeds)
        n_anomaly = sum(e.shape[0] for e in visual.anomaly_embeds) if visual.anomaly_embeds is not None else 0
        if n_placeholders == n_image + n_anomaly and n_anomaly:
            features = visual.placeholder_embeds(look_twice=True)
        elif n_placeholders == n_image:
            features = visual.placeholder_embeds(look_twice=False)
        else:
            raise ValueError(
                f"image placeholders and image features do not match: {n_placeholders} placeholders, "
                f"{n_image} image tokens" + (f" + {n_anomaly} look-twice tokens" if n_anomaly else "")
            )
        features = features.to(embeds.device, embeds.dtype)
        return embeds.masked_scatter(mask.unsqueeze(-1).to(embeds.device), features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes=None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        visual: VisualEncoding | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        zoom_pixel_values: torch.Tensor | None = None,
        **kwargs,
    ):
        """Causal-LM forward (loss when `labels` are given). Images come as pixels (with the processor's
        `zoom_pixel_values` when it makes them) or a precomputed `visual`."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            if visual is None and pixel_values is not None:
                visual = self.encode_images(pixel_values, image_sizes, zoom_pixel_values=zoom_pixel_values)
            inputs_embeds = self.merge_embeddings(input_ids, visual)
        if (
            labels is not None
            and self.chunked_loss
            and torch.is_grad_enabled()
            and fused_loss_applies(self.language_model)
        ):
            return self._chunked_loss_forward(
                inputs_embeds, attention_mask, position_ids, past_key_values, labels, use_cache, **kwargs
            )
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_cache_kwarg(self.language_model): past_key_values},
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _chunked_loss_forward(
        self, inputs_embeds, attention_mask, position_ids, past_key_values, labels, use_cache, **kwargs
    ):
        """Training forward whose loss never materialises the logits (`assistant.loss`); `logits` is None."""
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        decoder = self.language_model.get_decoder()
        out = decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_cache_kwarg(decoder): past_key_values},
            use_cache=use_cache,
            **kwargs,
        )
        head = self.language_model.get_output_embeddings()
        loss = linear_cross_entropy(out.last_hidden_state, head, labels, num_items_in_batch)
        cache_field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        return CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            **{cache_field: output_cache(out)},
        )

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, visual: VisualEncoding | None = None, attention_mask=None, **generate_kwargs
    ):
        """Generate with the language model from merged embeddings; returns only the new token ids."""
        embeds = self.merge_embeddings(input_ids.to(self.get_input_embeddings().weight.device), visual)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        name = _cache_kwarg(self.language_model)  # generate() takes the starting cache under the forward's name
        if "past_key_values" in generate_kwargs and name != "past_key_values":
            generate_kwargs[name] = generate_kwargs.pop("past_key_values")
        return self.language_model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask.to(embeds.device), **generate_kwargs
        )


def expert_fine_channels(vision_config, expert_config: ExpertConfig) -> int:
    """Channels the expert's fine head reads from this tower (0 without a fine head)."""
    if not expert_config.fine_stages:
        return 0
    from .backbones.tower import fine_channels

    return fine_channels(vision_config, list(expert_config.fine_stages))
