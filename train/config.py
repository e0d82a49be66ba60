"""One typed schema for training runs: dataclasses, YAML recipes and strict dotted overrides.

    cfg = load_config("configs/train/debug_tiny.yaml", ["lora.r=64", "trainer.max_steps=10"])

Every key of a recipe or an override must name a field of the schema; anything else is a
`ConfigError` naming the key ("Unknown config key: lora.rr"). The resolved config is written as
`training_config.yaml` next to every checkpoint, with the git commit.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# the library reads a checkpoint's run config (evaluation must not import train/); re-exported for train's modules
from assistant.calibration import CalibrationConfig
from assistant.expert import ExpertConfig
from assistant.run_config import RUN_CONFIG_FILE, ConfigError, config_section, read_run_config  # noqa: F401
from assistant.selector import SelectorConfig

STAGES = ("stage1", "stage2", "all")


#: the towers `ModelInit.vision` builds: random transformers towers, or a pretrained backbone from the package index
INIT_TOWERS = ("clip", "siglip", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


@dataclass
class ModelInit:
    """A small random model built from scratch (no download): vision tower, LLM and a tokenizer trained on the corpus."""

    #: clip | siglip (random, trained from scratch) | efficientnet_lite0/1/2 (ImageNet weights from the package index,
    #: frozen; `vision_hidden`, `vision_layers`, `vision_heads` and `patch` then follow from the backbone)
    vision: str = "clip"
    vision_hidden: int = 32
    vision_layers: int = 4
    #: the tower's attention heads (None: one per 16 channels). Fewer, wider heads step faster on CPU
    #: (bench/bench_heads.py), but a 2 x 64 tower learned less in the same steps (docs/default_model_history.md)
    vision_heads: int | None = None
    tile: int = 32  # vision image size
    patch: int = 8
    max_tiles_side: int = 3
    text: str = "llama"  # llama | qwen2
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    vocab_size: int = 600
    seed: int = 0


@dataclass
class ModelConfig:
    path: str | None = None  # a checkpoint folder (this project's or llava-hf LLaVA-OneVision)
    init: ModelInit | None = None  # or build one
    #: the expert and look-twice selector stage 1 gives a model without one: the library's own configs, their names
    #: and defaults (`assistant.expert.ExpertConfig`, `assistant.selector.SelectorConfig`)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    reinit_expert: bool = False  # stage 1: replace an existing expert with a fresh one
    #: the model's marker text in front of the look-twice tokens, set when stage 1 gives the model its expert (None:
    #: keep the model's); may hold `{where}` (`AnomalyAssistantConfig.suspicion_marker`)
    suspicion_marker: str | None = None
    #: the LLM reads each crop's patch grid pooled by this stride (`AnomalyAssistantConfig.image_token_pooling`;
    #: 2: a quarter of the image tokens, a shorter and cheaper stage 2); None keeps the model's
    image_token_pooling: int | None = None


@dataclass
class SynthData:
    """Synthetic data generated into `<output_dir>/data` when no data path is given."""

    n: int = 24  # images per family
    size: int = 64
    families: list = field(default_factory=list)  # empty: all
    #: empty: the standard seven (`data_prep.synth.DEFECT_TYPES`); `shading`, a large region, only when listed
    defect_types: list = field(default_factory=list)
    anomaly_ratio: float = 0.5
    seed: int = 0
    #: the conversations name a family by its kind ("surface", "part") instead of its noun ("wooden board"): a model
    #: trained on a few families cannot name a surface it never saw, and would otherwise call it one it did
    generic_nouns: bool = False
    #: the conversations describe every defect in the generic kind's words ("an irregular region", "it differs
    #: visibly from a normal sample") instead of its type's ("a fine crack"): a small model that cannot tell the types
    #: apart would otherwise name one type for all of them
    generic_defects: bool = False


@dataclass
class DataConfig:
    masked: str | None = None  # stage 1: MVTec-layout folder (or synth output) or a VisA root
    instructions: str | None = None  # stage 2: LLaVA-format JSON (`data_prep instruct` output)
    synth: SynthData | None = None
    val_fraction: float = 0.25  # held out for threshold calibration
    map_size: int = 64  # stage 1: the map loss is computed at map_size × map_size
    #: stage 1: keep each decoded, preprocessed image in memory after its first use (fast epochs on small
    #: images; needs about crops × 3 × tile² bytes per image, the crops kept as 8-bit pixels, so leave it off for large datasets)
    cache_images: bool = False
    #: with cache_images, fill the cache before training in this many forked processes (0: lazily, as items are
    #: first used); the cached items are the same either way, so the run's results do not change
    cache_workers: int = 0
    max_length: int = 2048  # stage 2: longer conversations are skipped (and counted)
    #: stage 1 augmentation (`train.data.Augment`), drawn afresh per item: the 8 flips / quarter turns of image
    #: and mask, a hue rotation of up to ± this many turns (0.5: any hue), a saturation factor in [1 − s, 1 + s],
    #: uneven lighting (a smooth gain field in [1 − l, 1 + l]), sensor grain (fine luminance noise of a standard
    #: deviation drawn in [0, g], in [0, 1] intensity units), and on half the items a random window enlarged by a
    #: factor in [1, 1 + scale] (up to 2: the range of the model's detection_zoom) with its mask
    augment_flips: bool = False
    augment_hue: float = 0.0
    augment_saturation: float = 0.0
    augment_lighting: float = 0.0
    augment_grain: float = 0.0
    augment_scale: float = 0.0
    mask_targets: str = (
        "max"  # stage 1's map targets: max (a cell any defect pixel touches is 1) | area (its defective fraction)
    )
    split_seed: int = 0


@dataclass
class LossConfig:
    focal_weight: float = 1.0
    focal_alpha: float = 0.75  # weight of anomalous pixels (they are rare)
    focal_gamma: float = 2.0
    dice_weight: float = 1.0
    score_weight: float = 1.0
    fine_weight: float = 1.0  # the expert's fine head (`model.expert.fine_stages`): focal + dice on its own map


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    #: a regex over module names; scoped to the LLM (plain names would also hit the vision tower's attention)
    target_modules: str = r"language_model\..*\.(q_proj|k_proj|v_proj|o_proj)"
    modules_to_save: list = field(default_factory=lambda: ["multi_modal_projector", "selector"])


@dataclass
class TrainerConfig:
    max_steps: int = 100
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    save_steps: int = 50
    save_total_limit: int = 2  # keep the last K checkpoints
    logging_steps: int = 10
    precision: str = "auto"  # auto (bf16 on CUDA when supported, else fp32) | fp32 | bf16
    deepspeed: str | None = None  # a JSON file from configs/deepspeed/
    gradient_checkpointing: bool = False
    num_workers: int = 0
    #: compile the trained module with torch.compile (TrainingArguments.torch_compile): the default model's stage 1
    #: ran 10.9 steps/s on 2 CPU cores against 9.2 eager (cold compile included); needs a C++ compiler on CPU
    torch_compile: bool = False


@dataclass
class PolishConfig:
    """Stage 1's polish: a second, short phase after the main one, with its own warmup and cosine schedule and a
    milder augmentation (lighting, grain and scale off unless set here too). The main phase's strong hue changes keep the
    tower from fitting the surface itself; the polish lets it fit what the data look like. On the default model
    (`configs/train/default_model.yaml`), 3,000 such steps after its stage 1 raised the held-out image AUROC
    from 0.935 to 0.949 (the same 3,000 steps with the main augmentation: 0.935)."""

    steps: int = 3000
    lr: float = 2e-4
    warmup_ratio: float = 0.02
    augment_flips: bool = True
    augment_hue: float = 0.1
    augment_saturation: float = 0.2
    augment_lighting: float = 0.0
    augment_grain: float = 0.0
    augment_scale: float = 0.0


@dataclass
class TrainConfig:
    stage: str = "all"  # stage1 | stage2 | all (stage 1, then stage 2 on its output)
    output_dir: str = "runs/debug"
    seed: int = 0
    resume: bool = False
    full: bool = False  # stage 2: full fine-tuning instead of LoRA
    quantization: str = "none"  # none | 4bit (QLoRA)
    stage1_steps: int | None = None  # stage "all": stage 1's max_steps (default trainer.max_steps)
    stage1_lr: float | None = None  # stage "all": stage 1's learning rate (default trainer.lr)
    stage1_batch_size: int | None = None  # stage "all": stage 1's per-device batch size (default trainer.batch_size)
    stage1_train_vision: bool = False  # stage 1 also trains the vision tower (a model built from scratch)
    #: stage 1 trains only the parameters under these name prefixes (e.g. [expert.fine_head.]: a fine head added to
    #: a trained expert, which stays as it is); None: the expert and the selector
    stage1_trainable: list[str] | None = None
    stage1_compile: bool = False  # stage 1 runs under torch.compile (as trainer.torch_compile, for stage 1 only)
    #: stage 1 keeps an exponential moving average of the trained weights with this decay (e.g. 0.999) and
    #: calibrates and saves the average instead of the last weights (`train.stage1.WeightAverage`)
    stage1_ema: float | None = None
    #: stage 1 ends with a polish phase (`PolishConfig`; checkpoints in <output_dir>/stage1/polish/)
    stage1_polish: PolishConfig | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    #: how stage 1 and stage 2 fit thresholds (`assistant.calibration.CalibrationConfig`)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def validate(self) -> TrainConfig:
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.quantization not in ("none", "4bit"):
            raise ConfigError(f"quantization must be 'none' or '4bit', got {self.quantization!r}")
        if self.quantization == "4bit" and self.full:
            raise ConfigError("quantization=4bit trains LoRA adapters; it cannot be combined with full=true")
        if self.trainer.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"trainer.precision must be auto, fp32 or bf16, got {self.trainer.precision!r}")
        if self.model.path is None and self.model.init is None:
            raise ConfigError("give model.path (a checkpoint folder) or a model.init section")
        if self.model.init is not None and self.model.init.vision not in INIT_TOWERS:
            raise ConfigError(
                f"model.init.vision must be one of {', '.join(INIT_TOWERS)}, got {self.model.init.vision!r}"
            )
        heads = None if self.model.init is None else self.model.init.vision_heads
        if heads is not None and (heads < 1 or self.model.init.vision_hidden % heads):
            raise ConfigError(
                f"model.init.vision_heads must divide model.init.vision_hidden "
                f"({self.model.init.vision_hidden}), got {heads!r}"
            )
        if self.model.init is not None and self.model.init.text not in ("llama", "qwen2"):
            raise ConfigError(f"model.init.text must be llama or qwen2, got {self.model.init.text!r}")
        if not 0.0 < self.data.val_fraction < 1.0:
            raise ConfigError("data.val_fraction must be between 0 and 1")
        if self.data.synth is not None and self.data.synth.defect_types:
            from data_prep.synth.defects import ALL_DEFECT_TYPES

            unknown = [d for d in self.data.synth.defect_types if d not in ALL_DEFECT_TYPES]
            if unknown:
                raise ConfigError(
                    f"data.synth.defect_types: unknown defect type {unknown[0]!r}; choose from {', '.join(ALL_DEFECT_TYPES)}"
                )
        if self.model.image_token_pooling is not None and self.model.image_token_pooling < 1:
            raise ConfigError(f"model.image_token_pooling must be ≥ 1, got {self.model.image_token_pooling}")
        check_augment_ranges("data.", self.data)
        if self.data.mask_targets not in ("max", "area"):
            raise ConfigError(f"data.mask_targets must be max or area, got {self.data.mask_targets!r}")
        if self.stage1_ema is not None and not 0.0 < self.stage1_ema < 1.0:
            raise ConfigError(f"stage1_ema must be in (0, 1), got {self.stage1_ema}")
        if self.stage1_ema is not None and self.trainer.deepspeed is not None:
            raise ConfigError(
                "stage1_ema does not work with DeepSpeed (its parameters are partitioned); use DDP (torchrun)"
            )
        polish = self.stage1_polish
        if polish is not None:
            if polish.steps < 1 or polish.lr <= 0 or not 0.0 <= polish.warmup_ratio < 1.0:
                raise ConfigError("stage1_polish needs steps ≥ 1, lr > 0 and warmup_ratio in [0, 1)")
            check_augment_ranges("stage1_polish.", polish)
            if self.stage1_ema is not None:
                raise ConfigError(
                    "stage1_polish and stage1_ema cannot be combined (the average would span both phases)"
                )
        if self.data.cache_workers < 0 or self.trainer.num_workers < 0:
            raise ConfigError("data.cache_workers and trainer.num_workers must be ≥ 0")
        if self.trainer.max_steps < 1 or self.trainer.batch_size < 1 or self.trainer.grad_accum < 1:
            raise ConfigError("trainer.max_steps, trainer.batch_size and trainer.grad_accum must be ≥ 1")
        if self.stage1_batch_size is not None and self.stage1_batch_size < 1:
            raise ConfigError(f"stage1_batch_size must be ≥ 1, got {self.stage1_batch_size}")
        if self.trainer.save_total_limit < 1:
            raise ConfigError("trainer.save_total_limit must be ≥ 1")
        if self.trainer.deepspeed is not None and not Path(self.trainer.deepspeed).is_file():
            raise ConfigError(f"trainer.deepspeed: no file {self.trainer.deepspeed}")
        return self


def check_augment_ranges(prefix: str, section) -> None:
    """The stage-1 augmentation ranges, for `data.` and `stage1_polish.` alike (their `augment_*` fields share names)."""
    for name, low, high, closed, unit in (
        ("hue", 0.0, 0.5, True, " turns"),
        ("saturation", 0.0, 1.0, False, ""),
        ("lighting", 0.0, 1.0, False, ""),
        ("grain", 0.0, 0.5, True, ""),
        ("scale", 0.0, 1.0, True, ""),
    ):
        value = getattr(section, f"augment_{name}")
        if not (low <= value <= high if closed else low <= value < high):
            raise ConfigError(
                f"{prefix}augment_{name} must be in [{low:g}, {high:g}{']' if closed else ')'}{unit}, got {value}"
            )


# -- building dataclasses from plain dicts, strictly ------------------------------------------------
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> type | None:
    """The dataclass in `tp` (also inside `X | None`), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _scalar(value):
    """A list item as YAML reads it ("3" from `feature_layers=1,3` is a number); other values as they are."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _coerce(value, tp, key: str):
    allowed = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType) else (tp,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"config key {key} cannot be null")
    for option in allowed:
        if option is type(None):
            continue
        base = typing.get_origin(option) or option
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if base is list and isinstance(value, (list, str)):
            if isinstance(value, str):  # "a,b" from the command line
                value = [v.strip() for v in value.split(",") if v.strip()]
            element = (typing.get_args(option) or (None,))[0]
            if element in (None, str):
                return list(value)
            return [_coerce(_scalar(v), element, f"{key}[{i}]") for i, v in enumerate(value)]
    names = " or ".join(getattr(o, "__name__", str(o)) for o in allowed)
    raise ConfigError(f"config key {key} expects {names}, got {value!r}")


def from_dict(cls, values: dict, prefix: str = ""):
    """Build dataclass `cls` from `values`; unknown keys and wrong types raise `ConfigError`. A library config (one with
    its own `from_dict`: the expert's, the selector's, calibration's) is built and validated by that method."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '(top level)'} must be a mapping, got {values!r}")
    hints = _hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"Unknown config key: {prefix}{key}")
        sub = _is_dataclass_type(hints[key])
        if sub is not None:
            if value is None:
                if type(None) not in typing.get_args(hints[key]):
                    raise ConfigError(f"config section {prefix}{key} cannot be null")
                kwargs[key] = None
            else:
                kwargs[key] = from_dict(sub, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    if hasattr(cls, "from_dict"):
        try:
            return cls.from_dict(kwargs)
        except ValueError as error:
            raise ConfigError(f"{prefix.rstrip('.')}: {error}") from None
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_override(tree: dict, override: str) -> None:
    """`a.b.c=value` into the nested dict `tree` (value parsed as YAML: numbers, booleans, lists, null)."""
    if "=" not in override:
        raise ConfigError(f"an override is key=value, got {override!r}")
    key, text = override.split("=", 1)
    key = key.strip().removeprefix("--")
    if not key:
        raise ConfigError(f"an override is key=value, got {override!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node, cls = tree, TrainConfig
    for depth, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            raise ConfigError(f"Unknown config key: {'.'.join(parts[: depth + 1])}")
        if depth == len(parts) - 1:
            node[part] = value
            return
        sub = _is_dataclass_type(hints[part])
        if sub is None:
            raise ConfigError(f"config key {'.'.join(parts[: depth + 1])} is not a section")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node, cls = node[part], sub


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The recipe at `path` (or the defaults) with the dotted `overrides` applied, validated."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no config file {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys")
    for override in overrides:
        apply_override(tree, override)
    return from_dict(TrainConfig, tree).validate()


def git_commit() -> str | None:
    """The commit of the working tree this code runs from (with "-dirty" when it has changes), or None."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_info(cfg: TrainConfig, folder: str | Path, commit: str | None = None) -> None:
    """`git_commit.txt` and `training_config.yaml` (the resolved config) into `folder`; the config last, and whole
    (renamed into place), since a checkpoint counts as complete once it holds it (`train.trainer.is_complete`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "git_commit.txt").write_text((commit or "unknown") + "\n")
    staging = folder / f".{RUN_CONFIG_FILE}.partial"
    staging.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(staging, folder / RUN_CONFIG_FILE)
