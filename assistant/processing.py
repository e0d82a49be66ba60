"""Text + image processing: chat template, placeholder expansion and pixel preprocessing.

Built from a checkpoint's tokenizer, its LLaVA-OneVision image processor (the PIL backend: no
torchvision) and its chat template. One `<image>` in the rendered prompt is expanded into exactly the
number of tokens the model fills — the LLaVA-OneVision image tokens, then, for a model with an expert,
the marker text (" with highly suspicious features: ") and the look-twice tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchEncoding
from transformers.image_processing_utils import select_best_resolution
from transformers.image_utils import SizeDict
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from .config import AnomalyAssistantConfig
from .projector import num_crops, num_image_tokens
from .selector import SelectorConfig

#: ChatML with images first in a user turn, the layout of llava-onevision-qwen2's template.
#: `{% generation %}` marks assistant text so training can mask everything else.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ part['text'] }}{% endgeneration %}"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def read_chat_template(path: Path) -> str | None:
    """The processor-level template of a checkpoint folder (jinja file, then the older JSON form)."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    as_json = path / "chat_template.json"
    if as_json.is_file():
        return json.loads(as_json.read_text()).get("chat_template")
    return None


def where_text(location: str | None) -> str:
    """What a marker's `{where}` becomes: " in the upper left" for a located defect, "" otherwise."""
    return f" in the {location}" if location else ""


#: the text between normal references shown as images and the image asked about
REFERENCES_NOTE = "The images above show normal samples of the same object. The image to inspect:"


def as_chat(messages, with_image: bool = True, references: int = 0) -> list[dict]:
    """Normalise messages (`content` as a string or as parts) and attach the image to the first user turn.

    `references` > 0: that many normal reference images come first in that turn, then `REFERENCES_NOTE`."""
    out, image_attached = [], not with_image
    for message in messages:
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown message role {role!r}")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else [dict(p) for p in content]
        if role == "user" and not image_attached:
            if not any(p.get("type") == "image" for p in parts):
                parts = [{"type": "image"}] + parts
            if references:
                parts = [{"type": "image"}] * references + [{"type": "text", "text": REFERENCES_NOTE}] + parts
            image_attached = True
        elif role == "user":
            parts = [p for p in parts if p.get("type") != "image"]
        out.append({"role": role, "content": parts})
    return out


def enlarge(crops: torch.Tensor, side: int) -> torch.Tensor:
    """Crops [N, C, S, S] enlarged to `side` × `side` (bicubic on the normalised pixels), in their dtype."""
    return torch.nn.functional.interpolate(crops.float(), size=(side, side), mode="bicubic", align_corners=False).to(
        crops.dtype
    )


def join_zoom_views(parts) -> torch.Tensor | list[torch.Tensor] | None:
    """Batches of the zoom's views (`AssistantProcessor.zoom_views`: tensors [n, 3, Z, Z] or lists of [3, Z_i, Z_i])
    joined in order: one tensor when every view has the same side, else a list of [3, Z_i, Z_i]; None for none."""
    views = [view for part in parts if part is not None for view in part]
    if not views:
        return None
    if len({tuple(view.shape) for view in views}) == 1:
        return torch.stack(views)
    return views


class AssistantProcessor:
    def __init__(self, tokenizer, image_processor, config: AnomalyAssistantConfig, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
        self._one_tile_checked: bool | None = (
            None  # `_one_tile_crops` agrees with the processor (None: not yet compared)
        )
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_index)
        if self.image_token is None or tokenizer.convert_tokens_to_ids(self.image_token) != config.image_token_index:
            raise ValueError(f"the tokenizer has no token for image_token_index {config.image_token_index}")

    @property
    def selector(self) -> SelectorConfig | None:
        """Read from the config each time, so an expert added after loading is counted."""
        return SelectorConfig.from_dict(self.config.selector_config or {}) if self.config.has_expert else None

    # -- persistence ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, config: AnomalyAssistantConfig) -> AssistantProcessor:
        path = Path(path)
        # the text config tells AutoTokenizer the family; without it, it parses config.json (an unregistered model type) and warns
        tokenizer = AutoTokenizer.from_pretrained(path, config=config.text_config)
        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(path)
        return cls(tokenizer, image_processor, config, read_chat_template(path))

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        (path / "chat_template.jinja").write_text(self.chat_template)

    # -- images -----------------------------------------------------------------------------------
    def preprocess(self, images, zoom: bool = True) -> dict:
        """{"pixel_values", "image_sizes"}, and "zoom_pixel_values" [N, 3, Z, Z] when the model's zoom reads each
        image's base view enlarged (`config.zoom_source_side`, `zoom_views`) and `zoom` is left on (training, which
        never zooms, turns it off)."""
        images = list(images)
        out = self._one_tile_crops(images)
        if out is None:
            made = self.image_processor(images, return_tensors="pt")
            out = {"pixel_values": made["pixel_values"], "image_sizes": made["image_sizes"]}
        side = self.config.zoom_source_side if zoom else None
        if side is not None:
            out["zoom_pixel_values"] = self.zoom_views(images, out["pixel_values"], side)
        return out

    def zoom_views(self, images, pixel_values: torch.Tensor, side: int) -> torch.Tensor | list[torch.Tensor]:
        """Each image's base view enlarged for the zoom, what it cuts its tiles from: [N, 3, side, side], or a list of
        [3, side_i, side_i] where images of different sizes take different zooms (`config.zoom_source_side_of`: an
        image that has the pixels is read at its own resolution, up to `detection_zoom_max`). Made from the image
        itself, with the base view's resize, rescale and normalisation, when the image is larger than the crop on both
        sides (its own detail: thin lines the crop's resize loses); otherwise the base view enlarged (`enlarge`), as
        the zoom did before, so an image no larger than the crop scores exactly as it did. Measured on 384 px crops of
        photographed surfaces (docs/default_model_history.md): gravel and tissue 0.878 → 0.926 image AUROC zero-shot."""
        tile = int(pixel_values.shape[-1])
        base = pixel_values[:, 0] if pixel_values.dim() == 5 else pixel_values
        views = []
        for index, image in enumerate(images):
            if isinstance(image, Image.Image) and image.mode == "RGB" and min(image.width, image.height) > tile:
                own = self.config.zoom_source_side_of(image.height, image.width) or side
                view = self._normalised_view(image, SizeDict(height=own, width=own))
                views.append(torch.from_numpy(np.ascontiguousarray(view)).to(base.dtype))
            else:
                views.append(enlarge(base[index : index + 1], side)[0])
        return join_zoom_views([views])

    def pixels_of(self, image: Image.Image) -> torch.Tensor:
        """One image's pixel values as a batch concatenates them: its crops [crops, 3, S, S], no padding crops."""
        c = self.config
        n = num_crops((image.height, image.width), c.image_grid_pinpoints, c.vision_config.image_size)
        return self.preprocess([image], zoom=False)["pixel_values"][0, :n]

    def _one_tile_crops(self, images) -> dict | None:
        """`preprocess`'s output made with one resize per image, where LLaVA-OneVision's anyres is a single tile; else None.

        A square RGB image whose best anyres resolution is the tile itself gets two identical crops from the
        processor: the base view, and its one tile (the same resize, nothing padded, then resized to its own size).
        The processor makes them with four PIL round trips and its batching; here the base view is made once, with
        the processor's own resize, rescale and normalize methods, and repeated. Written here because it is
        measurably faster: `python bench/bench_preprocess.py` (the default model's 128 px images, one thread)
        0.87 ms against 2.48 ms an image; the processor was most of the time of stage 1's image cache and of a
        stage-2 item. The first call of each processor is checked against the processor, bit for bit; after a
        difference, and for every other layout, the processor itself runs.
        """
        side = self._one_tile_side(images)
        if side is None:
            return None
        size = SizeDict(height=side, width=side)
        views = []
        for image in images:
            view = self._normalised_view(image, size)
            views.append(np.stack([view, view]))
        out = {
            "pixel_values": torch.from_numpy(np.stack(views)),
            "image_sizes": torch.tensor([[image.height, image.width] for image in images]),
        }
        if self._one_tile_checked is None:
            reference = self.image_processor(images[:1], return_tensors="pt")
            self._one_tile_checked = bool(
                torch.equal(reference["pixel_values"], out["pixel_values"][:1])
                and torch.equal(reference["image_sizes"], out["image_sizes"][:1])
            )
            if not self._one_tile_checked:
                return None
        return out

    def _resized_view(self, image: Image.Image, size) -> np.ndarray:
        ip = self.image_processor
        return ip.resize(image=np.asarray(image).transpose(2, 0, 1), size=size, resample=ip.resample)

    def _normalised_view(self, image: Image.Image, size) -> np.ndarray:
        """The image resized to `size`, rescaled and normalised as the processor makes its base view [3, H, W]."""
        ip = self.image_processor
        view = self._resized_view(image, size)
        if ip.do_rescale:
            view = ip.rescale(view, ip.rescale_factor)
        if ip.do_normalize:
            view = ip.normalize(view, ip.image_mean, ip.image_std)
        return view

    def _one_tile_side(self, images) -> int | None:
        """The tile side when every image is a square RGB image of one anyres tile and the shortcut is not ruled out."""
        ip = self.image_processor
        if self._one_tile_checked is False or not images or type(ip) is not LlavaOnevisionImageProcessorPil:
            return None
        side = ip.size.get("height") if ip.size else None
        if not (ip.do_resize and side and ip.size.get("width") == side and not getattr(ip, "do_center_crop", None)):
            return None
        for image in images:
            if not isinstance(image, Image.Image) or image.mode != "RGB" or image.width != image.height:
                return None
            if tuple(select_best_resolution((image.height, image.width), ip.image_grid_pinpoints)) != (side, side):
                return None
        return side

    def one_tile_pixels(self, image: Image.Image) -> np.ndarray | None:
        """The 8-bit base view [3, S, S] of an image `preprocess` makes with one resize (`_one_tile_crops`): each of its
        crops is this view rescaled by 1/255 and normalised by the processor's mean and std. None for any other image
        or processor.

        Stage 1's image cache keeps crops as 8 bits (`train.data.MaskedImages`); this gives them without making the
        float crops and converting them back. The shortcut's check against the processor runs first (on this image)
        when it has not run yet.
        """
        ip = self.image_processor
        if not (ip.do_rescale and ip.do_normalize and ip.rescale_factor == 1 / 255):
            return None
        if self._one_tile_checked is None and self._one_tile_crops([image]) is None:
            return None
        side = self._one_tile_side([image])
        if side is None:
            return None
        view = self._resized_view(image, SizeDict(height=side, width=side))
        return view if view.dtype == np.uint8 else None

    def image_sizes_of(self, images) -> list[tuple[int, int]]:
        return [(im.height, im.width) for im in images]

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        c = self.config
        # the patch grid excludes CLIP's class token, which the "default" strategy drops; pooled as the LLM reads it
        return num_image_tokens(
            image_size,
            c.image_grid_pinpoints,
            c.vision_config.image_size,
            c.llm_patches_per_side,
            c.vision_aspect_ratio,
        )

    def num_anomaly_tokens(self, image_size: tuple[int, int]) -> int:
        if self.selector is None:
            return 0
        if self.config.expert_config.get("views", "base") == "base":
            return self.selector.tokens_per_image(1)
        crops = num_crops(image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
        return self.selector.tokens_per_image(crops)

    def expand_image(self, image_size: tuple[int, int], level: str | None, where: str = "") -> str:
        """The text one `<image>` becomes: image tokens, then (with `level`) the marker and look-twice tokens.

        `where` fills a marker's optional `{where}` slot (see `where_text`); markers without it ignore it.
        """
        text = self.image_token * self.num_image_tokens(image_size)
        if level is not None:
            if self.selector is None:
                raise ValueError("this model has no expert, so it has no look-twice tokens")
            marker = self.config.suspicion_marker.format(level=level, where=where)
            text += marker + self.image_token * self.num_anomaly_tokens(image_size)
        return text

    # -- text -------------------------------------------------------------------------------------
    def render(self, messages, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def expand(
        self,
        prompt: str,
        image_sizes: list[tuple[int, int]],
        levels: list[str | None] | None = None,
        wheres: list[str] | None = None,
    ) -> str:
        pieces = prompt.split(self.image_token)
        if len(pieces) - 1 != len(image_sizes):
            raise ValueError(f"the prompt has {len(pieces) - 1} images but {len(image_sizes)} were given")
        levels = levels or [None] * len(image_sizes)
        wheres = wheres or [""] * len(image_sizes)
        out = [pieces[0]]
        for size, level, where, piece in zip(image_sizes, levels, wheres, pieces[1:]):
            out.append(self.expand_image(size, level, where))
            out.append(piece)
        return "".join(out)

    def __call__(
        self,
        prompt: str,
        images=(),
        levels: list[str | None] | None = None,
        pixels: dict | None = None,
        wheres: list[str] | None = None,
    ) -> BatchEncoding:
        """Tokenise one rendered prompt holding `<image>` once per image; pixels are computed unless given."""
        images = list(images)
        sizes = self.image_sizes_of(images) if images else []
        text = self.expand(prompt, sizes, levels, wheres) if images else prompt
        encoded = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        data = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if images:
            data.update(pixels if pixels is not None else self.preprocess(images))
        return BatchEncoding(data)

    def decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
