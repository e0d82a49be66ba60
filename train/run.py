"""The two training stages, top to bottom.

    <output_dir>/data/                      synthetic data, when the recipe generates it
    <output_dir>/base/                      the model a `model.init` section built
    <output_dir>/stage1/checkpoint-N/       resumable checkpoints (expert + selector, optimizer, RNG)
    <output_dir>/stage1/polish/checkpoint-N/  the same for stage 1's polish phase (`stage1_polish`)
    <output_dir>/stage1/model/              stage-1 result: a full checkpoint with calibrated thresholds
    <output_dir>/stage2/checkpoint-N/       resumable checkpoints (adapter or full weights)
    <output_dir>/stage2/adapter/            LoRA result in peft's format (+ processor files, calibration.json)
    <output_dir>/stage2/model/              full fine-tuning result (full=true)

Every result and checkpoint folder holds `training_config.yaml` (the resolved config) and `git_commit.txt`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from assistant.calibration import Calibration, write_report

from .build import data_paths, init_model, instruction_corpus, load_model
from .config import ConfigError, TrainConfig, git_commit, write_run_info
from .data import (
    Augment,
    ConversationCollator,
    Conversations,
    MaskedImages,
    Skipped,
    collate_masked,
    decode_checked,
    read_conversations,
    read_masked,
    split_records,
)
from .folders import atomic_folder, write_model_parts
from .scoring import calibrate, fit_domain
from .stage1 import ExpertObjective, WeightAverage, stage1_trainer_class
from .trainer import ReliableTrainer, checkpoint_folders, enable_checkpointing, last_checkpoint, training_arguments


def _say(args, message: str) -> None:
    if args.process_index == 0:
        print(message, flush=True)


def _resume_point(cfg: TrainConfig, run_dir: Path) -> str | None:
    found = last_checkpoint(run_dir)
    started = bool(checkpoint_folders(run_dir))  # complete or not: a killed run's leftovers are not overwritten unasked
    finished = any((run_dir / name).is_dir() for name in ("model", "adapter"))
    if (started or finished) and not cfg.resume:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume (resume=true) or choose a new output_dir")
    return found


def _save_model_folder(
    model, processor, generation, folder: Path, cfg: TrainConfig, commit, report: dict | None
) -> None:
    with atomic_folder(folder) as staging:
        write_model_parts(staging, model, processor, generation)
        write_run_info(cfg, staging, commit)
        if report is not None:
            write_report(report, staging, Calibration.of(model.config))


def run_stage1(cfg: TrainConfig, root: Path, masked: Path, base: Path, commit: str | None) -> Path:
    from assistant.checkpoint import add_expert, add_fine_head

    run_dir, final = root / "stage1", root / "stage1" / "model"
    args = training_arguments(
        cfg,
        run_dir,
        cfg.stage1_steps or cfg.trainer.max_steps,
        cfg.stage1_lr or cfg.trainer.lr,
        torch_compile=cfg.trainer.torch_compile or cfg.stage1_compile,
        per_device_train_batch_size=cfg.stage1_batch_size or cfg.trainer.batch_size,
    )
    if cfg.stage == "all" and cfg.resume and (final / "config.json").is_file():
        _say(args, f"stage 1 already finished: {final}")
        return final
    resume = _resume_point(cfg, run_dir)
    polish_dir = run_dir / "polish"
    polish_resume = _resume_point(cfg, polish_dir) if cfg.stage1_polish is not None else None
    model, processor, generation = load_model(base)
    set_token_pooling(model, cfg)
    if model.expert is None or cfg.model.reinit_expert:
        try:  # the recipe's expert and selector sections are the library's configs, validated when the recipe loaded
            add_expert(model, cfg.model.expert, cfg.model.selector, seed=cfg.seed)
        except ValueError as error:
            raise ConfigError(f"model.expert: {error}") from None
        if cfg.model.suspicion_marker is not None:
            model.config.suspicion_marker = cfg.model.suspicion_marker
        processor = type(processor)(
            processor.tokenizer, processor.image_processor, model.config, processor.chat_template
        )
    elif cfg.model.expert.fine_stages and not hasattr(model.expert, "fine_head"):
        try:  # a fine head added to a trained expert (train it alone with stage1_trainable: [expert.fine_head.])
            add_fine_head(model, cfg.model.expert, seed=cfg.seed)
        except ValueError as error:
            raise ConfigError(f"model.expert: {error}") from None
    # the split is drawn from the header-checked records, then each part is decoded once: the held-out part here, the
    # training part by the image cache's fill when there is one (it decodes every image anyway), else here. The
    # default model's 32,000 images: a header check of about 9 s + 0.9 s decoding the held-out part, against a 24.5 s
    # full check before the fill decoded them all again
    fill = cfg.data.cache_images and cfg.data.cache_workers > 0
    records, skipped = read_masked(masked, full_check=False)
    train_records, val_records = split_records(records, cfg.data.val_fraction, cfg.data.split_seed)
    val_records, problems = decode_checked(val_records)
    if not fill:
        train_records, more = decode_checked(train_records)
        problems += more
    augment = stage1_augment(cfg, model)
    objective = ExpertObjective(
        model, cfg.loss, cfg.data.map_size, train_vision=cfg.stage1_train_vision, trainable=cfg.stage1_trainable
    )
    dataset = MaskedImages(
        train_records,
        processor,
        cfg.data.map_size,
        cache=cfg.data.cache_images,
        augment=augment,
        mask_targets=cfg.data.mask_targets,
    )
    if fill:
        problems += dataset.fill_cache(cfg.data.cache_workers)
    skipped = Skipped(skipped.problems + problems, skipped.seen)
    if args.process_index == 0:
        skipped.report("stage 1 data")
    train_records = dataset.records
    if not train_records:
        raise ConfigError(f"no usable training images in {masked}")
    average = None
    if cfg.stage1_ema is not None:
        average = WeightAverage(model, cfg.stage1_ema)  # the trained parameters, under their saved names
        if resume is not None:
            average.load(resume)
    trainer = stage1_trainer_class(ReliableTrainer)(
        model=objective,
        args=args,
        train_dataset=dataset,
        data_collator=collate_masked,
        run_config=cfg,
        commit=commit,
        callbacks=[average] if average is not None else None,  # it saves into each checkpoint before the run info
    )
    _say(
        args, f"stage 1: {len(train_records)} training images, {len(val_records)} held out; resume from {resume or '-'}"
    )
    if polish_resume is None:
        trainer.train(resume_from_checkpoint=resume)
    else:  # the polish checkpoint holds every trained parameter: the main phase is over
        _say(args, "stage 1: main phase already finished")
    if average is not None:
        average.swap_in()
    if cfg.stage1_polish is not None:
        trainer = run_polish(cfg, dataset, model, polish_dir, polish_resume, commit)
    if trainer.is_world_process_zero():
        report = calibrate(model, processor, val_records, cfg.data.map_size, cfg.calibration)
        report["domain"] = fit_domain(
            model, processor, [r for r in train_records if r.label != 1], val_records, cfg.calibration, seed=cfg.seed
        )
        _save_model_folder(model, processor, generation, final, cfg, commit, report)
        print(f"stage 1: calibration {json.dumps(report)}")
        print(f"stage 1: model written to {final}", flush=True)
    trainer.accelerator.wait_for_everyone()
    return final


def run_polish(cfg: TrainConfig, dataset, model, polish_dir: Path, resume: str | None, commit: str | None):
    """Stage 1's polish phase (`PolishConfig`): the same loss and data, a new schedule and the milder augmentation."""
    polish = cfg.stage1_polish
    args = training_arguments(
        cfg,
        polish_dir,
        polish.steps,
        polish.lr,
        torch_compile=cfg.trainer.torch_compile or cfg.stage1_compile,
        per_device_train_batch_size=cfg.stage1_batch_size or cfg.trainer.batch_size,
        warmup_steps=int(round(polish.warmup_ratio * polish.steps)),
    )
    milder = dataclasses.replace(
        cfg,
        data=dataclasses.replace(
            cfg.data,
            augment_flips=polish.augment_flips,
            augment_hue=polish.augment_hue,
            augment_saturation=polish.augment_saturation,
            augment_lighting=polish.augment_lighting,
            augment_grain=polish.augment_grain,
            augment_scale=polish.augment_scale,
        ),
    )
    dataset.set_augment(stage1_augment(milder, model))
    # a new objective module around the same model: accelerate marks the module it prepared (and with stage1_compile
    # the mark reaches the main phase's objective), so reusing that one would leave the polish unprepared, eager
    objective = ExpertObjective(
        model, cfg.loss, cfg.data.map_size, train_vision=cfg.stage1_train_vision, trainable=cfg.stage1_trainable
    )
    trainer = stage1_trainer_class(ReliableTrainer)(
        model=objective,
        args=args,
        train_dataset=dataset,
        data_collator=collate_masked,
        run_config=cfg,
        commit=commit,
    )
    _say(args, f"stage 1: polish, {polish.steps} steps at lr {polish.lr:g}; resume from {resume or '-'}")
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _module_names(model, names: list[str]) -> list[str]:
    present = {name.split(".")[0] for name, _ in model.named_children()}
    return [n for n in names if n in present and getattr(model, n) is not None]


def stage1_augment(cfg: TrainConfig, model) -> Augment:
    """The configured augmentation (ranges checked by `TrainConfig.validate`); flips need base-view scoring."""
    from assistant.qwen import QwenAssistantConfig

    data = cfg.data
    augment = Augment(
        flips=data.augment_flips,
        hue=data.augment_hue,
        saturation=data.augment_saturation,
        lighting=data.augment_lighting,
        grain=data.augment_grain,
        scale=data.augment_scale,
    )
    if augment.active and isinstance(model.config, QwenAssistantConfig):
        raise ConfigError("data.augment_* act on image crops; a Qwen2.5-VL base reads flat patches: set them off")
    for name, on in (("augment_flips", data.augment_flips), ("augment_scale", data.augment_scale > 0)):
        if on and model.expert.config.views != "base":
            raise ConfigError(
                f"data.{name} needs the expert to score the base view only (views='base'): tiles do not flip or "
                "enlarge with the image"
            )
    return augment


def set_token_pooling(model, cfg: TrainConfig, lora: bool = False) -> None:
    """Apply `model.image_token_pooling` (when set) to the model's config.

    A LoRA adapter is loaded onto its base's config, so it cannot carry a different pooling: that case is
    refused (set the pooling in stage 1, or train stage 2 in full).
    """
    stride = cfg.model.image_token_pooling
    if stride is None:
        return
    current = model.config.image_token_pooling
    if lora and int(stride) != current:
        raise ConfigError(
            f"model.image_token_pooling={stride} differs from the base model's ({current}); a LoRA adapter keeps its base's "
            "token layout, so set it in stage 1 or train stage 2 with full=true"
        )
    model.config.image_token_pooling = int(stride)


def train_in_full(model, also: list[str] = ()) -> None:
    """Stage 2 without LoRA: the LLM, the projector, the image newline and the top-level modules `also` train; the
    tower, expert and selector stay frozen."""
    trained = {"language_model", "multi_modal_projector", *also}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.split(".")[0] in trained or name == "image_newline")
    model.config.use_cache = False


def run_stage2(cfg: TrainConfig, root: Path, instructions: Path, base: Path, commit: str | None) -> Path:
    run_dir = root / "stage2"
    final = run_dir / ("model" if cfg.full else "adapter")
    args = training_arguments(cfg, run_dir, cfg.trainer.max_steps, cfg.trainer.lr)
    resume = _resume_point(cfg, run_dir)
    model, processor, generation = load_model(base, quantize=cfg.quantization == "4bit")
    check_chat_template(processor.chat_template, base)
    set_token_pooling(model, cfg, lora=not cfg.full)  # the processor shares model.config, so its token count follows
    records, skipped = read_conversations(instructions)
    if args.process_index == 0:
        skipped.report("stage 2 data")
    to_save = _module_names(model, list(cfg.lora.modules_to_save))
    recalibrate = model.expert is not None and "selector" in to_save
    train_records, val_records = (
        split_records(records, cfg.data.val_fraction, cfg.data.split_seed) if recalibrate else (records, [])
    )
    dataset = Conversations(
        train_records, processor, with_levels=model.expert is not None, max_length=cfg.data.max_length
    )
    if args.process_index == 0:
        dataset.skipped.report("stage 2 length")
    if len(dataset) == 0:
        raise ConfigError(f"no usable conversations in {instructions}")

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if cfg.full:
        train_in_full(model, to_save)
        train_model = model
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        set_seed(cfg.seed)  # LoRA's initialisation: the same adapters in every run and on every rank
        pattern = re.compile(cfg.lora.target_modules)
        if not any(pattern.fullmatch(name) for name, _ in model.named_modules()):
            raise ConfigError(f"lora.target_modules {cfg.lora.target_modules!r} matches no module of the model")
        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            modules_to_save=to_save or None,
        )
        train_model = get_peft_model(model, lora)
        train_model.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    if cfg.trainer.gradient_checkpointing:
        enable_checkpointing(model.language_model)

    trainer = ReliableTrainer(
        model=train_model,
        args=args,
        train_dataset=dataset,
        run_config=cfg,
        commit=commit,
        data_collator=ConversationCollator(processor.tokenizer.pad_token_id),
    )
    n_trainable = sum(p.numel() for p in train_model.parameters() if p.requires_grad)
    _say(
        args,
        f"stage 2 ({'full' if cfg.full else 'LoRA'}{', 4-bit base' if cfg.quantization == '4bit' else ''}): "
        f"{len(dataset)} conversations, {n_trainable} trainable parameters; resume from {resume or '-'}",
    )
    trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():
        report = None
        if recalibrate and val_records:
            report = calibrate(model, processor, val_records, cfg.data.map_size, cfg.calibration)
        if report is not None:
            print(f"stage 2: recalibrated {json.dumps(report)}")
        if cfg.full:
            _save_model_folder(model, processor, generation, final, cfg, commit, report)
        else:
            with atomic_folder(final) as staging:
                train_model.save_pretrained(staging)
                processor.save_pretrained(staging)
                generation.save_pretrained(staging)
                write_run_info(cfg, staging, commit)
                if report is not None:
                    write_report(report, staging, Calibration.of(model.config))
        print(f"stage 2: {'model' if cfg.full else 'adapter'} written to {final}", flush=True)
    trainer.accelerator.wait_for_everyone()
    return final


def check_chat_template(template: str | None, base: Path) -> None:
    """Stage 2 supervises the assistant text the template marks with `{% generation %}`; refuse one without marks."""
    if isinstance(template, str) and "{% generation" not in template:
        raise ConfigError(
            f"the chat template of {base} marks no assistant text ({{% generation %}}), so stage 2 "
            "cannot tell the answers it learns from the prompt; give the model a template with the marks "
            "(docs/real_models_qwen.md shows one for Qwen2.5-VL)"
        )


def _base_chat_template(base: Path) -> str | None:
    """The template a model folder's processor will use, read without loading it (None: the project's default)."""
    from assistant.processing import read_chat_template

    template = read_chat_template(base)
    if template is None and (base / "tokenizer_config.json").is_file():
        template = json.loads((base / "tokenizer_config.json").read_text()).get("chat_template")
    return template


def run(cfg: TrainConfig) -> dict:
    """Run the configured stage(s); returns the result folders."""
    root = Path(cfg.output_dir)
    commit = git_commit()
    # set up the process group (if launched distributed) before anything else touches the disk
    args = training_arguments(cfg, root, 1, cfg.trainer.lr)
    with args.main_process_first(local=False, desc="data and model preparation"):
        masked, instructions = data_paths(cfg, root)
        if cfg.model.path is not None:
            base = Path(cfg.model.path)
        else:
            base = root / "base"
            if not (base / "config.json").is_file():
                init_model(cfg.model.init, instruction_corpus(instructions), base)
    if cfg.stage in ("stage2", "all"):  # before stage 1's hours, not after them
        check_chat_template(_base_chat_template(base), base)
    if args.process_index == 0:
        write_run_info(cfg, root, commit)
    results = {}
    if cfg.stage in ("stage1", "all"):
        base = results["stage1"] = run_stage1(cfg, root, masked, base, commit)
    if cfg.stage in ("stage2", "all"):
        results["stage2"] = run_stage2(cfg, root, instructions, base, commit)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return results
