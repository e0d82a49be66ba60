"""Anomaly-detection metrics against hand-computed values, scikit-learn and plain references."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

import assistant.metrics
import eval.metrics
from assistant.metrics import balanced_accuracy_threshold, f1_max, image_ap, image_auroc, pixel_auroc
from eval.metrics import AUPIMOUndefinedError, aupimo, aupro, compute_ad_metrics, verdict_rates

# The classic four-image example:
#   labels 0    0    1     1
#   scores 0.1  0.4  0.35  0.8
LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]


# ---------------------------------------------------------------------------------------------
# image level
# ---------------------------------------------------------------------------------------------


def test_image_auroc_hand_computed():
    # (positive, negative) pairs ranked right: 0.35>0.1, 0.8>0.1, 0.8>0.4; 0.35<0.4 -> 3 of 4
    assert image_auroc(LABELS, SCORES) == pytest.approx(0.75)


def test_image_ap_hand_computed():
    # thresholds high to low: 0.8 -> P=1, R=1/2; 0.4 -> R unchanged; 0.35 -> P=2/3, R=1
    # AP = sum (R_n - R_{n-1}) P_n = 1/2 * 1 + 1/2 * 2/3 = 5/6
    assert image_ap(LABELS, SCORES) == pytest.approx(5 / 6)


def test_f1_max_hand_computed_and_threshold_reproduces_it():
    # t=0.8: P=1 R=1/2 F1=2/3; t=0.4: P=1/2 R=1/2 F1=1/2; t=0.35: P=2/3 R=1 F1=0.8; t=0.1: F1=2/3
    f1, threshold = f1_max(LABELS, SCORES)
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)
    predicted = np.asarray(SCORES) >= threshold
    assert f1_score(LABELS, predicted) == pytest.approx(f1)


def test_f1_max_ties_keep_the_highest_threshold():
    # t=0.9: P=1 R=1/2 F1=2/3; t=0.5: TP=1 FP=1 F1=1/2; t=0.2: TP=2 FP=2 P=1/2 R=1 F1=2/3 (tie)
    f1, threshold = f1_max([1, 0, 1, 0], [0.9, 0.5, 0.2, 0.2])
    assert f1 == pytest.approx(2 / 3)
    assert threshold == pytest.approx(0.9)


def test_balanced_accuracy_threshold_hand_computed():
    # score >= 0.35 flags 0.4 (false alarm), 0.35, 0.8: hits 2/2, normals right 1/2 -> 0.75;
    # >= 0.8: hits 1/2, normals right 2/2 -> 0.75 too, and the tie goes to the higher threshold; >= 0.4: 0.5
    assert balanced_accuracy_threshold(LABELS, SCORES) == (pytest.approx(0.75), 0.8)
    best, threshold = balanced_accuracy_threshold([0, 0, 0, 1, 1], [0.1, 0.2, 0.6, 0.5, 0.7])
    flagged = np.array([0.1, 0.2, 0.6, 0.5, 0.7]) >= threshold
    truth = np.array([0, 0, 0, 1, 1], dtype=bool)
    assert best == pytest.approx(((flagged & truth).sum() / 2 + (~flagged & ~truth).sum() / 3) / 2)
    assert (threshold, best) == (0.5, pytest.approx((1 + 2 / 3) / 2))
    with pytest.raises(ValueError, match="both normal"):
        balanced_accuracy_threshold([1, 1], [0.2, 0.3])


def test_evaluation_reuses_the_librarys_metrics():
    """One implementation: evaluation's image and pixel metrics are the library's own functions."""
    for name in ("image_auroc", "image_ap", "f1_max", "pixel_auroc"):
        assert getattr(eval.metrics, name) is getattr(assistant.metrics, name), name


def test_image_metrics_match_sklearn_and_brute_force_on_random_data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)  # rounded: plenty of ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores))
    brute = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(brute)
    assert f1_score(labels, scores >= threshold) == pytest.approx(f1)


@pytest.mark.parametrize(
    "labels, scores, message",
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "both normal"),
        ([0, 0], [0.1, 0.2], "both normal"),
        ([0, 1, 1], [0.1, 0.2], "shape mismatch"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([0, 2], [0.1, 0.2], "labels must be 0"),
    ],
)
def test_image_input_errors_are_one_line_value_errors(labels, scores, message):
    for metric in (image_auroc, image_ap, f1_max, compute_ad_metrics):
        with pytest.raises(ValueError, match=message) as info:
            metric(labels, scores)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# pixel AUROC
# ---------------------------------------------------------------------------------------------


def test_pixel_auroc_hand_computed_with_a_tie():
    # anomalous pixels 0.9, 0.5; normal 0.2, 0.5, 0.1, 0.3
    # 0.9 beats 4 normals; 0.5 beats 3 and ties 1 (counts 1/2) -> (4 + 3.5) / 8
    maps = np.array([[[0.9, 0.2, 0.5], [0.5, 0.1, 0.3]]])
    masks = np.array([[[1, 0, 0], [1, 0, 0]]])
    assert pixel_auroc(masks, maps) == pytest.approx(7.5 / 8)


def test_pixel_auroc_matches_sklearn_over_all_pixels_of_all_images():
    rng = np.random.default_rng(1)
    masks = rng.random((6, 20, 24)) < 0.1
    maps = np.round(rng.random(masks.shape) + 0.3 * masks, 2).astype(np.float32)  # ties
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    # (N, 1, H, W) as anomalib batches it
    assert pixel_auroc(masks[:, None], maps[:, None]) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# AUPRO
# ---------------------------------------------------------------------------------------------


def reference_aupro(masks, maps, fpr_limit):
    """Plain definition: every distinct score is a threshold; regions labelled per image."""
    masks = np.asarray(masks, dtype=bool)
    structure = np.ones((3, 3), dtype=int)
    labelled = [ndimage.label(m, structure=structure) for m in masks]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        predicted = maps >= t
        fpr = (predicted & normal).sum() / normal.sum()
        overlaps = []
        for (regions, n), pred in zip(labelled, predicted):
            for r in range(1, n + 1):
                region = regions == r
                overlaps.append((pred & region).sum() / region.sum())
        points.append((fpr, np.mean(overlaps)))
    fprs, pros = np.array(points).T
    # keep the points up to the limit, then add the interpolated point at the limit
    keep = fprs <= fpr_limit
    x, y = list(fprs[keep]), list(pros[keep])
    if x[-1] < fpr_limit:
        nxt = np.flatnonzero(~keep)[0]
        x0, y0, x1, y1 = fprs[nxt - 1], pros[nxt - 1], fprs[nxt], pros[nxt]
        x.append(fpr_limit)
        y.append(y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    area = sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1))
    return area / fpr_limit


# Two 1x5 images.  A: mask 1 1 0 0 0, map .9 .4 .8 .1 .2;  B: mask 0 0 0 1 0, map .3 .5 .6 .7 .05
# Regions: A{.9,.4} and B{.7}; 7 normal pixels, so FPR moves in steps of 1/7.
# t=.9: FPR 0,   PRO (1/2 + 0)/2 = 1/4      t=.8: FPR 1/7, PRO 1/4
# t=.7: FPR 1/7, PRO (1/2 + 1)/2 = 3/4      t=.6: FPR 2/7   t=.5: FPR 3/7 (PRO 3/4)
# t=.4: FPR 3/7, PRO 1, and it stays 1 down to FPR 1.
# Area to 0.3: 1/4 * 1/7 + 3/4 * 1/7 + 3/4 * (0.3 - 2/7) = 0.225 - 0.5/7; / 0.3
# Area to 1:   (1/4 + 3/4 + 3/4) / 7 + 1 * 4/7 = 5.75 / 7
TWO_IMAGES_MASKS = np.array([[[1, 1, 0, 0, 0]], [[0, 0, 0, 1, 0]]])
TWO_IMAGES_MAPS = np.array([[[0.9, 0.4, 0.8, 0.1, 0.2]], [[0.3, 0.5, 0.6, 0.7, 0.05]]])


def test_aupro_hand_computed():
    assert aupro(TWO_IMAGES_MASKS, TWO_IMAGES_MAPS) == pytest.approx((0.225 - 0.5 / 7) / 0.3)
    assert aupro(TWO_IMAGES_MASKS, TWO_IMAGES_MAPS, fpr_limit=1.0) == pytest.approx(5.75 / 7)


def test_aupro_interpolates_linearly_at_the_limit():
    # one threshold only: the curve is the diagonal (0,0)-(1,1); area to L is L^2/2, so AUPRO = L/2
    masks = np.array([[[1, 0, 0, 0, 0]]])
    maps = np.full(masks.shape, 0.5)
    assert aupro(masks, maps) == pytest.approx(0.15)
    assert aupro(masks, maps, fpr_limit=0.1) == pytest.approx(0.05)


def test_aupro_counts_each_region_once_whatever_its_size():
    # region of 4 pixels found first, region of 1 pixel scored below every normal pixel:
    # PRO is (1 + 0)/2 = 1/2 until FPR 1 (a pixel-wise overlap would say 4/5)
    masks = np.array([[[1, 1, 1, 1, 0, 0, 0, 0, 0, 1]]])
    maps = np.array([[[0.9, 0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0]]])
    assert aupro(masks, maps) == pytest.approx(0.5)


def test_aupro_uses_8_connectivity():
    # (0,0),(0,1) and the diagonal neighbour (1,2) form ONE region under 8-connectivity: only (1,2)
    # is found above the normals (0.5), so PRO = 1/3; with 4-connectivity it would be (0 + 1)/2.
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 2] = True
    maps = np.full((1, 3, 3), 0.5)
    maps[0, 0, 0] = maps[0, 0, 1] = 0.0
    maps[0, 1, 2] = 0.9
    assert aupro(masks, maps) == pytest.approx(1 / 3)


def test_aupro_perfect_and_inverted_maps():
    rng = np.random.default_rng(2)
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:6, 3:9] = masks[1, 10:14, 10:12] = True
    assert aupro(masks, masks + 0.1 * rng.random(masks.shape)) == pytest.approx(1.0)
    assert aupro(masks, -1.0 * masks + 0.1 * rng.random(masks.shape)) == pytest.approx(0.0)


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_matches_plain_per_threshold_reference(seed, fpr_limit):
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 12, 12), dtype=bool)
    for image in range(3):  # image 3 stays normal
        for _ in range(2):
            y, x = rng.integers(0, 10, 2)
            masks[image, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 1)  # 1 decimal: many ties
    expected = reference_aupro(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-12)


def test_pixel_input_errors():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 1, 1] = True
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.raises(ValueError, match="shape mismatch"):
        aupro(masks, maps[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(masks, np.where(masks, np.nan, maps))
    with pytest.raises(ValueError, match="every mask pixel is normal"):
        aupro(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        pixel_auroc(masks[0], maps[0])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0)


# ---------------------------------------------------------------------------------------------
# AUPIMO
# ---------------------------------------------------------------------------------------------


def aupimo_fixture():
    """4 normal images of 500x500 with distinct scores (k-th highest normal = 1 - k/1e6) and 5
    anomalous images whose defect scores make each per-image curve known in closed form."""
    n_side, n_normal_images = 500, 4
    n_pixels = n_normal_images * n_side * n_side  # 1e6: shared FPR of the k-th highest score = k/1e6
    rng = np.random.default_rng(0)
    normal = (np.arange(n_pixels) / n_pixels)[rng.permutation(n_pixels)].reshape(4, n_side, n_side)
    kth_highest = lambda k: (n_pixels - k) / n_pixels  # noqa: E731

    anomalous = np.full((5, n_side, n_side), 0.5)
    masks = np.zeros((9, n_side, n_side), dtype=bool)
    masks[4:, 100:110, 100:110] = True  # 100 defect pixels each
    defect = np.zeros((5, 10, 10))
    defect[0] = 2.0  # above every normal score: TPR 1 everywhere -> 1
    defect[1] = -1.0  # below every normal score: TPR 0 -> 0
    defect[2, :5], defect[2, 5:] = 2.0, -1.0  # TPR 1/2 everywhere -> 1/2
    # between the 31st and 32nd highest normal: TPR 0 up to FPR 31e-6, then 1
    defect[3] = (kth_highest(31) + kth_highest(32)) / 2
    # tied with the 50th highest normal: diagonal from (49e-6, 0) to (50e-6, 1) in (log FPR, TPR)
    defect[4] = kth_highest(50)
    anomalous[:, 100:110, 100:110] = defect
    maps = np.concatenate([normal, anomalous])
    lo, hi = math.log(1e-5), math.log(1e-4)
    expected = [
        1.0,
        0.0,
        0.5,
        (hi - math.log(31e-6)) / (hi - lo),  # = 1 - log10(3.1)
        ((hi - math.log(50e-6)) + 0.5 * (math.log(50e-6) - math.log(49e-6))) / (hi - lo),
    ]
    return masks, maps, expected


def test_aupimo_constructed_case_with_known_answers():
    masks, maps, expected = aupimo_fixture()
    mean, per_image = aupimo(masks, maps)
    assert np.isnan(per_image[:4]).all()  # normal images are not scored
    assert per_image[4:] == pytest.approx(expected, abs=1e-12)
    assert expected[3] == pytest.approx(1 - math.log10(3.1))
    assert mean == pytest.approx(np.mean(expected), abs=1e-12)


def test_aupimo_matches_dense_log_grid_reference_on_random_maps():
    # distinct continuous scores: between consecutive shared-FPR steps an image's TPR is constant,
    # so a midpoint Riemann sum over a fine log-FPR grid converges to AUPIMO
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 200, 200), dtype=bool)
    masks[3:, 50:70, 60:90] = True
    maps = rng.normal(size=masks.shape) + 3.5 * masks * rng.random((6, 1, 1))
    mean, per_image = aupimo(masks, maps)

    normal_sorted = np.sort(maps[:3].ravel())[::-1]
    n = normal_sorted.size
    z = np.linspace(math.log(1e-5), math.log(1e-4), 4001)
    z = (z[1:] + z[:-1]) / 2
    # the step covering FPR e^z ends at the threshold where ceil(e^z n) normal pixels are counted
    thresholds = normal_sorted[np.ceil(np.exp(z) * n).astype(int) - 1]
    for i in range(3, 6):
        defect = maps[i][masks[i]]
        tpr = (defect[None, :] >= thresholds[:, None]).mean(axis=1)
        assert per_image[i] == pytest.approx(tpr.mean(), abs=2e-3)
    assert 0 < mean < 1


def test_aupimo_needs_enough_normal_pixels_and_compute_ad_metrics_warns():
    masks = np.zeros((3, 64, 64), dtype=bool)  # 2 normal images: 8192 pixels, min FPR 1.2e-4
    masks[2, 10:20, 10:20] = True
    maps = np.random.default_rng(0).random(masks.shape) + masks
    with pytest.raises(AUPIMOUndefinedError, match="lower FPR bound"):
        aupimo(masks, maps)
    with pytest.warns(RuntimeWarning, match="pixel_AUPIMO is NaN"):
        result = compute_ad_metrics([0, 0, 1], maps.max(axis=(1, 2)), masks, maps)
    assert math.isnan(result["pixel_AUPIMO"])
    assert result["pixel_AUROC"] > 0.9
    # a wider FPR range is resolvable with this little data
    mean, _ = aupimo(masks, maps, fpr_bounds=(1e-3, 1e-2))
    assert mean == pytest.approx(1.0)


def test_aupimo_label_mask_consistency():
    masks, maps, _ = aupimo_fixture()
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    labels_wrong = labels.copy()
    labels_wrong[5] = 0
    with pytest.raises(ValueError, match="image 5 has label 0 but a non-empty mask"):
        aupimo(masks, maps, image_labels=labels_wrong)
    # a label-1 image with an empty mask is scored in neither role
    labels_extra = labels.copy()
    labels_extra[3] = 1
    _, per_image = aupimo(masks, maps, image_labels=labels_extra)
    assert np.isnan(per_image[3])
    # 3 normal images (7.5e5 pixels) instead of 4: image 0's TPR is 1 at every FPR regardless
    assert per_image[4] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# compute_ad_metrics
# ---------------------------------------------------------------------------------------------


def test_compute_ad_metrics_without_masks_gives_image_metrics_only():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = compute_ad_metrics(LABELS, SCORES, maps=np.zeros((4, 2, 2)))
    assert set(result) == {"image_AUROC", "image_AP", "image_F1max", "thresholds"}
    assert result["image_AUROC"] == pytest.approx(0.75)
    assert result["image_AP"] == pytest.approx(5 / 6)
    assert result["image_F1max"] == pytest.approx(0.8)
    assert result["thresholds"] == {"image_F1max": pytest.approx(0.35)}


def test_compute_ad_metrics_with_masks():
    masks, maps, expected = aupimo_fixture()
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2))
    result = compute_ad_metrics(labels, scores, masks, maps)
    assert set(result) == {
        "image_AUROC",
        "image_AP",
        "image_F1max",
        "pixel_AUROC",
        "pixel_AUPRO",
        "pixel_AUPIMO",
        "thresholds",
        "per_image",
    }
    assert all(isinstance(result[k], float) for k in result if k.startswith(("image_", "pixel_")))
    assert result["pixel_AUPIMO"] == pytest.approx(np.mean(expected))
    assert result["per_image"]["pixel_AUPIMO"][4:] == pytest.approx(expected)
    assert result["pixel_AUPRO"] == pytest.approx(aupro(masks, maps))
    with pytest.raises(ValueError, match="without anomaly maps"):
        compute_ad_metrics(labels, scores, masks)
    with pytest.raises(ValueError, match="shape mismatch"):
        compute_ad_metrics(labels[:-1], scores[:-1], masks, maps)


def test_results_json_writes_undefined_numbers_as_null():
    from assistant import jsonutil

    text = jsonutil.dumps(
        {"auroc": float("nan"), "rows": [np.float32("nan"), np.float64(0.5), (float("inf"), 2)], "n": np.int64(3)}
    )
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {
        "auroc": None,
        "rows": [None, 0.5, [None, 2]],
        "n": 3,
    }


def test_verdict_rates_hand_computed():
    # 3 normal images (one flagged), 4 anomalous (one passed): 5 of 7 right
    rates = verdict_rates([0, 0, 0, 1, 1, 1, 1], [False, True, False, True, True, False, True])
    assert rates == pytest.approx({"verdict_accuracy": 5 / 7, "false_alarms": 1 / 3, "missed": 1 / 4})
    only_normal = verdict_rates([0, 0], [True, False])
    assert only_normal["false_alarms"] == 0.5 and math.isnan(only_normal["missed"])
    with pytest.raises(ValueError, match="one verdict per label"):
        verdict_rates([0, 1], [True])
