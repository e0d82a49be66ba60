"""Does a checkpoint's expert fit its own training data? The same figures on a sample of its training split and on
its held-out split.

    python -m train.fit_check --model assistant/default_model --data runs/default_model/data/synth [--n 800] [--seed 0]

The split is the checkpoint's own (`data.val_fraction` and `data.split_seed` from its `training_config.yaml`, as
`train.self_reference` reads them; without that file, 0.1 and 0). For each part it prints the image and pixel AUROC
(`assistant.calibration.fit_report`), the verdicts right at the checkpoint's own image threshold, and per truth
(normal or the defect type) how many verdicts are right.

How to read it: a training figure far above the held-out one means the model overfits (more data or augmentation is
the lever); near-equal figures, with the same defect types missed on both, mean it underfits — it cannot fit what
it was trained on, so more regularisation cannot help, and more capacity, more training or another objective may.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from assistant import jsonutil


class FitCheckError(ValueError):
    pass


def part_report(model, processor, records, map_size: int) -> dict:
    """`fit_report`'s AUROCs, plus the verdicts at the checkpoint's image threshold, overall and per truth."""
    from assistant.calibration import fit_report

    from .scoring import score_records

    labels, scores, maps, masks = score_records(model, processor, records, map_size)
    report = {
        key: value
        for key, value in fit_report(labels, scores, maps, masks).items()
        if key in ("n", "n_anomalous", "image_auroc", "pixel_auroc")
    }
    calibration = model.config.calibration
    threshold = calibration.image_threshold
    right = np.array([calibration.is_anomalous(s) for s in scores]) == (labels == 1)
    truths = [r.defect_type or "anomalous" if r.label == 1 else "normal" for r in records]
    total, found = Counter(truths), Counter(t for t, ok in zip(truths, right) if ok)
    report.update(
        threshold=threshold,
        verdict_accuracy=float(right.mean()),
        right_per_truth={t: [found[t], total[t]] for t in sorted(total, key=lambda t: (t != "normal", t))},
    )
    return report


def fit_check(model_path, data, n: int = 800, seed: int = 0, map_size: int = 64) -> dict:
    from assistant import checkpoint

    from .data import Skipped, decode_checked, read_masked_or_fail, split_records
    from .self_reference import training_split

    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise FitCheckError(f"{model_path} is not a checkpoint folder (no config.json)")
    if n < 2:
        raise FitCheckError(f"--n must be at least 2, got {n}")
    records, _ = read_masked_or_fail(
        data, full_check=False
    )  # the split as stage 1 draws it; the parts used decoded below
    val_fraction, split_seed = training_split(model_path) or (0.1, 0)
    train, held_out = split_records(records, val_fraction, split_seed)
    if not train or not held_out:
        raise FitCheckError(f"{data} has too few images for a training and a held-out part (found {len(records)})")
    rng = np.random.default_rng(seed)
    sample, bad = decode_checked([train[i] for i in sorted(rng.choice(len(train), min(n, len(train)), replace=False))])
    held_out, more = decode_checked(held_out)
    Skipped(bad + more, len(sample) + len(held_out) + len(bad) + len(more)).report(f"{data} (decoded)")
    model, processor, _, _ = checkpoint.load(model_path)
    model.eval()
    if model.expert is None:
        raise FitCheckError(f"{model_path} has no anomaly expert")
    return {
        "model": str(model_path),
        "data": str(data),
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "training_sample": part_report(model, processor, sample, map_size),
        "held_out": part_report(model, processor, held_out, map_size),
    }


def main(argv: list[str] | None = None) -> int:
    from assistant.errors import run_main

    return run_main(_main, argv, bad_input=(FitCheckError, ValueError))


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.fit_check", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="a checkpoint folder with an expert")
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="the masked images it was trained on (MVTec layout, synthetic output or VisA)",
    )
    parser.add_argument("--n", type=int, default=800, help="training images scored (a random sample; default 800)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training sample")
    parser.add_argument("--out", type=Path, help="also write the report as JSON here (never over an existing file)")
    args = parser.parse_args(argv)
    if args.out is not None and args.out.exists():
        raise FitCheckError(f"{args.out} already exists")
    report = fit_check(args.model, args.data, args.n, args.seed)
    for name, key in (("training sample", "training_sample"), ("held-out", "held_out")):
        part = report[key]
        per_truth = ", ".join(f"{t} {a}/{b}" for t, (a, b) in part["right_per_truth"].items())
        print(
            f"{name} ({part['n']} images): image AUROC {part['image_auroc']:.3f}, pixel AUROC {part['pixel_auroc']:.3f}, "
            f"verdicts {part['verdict_accuracy']:.1%} at threshold {part['threshold']:.3f}; right per truth: {per_truth}"
        )
    if args.out is not None:
        args.out.write_text(jsonutil.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
