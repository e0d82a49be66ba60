"""Configuration of the composed model, saved as `config.json` inside every checkpoint.

The nesting follows transformers' `LlavaOnevisionConfig`: a vision config and a text config (any
transformers CLIP/SigLIP vision config and any causal-LM config), plus the anomaly expert's and the
token selector's own small configs, the calibrated decision thresholds and a format version.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from .backbones import register as _register_backbones
from .calibration import Calibration

#: bumped whenever the checkpoint layout changes incompatibly
FORMAT_VERSION = 1

#: LLaVA-OneVision's default anyres grid (multiples of 384 up to 6×6 tiles)
LLAVA_OV_GRID_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


def _sub_config(value):
    if value is None or isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", None)
        if model_type is None:
            raise ValueError("a nested config dict needs a 'model_type'")
        return AutoConfig.for_model(model_type, **value)
    raise TypeError(f"expected a config or a dict, got {type(value).__name__}")


def checked_zoom(zoom) -> float:
    """`detection_zoom` as a float, or a ValueError when it is outside [1, 2] (`AnomalyAssistantModel._zoomed` cuts
    the enlarged crop into tiles at its two ends per axis, which cover it up to 2x)."""
    if not 1.0 <= float(zoom) <= 2.0:
        raise ValueError(f"detection_zoom must be between 1 and 2, got {zoom}")
    return float(zoom)


def checked_zooms(zoom, largest=None) -> tuple[float, float | None]:
    """(`detection_zoom`, `detection_zoom_max`) checked: each in [1, 2] (`checked_zoom`), the largest (None or 1: off)
    only with a `detection_zoom` above 1 and no smaller than it; a ValueError otherwise."""
    zoom = checked_zoom(zoom)
    if largest is None or float(largest) == 1.0:
        return zoom, None
    largest = checked_zoom(largest)
    if zoom <= 1.0 or largest < zoom:
        raise ValueError(f"detection_zoom_max ({largest:g}) needs a detection_zoom above 1 and no larger, got {zoom:g}")
    return zoom, largest


def zoom_geometry(size: int, zoom: float, patches: int) -> tuple[int, int]:
    """(extra patches per axis, side in pixels) of a crop of `size` pixels enlarged about `zoom` times, the growth
    rounded to whole patches of size // `patches` pixels so that the zoom's tiles' patch grids line up."""
    stride = size // patches
    extra = int(round((zoom - 1) * size / stride))
    return extra, size + extra * stride


class AnomalyAssistantConfig(PretrainedConfig):
    """Vision tower + anomaly expert + look-twice selector + projector + causal LM.

    Args:
        vision_config / text_config: configs (or dicts with `model_type`) of the vision model and the LLM.
        expert_config: dict for `assistant.expert.ExpertConfig`, or None for a model without an expert
            (then it behaves exactly like a plain LLaVA-OneVision model).
        selector_config: dict for `assistant.selector.SelectorConfig`.
        image_token_index: id of the `<image>` placeholder; anomaly tokens use the same placeholder and
            are told apart by the marker text in front of them and by their count.
        vision_feature_layer / vision_feature_select_strategy / vision_aspect_ratio / image_grid_pinpoints /
            projector_hidden_act / multimodal_projector_bias: as in `LlavaOnevisionConfig`.
        image_threshold: calibrated decision threshold on `pred_score` (stored by training).
        pixel_threshold: threshold on the anomaly map for `pred_mask`.
        suspicion_marker: text inserted between image tokens and anomaly tokens; `{level}` is filled with
            "slightly", "moderately" or "highly".
        suspicion_bounds: score bounds separating the three levels. Anomaly-OV uses fixed bounds
            (0.3, 0.7); this project's checkpoints derive them from the calibrated threshold so that
            "highly" means the verdict is anomalous.
        image_token_pooling: stride by which each crop's projected patch grid is pooled (bilinear, to
            ceil(side / stride) per side, as LLaVA-OneVision pools video frames) before the crops are
            packed into the LLM's image tokens. 1 (LLaVA-OneVision's image path) keeps every patch; 2
            gives the LLM a quarter of the tokens. The expert always scores the full grid.
        detection_views: how many of a square crop's 8 flips and quarter turns the expert scores at inference
            (1, 2, 4 or 8; `assistant.modeling.DETECTION_VIEWS` lists them in order). The anomaly map is the
            mean of the views' maps turned back, the score the mean of their scores; the LLM's tokens and the
            look-twice tokens come from the image as given. Thresholds are calibrated for one setting, so
            re-calibrate after changing it. Training ignores it.
        detection_zoom: 1 (off), or how many times larger (up to 2) the expert also reads each scored crop, in four
            tiles of the crop's size (`AnomalyAssistantModel._zoomed`); its learned map and score join the crop's
            own in logit terms (`assistant.modeling.ZOOM_WEIGHT`), in every mode. Thin scratches and cracks on busy
            textures, a pixel or two wide at the crop's size, are caught far more often; it costs four tower passes
            per crop. Re-calibrate after changing it (`train.calibrate --detection-zoom`). Training ignores it.
        detection_zoom_max: None (off), or the largest zoom (up to 2) for an image that has the pixels: one whose
            short side is larger than `detection_zoom`'s view is read at its own resolution (in whole patches), up to
            this zoom (at the default model's 256 px crop and 2x: 384 px at 1.5x, 448 px at 1.75x, 512 px and more at
            2x); same four tower passes. Needs `detection_zoom` > 1 (`zoom_source_side_of`).
        few_shot_thresholds: (image, pixel) thresholds calibrated for the few-shot mode (scores against normal
            references), or None. When set, few-shot scores and maps are mapped piecewise-linearly so that
            these thresholds land on `image_threshold` / `pixel_threshold` (0 and 1 stay put; the order of the
            scores, so every AUROC, is unchanged): one threshold and one suspicion scale serve both modes.
            Written by `python -m train.self_reference --few-shot K`.
        batch_thresholds: the same for the folder mode (each image's patches scored against the other images').
        moderate_from: suspicion_bounds = (moderate_from · image_threshold, image_threshold) when set; None keeps
            the given bounds.
        domain_threshold: an image farther than this from the training images (`AnomalyAssistantModel.domain_distance`)
            is out of domain; None: no check.
        novel_threshold: an in-domain image farther than this is of a kind training did not show (its single-image
            report advises references or a folder); None: no check.
        novel_image_threshold: the zero-shot verdict threshold for such an image scored on its own (its score is
            given on the image threshold's scale, `Calibration.for_new_kinds`); None: the image threshold.
        typical_score_top: the highest median learned score of a held-out folder's normal images; a folder whose
            typical image, or normal references whose median, scores above it has its learned scores shifted down
            (`Calibration.anchor`); None: never. All thresholds are fitted and written by `assistant.calibration`.
    """

    model_type = "anomaly_assistant"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        expert_config: dict | None = None,
        selector_config: dict | None = None,
        image_token_index: int = 151646,
        vision_feature_layer: int | list[int] = -1,
        vision_feature_select_strategy: str = "full",
        vision_aspect_ratio: str = "anyres_max_9",
        image_grid_pinpoints: list | None = None,
        projector_hidden_act: str = "gelu",
        multimodal_projector_bias: bool = True,
        image_threshold: float = 0.5,
        pixel_threshold: float = 0.5,
        suspicion_marker: str = " with {level} suspicious features: ",
        suspicion_bounds: tuple[float, float] = (0.3, 0.7),
        image_token_pooling: int = 1,
        detection_views: int = 1,
        detection_zoom: float = 1.0,
        detection_zoom_max: float | None = None,
        few_shot_thresholds: tuple[float, float] | None = None,
        batch_thresholds: tuple[float, float] | None = None,
        moderate_from: float | None = None,
        domain_threshold: float | None = None,
        novel_threshold: float | None = None,
        novel_image_threshold: float | None = None,
        typical_score_top: float | None = None,
        format_version: int = FORMAT_VERSION,
        **kwargs,
    ):
        self.vision_config = _sub_config(vision_config)
        self.text_config = _sub_config(text_config)
        self.expert_config = expert_config
        self.selector_config = selector_config
        self.image_token_index = image_token_index
        self.vision_feature_layer = vision_feature_layer
        if vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' or 'full', got {vision_feature_select_strategy!r}"
            )
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.vision_aspect_ratio = vision_aspect_ratio
        self.image_grid_pinpoints = (
            image_grid_pinpoints if image_grid_pinpoints is not None else LLAVA_OV_GRID_PINPOINTS
        )
        self.projector_hidden_act = projector_hidden_act
        self.multimodal_projector_bias = multimodal_projector_bias
        self.suspicion_marker = suspicion_marker
        # thresholds are stored here and owned by assistant.calibration: it validates them and is the only writer
        Calibration(
            image_threshold,
            pixel_threshold,
            moderate_from,
            suspicion_bounds,
            {"few_shot": few_shot_thresholds, "batch": batch_thresholds},
            domain_threshold,
            novel_threshold,
            novel_image_threshold,
            typical_score_top,
        ).write(self)
        if int(image_token_pooling) < 1:
            raise ValueError(f"image_token_pooling must be >= 1, got {image_token_pooling}")
        self.image_token_pooling = int(image_token_pooling)
        if int(detection_views) not in (1, 2, 4, 8):
            raise ValueError(f"detection_views must be 1, 2, 4 or 8, got {detection_views}")
        self.detection_views = int(detection_views)
        self.detection_zoom, self.detection_zoom_max = checked_zooms(detection_zoom, detection_zoom_max)
        if int(format_version) > FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format version {format_version} is newer than this library supports ({FORMAT_VERSION}); upgrade anomaly-assistant"
            )
        self.format_version = int(format_version)
        # checkpoints calibrated before the folder mode lost its raised threshold for new kinds carry this key; it is
        # not used, and dropping it here keeps it out of the config they are saved with again
        kwargs.pop("novel_batch_threshold", None)
        tie = kwargs.pop("tie_word_embeddings", None)
        if tie is None and self.text_config is not None:
            tie = getattr(self.text_config, "tie_word_embeddings", False)
        super().__init__(tie_word_embeddings=bool(tie), **kwargs)

    @property
    def has_expert(self) -> bool:
        return self.expert_config is not None

    @property
    def zoom_source_side(self) -> int | None:
        """The side of the enlarged base view the zoom reads (`detection_zoom` > 1, an expert that scores each image's
        base view): the processor makes it from the image itself (`AssistantProcessor.zoom_views`), so an image larger
        than the crop keeps its own detail there. None otherwise (the zoom, if any, enlarges the crops)."""
        if (
            self.detection_zoom <= 1.0
            or not self.has_expert
            or (self.expert_config or {}).get("views", "base") != "base"
        ):
            return None
        return zoom_geometry(self.vision_config.image_size, self.detection_zoom, self.patches_per_side)[1]

    def zoom_source_side_of(self, height: int, width: int) -> int | None:
        """The zoom's view side for an image of `height` × `width` pixels: its short side in whole patches, between
        `zoom_source_side` and `detection_zoom_max`'s view, so the zoom reads an image that has the pixels at its own
        resolution; `zoom_source_side` without `detection_zoom_max`."""
        side = self.zoom_source_side
        if side is None or self.detection_zoom_max is None:
            return side
        size, patches = self.vision_config.image_size, self.patches_per_side
        stride = size // patches
        own = size + (min(int(height), int(width)) - size) // stride * stride
        return max(side, min(own, zoom_geometry(size, self.detection_zoom_max, patches)[1]))

    @property
    def patches_per_side(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def llm_patches_per_side(self) -> int:
        """Side of each crop's token grid as the LLM reads it (after `image_token_pooling`)."""
        return -(-self.patches_per_side // self.image_token_pooling)

    @property
    def calibration(self) -> Calibration:
        """The thresholds this config holds (`assistant.calibration.Calibration`, their one owner)."""
        return Calibration.of(self)

    def few_shot_rescale(self, values, pixel: bool = False):
        """Few-shot scores (or maps) on the zero-shot scale (`Calibration.rescale`)."""
        return self.calibration.rescale(values, "few_shot", pixel)

    def suspicion_level(self, score: float) -> str:
        return self.calibration.suspicion_level(score)


_register_backbones()  # the pretrained-backbone towers' configs parse inside ours (AutoConfig); no weights read
