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
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )


def text_config(kind: str, vocab_size: int, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    return cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
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


def tiny_config(
    vision: str = "clip", text: str = "llama", expert: bool = True, tile: int = 32, vocab_size: int = 400, **overrides
):
    from .expert import ExpertConfig, evenly_spaced_layers
    from .selector import SelectorConfig

    vcfg = vision_config(vision, image_size=tile)
    expert_config = None
    if expert:
        expert_config = ExpertConfig(
            feature_layers=evenly_spaced_layers(vcfg.num_hidden_layers),
            embedding_dim=16,
            class_dim=16,
            predictor_dim=16,
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


def tiny_assistant(
    path: str | Path, vision: str = "clip", text: str = "llama", expert: bool = True, seed: int = 0, **overrides
) -> Path:
    """This project's checkpoint layout with a tiny random model."""
    from .modeling import AnomalyAssistantModel
    from .processing import AssistantProcessor

    path = Path(path)
    tokenizer = train_tokenizer()
    config = tiny_config(vision, text, expert, vocab_size=len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = AnomalyAssistantModel(config).eval()
    processor = AssistantProcessor(
        tokenizer, image_processor(config.vision_config.image_size, clip_normalisation=vision == "clip"), config
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# -- Qwen2.5-VL in Qwen's layout ------------------------------------------------------------------------
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def qwen_tokenizer(corpus: list[str] | None = None, vocab_size: int = 400):
    """A byte-level BPE tokenizer with Qwen2.5-VL's chat and vision special tokens."""
    from .qwen import QWEN_CHAT_TEMPLATE

    return train_tokenizer(corpus, vocab_size, QWEN_SPECIAL_TOKENS, QWEN_CHAT_TEMPLATE)


def tiny_qwen2_5_vl(
    path: str | Path,
    seed: int = 0,
    corpus: list[str] | None = None,
    vocab_size: int = 400,
    vision_hidden: int = 32,
    vision_layers: int = 4,
    text_hidden: int = 32,
    text_layers: int = 2,
    max_pixels: int = 28 * 28 * 64,
    tie_word_embeddings: bool = True,
) -> Path:
    """A Qwen2.5-VL checkpoint as Qwen ships it (`model_type: qwen2_5_vl`, Qwen's image processor config, tokenizer,
    chat template), written by transformers' `save_pretrained`. Window attention in the middle layers, full
    attention in every other one, as the real tower alternates them."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = qwen_tokenizer(corpus, vocab_size)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    heads = max(1, text_hidden // 16)
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": vision_layers,
            "hidden_size": vision_hidden,
            "intermediate_size": vision_hidden * 2,
            "num_heads": 2,
            "out_hidden_size": text_hidden,
            "window_size": 56,
            "patch_size": 14,
            "fullatt_block_indexes": list(range(1, vision_layers, 2)),
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": text_hidden,
            "intermediate_size": text_hidden * 2,
            "num_hidden_layers": text_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 4096,
            "initializer_range": 0.5,  # as text_config: image-dependent
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": _mrope_section(text_hidden // heads),
            },
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=max_pixels).save_pretrained(path)
    (path / "chat_template.jinja").write_text(tokenizer.chat_template)
    return path


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen's split of a head's rotary half into (temporal, height, width) sections, 2:3:3 as in the real models."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]
