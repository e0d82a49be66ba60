"""Tiny random checkpoints of the real classes and file layouts, written with `save_pretrained`.

No weights can be downloaded in tests, CI or benchmarks, so the code that loads real checkpoints
(CLIP/SigLIP towers, Llama/Qwen2 LLMs, llava-hf LLaVA-OneVision) is exercised on these: same classes,
same files, a few thousand parameters. Also handy for trying the tools without a download.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import AnomalyAssistantConfig
from .processing import CHAT_TEMPLATE
from .scratch import DEFAULT_CORPUS, SPECIAL_TOKENS, image_processor, train_tokenizer  # noqa: F401 (re-exported)


def vision_config(kind: str, image_size: int = 32, patch_size: int = 8, hidden: int = 32, layers: int = 4):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[kind]
    return cls(
        hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size,
    )


def text_config(kind: str, vocab_size: int, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    return cls(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=(kind == "qwen2"),
        # wide enough that a random model's greedy answer depends on the image (0.02 gives one repeated token)
        initializer_range=0.5,
    )


def tiny_llava_onevision(path: str | Path, seed: int = 0, tile: int = 32) -> Path:
    """A llava-hf LLaVA-OneVision checkpoint (SigLIP + Qwen2), as transformers saves it."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    path = Path(path)
    tokenizer = train_tokenizer()
    processor = image_processor(tile)
    config = LlavaOnevisionConfig(
        vision_config=vision_config("siglip", image_size=tile),
        text_config=text_config("qwen2", len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=processor.image_grid_pinpoints,
        vision_aspect_ratio="anyres_max_4",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def tiny_config(vision: str = "clip", text: str = "llama", expert: bool = True, tile: int = 32, vocab_size: int = 400, **overrides):
    from .expert import ExpertConfig, evenly_spaced_layers
    from .selector import SelectorConfig

    vcfg = vision_config(vision, image_size=tile)
    expert_config = None
    if expert:
        expert_config = ExpertConfig(
            feature_layers=evenly_spaced_layers(vcfg.num_hidden_layers), embedding_dim=16, class_dim=16, predictor_dim=16
        ).to_dict()
    values = dict(
        vision_config=vcfg,
        text_config=text_config(text, vocab_size),
        expert_config=expert_config,
        selector_config=SelectorConfig(attention_dim=16).to_dict() if expert else None,
        image_token_index=SPECIAL_TOKENS.index("<image>"),
        vision_feature_select_strategy="default" if vision == "clip" else "full",
        image_grid_pinpoints=image_processor(tile).image_grid_pinpoints,
        vision_aspect_ratio="anyres_max_4",
        suspicion_bounds=(0.25, 0.5),
    )
    values.update(overrides)
    return AnomalyAssistantConfig(**values)


def tiny_assistant(path: str | Path, vision: str = "clip", text: str = "llama", expert: bool = True, seed: int = 0, **overrides) -> Path:
    """This project's checkpoint layout with a tiny random model."""
    from .modeling import AnomalyAssistantModel
    from .processing import AssistantProcessor

    path = Path(path)
    tokenizer = train_tokenizer()
    config = tiny_config(vision, text, expert, vocab_size=len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = AnomalyAssistantModel(config).eval()
    processor = AssistantProcessor(tokenizer, image_processor(config.vision_config.image_size, clip_normalisation=vision == "clip"), config)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
