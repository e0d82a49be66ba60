"""Stage 1: train the anomaly expert (prompts, adapters, score head) and the look-twice selector.

The vision tower, projector and LLM are frozen and the LLM is never run: the loss is focal + dice on
the stitched anomaly map (`assistant.maps.image_anomaly_map`, at `data.map_size`²) against the mask,
plus BCE on the image score. Afterwards the image threshold (the best balanced accuracy) and the pixel
threshold (F1-max) are calibrated on the held-out split and stored in the checkpoint's config, with
`suspicion_bounds = (t/2, t)` so that the "highly suspicious" marker the LLM sees coincides with an anomalous verdict.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from .config import ConfigError, LossConfig
from .hf_compat import PartialCheckpoints
from .scoring import small_maps  # held-out scoring and calibration live in train.scoring
from .trainer import checkpoint_folder

TRAINABLE_FILE = "trainable.safetensors"
AVERAGE_FILE = "weight_average.safetensors"


def focal_loss(prob: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    prob = prob.clamp(1e-6, 1 - 1e-6)
    pos = -alpha * (1 - prob) ** gamma * target * torch.log(prob)
    neg = -(1 - alpha) * prob**gamma * (1 - target) * torch.log(1 - prob)
    return (pos + neg).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft dice per image (an empty mask with an empty map scores 1), averaged."""
    dims = tuple(range(1, prob.dim()))
    inter = (prob * target).sum(dims)
    return (1 - (2 * inter + eps) / (prob.sum(dims) + target.sum(dims) + eps)).mean()


class ExpertObjective(nn.Module):
    """The stage-1 training module: forward returns the loss (so DDP/DeepSpeed wrap it like any model)."""

    def __init__(
        self, model, loss: LossConfig, map_size: int, train_vision: bool = False, trainable: list[str] | None = None
    ):
        super().__init__()
        self.model, self.loss, self.map_size = model, loss, map_size
        trained = ("expert.", "selector.") + (("vision_tower.",) if train_vision else ())
        if trainable is not None:
            trained = tuple(trainable)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith(trained))
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"stage 1 would train nothing: no parameter name starts with any of {list(trained)}")
        #: only the fine head trains: the rest of the loss could not move anything
        self.fine_only = trainable is not None and all(t.startswith("expert.fine_head") for t in trainable)

    def forward(self, pixel_values, image_sizes, masks, labels):
        crop_maps, scores, fine = self.model.detect(pixel_values, image_sizes.tolist(), with_fine=True)
        c = self.loss
        labels = labels.to(scores.device).float()
        total = scores.new_zeros((), dtype=torch.float32)
        if not self.fine_only:
            maps = small_maps(self.model, crop_maps, image_sizes.tolist(), self.map_size)
            masks, labels = masks.to(maps), labels.to(maps)
            total = (
                c.focal_weight * focal_loss(maps, masks, c.focal_alpha, c.focal_gamma)
                + c.dice_weight * dice_loss(maps, masks)
                + c.score_weight * F.binary_cross_entropy(scores.float().clamp(1e-6, 1 - 1e-6), labels)
            )
        if fine is not None:  # the fine head on its own map, at its own resolution (each crop: the whole image)
            fine = fine.float()
            target = masks.to(fine)
            if target.dim() == 4:
                target = target.squeeze(1)
            if target.shape[-2:] != fine.shape[-2:]:
                target = F.adaptive_max_pool2d(target[:, None], fine.shape[-2:])[:, 0]  # thin defects kept
            total = total + c.fine_weight * (
                c.focal_weight * focal_loss(fine, target, c.focal_alpha, c.focal_gamma)
                + c.dice_weight * dice_loss(fine, target)
            )
        elif self.fine_only:
            raise ConfigError("stage1_trainable names the fine head, but the model's expert has none")
        return {"loss": total}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}


class WeightAverage(TrainerCallback):
    """Exponential moving average of the trained parameters, updated after every optimizer step.

    The decay ramps up as min(decay, (1 + t) / (10 + t)) so the average does not remember the random start.
    `swap_in()` copies the average into the model (for calibration and saving). It saves itself into each checkpoint
    (`on_save`) and `load(checkpoint)` restores it on resume, so a resumed run ends with the same average.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]
        self.updates = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            state_dict = {k: v.cpu() for k, v in self.state_dict().items()}
            save_file(state_dict, str(checkpoint_folder(args, state) / AVERAGE_FILE))

    def load(self, checkpoint: str | Path) -> None:
        path = Path(checkpoint) / AVERAGE_FILE
        if not path.is_file():
            raise ConfigError(f"{checkpoint} holds no weight average (was it trained without stage1_ema?)")
        self.load_state_dict(load_file(str(path)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {name: value.contiguous() for name, value in zip(self.names, self.average)}
        state["__updates__"] = torch.tensor(self.updates)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.names) | {"__updates__"}:
            raise ConfigError("the checkpoint's weight average does not match this run's trained parameters")
        self.updates = int(state["__updates__"])
        with torch.no_grad():
            for name, value in zip(self.names, self.average):
                value.copy_(state[name])

    def swap_in(self) -> None:
        with torch.no_grad():
            for param, value in zip(self.params, self.average):
                param.copy_(value)


def stage1_trainer_class(base):
    """`base` (the reliable Trainer) saving and resuming only the trained parts (expert + selector, and the tower when
    it trains), in `TRAINABLE_FILE` instead of the whole model's weights."""

    class ExpertTrainer(PartialCheckpoints, base):
        def save_part(self, folder, state_dict=None):
            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            objective = self.accelerator.unwrap_model(self.model)
            if state_dict is not None:  # DeepSpeed hands over the (gathered) state dict
                keep = set(objective.trainable_state())
                named = ((k.removeprefix("model."), v) for k, v in state_dict.items())
                state = {k: v.contiguous() for k, v in named if k in keep}
            else:
                state = objective.trainable_state()
            save_file({k: v.cpu() for k, v in state.items()}, str(folder / TRAINABLE_FILE))

        def load_part(self, folder, model):
            objective = self.accelerator.unwrap_model(model)
            state = load_file(str(Path(folder) / TRAINABLE_FILE))
            if set(state) != set(objective.trainable_state()):
                raise ConfigError(f"{folder} does not hold this run's expert parameters")
            objective.model.load_state_dict(state, strict=False)

    return ExpertTrainer
