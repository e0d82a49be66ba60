"""Training configs: every recipe loads, overrides are strict, bad input is one line and exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "train").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_names_its_command(recipe):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# ") and "python -m train" in first or "torchrun" in first or "deepspeed" in first
    cfg = load_config(recipe)
    assert isinstance(cfg, TrainConfig)


def test_deepspeed_configs_are_json_with_auto_fields():
    for name, stage in (("zero2.json", 2), ("zero3.json", 3)):
        values = json.loads((ROOT / "configs" / "deepspeed" / name).read_text())
        assert values["zero_optimization"]["stage"] == stage
        assert values["train_micro_batch_size_per_gpu"] == "auto"


def test_dotted_overrides_are_typed():
    cfg = load_config(ROOT / "configs/train/debug_tiny.yaml", ["lora.r=64", "trainer.lr=1e-3", "lora.modules_to_save=multi_modal_projector", "resume=true"])
    assert cfg.lora.r == 64 and cfg.trainer.lr == 1e-3 and cfg.resume is True
    assert cfg.lora.modules_to_save == ["multi_modal_projector"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.rr=3"], "Unknown config key: lora.rr"),
        (["nonsense=1"], "Unknown config key: nonsense"),
        (["lora.r=many"], "lora.r expects int"),
        (["trainer.max_steps.x=1"], "is not a section"),
        (["stage=stage9"], "stage must be one of"),
        (["quantization=4bit", "full=true"], "cannot be combined"),
        (["novalue"], "key=value"),
    ],
)
def test_bad_overrides_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/train/debug_tiny.yaml", overrides)


def test_unknown_key_in_a_recipe_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("# python -m train bad.yaml\nmodel:\n  init:\n    vison: clip\n")
    with pytest.raises(ConfigError, match="Unknown config key: model.init.vison"):
        load_config(recipe)


def test_cli_bad_config_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "train", "stage2", str(ROOT / "configs/train/debug_tiny.yaml"), "lora.rr=3", f"output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: Unknown config key: lora.rr"
    assert "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli_accepts_the_deepspeed_launchers_local_rank():
    from train.cli import parse

    cfg = parse(["--local_rank=1", "stage1", str(ROOT / "configs/train/debug_tiny.yaml"), "trainer.max_steps=3"])
    assert cfg.stage == "stage1" and cfg.trainer.max_steps == 3
