"""Merge a LoRA adapter into its base: a standalone checkpoint in this project's layout.

    python -m train.merge --adapter runs/debug_tiny/stage2/adapter --out models/debug_tiny [--base PATH] [--overwrite]

The adapter folder is peft's format (`adapter_config.json` + `adapter_model.safetensors`, the base
model's path in `base_model_name_or_path`) plus the processor files and, when stage 2 recalibrated
the expert, `calibration.json` (the fitted `assistant.calibration.Calibration`, applied to the merged model). The merged folder loads with `AnomalyAssistant.from_pretrained(out)`
and answers as base + adapter does. A QLoRA adapter is merged into the full-precision base.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class MergeError(ValueError):
    pass


def _read(folder: Path) -> dict:
    try:
        return json.loads((folder / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise MergeError(f"{folder} is not a peft adapter folder: {error}") from None


def load_with_adapter(adapter: str | Path, base: str | Path | None = None):
    """(peft model, processor, generation config): the base with the adapter applied, thresholds from the adapter."""
    from peft import PeftModel

    from assistant import checkpoint
    from assistant.calibration import read_calibration

    adapter = Path(adapter)
    base = Path(base or _read(adapter).get("base_model_name_or_path") or "")
    if not str(base) or not (base / "config.json").is_file():
        raise MergeError(f"the adapter's base model {str(base)!r} is not a model folder; pass --base")
    model, processor, generation, _ = checkpoint.load(base)
    model = PeftModel.from_pretrained(model, adapter).eval()
    inner = model.get_base_model()
    calibration = read_calibration(adapter)  # what stage 2 fitted, recipe bounds and mode thresholds included
    if calibration is not None:
        calibration.write(inner.config)
    if (adapter / "tokenizer_config.json").is_file():
        processor = type(processor).from_pretrained(adapter, inner.config)
    return model, processor, generation


def assistant_with_adapter(adapter: str | Path, base: str | Path | None = None):
    """An `AnomalyAssistant` on base + adapter (unmerged), for comparing with the merged checkpoint."""
    from assistant.inference import AnomalyAssistant

    model, processor, generation = load_with_adapter(adapter, base)
    return AnomalyAssistant(model.get_base_model(), processor, generation, str(adapter), "assistant")


def merge(adapter: str | Path, out: str | Path, base: str | Path | None = None, overwrite: bool = False) -> Path:
    from .folders import atomic_folder, write_model_parts

    adapter, out = Path(adapter), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"{out} exists and is not empty (use --overwrite)")
    model, processor, generation = load_with_adapter(adapter, base)
    merged = model.merge_and_unload()
    with atomic_folder(out) as staging:
        write_model_parts(
            staging,
            merged,
            processor,
            generation,
            adapter,
            ("training_config.yaml", "git_commit.txt", "calibration.json"),
        )
        base_path = str(Path(model.peft_config["default"].base_model_name_or_path or base))
        (staging / "merged_from.json").write_text(
            json.dumps({"adapter": str(adapter.resolve()), "base": base_path}, indent=1) + "\n"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    from assistant.errors import run_main

    return run_main(_main, argv, bad_input=(MergeError,))


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.merge", description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--base", type=Path, help="base model folder (default: the one recorded in the adapter)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    out = merge(args.adapter, args.out, args.base, args.overwrite)
    print(f"merged {args.adapter} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
