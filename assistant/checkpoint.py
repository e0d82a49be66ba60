"""Finding and loading checkpoints of four kinds, and converting Anomaly-OV's expert weights.

(a) this project's folders (`config.json` with `model_type: anomaly_assistant`, safetensors weights,
    tokenizer, image processor, chat template);
(b) a plain LLaVA-OneVision checkpoint in transformers' llava-hf layout (no expert: no score);
(c) a hub id, resolved by `huggingface_hub` where a hub is reachable, then (a) or (b);
(d) Anomaly-OV's released expert (`pretrained_expert_05b.pth` / `_7b.pth`) on a LLaVA-OneVision base,
    read with `torch.load(weights_only=True)` and saved as safetensors in a folder of kind (a);
(e) a plain Qwen2.5-VL checkpoint in Qwen's layout (`model_type: qwen2_5_vl`), and this project's folders built
    on one (`anomaly_assistant_qwen2_5_vl`): `assistant.qwen`.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from transformers import GenerationConfig

from .calibration import Calibration
from .config import AnomalyAssistantConfig
from .domain import load_bank
from .expert import ExpertConfig
from .modeling import AnomalyAssistantModel
from .processing import AssistantProcessor, read_chat_template
from .qwen import QWEN_FAMILIES, QwenAssistantConfig, QwenAssistantModel, QwenProcessor, from_qwen2_5_vl
from .selector import SelectorConfig


class ModelLoadError(ValueError):
    """A model that cannot be found or read; the message is one line for the user."""


def default_model_path() -> Path:
    return Path(str(resources.files("assistant") / "default_model"))


def resolve(path_or_id: str | Path) -> Path:
    """A local checkpoint folder for a path, "default" or a hub id."""
    text = str(path_or_id)
    if text == "default":
        path = default_model_path()
        if not (path / "config.json").is_file():
            raise ModelLoadError("the embedded default model is not installed with this package; pass --model PATH")
        return path
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"'{text}' is not a model folder: it has no config.json")
        return path
    if path.exists():
        raise ModelLoadError(f"'{text}' is a file; a model is a folder with config.json")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _download(text)
    raise ModelLoadError(f"no model at '{text}'")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=["*.json", "*.jinja", "*.safetensors", "*.txt", "*.model", "*.py.txt"]
            )
        )
    except Exception as error:  # network, auth, missing repo: all mean "cannot get it"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot fetch '{repo_id}' from the hub: {reason}") from None


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {error}") from None


def load(path_or_id: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Returns (model, processor, generation_config, kind): kind "assistant", "llava_onevision" or "qwen2_5_vl"."""
    path = resolve(path_or_id)
    model_type = read_config(path).get("model_type")
    try:
        if model_type == AnomalyAssistantConfig.model_type:
            model = AnomalyAssistantModel.from_pretrained(path, dtype=dtype or torch.float32)
            kind = "assistant"
        elif model_type == "llava_onevision":
            model = from_llava_onevision(path, dtype or torch.float32)
            kind = "llava_onevision"
        elif model_type in (QwenAssistantConfig.model_type, *QWEN_FAMILIES):
            model, kind = _load_qwen(path, model_type, dtype or torch.float32)
        else:
            raise ModelLoadError(
                f"'{path}' holds a '{model_type}' model; expected anomaly_assistant, llava_onevision or qwen2_5_vl"
            )
        processor_class = QwenProcessor if isinstance(model.config, QwenAssistantConfig) else AssistantProcessor
        processor = processor_class.from_pretrained(path, model.config)
        load_bank(model, path)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load the model in '{path}': {reason}") from None
    generation = (
        GenerationConfig.from_pretrained(path) if (path / "generation_config.json").is_file() else GenerationConfig()
    )
    return model.to(device).eval(), processor, generation, kind


def _load_qwen(path: Path, model_type: str, dtype: torch.dtype):
    """(model, kind) for a Qwen2.5-VL base in Qwen's layout, or this project's checkpoint built on one."""
    if model_type == QwenAssistantConfig.model_type:
        return QwenAssistantModel.from_pretrained(path, dtype=dtype), "assistant"
    return from_qwen2_5_vl(path, dtype), model_type


def from_llava_onevision(path: Path, dtype: torch.dtype = torch.float32) -> AnomalyAssistantModel:
    """Load a llava-hf LLaVA-OneVision checkpoint with transformers and compose our model from its parts."""
    from transformers import LlavaOnevisionForConditionalGeneration

    return compose_from_llava(LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=dtype))


def compose_from_llava(llava) -> AnomalyAssistantModel:
    """Our model holding the very modules of a loaded `LlavaOnevisionForConditionalGeneration` (no copy)."""
    from transformers import AutoModelForCausalLM

    lcfg = llava.config
    config = AnomalyAssistantConfig(
        vision_config=lcfg.vision_config,
        text_config=lcfg.text_config,
        image_token_index=lcfg.image_token_id,
        vision_feature_layer=lcfg.vision_feature_layer,
        vision_feature_select_strategy=lcfg.vision_feature_select_strategy,
        vision_aspect_ratio=lcfg.vision_aspect_ratio,
        image_grid_pinpoints=lcfg.image_grid_pinpoints,
        projector_hidden_act=lcfg.projector_hidden_act,
        multimodal_projector_bias=lcfg.multimodal_projector_bias,
        tie_word_embeddings=lcfg.text_config.tie_word_embeddings,
    )
    with torch.device("meta"):
        model = AnomalyAssistantModel(config)
        language_model = AutoModelForCausalLM.from_config(lcfg.text_config)
    language_model.model = llava.model.language_model
    language_model.lm_head = llava.lm_head
    language_model.generation_config = llava.generation_config
    model.language_model = language_model
    model.vision_tower = llava.model.vision_tower
    model.multi_modal_projector = llava.model.multi_modal_projector
    model.image_newline = llava.model.image_newline
    leftovers = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise ModelLoadError(f"could not take over {leftovers[0]} from the LLaVA-OneVision checkpoint")
    return model


def add_expert(
    model: AnomalyAssistantModel, expert_config: ExpertConfig, selector_config: SelectorConfig, seed: int | None = None
) -> AnomalyAssistantModel:
    """Give a model a freshly initialised expert and selector (the start of stage-1 training), in place."""
    from .expert import AnomalyExpert
    from .selector import LookTwiceSelector

    config = model.config
    if max(expert_config.feature_layers) > config.vision_config.num_hidden_layers:
        raise ValueError(
            f"expert feature layer {max(expert_config.feature_layers)} is beyond the tower's "
            f"{config.vision_config.num_hidden_layers} layers"
        )
    if seed is not None:
        torch.manual_seed(seed)
    reference = model.get_input_embeddings().weight  # every base family has one
    dtype, device = reference.dtype, reference.device
    hidden = config.vision_config.hidden_size
    config.expert_config = expert_config.to_dict()
    config.selector_config = selector_config.to_dict()
    from .modeling import expert_fine_channels

    fine = expert_fine_channels(config.vision_config, expert_config)
    model.expert = AnomalyExpert(expert_config, hidden, config.patches_per_side**2, fine).to(device, dtype)
    model.selector = LookTwiceSelector(selector_config, hidden).to(device, dtype)
    return model


def add_fine_head(model: AnomalyAssistantModel, expert_config: ExpertConfig, seed: int | None = None) -> None:
    """Give a model's trained expert a freshly initialised fine head (`expert_config`'s fine stages, width and
    weight), in place; the rest of the expert is kept."""
    from .expert import FineHead
    from .modeling import expert_fine_channels

    if model.expert is None:
        raise ValueError("the model has no expert to add a fine head to")
    values = {**model.expert.config.to_dict()}
    values.update(
        fine_stages=list(expert_config.fine_stages),
        fine_width=expert_config.fine_width,
        fine_weight=expert_config.fine_weight,
    )
    config = ExpertConfig.from_dict(values)
    channels = expert_fine_channels(model.config.vision_config, config)
    if seed is not None:
        torch.manual_seed(seed)
    reference = model.expert.positive_embedding
    model.expert.fine_head = FineHead(channels, config.fine_width).to(reference.device, reference.dtype)
    model.expert.config = config
    model.config.expert_config = config.to_dict()


# -- (d) Anomaly-OV's expert --------------------------------------------------------------------------
ANOMALY_OV_LAYERS = [7, 13, 19, 25]  # hidden_states of SigLIP-so400m that feed siglip_adaptors.{0..3}


def _anomaly_ov_key(key: str) -> str:
    if key.startswith("q_former."):
        return "selector." + key[len("q_former.") :]
    if key.startswith("siglip_adaptors."):
        return "expert.patch_adaptors." + key[len("siglip_adaptors.") :]
    return "expert." + key


def read_anomaly_ov_expert(expert_path: str | Path) -> dict[str, torch.Tensor]:
    """Anomaly-OV's `pretrained_expert_*.pth`, read safely (`weights_only=True`), keys in our names."""
    try:
        state = torch.load(str(expert_path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelLoadError(f"cannot read the expert weights '{expert_path}': {str(error).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"'{expert_path}' is not a state dict of tensors")
    return {_anomaly_ov_key(k.removeprefix("module.")): v for k, v in state.items()}


def attach_anomaly_ov_expert(model: AnomalyAssistantModel, expert_path: str | Path) -> AnomalyAssistantModel:
    """Add Anomaly-OV's expert and selector to a LLaVA-OneVision-based model, in place."""
    state = read_anomaly_ov_expert(expert_path)
    required = [
        "expert.positive_embedding",
        "expert.class_predictor.2.weight",
        "expert.final_predictor.0.weight",
        "selector.query_proj.weight",
        "expert.pooling_layer.0.weight",
        "expert.patch_adaptors.0.weight",
    ]
    absent = [k for k in required if k not in state]
    if absent:
        raise ModelLoadError(f"'{expert_path}' is not an Anomaly-OV expert: it lacks {absent[0]}")
    embedding_dim = state["expert.positive_embedding"].shape[-1]
    class_dim = state["expert.class_predictor.2.weight"].shape[0]
    predictor_dim = state["expert.final_predictor.0.weight"].shape[0]
    attention_dim = state["selector.query_proj.weight"].shape[0]
    num_patches = state["expert.pooling_layer.0.weight"].shape[1]
    vision_hidden = state["expert.patch_adaptors.0.weight"].shape[1]
    config = model.config
    if vision_hidden != config.vision_config.hidden_size or num_patches != config.patches_per_side**2:
        raise ModelLoadError(
            f"the expert expects a vision tower with hidden size {vision_hidden} and {num_patches} patches; "
            f"this base has {config.vision_config.hidden_size} and {config.patches_per_side**2}"
        )
    levels = sum(1 for k in state if k.startswith("expert.patch_adaptors.") and k.endswith(".weight"))
    layers = ANOMALY_OV_LAYERS if levels == 4 else None
    if layers is None or max(layers) > config.vision_config.num_hidden_layers:
        raise ModelLoadError(f"unexpected expert layout: {levels} feature levels")
    expert_config = ExpertConfig(
        feature_layers=layers,
        embedding_dim=embedding_dim,
        class_dim=class_dim,
        predictor_dim=predictor_dim,
        views="all",
    )
    selector_config = SelectorConfig(mode="pool", grid=2, attention_dim=attention_dim)
    add_expert(model, expert_config, selector_config)
    calibration = Calibration.of(config)
    Calibration(calibration.image_threshold, calibration.pixel_threshold, None, (0.3, 0.7)).write(
        config
    )  # Anomaly-OV's bounds
    own = {f"expert.{k}": v for k, v in model.expert.state_dict().items()}
    own.update({f"selector.{k}": v for k, v in model.selector.state_dict().items()})
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelLoadError(f"expert weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise ModelLoadError(
                f"expert weight {name} has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}"
            )
    model.expert.load_state_dict({k[len("expert.") :]: v for k, v in state.items() if k.startswith("expert.")})
    model.selector.load_state_dict({k[len("selector.") :]: v for k, v in state.items() if k.startswith("selector.")})
    return model


def convert_anomaly_ov(base: str | Path, expert_path: str | Path, out: str | Path) -> Path:
    """Write a checkpoint of kind (a): a LLaVA-OneVision base plus Anomaly-OV's expert, all safetensors."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(f"'{out}' exists and is not empty; choose a new folder")
    model, processor, generation, kind = load(base)
    if kind != "llava_onevision":
        raise ModelLoadError(f"'{base}' is not a LLaVA-OneVision checkpoint")
    attach_anomaly_ov_expert(model, expert_path)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    generation.save_pretrained(out)
    return out


__all__ = [
    "ModelLoadError",
    "attach_anomaly_ov_expert",
    "convert_anomaly_ov",
    "default_model_path",
    "add_expert",
    "compose_from_llava",
    "from_llava_onevision",
    "load",
    "read_anomaly_ov_expert",
    "read_chat_template",
    "resolve",
]
