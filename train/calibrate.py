"""Fit a checkpoint's thresholds again on its held-out split, the scoring modes' included; no weight is trained.

    python -m train.calibrate --model runs/default_model/stage2/model --data runs/default_model/data/synth \\
        --out runs/default_model/final --few-shot 4 --batch-mode

The held-out split is the one the checkpoint's training held out (`data.val_fraction` and `data.split_seed` from its
`training_config.yaml`). The zero-shot thresholds are fitted again (`assistant.calibration.Calibration.fit`), and
how high the training surfaces' normal images score (`Calibration.with_typical_top`); with
`--few-shot K` each held-out image is scored against K held-out normal images of its category and the few-shot
thresholds are fitted on those scores; with `--batch-mode` each category's held-out images are scored against each
other (the folder mode, `AnomalyAssistantModel.detect_folder`) and its thresholds are fitted. The new checkpoint goes
to `--out` (never over `--model`), with `calibration.json` holding the fits.

`--all-images` uses every labelled image of `--data` instead of a held-out split: images of a product the checkpoint
never trained on (an MVTec-layout folder; defective images without a mask count at the image level), so that its
verdicts are fitted to that product, which then counts as a kind the model knows (docs/training.md, "Fitting the
verdicts to your own product"). `--model default` is the embedded model:

    python -m train.calibrate --model default --data ./my_product --all-images --out ./my_model --few-shot 4 --batch-mode
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from assistant.errors import run_main


class CalibrateError(ValueError):
    pass


def batch_mode_scores(model, processor, records, map_size: int, prepared=None):
    """(labels, scores, maps, masks) of `records` in the folder mode: each category's images scored against each other
    (on the raw scale: call with the mode's thresholds cleared)."""
    import torch

    from .scoring import Prepared, small_maps

    prepared = prepared or Prepared(processor, map_size)
    by_category: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        by_category.setdefault(record.category, []).append(index)
    labels, scores, maps, masks = [], [], [], []
    for indices in by_category.values():
        if len(indices) < 2:
            continue
        items = [prepared(records[i]) for i in indices]
        with torch.no_grad():
            crop_maps, batch_scores, _ = model.detect_folder([(item[0], [item[1]], item[3]) for item in items])
        maps.extend(small_maps(model, crop_maps, [item[1] for item in items], map_size).float().cpu().numpy())
        masks.extend(item[2] for item in items)
        scores.extend(float(v) for v in batch_scores)
        labels.extend(int(records[i].label == 1) for i in indices)
    if not labels:
        raise CalibrateError("--batch-mode needs at least 2 held-out images of a category")
    return np.array(labels), np.array(scores), np.stack(maps), np.stack(masks)


def batch_mode_calibration(model, processor, records, map_size: int, prepared=None, settings=None) -> dict:
    """The folder mode's thresholds (`Calibration.with_mode("batch")`), written into `model.config`. They are fitted on
    the folder scores as the folder mode gives them at inference, a folder's learned scores shifted when its typical
    image scores above the training surfaces' (`Calibration.anchor_folder`). Fitted on unshifted scores (until the
    thirteenth session), the thresholds sat above the shifted scores of surfaces far from training: on the default
    model's held-out split the folder image AUROC was 0.994 against 0.997 shifted, and a fit to moon and retina crops
    (`--all-images`) judged their folders worse than the default model (68% of verdicts right against 80%; shifted
    93%; docs/default_model_history.md)."""
    from assistant.calibration import Calibration

    kept = Calibration.of(model.config)
    kept.without_mode("batch").write(model.config)  # the raw folder-mode scale, the shift kept
    scored = batch_mode_scores(model, processor, records, map_size, prepared)
    try:
        calibration, report = kept.without_mode("batch").with_mode("batch", *scored, settings=settings)
    except ValueError as error:
        raise CalibrateError(str(error)) from None
    calibration.write(model.config)
    return report


def keep_checkpoint_typical_top(model, top: float | None, fit: dict) -> None:
    """Under `--all-images`, keep the checkpoint's `typical_score_top`, the level to which references and folders of a
    surface far from its training are shifted (`Calibration.anchor`): it says how high the training surfaces' normal
    images score, which a product's images do not change. Set from the product's own images instead, the few-shot
    ranking of two unseen real surfaces fell (image AUROC 0.946 to 0.924, docs/default_model_history.md)."""
    from assistant.calibration import Calibration

    if "typical" in fit:
        fit["typical"]["kept_from_checkpoint"] = top
    Calibration.of(model.config).replace(typical_score_top=top).write(model.config)


def keep_pixel_thresholds(model, original, unmasked: int) -> str:
    """Under `--all-images` with defective images that have no mask: the pixel thresholds (zero-shot and each mode's)
    put back to the checkpoint's `original` ones, which a fit on maps without their masks would not give (those
    images' defect pixels would count as normal); a mode the checkpoint had not fitted keeps the new fit's."""
    from assistant.calibration import Calibration

    fitted = Calibration.of(model.config)
    modes = {
        mode: [pair[0], original.modes[mode][1]] if mode in original.modes else pair
        for mode, pair in fitted.modes.items()
    }
    fitted.replace(pixel_threshold=original.pixel_threshold, modes=modes).write(model.config)
    return f"kept from the checkpoint: {unmasked} defective images have no mask"


def add_to_domain_bank(model, processor, records, prepared=None) -> dict:
    """The calibration images' domain embeddings added to the checkpoint's bank (`assistant.domain`), cut by greedy
    coreset to `assistant.domain.BANK_SIZE` of them: images of the product are then judged as a kind the model knows
    (`Calibration.is_novel` false: the thresholds fitted on them apply, and no answer calls the surface new)."""
    import torch

    from assistant.domain import build_bank

    from .scoring import embed_records

    before = int(model.domain_bank.shape[0])
    added = build_bank(embed_records(model, processor, records, prepared=prepared).to(model.domain_bank.dtype))
    model.domain_bank = torch.cat([model.domain_bank, added.to(model.domain_bank.device)]).contiguous()
    return {"before": before, "added": int(added.shape[0])}


def recalibrate(
    model_path,
    data,
    out,
    few_shot: int = 0,
    batch_mode: bool = False,
    map_size: int = 64,
    overwrite: bool = False,
    domain_margin: float | None = None,
    typical_quantile: float | None = None,
    detection_zoom: float | None = None,
    all_images: bool = False,
    detection_zoom_max: float | None = None,
) -> dict:
    from assistant import checkpoint
    from assistant.calibration import Calibration, CalibrationConfig, write_report
    from assistant.config import checked_zooms
    from assistant.run_config import ConfigError, config_section, read_run_config

    from .data import Skipped, decode_checked, read_held_out, read_masked_or_fail
    from .folders import RUN_FILES, atomic_folder, refit_problem, write_model_parts
    from .scoring import Prepared, calibrate, fit_domain_threshold
    from .self_reference import SelfReferenceError, few_shot_calibration, training_split

    try:  # a folder, or "default" for the embedded model, as every other command takes it
        model_path, out = checkpoint.resolve(model_path), Path(out)
    except checkpoint.ModelLoadError as error:
        raise CalibrateError(str(error)) from None
    problem = refit_problem(model_path, out, overwrite)
    if problem:
        raise CalibrateError(problem)
    if few_shot < 0:
        raise CalibrateError(f"--few-shot must be ≥ 0, got {few_shot}")
    if all_images and domain_margin is not None:
        # the margin multiplies the training surfaces' own spread; a product's distances to them would set it so wide
        # (gravel and tissue crops at margin 6: 1.0) that nothing is ever out of domain
        raise CalibrateError(
            "--domain-margin refits the training surfaces' domain threshold; it does not go with --all-images"
        )
    val_fraction, seed = training_split(model_path) or (0.1, 0)
    if all_images:  # every labelled image: a product the checkpoint never trained on
        try:
            records, _ = read_masked_or_fail(data, full_check=False, masks_required=False)
        except ValueError as error:
            raise CalibrateError(str(error)) from None
        held_out, problems = decode_checked(records)
        Skipped(problems, len(records)).report(f"{data} (decoded)")
        labels = {r.label for r in held_out}
        if labels != {0, 1}:
            missing = (
                "no defective one (with normal images alone, give them as references: --reference)"
                if 0 in labels
                else "no normal one (test/good or train/good)"
            )
            raise CalibrateError(f"--all-images needs normal and defective images; {data} has {missing}")
    else:
        held_out, _, found = read_held_out(data, val_fraction, seed)
        if not held_out:
            raise CalibrateError(f"no held-out images in {data} (found {found} images)")
    model, processor, generation, _ = checkpoint.load(model_path)
    if model.expert is None:
        raise CalibrateError(f"{model_path} has no anomaly expert")
    if detection_zoom is not None or detection_zoom_max is not None:  # the new checkpoint reads each crop
        try:  # enlarged too (large images more), and is fitted that way
            model.config.detection_zoom, model.config.detection_zoom_max = checked_zooms(
                model.config.detection_zoom if detection_zoom is None else detection_zoom,
                model.config.detection_zoom_max if detection_zoom_max is None else detection_zoom_max,
            )
        except ValueError as error:
            raise CalibrateError(str(error)) from None
    try:  # the recipe's calibration settings, the checkpoint's suspicion rule, and --domain-margin etc. when given
        settings = CalibrationConfig.from_dict(
            {
                **config_section(read_run_config(model_path), "calibration"),
                "moderate_from": model.config.moderate_from or CalibrationConfig.moderate_from,
                **({} if domain_margin is None else {"domain_margin": domain_margin}),
                **({} if typical_quantile is None else {"typical_quantile": typical_quantile}),
            }
        )
    except (ConfigError, ValueError) as error:
        raise CalibrateError(str(error)) from None
    prepared = Prepared(processor, map_size, keep_bytes=2 << 30)
    original = Calibration.of(model.config)
    kept_top = original.typical_score_top
    unmasked = sum(r.label == 1 and r.mask is None for r in held_out)
    report = {
        "model": str(model_path),
        "data": str(data),
        "held_out": len(held_out),
        "images": "all" if all_images else "held-out split",
        "detection_zoom": model.config.detection_zoom,
        "detection_zoom_max": model.config.detection_zoom_max,
        "zero_shot": calibrate(model, processor, held_out, map_size, settings, prepared=prepared),
    }
    if all_images:
        keep_checkpoint_typical_top(model, kept_top, report["zero_shot"])
    if few_shot:
        images = str(data) if all_images else "the held-out split"
        try:
            report["few_shot"] = few_shot_calibration(
                model, processor, held_out, map_size, few_shot, seed, prepared, settings, images
            )
        except SelfReferenceError as error:  # too few normal images: bad input, exit 2
            raise CalibrateError(str(error)) from None
    if batch_mode:
        report["batch"] = batch_mode_calibration(model, processor, held_out, map_size, prepared, settings)
    if domain_margin is not None:
        if model.domain_bank is None:
            raise CalibrateError("the checkpoint has no domain bank (domain_bank.safetensors); stage 1 fits it")
        report["domain"] = fit_domain_threshold(model, processor, held_out, settings, prepared)
    if unmasked:  # image-level labels: every pixel threshold stays the checkpoint's
        report["pixel_thresholds"] = keep_pixel_thresholds(model, original, unmasked)
    if all_images and model.domain_bank is not None:  # the product's images are a kind the checkpoint now knows
        report["domain_bank"] = add_to_domain_bank(model, processor, held_out, prepared)
    with atomic_folder(out) as staging:
        write_model_parts(staging, model, processor, generation, model_path, RUN_FILES)
        write_report(report, staging, Calibration.of(model.config))
    return report


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="a full checkpoint folder with an expert, or 'default' (the embedded model)"
    )
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="the masked images it was trained on (its held-out split is used), or with --all-images your product's",
    )
    parser.add_argument(
        "--all-images",
        action="store_true",
        help="use every labelled image of --data (an MVTec-layout folder of your own product, normal and defective "
        "images; without masks, the pixel thresholds stay the checkpoint's), not the held-out split: the verdicts are "
        "fitted to that product, which then counts as a kind the model knows",
    )
    parser.add_argument("--out", required=True, type=Path, help="the new checkpoint folder")
    parser.add_argument(
        "--few-shot", type=int, default=0, metavar="K", help="also fit the few-shot mode with K references"
    )
    parser.add_argument("--batch-mode", action="store_true", help="also fit the folder (batch) zero-shot mode")
    parser.add_argument(
        "--domain-margin",
        type=float,
        default=None,
        metavar="M",
        help="also refit the out-of-domain threshold: M times the held-out images' 99th-percentile distance",
    )
    parser.add_argument(
        "--typical-quantile",
        type=float,
        default=None,
        metavar="Q",
        help="typical_score_top as this quantile of the training surfaces' median normal scores (default: the recipe's "
        "calibration.typical_quantile, 1.0 = the highest); lower: fewer false alarms on new surfaces with references "
        "or in a folder, more misses",
    )
    parser.add_argument(
        "--detection-zoom",
        type=float,
        default=None,
        metavar="Z",
        help="the new checkpoint also reads each image Z times larger (1-2; 1 = off; default: the checkpoint's), "
        "config.detection_zoom: thin scratches on busy textures are caught more often, at four tower passes more",
    )
    parser.add_argument(
        "--detection-zoom-max",
        type=float,
        default=None,
        metavar="Z",
        help="the largest zoom (up to 2; 1 = off; default: the checkpoint's), config.detection_zoom_max: an image larger "
        "than --detection-zoom's view is read at its own resolution up to Z times the crop (2: 512 px at 256 px crops); "
        "same cost",
    )
    parser.add_argument("--map-size", type=int, default=64)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    report = recalibrate(
        args.model,
        args.data,
        args.out,
        args.few_shot,
        args.batch_mode,
        args.map_size,
        args.overwrite,
        args.domain_margin,
        args.typical_quantile,
        args.detection_zoom,
        args.all_images,
        args.detection_zoom_max,
    )
    if report["detection_zoom"] > 1:
        print(
            f"detection zoom {report['detection_zoom']:g}: each image is read {report['detection_zoom']:g} times larger too"
            + (
                f", up to {report['detection_zoom_max']:g} times at an image's own resolution when it has the pixels"
                if report["detection_zoom_max"]
                else ""
            )
        )
    if "domain" in report:
        print(
            f"out-of-domain threshold {report['domain']['domain_threshold']:.3f} (held-out 99th percentile "
            f"{report['domain']['held_out_q99']:.3f})"
        )
    where = "held-out" if report["images"] == "held-out split" else f"{report['held_out']} images'"
    for mode in ("zero_shot", "few_shot", "batch"):
        if mode in report:
            fit = report[mode]
            if "pixel_thresholds" in report:  # maps without their masks: no pixel figure holds
                print(
                    f"{mode}: {where} image AUROC {fit['image_auroc']:.3f}, "
                    f"image threshold {fit.get('image_threshold', float('nan')):.3f}"
                )
                continue
            print(
                f"{mode}: {where} image AUROC {fit['image_auroc']:.3f}, pixel AUROC {fit['pixel_auroc']:.3f}, "
                f"thresholds {fit.get('image_threshold', float('nan')):.3f} / {fit.get('pixel_threshold', float('nan')):.3f}"
            )
    if "typical" in report.get("zero_shot", {}):
        typical = report["zero_shot"]["typical"]
        medians = ", ".join(f"{name} {m:.3f}" for name, m in zip(typical["surfaces"], typical["normal_medians"]))
        if "kept_from_checkpoint" in typical:
            kept = typical["kept_from_checkpoint"]
            print(
                f"typical_score_top kept from the checkpoint ({'none' if kept is None else f'{kept:.3f}'}); "
                f"the images' median normal scores: {medians}"
            )
        else:
            print(
                f"typical_score_top {typical['typical_score_top']:.3f} (quantile {typical['typical_quantile']} of the "
                f"surfaces' median normal scores {medians})"
            )
    if "pixel_thresholds" in report:
        print(f"pixel thresholds {report['pixel_thresholds']}")
    if "domain_bank" in report:
        bank = report["domain_bank"]
        print(f"domain bank: {bank['added']} embeddings of these images added to the {bank['before']} of training")
    print(f"written to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv, bad_input=(CalibrateError,))


if __name__ == "__main__":
    sys.exit(main())
