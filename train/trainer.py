"""HF Trainer with this project's reliability rules, shared by both stages, through public hooks only.

* a checkpoint counts once complete: after every process has written its part, the run info (the resolved config and
  the git commit) goes in last, and only folders holding it are resumed from (`last_checkpoint`); the last K complete
  ones are kept (`save_total_limit`), and the incomplete leftovers of a killed run are removed when training starts;
* a NaN/inf loss stops the run before the optimizer step, naming the step; nothing is saved after it;
* `TrainingArguments` from the typed config: bf16 on CUDA where supported, fp32 on CPU; gloo DDP on CPU;
  DeepSpeed from a JSON file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import RUN_CONFIG_FILE, TrainConfig, write_run_info


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the message names the step."""


_CHECKPOINTING_ARG = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing on a transformers model, under either of its names (5.24 renamed it)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def training_arguments(cfg: TrainConfig, run_dir: Path, max_steps: int, lr: float, **overrides) -> TrainingArguments:
    t = cfg.trainer
    cuda = torch.cuda.is_available()
    bf16 = t.precision == "bf16" or (t.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    if bf16 and not cuda:
        raise ValueError("trainer.precision=bf16 needs a CUDA device; use fp32 or auto on CPU")
    values = dict(
        output_dir=str(run_dir),
        max_steps=max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=lr,
        weight_decay=t.weight_decay,
        warmup_steps=int(round(t.warmup_ratio * max_steps)),
        lr_scheduler_type=t.scheduler,
        max_grad_norm=t.max_grad_norm,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # `CompleteCheckpoints` keeps the last t.save_total_limit complete ones
        logging_steps=t.logging_steps,
        logging_first_step=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        deepspeed=t.deepspeed,
        # transformers 5.24 renamed gradient_checkpointing to activation_checkpointing (the old name goes in v6)
        **{_CHECKPOINTING_ARG: t.gradient_checkpointing},
        dataloader_num_workers=t.num_workers,
        torch_compile=t.torch_compile,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def checkpoint_folder(args: TrainingArguments, state) -> Path:
    """The folder the Trainer has just saved the checkpoint of `state.global_step` into (in `on_save`)."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


def checkpoint_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` folder in `run_dir`, complete or not, by step."""
    if not run_dir.is_dir():
        return []
    return sorted(
        (int(p.name.split("-")[-1]), p)
        for p in run_dir.iterdir()
        if p.is_dir() and p.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and p.name.split("-")[-1].isdigit()
    )


def is_complete(folder: Path) -> bool:
    """A checkpoint every process finished writing: its run info, written last, is there."""
    return (folder / "trainer_state.json").is_file() and (folder / RUN_CONFIG_FILE).is_file()


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete (the run info, written once every process has saved its part) and keeps the last
    `keep`; a checkpoint a killed run left incomplete is removed when training starts again. Runs after the Trainer's
    own flow callback, which decides in `on_step_end` whether this step saves."""

    def __init__(self, run_config: TrainConfig, commit: str | None, keep: int):
        self.run_config, self.commit, self.keep = run_config, commit, keep

    def on_train_begin(self, args, state, control, **kwargs):
        if args.should_save:
            for _, folder in checkpoint_folders(Path(args.output_dir)):
                if not is_complete(folder):
                    shutil.rmtree(folder, ignore_errors=True)
        PartialState().wait_for_everyone()

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and args.should_save:  # a folder about to be written again is not complete meanwhile
            (checkpoint_folder(args, state) / RUN_CONFIG_FILE).unlink(missing_ok=True)

    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()  # every rank's files (shards, RNG states) are in place
        if args.should_save:
            write_run_info(self.run_config, checkpoint_folder(args, state), self.commit)
            complete = [folder for _, folder in checkpoint_folders(Path(args.output_dir)) if is_complete(folder)]
            for folder in complete[: -self.keep]:
                shutil.rmtree(folder, ignore_errors=True)
        PartialState().wait_for_everyone()


class ReliableTrainer(Trainer):
    """`Trainer` with checkpoints that count only complete, run info in every checkpoint and a NaN/inf guard.

    Callbacks that write into a checkpoint folder in `on_save` go in `callbacks=`: they then run before the mark that
    completes it.
    """

    def __init__(self, *args, run_config: TrainConfig, commit: str | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(CompleteCheckpoints(run_config, commit, run_config.trainer.save_total_limit))

    # -- loss ----------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss = result[0] if return_outputs else result
        self.check_finite(loss)
        return result

    def check_finite(self, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).float().reshape(-1)[:1].sum()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad)  # every rank stops together
        if bad.item() > 0:
            raise NonFiniteLoss(
                f"non-finite loss at step {self.state.global_step + 1}; stopping (the last checkpoint, if any, is intact)"
            )


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest complete checkpoint folder (`is_complete`), or None."""
    complete = [folder for _, folder in checkpoint_folders(Path(run_dir)) if is_complete(folder)]
    return str(complete[-1]) if complete else None
