"""Add the zero-shot self-reference map to a trained checkpoint, fitted on held-out masked images.

    python -m train.self_reference --model runs/default_model/stage2/model --data runs/default_model/data/synth \\
        --out runs/default_model/final [--weight 0.5] [--level -1] [--k 3] [--val-fraction F] [--seed S]

Each patch's distance to the most similar patches of the same image outside its 3×3 neighbourhood
(`assistant.expert.self_distance`) is turned into a probability by a logistic fit (scikit-learn) on the
pixels of the held-out split — by default the split the checkpoint's training held out (`data.val_fraction`
and `data.split_seed` from its `training_config.yaml`), so no image training saw is used — and blended into
the expert's map with `--weight`. The image and pixel thresholds are then re-calibrated
(`assistant.calibration`) on that split. The checkpoint's weights are not trained further, so this takes
about a minute on CPU and works on any checkpoint with an expert (Anomaly-OV's included).

The new checkpoint is written to `--out` (never over `--model`); `self_reference.json` there records the
fit and the held-out AUROCs before and after.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from assistant import jsonutil


class SelfReferenceError(ValueError):
    pass


def self_distance_maps(
    model, processor, records, map_size: int, level: int, k: int, prepared=None, batch_size: int = 16
) -> np.ndarray:
    """Per record, the self-reference distance map resized to map_size² ([N, S, S], the layout of `score_records`' maps);
    records of the same crop layout `batch_size` at a time."""
    import torch

    from assistant.expert import self_distance

    from .scoring import Prepared, small_maps

    prepared = prepared or Prepared(processor, map_size)
    distances = []
    with torch.no_grad():
        for _, group in prepared.batches(records, batch_size):
            sizes = [item[1] for item in group]
            _, levels, counts = model.vision_features(torch.cat([item[0] for item in group]), sizes)
            features = levels[level]
            if model.expert.config.views == "base":  # each image's first crop
                features = features[torch.tensor([0] + counts[:-1]).cumsum(0)]
                per_image = [features[i : i + 1] for i in range(len(group))]
            else:
                per_image = list(features.split(counts))
            distance = [self_distance(f, k) for f in per_image]
            distances.extend(small_maps(model, distance, sizes, map_size).float().cpu().numpy())
    return np.stack(distances)


def fit_scale_bias(
    distances: np.ndarray, masks: np.ndarray, max_pixels: int = 400_000, seed: int = 0
) -> tuple[float, float]:
    """Logistic regression of the pixel label on the distance: P(anomalous) = sigmoid(scale · d + bias)."""
    from sklearn.linear_model import LogisticRegression

    x, y = distances.reshape(-1, 1).astype(np.float64), masks.reshape(-1).astype(int)
    if y.min() == y.max():
        raise SelfReferenceError("the held-out split needs both normal and defective pixels to fit the self-reference")
    if len(y) > max_pixels:
        keep = np.random.default_rng(seed).choice(len(y), max_pixels, replace=False)
        x, y = x[keep], y[keep]
    fit = LogisticRegression(C=100.0).fit(x, y)
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def few_shot_calibration(
    model,
    processor,
    records,
    map_size: int,
    shots: int,
    seed: int = 0,
    prepared=None,
    settings=None,
    images: str = "the held-out split",
) -> dict:
    """The few-shot mode's thresholds (`Calibration.with_mode`), written into `model.config`: each held-out image is
    scored against `shots` held-out normal images of its own category (never itself). `images` names the records in
    the error raised when they are too few."""
    from assistant.calibration import Calibration
    from data_prep.records import ANOMALOUS

    from .scoring import score_records

    normals: dict[str, list] = {}
    for record in records:
        if record.label != ANOMALOUS:
            normals.setdefault(record.category, []).append(record)
    rng = np.random.default_rng(seed)

    def references(record):
        pool = [n for n in normals[record.category] if n is not record]
        return [pool[i] for i in rng.choice(len(pool), shots, replace=False)]

    scored = [r for r in records if len(normals.get(r.category, [])) - (r.label != ANOMALOUS) >= shots]
    calibration = Calibration.of(model.config)
    calibration.without_mode("few_shot").write(model.config)  # score on the raw few-shot scale
    if scored:
        scores = score_records(model, processor, scored, map_size, references, prepared=prepared)
        try:
            calibration, report = calibration.with_mode("few_shot", *scores, settings=settings)
        except ValueError:
            scored = []
    if not scored:
        raise SelfReferenceError(
            f"--few-shot {shots}: {images} needs normal and defective images with at least "
            f"{shots + 1} normal images per category"
        )
    calibration.write(model.config)
    return {"shots": shots, **report}


def training_split(model_path: Path) -> tuple[float, int] | None:
    """(data.val_fraction, data.split_seed) from the checkpoint's `training_config.yaml`, or None without one."""
    from .config import config_section, read_run_config

    data = config_section(read_run_config(model_path), "data")
    if "val_fraction" not in data:
        return None
    return float(data["val_fraction"]), int(data.get("split_seed", 0))


def add_self_reference(
    model_path,
    data,
    out,
    weight: float = 0.5,
    level: int = -1,
    k: int = 3,
    val_fraction: float | None = None,
    seed: int | None = None,
    map_size: int = 64,
    overwrite: bool = False,
    detection_views: int | None = None,
    few_shot: int = 0,
) -> dict:
    """`val_fraction` / `seed` default to the checkpoint's own training split (its `training_config.yaml`), so that
    the fit and the thresholds see only images training held out; without that file, 0.1 and 0.

    `detection_views` (1, 2, 4 or 8; None keeps the checkpoint's) sets how many flips and turns of each image the
    new checkpoint scores (`AnomalyAssistantConfig.detection_views`); its thresholds are calibrated for it.
    `few_shot` K > 0 also calibrates the few-shot mode's thresholds (`few_shot_calibration`, K references per image)."""
    from assistant import checkpoint
    from assistant.calibration import write_report
    from assistant.metrics import pixel_auroc

    from .data import read_held_out
    from .folders import RUN_FILES, atomic_folder, refit_problem, write_model_parts
    from .scoring import Prepared, auroc, calibrate, score_records

    model_path, out = Path(model_path), Path(out)
    problem = refit_problem(model_path, out, overwrite)
    if problem:
        hint = "; merge an adapter first with train.merge" if "not a checkpoint folder" in problem else ""
        raise SelfReferenceError(problem + hint)
    if not 0.0 < weight <= 1.0:
        raise SelfReferenceError(f"--weight must be in (0, 1], got {weight}")
    if few_shot < 0:
        raise SelfReferenceError(f"--few-shot must be ≥ 0, got {few_shot}")
    if detection_views is not None and detection_views not in (1, 2, 4, 8):
        raise SelfReferenceError(f"--detection-views must be 1, 2, 4 or 8, got {detection_views}")
    recorded = training_split(model_path)
    if val_fraction is None:
        val_fraction = recorded[0] if recorded else 0.1
    if seed is None:
        seed = recorded[1] if recorded else 0
    if not 0.0 < val_fraction < 1.0:
        raise SelfReferenceError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    held_out, skipped, found = read_held_out(data, val_fraction, seed)  # only the held-out part is decoded
    if not held_out:
        raise SelfReferenceError(f"no held-out images in {data} (found {found} images)")
    model, processor, generation, _ = checkpoint.load(model_path)
    model.eval()
    if model.expert is None:
        raise SelfReferenceError(f"{model_path} has no anomaly expert")
    levels = len(model.expert.config.feature_layers)
    if not -levels <= level < levels:
        raise SelfReferenceError(f"--level {level} does not index the expert's {levels} feature levels")

    # each held-out image is preprocessed once for the four passes below (the default model's 800: 177 MB of pixels;
    # past 2 GiB the rest are preprocessed again in each pass)
    prepared = Prepared(processor, map_size, keep_bytes=2 << 30)
    labels, scores, maps, masks = score_records(model, processor, held_out, map_size, prepared=prepared)
    before = {"image_auroc": auroc(labels, scores), "pixel_auroc": pixel_auroc(masks, maps)}
    distances = self_distance_maps(model, processor, held_out, map_size, level, k, prepared)
    scale, bias = fit_scale_bias(distances, masks, seed=seed)
    if scale <= 0:
        raise SelfReferenceError(
            f"on {data} the self-reference distance does not rise on defects (fitted scale {scale:.3g}); not added"
        )
    model.set_self_reference(weight, scale, bias, level, k)
    if detection_views is not None:
        model.config.detection_views = int(detection_views)
    calibration = calibrate(model, processor, held_out, map_size, prepared=prepared)  # scores the held-out split again
    few_shot_report = (
        few_shot_calibration(model, processor, held_out, map_size, few_shot, seed, prepared) if few_shot else None
    )
    after = {"image_auroc": calibration["image_auroc"], "pixel_auroc": calibration["pixel_auroc"]}
    report = {
        "model": str(model_path),
        "data": str(data),
        "held_out": len(held_out),
        "skipped": len(skipped.problems),
        "weight": weight,
        "level": level,
        "k": k,
        "scale": scale,
        "bias": bias,
        "detection_views": int(getattr(model.config, "detection_views", 1)),
        "held_out_before": before,
        "held_out_after": after,
        "calibration": calibration,
    }
    if few_shot_report is not None:
        report["few_shot"] = few_shot_report

    with atomic_folder(out) as staging:
        write_model_parts(staging, model, processor, generation, model_path, RUN_FILES)
        write_report(calibration, staging)
        (staging / "self_reference.json").write_text(jsonutil.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    from assistant.errors import run_main

    return run_main(_main, argv, bad_input=(SelfReferenceError, ValueError))


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.self_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="a full checkpoint folder with an expert")
    parser.add_argument(
        "--data", required=True, type=Path, help="masked images (MVTec layout, synthetic output or VisA)"
    )
    parser.add_argument("--out", required=True, type=Path, help="the new checkpoint folder")
    parser.add_argument("--weight", type=float, default=0.5, help="the self-reference map's share of the expert's map")
    parser.add_argument(
        "--level", type=int, default=-1, help="the expert feature level compared (index into feature_layers)"
    )
    parser.add_argument("--k", type=int, default=3, help="nearest patches averaged")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="held-out share of --data (default: the model's training split, data.val_fraction in its training_config.yaml, else 0.1)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="split seed (default: the model's data.split_seed, else 0)"
    )
    parser.add_argument("--map-size", type=int, default=64)
    parser.add_argument(
        "--detection-views",
        type=int,
        default=None,
        choices=[1, 2, 4, 8],
        help="flips and quarter turns of each image the new checkpoint scores and averages (default: the model's setting); the thresholds are calibrated for it",
    )
    parser.add_argument(
        "--few-shot",
        type=int,
        default=0,
        metavar="K",
        help="also calibrate the few-shot mode: each held-out image against K held-out normal images of its category",
    )
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    report = add_self_reference(
        args.model,
        args.data,
        args.out,
        args.weight,
        args.level,
        args.k,
        args.val_fraction,
        args.seed,
        args.map_size,
        args.overwrite,
        args.detection_views,
        args.few_shot,
    )
    b, a = report["held_out_before"], report["held_out_after"]
    views = f", {report['detection_views']} detection views" if report["detection_views"] > 1 else ""
    print(
        f"self-reference added (scale {report['scale']:.2f}, bias {report['bias']:.2f}, weight {report['weight']}{views}); "
        f"held-out ({report['held_out']} images) pixel AUROC {b['pixel_auroc']:.3f} → {a['pixel_auroc']:.3f}, "
        f"image AUROC {b['image_auroc']:.3f} → {a['image_auroc']:.3f}; written to {args.out}"
    )
    if "few_shot" in report:
        f = report["few_shot"]
        print(
            f"few-shot ({f['shots']} references): held-out image AUROC {f['image_auroc']:.3f}, pixel AUROC {f['pixel_auroc']:.3f}; "
            f"thresholds {f['image_threshold']:.3f} / {f['pixel_threshold']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
