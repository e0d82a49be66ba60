"""What training relies on in transformers' Trainer: the private methods `train.hf_compat` overrides (still there, same
signatures, still called where expected) and the public hooks the checkpoint rules use, run on a tiny plain module.

A failure here after a transformers upgrade means `train/hf_compat.py` (or `train/trainer.py`) must follow it."""

import inspect
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from train.hf_compat import RELIED_ON


@pytest.mark.parametrize("name", sorted(RELIED_ON))
def test_the_private_trainer_methods_still_exist_with_their_signatures_and_callers(name):
    from transformers import Trainer

    parameters, caller = RELIED_ON[name]
    method = getattr(Trainer, name, None)
    assert method is not None, f"transformers.Trainer.{name} is gone: train/hf_compat.py must follow transformers"
    assert tuple(inspect.signature(method).parameters) == parameters, f"Trainer.{name} changed its signature"
    assert f"self.{name}(" in inspect.getsource(getattr(Trainer, caller)), f"Trainer.{caller} no longer calls {name}"


def test_the_public_hooks_keep_their_shape():
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    assert PREFIX_CHECKPOINT_DIR == "checkpoint"
    for hook in ("on_train_begin", "on_save", "on_step_end"):
        parameters = tuple(inspect.signature(getattr(TrainerCallback, hook)).parameters)
        assert parameters == ("self", "args", "state", "control", "kwargs"), hook


class Part(nn.Module):
    """A trained part beside a frozen one; forward returns the loss, as the stage-1 objective does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trained = nn.Linear(4, 1)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x, y):
        return {"loss": ((self.trained(self.frozen(x)).squeeze(-1) - y) ** 2).mean()}


class Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(4, generator=g), "y": torch.tensor(float(i % 3))}


def tiny_trainer(out: Path, steps: int, keep: int = 2):
    from transformers import TrainingArguments

    from train.config import TrainConfig
    from train.hf_compat import PartialCheckpoints
    from train.trainer import ReliableTrainer

    class PartTrainer(PartialCheckpoints, ReliableTrainer):
        def save_part(self, folder, state_dict=None):
            Path(folder).mkdir(parents=True, exist_ok=True)
            torch.save(self.model.trained.state_dict(), Path(folder) / "part.pt")

        def load_part(self, folder, model):
            model.trained.load_state_dict(torch.load(Path(folder) / "part.pt", weights_only=True))

    cfg = TrainConfig()
    cfg.trainer.save_total_limit = keep
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=0.1,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        save_total_limit=None,
    )
    return PartTrainer(model=Part(), args=args, train_dataset=Pairs(), run_config=cfg, commit="test")


def test_checkpoints_hold_only_the_part_count_once_complete_and_resume(tmp_path):
    from train.trainer import last_checkpoint

    whole = tiny_trainer(tmp_path / "whole", 6)
    whole.train()
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == ["checkpoint-4", "checkpoint-6"], names  # the last 2 complete ones kept
    files = {p.name for p in (tmp_path / "whole" / "checkpoint-6").iterdir()}
    assert {"part.pt", "trainer_state.json", "training_config.yaml", "git_commit.txt", "optimizer.pt"} <= files
    assert not any(name.endswith(".safetensors") for name in files)  # the frozen part is not saved

    # a run killed at step 6 while saving: checkpoint-6 lacks its run info, so resuming starts from checkpoint-4
    killed = tmp_path / "killed"
    (killed / "checkpoint-6").mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "checkpoint-4", killed / "checkpoint-4")
    (killed / "checkpoint-6" / "trainer_state.json").write_text("{}")  # written, but the run info is not
    assert last_checkpoint(killed) == str(killed / "checkpoint-4")
    resumed = tiny_trainer(killed, 6)
    resumed.train(resume_from_checkpoint=last_checkpoint(killed))
    assert sorted(p.name for p in killed.iterdir()) == ["checkpoint-4", "checkpoint-6"]  # the leftover was replaced
    assert (killed / "checkpoint-6" / "training_config.yaml").is_file()
    torch.testing.assert_close(resumed.model.trained.weight, whole.model.trained.weight)  # the part was restored

    # the frozen part is never trained or restored from a checkpoint: loading a part file changes only the part
    fresh = tiny_trainer(tmp_path / "fresh", 6)
    before = fresh.model.frozen.weight.clone()
    fresh._load_from_checkpoint(str(tmp_path / "whole" / "checkpoint-6"))
    torch.testing.assert_close(fresh.model.trained.weight, whole.model.trained.weight)
    assert torch.equal(fresh.model.frozen.weight, before)


def test_a_checkpoint_about_to_be_written_again_stops_counting_as_complete(tmp_path):
    """Saving into a folder that already holds a complete checkpoint (a run resumed from an earlier one): its mark goes
    first, so a run killed halfway through the rewrite does not leave a mix of two saves that counts as complete."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from train.config import TrainConfig, write_run_info
    from train.trainer import CompleteCheckpoints, is_complete, last_checkpoint

    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{}")
    write_run_info(TrainConfig(), folder, "test")
    assert is_complete(folder) and last_checkpoint(tmp_path) == str(folder)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state = TrainerState()
    state.global_step = 4
    callback = CompleteCheckpoints(TrainConfig(), "test", keep=2)
    callback.on_step_end(args, state, TrainerControl(should_save=False))
    assert is_complete(folder)  # no save at this step: untouched
    callback.on_step_end(args, state, TrainerControl(should_save=True))
    assert not is_complete(folder) and last_checkpoint(tmp_path) is None
