"""Writing model folders: a staging folder renamed into place, and the parts of a checkpoint.

Apart from `train.trainer` so that the commands that only write a model (`train.self_reference`, `train.merge`) do
not import the HF Trainer and what it pulls in (DeepSpeed when installed, peft, bitsandbytes: `import train.trainer`
took 12.5 s on 2 CPU cores, torch's 2.5 s included).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: the run's files a refit checkpoint (`train.calibrate`, `train.self_reference`) carries over from its source
RUN_FILES = ("training_config.yaml", "git_commit.txt", "training_summary.json")


def refit_problem(model_path: Path, out: Path, overwrite: bool) -> str | None:
    """Why checkpoint `model_path` cannot be refitted into `out` (one line), or None."""
    if not (model_path / "config.json").is_file():
        return f"{model_path} is not a checkpoint folder (no config.json)"
    if out.resolve() == model_path.resolve():
        return "--out must be a new folder, not the --model folder"
    if out.exists() and any(out.iterdir()) and not overwrite:
        return f"{out} exists and is not empty (use --overwrite)"
    return None


def atomic_folder(final: Path):
    """A context giving a staging folder that replaces `final` when the block succeeds."""
    import contextlib

    @contextlib.contextmanager
    def manager():
        staging = final.with_name(f".staging-{final.name}")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)

    return manager()


def write_model_parts(
    staging: Path, model, processor, generation, copy_from: Path | None = None, names: tuple[str, ...] = ()
) -> None:
    """Model, processor and generation config into `staging`, plus `names` copied from `copy_from`."""
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    generation.save_pretrained(staging)
    for name in names:
        if copy_from is not None and (Path(copy_from) / name).is_file():
            shutil.copy2(Path(copy_from) / name, staging / name)
