"""Calibration: the one owner of every decision threshold (image, pixel, suspicion bounds, per scoring mode).

Scores and maps are computed elsewhere; this module fits thresholds on held-out labels, scores and masks, writes them
into a model's config and reads them back. Training stages, merge, refits and inference all go through it
(anomalib keeps thresholds apart from scores the same way).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class CalibrationConfig:
    """How thresholds are fitted (the recipe's `calibration` section)."""

    #: suspicion bounds = (moderate_from · t, t) for the image threshold t; 1.0 leaves no "moderately" band, so the
    #: two levels stage 2 trains on ("slightly" / "highly") split exactly at the verdict
    moderate_from: float = 0.5
    #: the out-of-domain threshold is this many times the 99th percentile of the held-out images' distances to the
    #: training images (`Calibration.with_domain`): an image that far from everything trained on is flagged
    domain_margin: float = 4.0
    #: an in-domain image farther than this many times that 99th percentile is of a kind training did not show
    #: (`Calibration.is_novel`): its single-image report advises normal references or a folder, the modes whose
    #: verdicts carry over to new surfaces
    novel_margin: float = 3.0
    #: image thresholds: the middle of those within this much balanced accuracy of the best (`image_threshold`);
    #: 0 keeps the best one's edge, right above the held-out normal images
    threshold_slack: float = 0.01
    #: `typical_score_top` is this quantile of the training surfaces' median normal scores (`with_typical_top`): 1.0
    #: their highest, so no training surface is shifted; lower values shift the scores of a new surface's normal
    #: references or folder further down (fewer false alarms, more misses). The highest is one surface's median of a
    #: few held-out images, so one surface can set it (docs/training.md)
    typical_quantile: float = 1.0

    def __post_init__(self):
        if not 0.0 < self.moderate_from <= 1.0:
            raise ValueError(f"calibration moderate_from must be in (0, 1], got {self.moderate_from}")
        if self.domain_margin < 1.0:
            raise ValueError(f"calibration domain_margin must be ≥ 1, got {self.domain_margin}")
        if not 1.0 <= self.novel_margin <= self.domain_margin:
            raise ValueError(
                f"calibration novel_margin must be in [1, domain_margin = {self.domain_margin}], got {self.novel_margin}"
            )
        if not 0.0 <= self.threshold_slack < 0.5:
            raise ValueError(f"calibration threshold_slack must be in [0, 0.5), got {self.threshold_slack}")
        if not 0.0 <= self.typical_quantile <= 1.0:
            raise ValueError(f"calibration typical_quantile must be in [0, 1], got {self.typical_quantile}")

    @classmethod
    def from_dict(cls, values: dict) -> CalibrationConfig:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown calibration config keys: {sorted(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


#: scoring modes whose scores sit on their own scale and get their own thresholds, mapped onto the zero-shot scale
MODES = ("few_shot", "batch")


@dataclass
class Calibration:
    """Every threshold a checkpoint decides with, read from and written to its config (`config.json`).

    `image_threshold` / `pixel_threshold` decide on the zero-shot scale; `modes` holds, for the few-shot and the
    folder (batch) modes, their own (image, pixel) thresholds on their raw scales, which `rescale` maps
    piecewise-linearly onto the zero-shot ones (0 and 1 stay put, order and so every AUROC unchanged), so one
    threshold and one suspicion scale serve every mode. `moderate_from` sets the suspicion bounds
    (moderate_from · t, t); None keeps fixed bounds (Anomaly-OV's 0.3 / 0.7).
    """

    image_threshold: float = 0.5
    pixel_threshold: float = 0.5
    moderate_from: float | None = None
    suspicion_bounds: tuple[float, float] = (0.3, 0.7)
    modes: dict = None
    #: an image whose `domain_distance` exceeds this is out of domain (None: no check)
    domain_threshold: float | None = None
    #: an in-domain image past this is of a new kind (`is_novel`; None: no check)
    novel_threshold: float | None = None
    #: the zero-shot verdict threshold for such an image scored on its own (`for_new_kinds`): the highest of the
    #: held-out thresholds that are as good as the chosen one (`threshold_range`); None: the image threshold
    novel_image_threshold: float | None = None
    #: the folder and few-shot modes: the highest median zero-shot score of a held-out folder's normal images (a
    #: folder per training surface, `with_typical_top`); a folder whose typical image (`typical_score`), or a set of
    #: normal references whose median, scores above it has its learned scores shifted down (`anchor`); None: never
    typical_score_top: float | None = None

    def __post_init__(self):
        self.modes = {mode: [float(t) for t in pair] for mode, pair in (self.modes or {}).items() if pair is not None}
        for mode, pair in self.modes.items():
            if mode not in MODES:
                raise ValueError(f"unknown scoring mode {mode!r}; expected one of {MODES}")
            if len(pair) != 2 or not all(0.0 < t < 1.0 for t in pair):
                raise ValueError(f"{mode}_thresholds must be two thresholds in (0, 1), got {pair}")
        if self.domain_threshold is not None:
            self.domain_threshold = float(self.domain_threshold)
        if self.novel_threshold is not None:
            self.novel_threshold = float(self.novel_threshold)
        for name in ("novel_image_threshold", "typical_score_top"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, float(value))
                if not 0.0 < float(value) < 1.0:
                    raise ValueError(f"{name} must be in (0, 1), got {value}")
        if self.moderate_from is not None:
            CalibrationConfig(moderate_from=self.moderate_from)  # validates
            self.suspicion_bounds = (self.moderate_from * self.image_threshold, self.image_threshold)
        self.suspicion_bounds = tuple(float(b) for b in self.suspicion_bounds)

    # -- the config is the storage --------------------------------------------------------------
    @classmethod
    def of(cls, config) -> Calibration:
        """The calibration a model config holds."""
        modes = {mode: getattr(config, f"{mode}_thresholds", None) for mode in MODES}
        return cls(
            config.image_threshold,
            config.pixel_threshold,
            getattr(config, "moderate_from", None),
            tuple(config.suspicion_bounds),
            modes,
            getattr(config, "domain_threshold", None),
            getattr(config, "novel_threshold", None),
            getattr(config, "novel_image_threshold", None),
            getattr(config, "typical_score_top", None),
        )

    def write(self, config) -> None:
        """The one place that writes thresholds into a model config."""
        config.image_threshold, config.pixel_threshold = float(self.image_threshold), float(self.pixel_threshold)
        config.moderate_from = self.moderate_from
        config.suspicion_bounds = tuple(self.suspicion_bounds)
        for mode in MODES:
            setattr(config, f"{mode}_thresholds", self.modes.get(mode))
        config.domain_threshold = self.domain_threshold
        config.novel_threshold = self.novel_threshold
        config.novel_image_threshold = self.novel_image_threshold
        config.typical_score_top = self.typical_score_top

    # -- fitting ----------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls, labels, scores, maps, masks, settings: CalibrationConfig | None = None, previous: Calibration | None = None
    ) -> tuple[Calibration | None, dict]:
        """Zero-shot thresholds fitted on held-out scores (`fit_report`): (calibration, report); the calibration is None
        when the split lacks normal or anomalous images. Mode thresholds fitted to an earlier model are dropped: they
        no longer hold for the new scores (`with_mode` fits them again); the `previous` domain threshold is kept (it
        reads the vision tower's features, not the expert's scores). The threshold for a new kind of surface is the
        top of the held-out range (`threshold_range`), clipped into (image threshold, 1)."""
        settings = settings or CalibrationConfig()
        report = fit_report(labels, scores, maps, masks, settings.threshold_slack)
        if "image_threshold" not in report:
            report["note"] = "the held-out split needs normal and anomalous images; thresholds left unchanged"
            return None, report
        fitted = cls(
            report["image_threshold"],
            report["pixel_threshold"],
            settings.moderate_from,
            novel_image_threshold=_range_top(report),
        )
        if previous is not None:
            fitted = fitted.replace(
                domain_threshold=previous.domain_threshold, novel_threshold=previous.novel_threshold
            )
        return fitted, report

    def replace(self, **changes) -> Calibration:
        values = {**asdict(self), **changes}
        values["modes"] = changes.get("modes", dict(self.modes))
        return Calibration(**values)

    def with_mode(
        self, mode: str, labels, scores, maps, masks, settings: CalibrationConfig | None = None
    ) -> tuple[Calibration, dict]:
        """This calibration plus `mode`'s own thresholds, fitted on that mode's raw (un-rescaled) held-out scores."""
        if mode not in MODES:
            raise ValueError(f"unknown scoring mode {mode!r}; expected one of {MODES}")
        settings = settings or CalibrationConfig()
        report = fit_report(labels, scores, maps, masks, settings.threshold_slack)
        if "image_threshold" not in report:
            raise ValueError(f"{mode} calibration needs normal and anomalous held-out images")
        pair = [min(max(report[key], 1e-4), 1 - 1e-4) for key in ("image_threshold", "pixel_threshold")]
        report["image_threshold"], report["pixel_threshold"] = pair
        return self.replace(modes={**self.modes, mode: pair}), report

    def without_mode(self, mode: str) -> Calibration:
        """This calibration with `mode`'s thresholds cleared (its scores then stay on their raw scale)."""
        return self.replace(modes={k: v for k, v in self.modes.items() if k != mode})

    def with_typical_top(
        self, folder_scores, folder_labels, settings: CalibrationConfig | None = None, names=None
    ) -> tuple[Calibration, dict]:
        """This calibration plus `typical_score_top`: from held-out folders' zero-shot learned scores and labels (one
        sequence each per folder, a folder per training surface), the median score of each folder's normal images,
        and of those medians the quantile `settings.typical_quantile` (default: the highest). At the highest, a folder
        whose defects are at most 80% of it has its typical image (`typical_score`) at or below its normal images'
        median, so no training surface's folder is shifted by `anchor_folder`, nor are normal references of a
        training surface whose median is typical (`anchor`). With the folders' `names`, the report's "surfaces"
        names each of its "normal_medians" (a folder without normal images has neither)."""
        import numpy as np

        settings = settings or CalibrationConfig()
        medians, surfaces = [], []
        for scores, labels, name in zip(folder_scores, folder_labels, names or [None] * len(folder_scores)):
            normal = np.asarray(scores, dtype=np.float64)[np.asarray(labels) == 0]
            if normal.size:
                medians.append(float(np.median(normal)))
                surfaces.append(name)
        if not medians:
            raise ValueError("the folder mode's typical score needs held-out folders with normal images")
        top = float(np.quantile(medians, settings.typical_quantile))
        report = {"normal_medians": medians, "typical_quantile": settings.typical_quantile, "typical_score_top": top}
        if names is not None:
            report["surfaces"] = surfaces
        return self.replace(typical_score_top=top), report

    def with_domain(self, held_out_distances, settings: CalibrationConfig | None = None) -> tuple[Calibration, dict]:
        """The out-of-domain threshold from held-out in-domain images' distances to the training images:
        `settings.domain_margin` times their 99th percentile (no out-of-domain examples are needed to fit it), and the
        new-kind threshold, `settings.novel_margin` times it."""
        import numpy as np

        settings = settings or CalibrationConfig()
        distances = np.asarray(held_out_distances, dtype=np.float64)
        if distances.size == 0:
            raise ValueError("the domain threshold needs held-out images")
        q99 = float(np.quantile(distances, 0.99))
        threshold = min(settings.domain_margin * q99, 1.0)
        novel = min(settings.novel_margin * q99, threshold)
        report = {
            "n": int(distances.size),
            "held_out_q99": q99,
            "held_out_max": float(distances.max()),
            "margin": settings.domain_margin,
            "domain_threshold": threshold,
            "novel_margin": settings.novel_margin,
            "novel_threshold": novel,
        }
        return self.replace(domain_threshold=threshold, novel_threshold=novel), report

    def is_out_of_domain(self, distance) -> bool | None:
        """Whether an image's domain distance is past the threshold; None when there is no check."""
        if self.domain_threshold is None or distance is None:
            return None
        return float(distance) > self.domain_threshold

    def is_past_new_kind(self, distance) -> bool:
        """Whether an image is farther from the training images than `novel_threshold`, in domain or not; False
        without a distance or that threshold."""
        return self.novel_threshold is not None and distance is not None and float(distance) > self.novel_threshold

    def is_novel(self, distance) -> bool:
        """Whether an in-domain image is farther from the training images than `novel_threshold`: a kind of surface or
        part training did not show, where single-image verdicts are least reliable."""
        return self.is_past_new_kind(distance) and not self.is_out_of_domain(distance)

    # -- applying ---------------------------------------------------------------------------------
    def rescale(self, values, mode: str, pixel: bool = False):
        """A mode's scores (or maps, `pixel=True`) on the zero-shot scale: the mode's threshold goes to the zero-shot
        one, linearly on each side of it. Unchanged when the mode is not calibrated. Works on tensors and arrays."""
        pair = self.modes.get(mode)
        if pair is None:
            return values
        target = min(max(self.pixel_threshold if pixel else self.image_threshold, 1e-6), 1 - 1e-6)
        return _move(values, pair[1 if pixel else 0], target)

    def raise_to(self, values, floor: float | None):
        """Scores on the zero-shot scale re-mapped so that `floor` lands on the image threshold (linearly on each side
        of it): the verdict threshold raised to `floor` for one set of normal references whose own leave-one-out
        scores reach it (`AnomalyAssistantModel.reference_floor`). Unchanged when `floor` is None or at most the
        threshold; order kept. Works on tensors and floats."""
        if floor is None or floor <= self.image_threshold:
            return values
        return _move(values, min(float(floor), 1 - 1e-6), self.image_threshold)

    def for_new_kinds(self, values, distances):
        """Zero-shot scores [N] (tensor) of images scored each on its own, with each image past the new-kind distance
        (`is_novel`, or farther: out of domain) re-mapped so that `novel_image_threshold` lands on the image
        threshold (as `raise_to` does for references): on a surface training did not show, normal scores shift up,
        so the verdict takes the most cautious threshold the held-out images cannot tell from the chosen one.
        Unchanged without distances or that threshold; order kept within each group. The folder mode needs no such
        raise: its typical-image shift (`anchor_folder`) takes a new surface's scores back down by how far they
        rose, and its verdicts balance better without one (docs/default_model_history.md)."""
        top = self.novel_image_threshold
        if distances is None or top is None or top <= self.image_threshold:
            return values
        novel = [self.is_past_new_kind(float(d)) for d in distances]
        if not any(novel):
            return values
        moved = self.raise_to(values, top)
        return moved.where(values.new_tensor(novel, dtype=bool), values)

    def anchor(self, scores, typical: float):
        """Learned zero-shot scores (tensor) of images of one kind shifted down, in logit terms, by as much as
        `typical`, the score of that kind's typical normal image, lies above `typical_score_top`; unchanged when it
        does not, or without that field. Order kept.

        The learned score is an absolute judgement, fitted on the training surfaces: on a surface far from them it
        calls nearly every image anomalous (crops of a photographed moon surface: normal ones at 0.99) while still
        ranking the defects first. Images known to be normal (few-shot references, their median) or presumed so
        (most of a folder, `anchor_folder`) tell how far the surface's scores moved up; the shift brings them back
        to the highest median a training surface's normal images score."""
        import torch

        if self.typical_score_top is None or typical is None:
            return scores
        shift = _logit(float(typical)) - _logit(self.typical_score_top)
        if shift <= 0:
            return scores
        return torch.sigmoid(torch.logit(scores.float().clamp(1e-6, 1 - 1e-6)) - shift).to(scores.dtype)

    def anchor_folder(self, scores):
        """A folder's learned zero-shot scores [N] (tensor), `anchor`ed at its typical image's score
        (`typical_score`: most images of a folder are normal, the folder mode's premise)."""
        if len(scores) == 0:
            return scores
        return self.anchor(scores, typical_score(scores))

    def is_anomalous(self, score: float) -> bool:
        return float(score) >= self.image_threshold

    def suspicion_level(self, score: float) -> str:
        low, high = self.suspicion_bounds
        return "slightly" if score < low else "moderately" if score < high else "highly"


#: a folder's typical image (`typical_score`): this quantile of its images' learned scores, a normal image's as long as
#: at most 90% of the folder is defective (a benchmark's test set often is mostly defective: MVTec AD's classes are
#: 40-84%). The lower quartile cost defects caught in 80%-defective folders of training surfaces (brick 100% → 90%)
TYPICAL_QUANTILE = 0.1


def typical_score(scores) -> float:
    """The score of a folder's typical image: the `TYPICAL_QUANTILE` quantile of its images' scores (a tensor)."""
    import torch

    return float(torch.quantile(scores.float().cpu(), TYPICAL_QUANTILE))


def shown(score: float, threshold: float, digits: int = 3, most: int = 6) -> tuple[str, str]:
    """A score and its threshold as text for a verdict line: `digits` decimals, or more (up to `most`) while the two
    read the same or the threshold reads as 1 without being 1, so that a line such as "score 1.000, threshold 1.000"
    never hides which side of the threshold a score is on (a threshold fitted to a far product can sit at 0.9998)."""
    score, threshold = float(score), float(threshold)

    def unclear(d: int) -> bool:
        same = f"{score:.{d}f}" == f"{threshold:.{d}f}" and score != threshold
        return same or (threshold < 1.0 and float(f"{threshold:.{d}f}") >= 1.0)

    while digits < most and unclear(digits):
        digits += 1
    return f"{score:.{digits}f}", f"{threshold:.{digits}f}"


def _logit(p: float) -> float:
    import math

    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def _range_top(report: dict) -> float:
    """The top of a fit's range of equally good image thresholds (`threshold_range`), kept at or above the chosen
    threshold and below 1: the verdict threshold for images of a new kind (`Calibration.for_new_kinds`)."""
    return min(max(report["image_threshold_range"][1], report["image_threshold"]), 1 - 1e-4)


def _move(values, source: float, target: float):
    """Values in [0, 1] mapped piecewise-linearly so that `source` lands on `target` (0 and 1 stay put, order kept);
    tensors, arrays and floats."""
    below = values * (target / source)
    above = target + (values - source) * ((1 - target) / (1 - source))
    if hasattr(values, "where"):
        return below.where(values < source, above)
    import numpy as np

    return np.where(np.asarray(values) < source, below, above)


def fit_report(labels, scores, maps, masks, slack: float = 0.0) -> dict:
    """AUROCs and, when both classes are present, the image threshold of best balanced accuracy (the mean hit rate on
    defective and normal images: it does not depend on the split's share of defects and it counts false alarms,
    which F1 ignores), the middle of those within `slack` of it (`image_threshold`), and the F1-max pixel threshold;
    the image F1-max is reported too."""
    import numpy as np

    from .metrics import f1_max, image_auroc, pixel_auroc

    labels, scores, maps, masks = (np.asarray(v) for v in (labels, scores, maps, masks))
    both_pixels = bool(masks.any() and not masks.all())
    both_images = 0 < labels.sum() < len(labels)
    report = {
        "n": int(len(labels)),
        "n_anomalous": int(labels.sum()),
        "image_auroc": image_auroc(labels, scores) if both_images else float("nan"),
        "pixel_auroc": pixel_auroc(masks, maps) if both_pixels else float("nan"),
    }
    if both_images:
        report["image_f1_max"] = f1_max(labels, scores)[0]
        report["image_balanced_accuracy"], report["image_threshold"] = image_threshold(labels, scores, slack)
        report["image_threshold_range"] = list(threshold_range(labels, scores, slack))
        if both_pixels:
            report["pixel_f1_max"], report["pixel_threshold"] = f1_max(masks.reshape(-1), maps.reshape(-1))
        else:  # no mask marks a defect (or all do): nothing to fit; the threshold flags only the highest-scored pixels
            report["pixel_f1_max"], report["pixel_threshold"] = float("nan"), float(maps.max())
    return report


REPORT = "calibration.json"


def write_report(report: dict, folder, calibration: Calibration | None = None) -> None:
    """The fit's figures beside the checkpoint (`calibration.json`), with the calibration itself when given: an
    adapter folder carries it this way, and `read_calibration` gives it back (merging applies it to the base)."""
    from pathlib import Path

    from . import jsonutil

    values = {**report, "calibration": asdict(calibration)} if calibration is not None else report
    (Path(folder) / REPORT).write_text(jsonutil.dumps(values, indent=1) + "\n")


def read_calibration(folder) -> Calibration | None:
    """The calibration `write_report` stored in `folder`, or None when it holds none."""
    import json
    from pathlib import Path

    path = Path(folder) / REPORT
    if not path.is_file():
        return None
    stored = json.loads(path.read_text()).get("calibration")
    return Calibration(**stored) if stored else None


def threshold_range(labels, scores, slack: float = 0.0) -> tuple[float, float]:
    """(low, high): the image thresholds whose balanced accuracy on held-out scores is within `slack` of the best
    (`score >= threshold` flags), from the highest score just below the lowest of them (exclusive) to the highest
    (inclusive). Any threshold in (low, high] gives the held-out images the same verdicts, up to `slack`."""
    import numpy as np
    from sklearn.metrics import roc_curve

    from .metrics import check_image_inputs

    labels, scores = check_image_inputs(labels, scores)
    false_alarm, hit, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    balanced, thresholds = (hit[1:] + 1 - false_alarm[1:]) / 2, thresholds[1:]  # descending thresholds
    best = int(np.argmax(balanced))
    floor = balanced[best] - slack - 1e-12
    top, bottom = best, best
    while top > 0 and balanced[top - 1] >= floor:
        top -= 1
    while bottom + 1 < len(balanced) and balanced[bottom + 1] >= floor:
        bottom += 1
    below = scores[scores < thresholds[bottom]]
    return (float(below.max()) if below.size else float(thresholds[bottom])), float(thresholds[top])


def image_threshold(labels, scores, slack: float = 0.0) -> tuple[float, float]:
    """(balanced accuracy, threshold) of the image verdict `score >= threshold` fitted on held-out scores.

    The thresholds whose balanced accuracy (`assistant.metrics.balanced_accuracy_threshold`) is within `slack` of the
    best form a range around it (`threshold_range`); the threshold is that range's middle, in logit terms for scores
    in [0, 1]. Held-out images of the training surfaces leave a wide gap between normal and defective scores, and the
    best threshold's edge of it (scikit-learn's) sits right above the normal images: on a surface the expert never
    saw, normal scores shift up and most cross it, while the middle keeps the margin on both sides. The reported
    balanced accuracy is the chosen threshold's.
    """
    import numpy as np

    from .metrics import check_image_inputs

    labels, scores = check_image_inputs(labels, scores)
    low, high = threshold_range(labels, scores, slack)
    if 0.0 <= scores.min() and scores.max() <= 1.0:
        ends = np.clip([low, high], 1e-6, 1 - 1e-6)
        threshold = float(1.0 / (1.0 + np.exp(-np.log(ends / (1 - ends)).mean())))  # the logits' mean
    else:
        threshold = (low + high) / 2
    threshold = min(max(threshold, np.nextafter(low, np.inf)), high)  # inside (low, high]: the same verdicts
    flagged = scores >= threshold
    accuracy = (flagged[labels == 1].mean() + (~flagged[labels == 0]).mean()) / 2
    return float(accuracy), threshold
