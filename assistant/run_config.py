"""The resolved training config a checkpoint folder holds (`training_config.yaml`), read as a plain mapping.

Training writes it next to every checkpoint (`train.config.write_run_info`); evaluation and refits read what they
need from it with defaults, so a checkpoint from an older recipe, or one trained elsewhere (no file), still works.
"""

from __future__ import annotations

from pathlib import Path

import yaml

RUN_CONFIG_FILE = "training_config.yaml"


class ConfigError(ValueError):
    """A bad training config (a recipe, an override or a checkpoint's file); reported as one line on stderr, exit 2."""


def read_run_config(folder: str | Path) -> dict:
    """The `training_config.yaml` a checkpoint folder holds, as a plain dict ({} when there is none).

    Readers take what they need with defaults, so a file from an older recipe still loads; a file that is not a
    YAML mapping raises ConfigError naming it.
    """
    path = Path(folder) / RUN_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} is not a YAML mapping")
    return values


def config_section(values: dict, *keys: str) -> dict:
    """The mapping at `keys` inside `values` (e.g. "data", "synth"), {} where a level is missing or not a mapping."""
    for key in keys:
        values = values.get(key) if isinstance(values, dict) else None
    return values if isinstance(values, dict) else {}
