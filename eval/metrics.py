"""Anomaly-detection metrics on numpy arrays, with anomalib's names and definitions.

Inputs use anomalib's vocabulary: ``pred_score`` (one score per image, higher = more anomalous),
image labels (0 normal, 1 anomalous), ``anomaly_map`` (one score per pixel, shape ``(N, H, W)``) and
ground-truth masks of the same shape (nonzero = anomalous pixel). Thresholds are returned apart from
the scores they were chosen on, never folded into them.

Image level: ``image_auroc``, ``image_ap`` (scikit-learn), ``f1_max`` (max F1 on the PR curve and the
threshold that reaches it). Pixel level, over all pixels of all images: ``pixel_auroc``, ``aupro``
(per-region overlap up to FPR 0.3, normalised), ``aupimo`` (per-image overlap, Bertoldo et al. 2024).
``compute_ad_metrics`` runs them all and names the results ``image_AUROC, image_AP, image_F1max,
pixel_AUROC, pixel_AUPRO, pixel_AUPIMO``. The metrics training needs too (image and pixel AUROC, AP, F1-max) live in
``assistant.metrics`` and are re-exported here; AUPRO and AUPIMO are evaluation's own.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import ndimage

from assistant.metrics import check_image_inputs, check_pixel_inputs, f1_max, image_ap, image_auroc, pixel_auroc

__all__ = [
    "AUPIMOUndefinedError",
    "aupimo",
    "aupro",
    "compute_ad_metrics",
    "f1_max",
    "verdict_rates",
    "image_ap",
    "image_auroc",
    "pixel_auroc",
]

# 8-connectivity inside each image and none across images, so one `ndimage.label` call labels a stack.
_STACK_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=int)
_STACK_8_CONNECTIVITY[1] = 1


class AUPIMOUndefinedError(ValueError):
    """The data cannot resolve AUPIMO's FPR range (too few normal pixels for its lower bound)."""


# ----------------------------------------------------------------------------------------------
# pixel level (evaluation only)
# ----------------------------------------------------------------------------------------------


def _integrate_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoidal area under the polyline (x, y) from x[0] up to ``limit``.

    ``x`` is non-decreasing and must reach ``limit``; y is linearly interpolated at the limit.
    """
    end = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit
    xs, ys = x[:end], y[:end]
    if xs[-1] < limit:
        x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
        y_limit = y0 + (limit - x0) * (y1 - y0) / (x1 - x0)
        xs, ys = np.append(xs, limit), np.append(ys, y_limit)
    return float(np.trapezoid(ys, xs))


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap (PRO) curve up to ``fpr_limit``, divided by ``fpr_limit``.

    Definition (Bergmann et al., MVTec AD; anomalib's AUPRO): ground-truth regions are the connected
    components of each mask (8-connectivity). At a threshold t, a region's overlap is the fraction
    of its pixels with ``map >= t``; PRO(t) is the mean over all regions of all images (every region
    counts once, whatever its size); FPR(t) is the fraction of normal pixels (all images) with
    ``map >= t``. The curve runs over every distinct score (exact, no threshold grid) from (0, 0);
    its trapezoidal area from FPR 0 to ``fpr_limit``, with PRO linearly interpolated at the limit,
    is divided by ``fpr_limit`` so a perfect map scores 1.

    Vectorised, no threshold loop: the ``fpr_limit`` quantile of normal scores is found with
    ``np.partition`` and only scores above it are sorted (normal ones by value, region ones by
    argsort); PRO at each region-pixel score is a cumulative sum of per-pixel weights
    1 / (#regions * region size), FPR a binary search in the sorted normal scores.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    masks, maps = check_pixel_inputs(masks, maps)
    region_ids, n_regions = ndimage.label(masks, structure=_STACK_8_CONNECTIVITY)
    region_ids = region_ids.ravel()
    scores = maps.ravel()
    in_region = region_ids > 0
    normal_scores = scores[~in_region]
    n_normal = normal_scores.size

    # Thresholds at or above `cut` (the k-th highest normal score, k / n_normal > fpr_limit) cover
    # the curve up to and past the limit: lower scores are never sorted.
    k = min(math.floor(fpr_limit * n_normal) + 1, n_normal)
    cut = np.partition(normal_scores, n_normal - k)[n_normal - k]
    normal_top = np.sort(normal_scores[normal_scores >= cut])  # ascending; ties with `cut` included

    # PRO only changes at region-pixel scores: sort those (few) and accumulate their weights.
    region_scores, region_of_pixel = scores[in_region], region_ids[in_region]
    above = region_scores >= cut
    region_scores, region_of_pixel = region_scores[above], region_of_pixel[above]
    order = np.argsort(region_scores)[::-1]  # descending; unstable is fine, ties are grouped below
    region_scores = region_scores[order]
    region_size = np.bincount(region_ids, minlength=n_regions + 1)[1:]
    weights = 1.0 / (n_regions * region_size[region_of_pixel[order] - 1])
    # the last pixel of each run of tied scores (none when every region pixel is below the cut)
    last_of_tie = np.flatnonzero(np.append(region_scores[1:] != region_scores[:-1], region_scores.size > 0))
    thresholds = region_scores[last_of_tie]  # distinct, descending
    pro_at = np.cumsum(weights)[last_of_tie]  # PRO(map >= threshold)
    pro_above = np.concatenate(([0.0], pro_at))[:-1]  # PRO(map > threshold)
    m = normal_top.size
    fpr_at = (m - np.searchsorted(normal_top, thresholds, side="left")) / n_normal
    fpr_above = (m - np.searchsorted(normal_top, thresholds, side="right")) / n_normal

    # Exact curve over every distinct score: from (0, 0), for each region threshold the point just
    # above it and the point at it (a diagonal when normal pixels tie with it); between region
    # thresholds only FPR moves (horizontal); it ends at the cut, past the limit.
    fpr = np.concatenate(([0.0], np.column_stack((fpr_above, fpr_at)).ravel(), [m / n_normal]))
    pro = np.concatenate(([0.0], np.column_stack((pro_above, pro_at)).ravel(), [pro_at[-1] if pro_at.size else 0.0]))
    return _integrate_to_limit(fpr, pro, fpr_limit) / fpr_limit


def aupimo(
    masks,
    maps,
    fpr_bounds: tuple[float, float] = (1e-5, 1e-4),
    image_labels=None,
) -> tuple[float, np.ndarray]:
    """AUPIMO (Bertoldo et al. 2024): area under each anomalous image's per-image overlap curve.

    Returns ``(mean over anomalous images, per-image values)``; the per-image array has one entry
    per input image, NaN for images that are not scored (normal ones).

    Exact choices (the paper's definition; anomalib evaluates the same curves on a grid of
    thresholds, here they are exact):

    - Normal images are those with an empty mask (or, when ``image_labels`` is given, label 0; a
      label-0 image with a non-empty mask is an error). Anomalous images are those with a non-empty
      mask; a label-1 image with an empty mask is scored in neither role.
    - Shared FPR(t): the mean over normal images of each image's fraction of pixels with
      ``map >= t``. All images here have the same size, so this equals the pooled fraction.
    - Per-image TPR_i(t): the fraction of image i's anomalous pixels with ``map >= t``.
    - Each image's curve is TPR_i against the shared FPR over every distinct score (no threshold
      grid; tied scores give diagonal steps as in a ROC curve). AUPIMO_i is the trapezoidal area
      under TPR_i over log(FPR) on ``fpr_bounds`` (default [1e-5, 1e-4]), TPR linearly interpolated
      in log(FPR) at the bounds, divided by log(upper / lower), so it lies in [0, 1].
    - The lower bound must be resolvable: the smallest positive shared FPR (one normal pixel, or one
      run of ties at the top normal score) must not exceed it, i.e. about 1e5 normal pixels at the
      default; otherwise ``AUPIMOUndefinedError`` (a ValueError) is raised.

    Only the top normal scores (shared FPR up to the upper bound) are sorted; TPRs come from a binary
    search of each anomalous image's sorted scores, so this is cheap for any number of images.
    """
    lower, upper = (float(b) for b in fpr_bounds)
    if not 0 < lower < upper <= 1:
        raise ValueError(f"fpr_bounds must satisfy 0 < lower < upper <= 1, got {fpr_bounds}")
    masks, maps = check_pixel_inputs(masks, maps)
    has_defect = masks.any(axis=(1, 2))
    if image_labels is None:
        is_normal = ~has_defect
    else:
        image_labels = np.asarray(image_labels)
        if image_labels.shape != (masks.shape[0],):
            raise ValueError(f"shape mismatch: {image_labels.shape} image labels for {masks.shape[0]} masks")
        is_normal = image_labels == 0
        if (is_normal & has_defect).any():
            first = int(np.flatnonzero(is_normal & has_defect)[0])
            raise ValueError(f"image {first} has label 0 but a non-empty mask")
    if not is_normal.any():
        raise ValueError("AUPIMO needs normal images (empty masks) for its shared FPR; found none")

    normal_scores = maps[is_normal].ravel()
    n_normal = normal_scores.size
    # top-k normal scores with k / n_normal > upper reach past the upper bound; the rest never matter
    k = min(math.floor(upper * n_normal) + 1, n_normal)
    cut = np.partition(normal_scores, n_normal - k)[n_normal - k]
    top = np.sort(normal_scores[normal_scores >= cut])[::-1]  # ties with the cut included
    last_of_tie = np.flatnonzero(np.append(top[1:] != top[:-1], True))
    thresholds = top[last_of_tie]  # descending, distinct
    fpr = (last_of_tie + 1) / n_normal  # shared FPR at each threshold, increasing
    if fpr[0] > lower:
        raise AUPIMOUndefinedError(
            f"AUPIMO's lower FPR bound {lower:g} is below the smallest shared FPR {fpr[0]:.3g} "
            f"({n_normal} normal pixels); add normal images or raise the bound"
        )
    # Segment j (j >= 1) of an image's curve runs from (log fpr[j-1], TPR(> thresholds[j])) to
    # (log fpr[j], TPR(>= thresholds[j])): anomalous pixels strictly between two normal thresholds
    # raise TPR at constant FPR (no area), pixels tied with a threshold make the diagonal.
    log_fpr = np.log(fpr)
    x0, x1 = log_fpr[:-1], log_fpr[1:]
    lo, hi = math.log(lower), math.log(upper)
    a, b = np.clip(x0, lo, hi), np.clip(x1, lo, hi)
    inside = b > a
    x0, x1, a, b = x0[inside], x1[inside], a[inside], b[inside]
    segment_thresholds = thresholds[1:][inside]

    per_image = np.full(masks.shape[0], np.nan)
    for i in np.flatnonzero(has_defect & ~is_normal):
        defect_scores = np.sort(maps[i][masks[i]])
        n = defect_scores.size
        y0 = (n - np.searchsorted(defect_scores, segment_thresholds, side="right")) / n
        y1 = (n - np.searchsorted(defect_scores, segment_thresholds, side="left")) / n
        slope = (y1 - y0) / (x1 - x0)
        ya, yb = y0 + slope * (a - x0), y0 + slope * (b - x0)
        per_image[i] = float(np.sum((b - a) * (ya + yb) / 2)) / (hi - lo)
    scored = per_image[~np.isnan(per_image)]
    if scored.size == 0:
        raise ValueError("AUPIMO needs anomalous images (non-empty masks); found none")
    return float(scored.mean()), per_image


# ----------------------------------------------------------------------------------------------
# everything at once
# ----------------------------------------------------------------------------------------------


def compute_ad_metrics(labels, scores, masks=None, maps=None, fpr_limit: float = 0.3) -> dict:
    """Image metrics always; pixel metrics when ground-truth ``masks`` (and ``maps``) are given.

    Returns ``{"image_AUROC", "image_AP", "image_F1max"[, "pixel_AUROC", "pixel_AUPRO",
    "pixel_AUPIMO"], "thresholds": {"image_F1max": t}[, "per_image": {"pixel_AUPIMO": array}]}``:
    metric values are plain floats at the top level; the F1-max threshold and per-image AUPIMO
    values are kept apart. Sets without masks get image metrics only (``maps`` alone are ignored).
    When the set has too few normal pixels for AUPIMO's 1e-5 FPR bound, ``pixel_AUPIMO`` is NaN and
    a ``RuntimeWarning`` says why; every other problem raises ``ValueError``.
    """
    labels, scores = check_image_inputs(labels, scores)
    f1, f1_threshold = f1_max(labels, scores)
    result: dict = {
        "image_AUROC": image_auroc(labels, scores),
        "image_AP": image_ap(labels, scores),
        "image_F1max": f1,
    }
    thresholds = {"image_F1max": f1_threshold}
    per_image: dict = {}
    if masks is not None:
        if maps is None:
            raise ValueError("masks were given without anomaly maps; pixel metrics need both")
        masks, maps = check_pixel_inputs(masks, maps)
        if masks.shape[0] != labels.shape[0]:
            raise ValueError(f"shape mismatch: {labels.shape[0]} labels but {masks.shape[0]} masks")
        result["pixel_AUROC"] = pixel_auroc(masks, maps)
        result["pixel_AUPRO"] = aupro(masks, maps, fpr_limit=fpr_limit)
        try:
            result["pixel_AUPIMO"], per_image["pixel_AUPIMO"] = aupimo(masks, maps, image_labels=labels)
        except AUPIMOUndefinedError as err:
            warnings.warn(f"pixel_AUPIMO is NaN: {err}", RuntimeWarning, stacklevel=2)
            result["pixel_AUPIMO"] = float("nan")
            per_image["pixel_AUPIMO"] = np.full(labels.shape[0], np.nan)
    result["thresholds"] = thresholds
    if per_image:
        result["per_image"] = per_image
    return result


def verdict_rates(labels, verdicts) -> dict:
    """The model's own verdicts (its calibrated thresholds, not a threshold chosen on the set) against the labels:
    ``verdict_accuracy`` (share right), ``false_alarms`` (share of normal images flagged, NaN without normal ones)
    and ``missed`` (share of anomalous images passed, NaN without anomalous ones). Counts by scikit-learn's
    ``confusion_matrix``."""
    from sklearn.metrics import confusion_matrix

    labels = np.asarray(labels, dtype=int)
    verdicts = np.asarray(verdicts, dtype=bool).astype(int)
    if labels.shape != verdicts.shape or labels.ndim != 1 or not len(labels):
        raise ValueError(f"verdict_rates needs one verdict per label, got {labels.shape} and {verdicts.shape}")
    tn, fp, fn, tp = confusion_matrix(labels, verdicts, labels=[0, 1]).ravel()
    return {
        "verdict_accuracy": float((tn + tp) / len(labels)),
        "false_alarms": float(fp / (tn + fp)) if tn + fp else float("nan"),
        "missed": float(fn / (fn + tp)) if fn + tp else float("nan"),
    }
