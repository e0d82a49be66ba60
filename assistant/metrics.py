"""Anomaly-detection metrics the library and training share, on numpy arrays, with anomalib's names.

Inputs use anomalib's vocabulary: ``pred_score`` (one score per image, higher = more anomalous), image labels
(0 normal, 1 anomalous), ``anomaly_map`` (one score per pixel, shape ``(N, H, W)``) and ground-truth masks of the same
shape (nonzero = anomalous pixel). Thresholds are returned apart from the scores they were chosen on.

``image_auroc``, ``image_ap`` (scikit-learn), ``f1_max`` (max F1 on the PR curve and its threshold),
``balanced_accuracy_threshold`` (the best image verdict; calibration fits its threshold from it), ``pixel_auroc`` (over all pixels of all images).
The evaluation-only metrics (AUPRO, AUPIMO) live in ``eval.metrics``.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

__all__ = [
    "balanced_accuracy_threshold",
    "check_image_inputs",
    "check_pixel_inputs",
    "check_scores",
    "f1_max",
    "image_ap",
    "image_auroc",
    "pixel_auroc",
]


# ----------------------------------------------------------------------------------------------
# input checks: one-line ValueErrors for the mistakes people actually make
# ----------------------------------------------------------------------------------------------


def check_scores(values, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype == bool or not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {values.dtype}")
    if not np.isfinite(values).all():
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s)")
    return values


def check_image_inputs(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = check_scores(scores, "scores")
    if labels.ndim != 1 or scores.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {labels.shape} and {scores.shape}")
    if labels.shape != scores.shape:
        raise ValueError(f"shape mismatch: {labels.shape[0]} labels but {scores.shape[0]} scores")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (anomalous), got values {np.unique(labels)[:5]}")
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        only = int(labels[0]) if labels.size else "none"
        raise ValueError(f"image metrics need both normal (0) and anomalous (1) images; got only label {only}")
    return labels, scores


def check_pixel_inputs(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(masks as bool (N, H, W), maps (N, H, W))``; ``(N, 1, H, W)`` is squeezed."""
    masks = np.asarray(masks)
    maps = check_scores(maps, "anomaly maps")
    if masks.shape != maps.shape:
        raise ValueError(f"shape mismatch: masks {masks.shape} vs anomaly maps {maps.shape}")
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks, maps = masks[:, 0], maps[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks and anomaly maps must be (N, H, W) or (N, 1, H, W), got {masks.shape}")
    masks = masks.astype(bool, copy=False)
    n_anomalous = int(np.count_nonzero(masks))
    if n_anomalous == 0 or n_anomalous == masks.size:
        kind = "anomalous" if n_anomalous else "normal"
        raise ValueError(f"pixel metrics need both normal and anomalous pixels; every mask pixel is {kind}")
    return masks, maps


# ----------------------------------------------------------------------------------------------
# image level
# ----------------------------------------------------------------------------------------------


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores (scikit-learn's ``roc_auc_score``)."""
    labels, scores = check_image_inputs(labels, scores)
    return float(roc_auc_score(labels, scores))


def image_ap(labels, scores) -> float:
    """Average precision of image scores (scikit-learn's ``average_precision_score``, step rule)."""
    labels, scores = check_image_inputs(labels, scores)
    return float(average_precision_score(labels, scores))


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds of the PR curve, and the threshold that reaches it.

    Predicting ``score >= threshold`` as anomalous gives exactly the returned F1. Ties between
    thresholds go to the highest threshold (the first one scikit-learn lists in descending order).
    """
    labels, scores = check_image_inputs(labels, scores)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # the last PR point (precision 1, recall 0) has no threshold
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    # scikit-learn lists thresholds ascending; scan from the top so ties keep the highest threshold
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    return float(f1[best]), float(thresholds[best])


def balanced_accuracy_threshold(labels, scores) -> tuple[float, float]:
    """(best balanced accuracy, its threshold) for predicting ``score >= threshold``, among the observed scores.

    The image verdict's threshold: the mean of the hit rates on anomalous and on normal images does not depend on how
    many of each the set holds, and it counts false alarms, which F1 ignores. Ties go to the highest threshold.
    """
    labels, scores = check_image_inputs(labels, scores)
    false_alarm, hit, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    balanced = (hit[1:] + 1 - false_alarm[1:]) / 2  # [0] is the threshold above every score: nothing flagged
    best = int(np.argmax(balanced))
    return float(balanced[best]), float(thresholds[1:][best])


# ----------------------------------------------------------------------------------------------
# pixel level
# ----------------------------------------------------------------------------------------------


def _auroc_by_ranks(positive: np.ndarray, negative: np.ndarray) -> float:
    """AUROC as P(positive > negative) + P(tie) / 2 (Mann-Whitney), exact and tie-aware.

    Own code because it is measurably better at pixel scale: 100 maps of 256x256 (6.5M pixels)
    take ~0.3 s here versus ~3-4 s for scikit-learn's ``roc_auc_score`` on 2 cores (it argsorts
    all pixels with a stable sort; this value-sorts the pixels and binary-searches the anomalous
    ones among the normal ones). The value equals scikit-learn's (trapezoidal ROC area) to
    rounding; the tests check that.
    """
    negative = np.sort(negative)  # unstable SIMD sort: ~2.5x faster than kind="stable" here
    positive = np.sort(positive)  # sorted queries make the binary searches cache-friendly
    below = np.searchsorted(negative, positive, side="left").astype(np.int64)
    below_or_tied = np.searchsorted(negative, positive, side="right").astype(np.int64)
    # integers throughout: 2 * (#pairs pos > neg) + (#tied pairs), over 2 * #pairs
    numerator = int(below.sum()) + int(below_or_tied.sum())
    return numerator / (2 * positive.size * negative.size)


def pixel_auroc(masks, maps) -> float:
    """ROC AUC over all pixels of all images (every pixel one sample, as anomalib's pixel AUROC)."""
    masks, maps = check_pixel_inputs(masks, maps)
    return _auroc_by_ranks(maps[masks], maps[~masks])
