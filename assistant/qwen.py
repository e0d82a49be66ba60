"""Qwen2.5-VL as a base: its vision tower and language model composed with the anomaly expert.

The parts of a loaded `Qwen2_5_VLForConditionalGeneration` are held side by side: `vision_tower` is its
ViT (window attention, with the 2×2 patch merger that projects to the LLM), `language_model` the rest of
it (the LLM with its multimodal rotary positions and its own `generate`). The expert reads several layers'
hidden states of the tower, put back into the image's patch grid (from `image_grid_thw`, before the merger)
and resampled to a fixed square grid; the look-twice tokens it picks go through the same merger (each token
as a 2×2 group of itself) and follow the marker text as text-position tokens. Everything that does not depend
on the base family — the expert's maps, the selector, placeholder scattering, the loss — is
`AnomalyAssistantModel`'s.

The processor is built from the checkpoint's tokenizer, `Qwen2VLImageProcessorPil` and its chat template
(`Qwen2_5_VLProcessor` needs torchvision for its video processor). Images keep their aspect ratio and get
one `<|image_pad|>` per merged patch; `image_sizes` carry (height, width) as for LLaVA-OneVision, and the model
derives each image's grid from them with the image processor's own `smart_resize`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, PreTrainedModel
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
    smart_resize,
)

from .config import AnomalyAssistantConfig
from .expert import AnomalyExpert, ExpertConfig
from .modeling import AnomalyAssistantModel, VisualEncoding, _cache_kwarg, expert_fine_channels
from .processing import AssistantProcessor, read_chat_template
from .selector import LookTwiceSelector, SelectorConfig

#: the base families this module composes, by their transformers model_type
QWEN_FAMILIES = ("qwen2_5_vl",)

#: ChatML as Qwen2.5-VL's checkpoints render an image-and-text chat: a default system turn, each image as vision start,
#: one pad, vision end, in the order of the message's parts; `{% generation %}` marks assistant text, which stage 2
#: needs to supervise only the answers (Qwen's own template has no such marks)
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ part['text'] }}{% endgeneration %}"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class QwenAssistantConfig(AnomalyAssistantConfig):
    """`AnomalyAssistantConfig` for a Qwen2.5-VL base.

    Args (beyond the parent's thresholds, marker, expert and selector configs):
        vision_config / text_config: the `Qwen2_5_VLVisionConfig` and `Qwen2_5_VLTextConfig` of the base.
        image_token_index / video_token_index / vision_start_token_id / vision_end_token_id: the base's ids.
        min_pixels / max_pixels: the image processor's pixel bounds (`size` shortest_edge / longest_edge), from
            which each image's patch grid follows.
        expert_grid: side of the square patch grid the expert reads (each image's grid resampled to it).
        references_as_images: with normal references, show up to this many of them to the LLM as images before the
            image asked about (0, the default: none; the expert compares the image with all of them either way).
    """

    model_type = "anomaly_assistant_qwen2_5_vl"

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        image_token_index: int = 151655,
        video_token_index: int = 151656,
        vision_start_token_id: int = 151652,
        vision_end_token_id: int = 151653,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        expert_grid: int = 24,
        references_as_images: int = 0,
        **kwargs,
    ):
        kwargs.setdefault("vision_feature_select_strategy", "full")
        super().__init__(
            vision_config=vision_config, text_config=text_config, image_token_index=image_token_index, **kwargs
        )
        if self.detection_views != 1 or self.detection_zoom != 1 or self.image_token_pooling != 1:
            raise ValueError("a Qwen2.5-VL base takes detection_views=1, detection_zoom=1 and image_token_pooling=1")
        self.video_token_index = int(video_token_index)
        self.vision_start_token_id = int(vision_start_token_id)
        self.vision_end_token_id = int(vision_end_token_id)
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        if int(expert_grid) < 2:
            raise ValueError(f"expert_grid must be >= 2, got {expert_grid}")
        self.expert_grid = int(expert_grid)
        if int(references_as_images) < 0:
            raise ValueError(f"references_as_images must be >= 0, got {references_as_images}")
        self.references_as_images = int(references_as_images)

    @property
    def patches_per_side(self) -> int:
        return self.expert_grid

    def base_config(self):
        """The `Qwen2_5_VLConfig` of the base model these parts come from."""
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(
            vision_config=self.vision_config.to_dict(),
            text_config=self.text_config.to_dict(),
            image_token_id=self.image_token_index,
            video_token_id=self.video_token_index,
            vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
        )

    def grid_thw(self, image_sizes) -> torch.Tensor:
        """Each (height, width) image's (t, h, w) patch grid, as `Qwen2VLImageProcessorPil` makes it: [N, 3]."""
        vision = self.vision_config
        factor = vision.patch_size * vision.spatial_merge_size
        rows = []
        for height, width in image_sizes:
            resized_h, resized_w = smart_resize(int(height), int(width), factor, self.min_pixels, self.max_pixels)
            rows.append((1, resized_h // vision.patch_size, resized_w // vision.patch_size))
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)


class QwenAssistantModel(AnomalyAssistantModel):
    """The composed model on a Qwen2.5-VL base; the expert-side methods are `AnomalyAssistantModel`'s."""

    config_class = QwenAssistantConfig
    chunked_loss = False  # the VLM's head is not a plain causal LM's: transformers' own loss

    def __init__(self, config: QwenAssistantConfig):
        from transformers import Qwen2_5_VLForConditionalGeneration

        PreTrainedModel.__init__(self, config)  # the LLaVA parts of the parent's __init__ do not apply
        base = Qwen2_5_VLForConditionalGeneration(config.base_config())
        self.vision_tower = base.model.visual
        del base.model.visual  # held once, here; the base keeps its LLM, positions and generate
        self.language_model = base
        if config.has_expert:
            hidden = config.vision_config.hidden_size
            expert_config = ExpertConfig.from_dict(config.expert_config)
            fine = expert_fine_channels(config.vision_config, expert_config)  # refuses a fine head: no finer stages
            self.expert = AnomalyExpert(expert_config, hidden, config.patches_per_side**2, fine)
            self.selector = LookTwiceSelector(SelectorConfig.from_dict(config.selector_config or {}), hidden)
        else:
            self.expert = None
            self.selector = None
        self.domain_bank = None  # as the parent's: the out-of-domain check's training embeddings, when loaded
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        PreTrainedModel._init_weights(self, module)
        if isinstance(module, AnomalyExpert):
            torch.nn.init.normal_(module.positive_embedding)
            torch.nn.init.normal_(module.negative_embedding)

    # -- vision side ------------------------------------------------------------------------------
    def crops_per_image(self, image_sizes) -> list[int]:
        return [1] * len(image_sizes)  # the whole image at its own resolution, no tiles

    def vision_features(self, pixel_values: torch.Tensor, image_sizes, distinct: bool = False):
        """The expert's inputs: last-block features [N, S², H], its levels, and one crop per image (so every crop is
        distinct, whatever `distinct` asks)."""
        _, features, levels = self._tower(pixel_values, self.config.grid_thw(image_sizes))
        return features, levels, [1] * len(image_sizes)

    def _tower(self, pixel_values: torch.Tensor, grid: torch.Tensor):
        """Flat patches [Σ t·h·w, C·T·P·P] → (merged LLM tokens per image, last-block grid features, expert levels)."""
        tower = self.vision_tower
        patches = int(grid.prod(-1).sum())
        if pixel_values.dim() != 2 or pixel_values.shape[0] != patches:
            raise ValueError(f"got pixel_values of shape {tuple(pixel_values.shape)} for images of {patches} patches")
        pixel_values = pixel_values.to(device=tower.device, dtype=tower.dtype)
        out = tower(pixel_values, grid_thw=grid.to(tower.device), output_hidden_states=True, return_dict=True)
        unit = tower.spatial_merge_size**2
        merged = list(out.pooler_output.split((grid.prod(-1) // unit).tolist()))
        layers = self.expert.config.feature_layers if self.expert is not None else []
        grids = self._patch_grids([out.hidden_states[-1]] + [out.hidden_states[i] for i in layers], grid)
        return merged, grids[0], grids[1:]

    def _patch_grids(self, hidden_states: list[torch.Tensor], grid: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states in the tower's window order → per state, [N, S², H] on the expert's S×S grid."""
        from transformers.vision_utils import get_vision_window_index

        tower, side = self.vision_tower, self.config.expert_grid
        merge = tower.spatial_merge_size
        window_index, _ = get_vision_window_index(grid, merge, tower.window_size, tower.patch_size)
        reverse = torch.argsort(window_index).to(hidden_states[0].device)
        counts = grid.prod(-1).tolist()
        out = []
        for hidden in hidden_states:
            width = hidden.shape[-1]
            ordered = hidden.view(-1, merge * merge, width)[reverse].view(-1, width)  # the processor's patch order
            maps = []
            for patches, (t, h, w) in zip(ordered.split(counts), grid.tolist()):
                # the processor lays patches out as (t, h/m, w/m, m, m): back to a (h, w) grid of the first frame
                image = patches.view(t, h // merge, w // merge, merge, merge, width)[0]
                image = image.permute(4, 0, 2, 1, 3).reshape(1, width, h, w)
                image = F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
                maps.append(image[0].flatten(1).T)
            out.append(torch.stack(maps))
        return out

    def crop_layout(self) -> tuple[list, int]:
        return [], 0  # one map per image, on the expert's grid over the whole image: no tiles to lay out

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Look-twice tokens [T, H] → LLM embeddings [T, D] through the merger, each token as a 2×2 group of itself."""
        merger = self.vision_tower.merger
        return merger(tokens.repeat_interleave(self.vision_tower.spatial_merge_size**2, dim=0))

    def encode_images(
        self,
        pixel_values,
        image_sizes,
        reference_pixel_values=None,
        reference_image_sizes=None,
        reference_typical=None,
        reference_bank=None,
        zoom_pixel_values=None,
    ) -> VisualEncoding:
        """Image tokens for the LLM and, with an expert, maps, scores and look-twice tokens (see the parent; Qwen's
        processor makes no `zoom_pixel_values`, so a zoom, if set, enlarges the crops)."""
        image_sizes = [tuple(int(v) for v in size) for size in image_sizes]
        grid = self.config.grid_thw(image_sizes)
        merged, features, levels = self._tower(pixel_values, grid)
        encoding = VisualEncoding(image_embeds=merged, image_sizes=image_sizes, extras={"grid_thw": grid})
        shown = (
            0 if reference_pixel_values is None else min(self.config.references_as_images, len(reference_image_sizes))
        )
        if shown:  # the first references, as images before the one asked about (`config.references_as_images`)
            sizes = [tuple(int(v) for v in size) for size in reference_image_sizes[:shown]]
            reference_grid = self.config.grid_thw(sizes)
            rows = int(reference_grid.prod(-1).sum())
            encoding.image_embeds = self._tower(reference_pixel_values[:rows], reference_grid)[0] + merged
            encoding.image_sizes = sizes + image_sizes
            encoding.extras.update(grid_thw=torch.cat([reference_grid, grid]), references_shown=shown)
        if self.expert is None:
            return encoding
        encoding.domain_distances = self.domain_distance(features)
        tokens, encoding.scores, encoding.crop_maps = self._look_twice(
            features,
            levels,
            [1] * len(image_sizes),
            reference_pixel_values,
            reference_image_sizes,
            bank=reference_bank,
            typical=reference_typical,
        )
        empty = merged[0].new_zeros(0, merged[0].shape[-1])
        encoding.anomaly_embeds = [empty] * shown + [self.project_tokens(t) for t in tokens]
        return encoding

    def _detection_features(self, pixel_values, image_sizes):
        """(last-block features, expert levels, one crop per image, None, None): the whole image on the expert's grid
        (no fine head: it reads the EfficientNet-Lite tower's finer stages)."""
        features, levels, counts = self.vision_features(pixel_values, image_sizes)
        return features, levels, counts, None, None

    # -- language side ----------------------------------------------------------------------------
    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Qwen's `mm_token_type_ids`: 1 for the image tokens right after `<|vision_start|>`, 0 for the rest.

        Look-twice tokens share the image token id but follow the marker text, so they take text positions.
        """
        is_image = input_ids == self.config.image_token_index
        opened = torch.zeros_like(is_image)
        opened[:, 1:] = input_ids[:, :-1] == self.config.vision_start_token_id
        run = (~is_image).long().cumsum(-1)  # one id per run of image tokens
        length = input_ids.shape[1]
        starts = torch.zeros(input_ids.shape[0], length + 2, dtype=torch.bool, device=input_ids.device)
        starts.scatter_(1, run.masked_fill(~(is_image & opened), length + 1), True)
        starts[:, length + 1] = False
        return (is_image & starts.gather(1, run)).int()

    def rope_index(self, input_ids, visual: VisualEncoding | None, attention_mask=None):
        """(3-D rotary positions [3, B, L], their deltas [B, 1]) from the base model's own `get_rope_index`."""
        grid = visual.extras.get("grid_thw") if visual is not None else None
        return self.language_model.model.get_rope_index(
            input_ids, mm_token_type_ids=self.token_types(input_ids), image_grid_thw=grid, attention_mask=attention_mask
        )

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        image_sizes=None,
        attention_mask=None,
        position_ids=None,
        visual: VisualEncoding | None = None,
        **kwargs,
    ):
        """Causal-LM forward (loss with `labels`) with the base's multimodal rotary positions."""
        if input_ids is not None and visual is None and pixel_values is not None:
            visual = self.encode_images(pixel_values, image_sizes)
        if position_ids is None and input_ids is not None:
            position_ids, _ = self.rope_index(input_ids, visual, attention_mask)
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, visual=visual, **kwargs
        )

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, visual: VisualEncoding | None = None, attention_mask=None, **generate_kwargs
    ):
        """The base model's `generate` on the merged embeddings; returns only the new token ids."""
        input_ids = input_ids.to(self.get_input_embeddings().weight.device)
        embeds = self.merge_embeddings(input_ids, visual)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(input_ids.device)
        # the base keeps the deltas of its last prompt for decoding; set them for this prompt (a reused cache skips it)
        _, self.language_model.model.rope_deltas = self.rope_index(input_ids, visual, attention_mask)
        name = _cache_kwarg(self.language_model)
        if "past_key_values" in generate_kwargs and name != "past_key_values":
            generate_kwargs[name] = generate_kwargs.pop("past_key_values")
        grid = visual.extras.get("grid_thw") if visual is not None else None
        out = self.language_model.generate(
            input_ids=input_ids,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            image_grid_thw=grid,
            mm_token_type_ids=self.token_types(input_ids),
            **generate_kwargs,
        )
        prompt = input_ids.shape[1]
        if isinstance(out, torch.Tensor):
            return out[:, prompt:]
        out.sequences = out.sequences[:, prompt:]
        return out


class QwenProcessor(AssistantProcessor):
    """Tokenizer + `Qwen2VLImageProcessorPil` + chat template; one `<|image_pad|>` per merged patch."""

    def __init__(self, tokenizer, image_processor, config: QwenAssistantConfig, chat_template: str | None = None):
        super().__init__(tokenizer, image_processor, config, chat_template)
        bounds = (image_processor.size.get("shortest_edge"), image_processor.size.get("longest_edge"))
        if bounds != (config.min_pixels, config.max_pixels):
            raise ValueError(
                f"the image processor's pixel bounds {bounds} differ from the model's "
                f"({config.min_pixels}, {config.max_pixels})"
            )

    @classmethod
    def from_pretrained(cls, path: str | Path, config: QwenAssistantConfig) -> QwenProcessor:
        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(path, config=config.text_config)
        return cls(tokenizer, Qwen2VLImageProcessorPil.from_pretrained(path), config, read_chat_template(path))

    def preprocess(self, images) -> dict:
        """Flat patches [Σ t·h·w, C·T·P·P] (Qwen's `pixel_values`) and each image's (height, width)."""
        images = list(images)
        out = self.image_processor(images, return_tensors="pt")
        sizes = torch.tensor([[image.height, image.width] for image in images])
        if not torch.equal(out["image_grid_thw"], self.config.grid_thw(sizes.tolist())):
            raise ValueError("the image processor's patch grid differs from the model's")
        return {"pixel_values": out["pixel_values"], "image_sizes": sizes}

    def pixels_of(self, image) -> torch.Tensor:
        return self.preprocess([image])["pixel_values"]  # flat patches concatenate as they are

    def one_tile_pixels(self, image):
        return None  # no anyres tiles

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        merge = self.config.vision_config.spatial_merge_size
        return int(self.config.grid_thw([image_size]).prod()) // merge**2

    def num_anomaly_tokens(self, image_size: tuple[int, int]) -> int:
        return 0 if self.selector is None else self.selector.tokens_per_image(1)


def compose_from_qwen2_5_vl(base, image_processor, expert_grid: int = 24) -> QwenAssistantModel:
    """Our model holding the very modules of a loaded `Qwen2_5_VLForConditionalGeneration` (no copy)."""
    bcfg = base.config
    config = QwenAssistantConfig(  # copies: building the meta model must not reset the loaded parts' attention settings
        vision_config=copy.deepcopy(bcfg.vision_config),
        text_config=copy.deepcopy(bcfg.text_config),
        image_token_index=bcfg.image_token_id,
        video_token_index=bcfg.video_token_id,
        vision_start_token_id=bcfg.vision_start_token_id,
        vision_end_token_id=bcfg.vision_end_token_id,
        min_pixels=image_processor.size["shortest_edge"],
        max_pixels=image_processor.size["longest_edge"],
        expert_grid=expert_grid,
        tie_word_embeddings=bcfg.tie_word_embeddings,
    )
    with torch.device("meta"):
        model = QwenAssistantModel(config)
    model.vision_tower = base.model.visual
    del base.model.visual
    model.language_model = base
    leftovers = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise ValueError(f"could not take over {leftovers[0]} from the Qwen2.5-VL checkpoint")
    return model


def from_qwen2_5_vl(path: Path, dtype: torch.dtype = torch.float32) -> QwenAssistantModel:
    """Load a Qwen2.5-VL checkpoint in Qwen's layout with transformers and compose our model from its parts."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
    return compose_from_qwen2_5_vl(base, Qwen2VLImageProcessorPil.from_pretrained(path))
