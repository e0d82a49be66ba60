"""HF Trainer with this project's reliability rules, shared by both stages.

* checkpoints are written into a staging folder and renamed into place (`checkpoint-N` exists only
  complete), the last K kept (`save_total_limit`); each holds the resolved config and the git commit;
* a NaN/inf loss stops the run before the optimizer step, naming the step; nothing is saved after it;
* `TrainingArguments` from the typed config: bf16 on CUDA where supported, fp32 on CPU; gloo DDP on CPU;
  DeepSpeed from a JSON file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import TrainConfig, write_run_info


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the message names the step."""


_CHECKPOINTING_ARG = (
    "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing"
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
        save_total_limit=t.save_total_limit,
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


class ReliableTrainer(Trainer):
    """`Trainer` with atomic checkpoints, run info in every checkpoint and a NaN/inf guard."""

    def __init__(self, *args, run_config: TrainConfig, commit: str | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_config = run_config
        self.commit = commit
        self._staging: str | None = None

    # -- loss ----------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
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

    # -- checkpoints ---------------------------------------------------------------------------------
    def _get_output_dir(self, trial):
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f".staging-{name}")
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)
        self.args.save_total_limit, limit = None, self.args.save_total_limit  # rotate in the real folder only
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            write_run_info(self.run_config, os.path.join(staging, name), self.commit)
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            self._rotate(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate(self, run_dir: str) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        found = sorted(
            (int(p.name.split("-")[-1]), p)
            for p in Path(run_dir).iterdir()
            if p.is_dir() and p.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and p.name.split("-")[-1].isdigit()
        )
        for _, path in found[:-limit]:
            shutil.rmtree(path, ignore_errors=True)


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest complete checkpoint folder (staging folders are never complete ones)."""
    if not run_dir.is_dir():
        return None
    found = [
        (int(p.name.split("-")[-1]), p)
        for p in run_dir.iterdir()
        if p.is_dir() and p.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and p.name.split("-")[-1].isdigit()
        and (p / "trainer_state.json").is_file()
    ]
    return str(max(found)[1]) if found else None
