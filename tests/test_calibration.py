"""The calibration owner (`assistant.calibration`, `assistant.metrics`): how a verdict threshold is fitted from
held-out scores, and how the few-shot and reference-floor maps move scores onto the zero-shot scale."""

import numpy as np
import pytest
import torch


def test_few_shot_rescale_maps_the_few_shot_threshold_onto_the_zero_shot_one():
    import torch

    from assistant.config import AnomalyAssistantConfig

    config = AnomalyAssistantConfig(image_threshold=0.8, pixel_threshold=0.3, few_shot_thresholds=(0.4, 0.6))
    values = torch.tensor([0.0, 0.2, 0.4, 0.7, 1.0])
    assert config.few_shot_rescale(values).tolist() == pytest.approx([0.0, 0.4, 0.8, 0.9, 1.0])
    assert config.few_shot_rescale(values, pixel=True).tolist() == pytest.approx([0.0, 0.1, 0.2, 0.475, 1.0])
    assert AnomalyAssistantConfig(image_threshold=0.8).few_shot_rescale(values) is values
    for bad in ((0.4,), (0.0, 0.5), (0.5, 1.0)):
        with pytest.raises(ValueError, match="few_shot_thresholds"):
            AnomalyAssistantConfig(few_shot_thresholds=bad)


def test_image_threshold_balances_misses_and_false_alarms():
    """The image verdict's calibration: with mostly defective held-out images, F1-max would flag normal images to
    catch one more defect; the best balanced accuracy does not, and no other threshold balances better."""
    from sklearn.metrics import balanced_accuracy_score

    from assistant.metrics import balanced_accuracy_threshold
    from eval.metrics import f1_max

    labels = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    scores = np.array([0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.2, 0.5, 0.1])
    best, threshold = balanced_accuracy_threshold(labels, scores)
    assert threshold == pytest.approx(0.6)  # the lowest-scored defect is left as a miss
    assert f1_max(labels, scores)[1] == pytest.approx(
        0.2
    )  # F1 buys it with a false alarm on one of the two normal images
    candidates = [balanced_accuracy_score(labels, scores >= t) for t in np.unique(scores)]
    assert best == pytest.approx(max(candidates)) == pytest.approx(balanced_accuracy_score(labels, scores >= threshold))


def test_image_threshold_keeps_a_margin_above_the_held_out_normal_images():
    """Held-out normal images at 0.02-0.1 and defects at 0.6-0.99: any threshold in (0.1, 0.6] is right on all of
    them. The fitted one is the middle of that gap (in logit terms), not its edge at 0.6 (a new surface's normal
    images, scoring a little higher than the training ones, still pass; a defect a little weaker is still caught);
    with a slack, thresholds a point of balanced accuracy worse widen the range it takes the middle of."""
    from assistant.calibration import image_threshold
    from assistant.metrics import balanced_accuracy_threshold

    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.02, 0.05, 0.1, 0.6, 0.9, 0.95, 0.99])
    assert balanced_accuracy_threshold(labels, scores) == (pytest.approx(1.0), pytest.approx(0.6))
    accuracy, threshold = image_threshold(labels, scores)
    assert accuracy == pytest.approx(1.0)
    assert threshold == pytest.approx(1 / (1 + np.sqrt(0.9 / 0.1 * 0.4 / 0.6)))  # logit midpoint of 0.1 and 0.6
    # 100 defects, one scored among the normal images: no threshold is perfect; a slack of 0.01 lets the range's top
    # pass the two weakest other defects too (each costs 0.005), so its middle moves up but stays inside the gap
    labels = np.array([0] * 10 + [1] * 100)
    scores = np.concatenate([np.linspace(0.01, 0.1, 10), [0.05], np.linspace(0.6, 0.99, 99)])
    strict = image_threshold(labels, scores)
    slack = image_threshold(labels, scores, slack=0.01)
    assert strict[0] == pytest.approx(slack[0]) == pytest.approx(0.995)
    assert 0.1 < strict[1] < slack[1] <= 0.6
    with pytest.raises(ValueError, match="both normal"):
        image_threshold([1, 1], [0.2, 0.3])


def test_threshold_report_without_defect_pixels_still_gives_thresholds():
    """Held-out defects with image labels only (empty masks): the image threshold is fitted, and the pixel threshold
    falls back to the highest map value instead of failing the calibration."""
    from assistant.calibration import fit_report as threshold_report

    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.7, 0.9])
    maps = rng.random((4, 8, 8)).astype(np.float32)
    report = threshold_report(labels, scores, maps, np.zeros((4, 8, 8), dtype=bool))
    assert 0.2 < report["image_threshold"] < 0.7 and report["image_balanced_accuracy"] == pytest.approx(1.0)
    assert report["pixel_threshold"] == pytest.approx(float(maps.max()))
    assert np.isnan(report["pixel_f1_max"]) and np.isnan(report["pixel_auroc"])


def test_raise_to_moves_the_verdict_threshold_to_the_references_floor_and_keeps_the_order():
    from assistant.calibration import Calibration

    calibration = Calibration(image_threshold=0.5, pixel_threshold=0.5)
    scores = torch.tensor([0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0])
    assert torch.equal(calibration.raise_to(scores, None), scores)
    assert torch.equal(calibration.raise_to(scores, 0.4), scores)  # a floor under the threshold changes nothing
    raised = calibration.raise_to(scores, 0.8)
    assert [calibration.is_anomalous(float(s)) for s in raised] == [False] * 4 + [True] * 3  # 0.8 and above only
    assert float(raised[4]) == pytest.approx(0.5) and float(raised[-1]) == pytest.approx(1.0)
    assert bool((raised.diff() > 0).all()) and calibration.raise_to(0.8, 0.8) == pytest.approx(0.5)


def test_domain_fit_sets_the_new_kind_threshold_between_the_held_out_images_and_out_of_domain():
    """Held-out distances with a 99th percentile q: out of domain past domain_margin · q, a new kind past
    novel_margin · q; in between an image is in domain but new (`is_novel`), beyond it only out of domain."""
    from assistant.calibration import Calibration, CalibrationConfig

    distances = np.linspace(0.0, 0.05, 101)  # 99th percentile 0.0495
    calibration, report = Calibration().with_domain(distances, CalibrationConfig(domain_margin=6.0, novel_margin=2.0))
    q99 = float(np.quantile(distances, 0.99))
    assert calibration.domain_threshold == pytest.approx(6 * q99) and calibration.novel_threshold == pytest.approx(
        2 * q99
    )
    assert report["novel_threshold"] == pytest.approx(2 * q99)
    assert [calibration.is_novel(d) for d in (0.05, 0.1, 0.2, 0.4, None)] == [False, True, True, False, False]
    assert calibration.is_out_of_domain(0.4) is True
    assert Calibration().is_novel(0.5) is False  # no domain fit, no check
    with pytest.raises(ValueError, match="novel_margin"):
        CalibrationConfig(domain_margin=4.0, novel_margin=5.0)


def test_a_new_kind_of_surface_takes_the_top_of_the_held_out_threshold_range():
    """The fit keeps, beside the middle of the thresholds as good as the best, their top (`threshold_range`) for
    images of a new kind; `for_new_kinds` re-maps only those images' scores so that top lands on the image
    threshold (order kept), and leaves every score alone without a distance or that threshold."""
    import numpy as np
    import torch

    from assistant.calibration import Calibration, threshold_range

    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.05, 0.1, 0.2, 0.3, 0.7, 0.8, 0.9, 0.95])
    low, high = threshold_range(labels, scores, slack=0.0)
    assert (low, high) == (0.3, 0.7)  # any threshold in (0.3, 0.7] splits them alike
    maps = np.zeros((8, 4, 4))
    masks = np.zeros((8, 4, 4), dtype=bool)
    masks[4:, 0, 0] = True
    maps[4:, 0, 0] = 1.0
    fitted, report = Calibration.fit(labels, scores, maps, masks)
    assert report["image_threshold_range"] == [0.3, 0.7]
    assert fitted.image_threshold < fitted.novel_image_threshold == 0.7
    calibration = fitted.replace(domain_threshold=0.2, novel_threshold=0.1)
    values = torch.tensor([0.6, 0.6, 0.6, 0.8])
    moved = calibration.for_new_kinds(values, torch.tensor([0.05, 0.15, 0.3, 0.15]))
    assert moved[0] == 0.6  # a kind training showed
    assert moved[1] == moved[2] < calibration.image_threshold < moved[3]  # new kind, out of domain: 0.6 below the top
    assert torch.equal(calibration.for_new_kinds(values, None), values)
    assert torch.equal(
        calibration.replace(novel_image_threshold=None).for_new_kinds(values, torch.full((4,), 0.15)), values
    )


def test_a_new_kind_in_a_folder_is_judged_at_the_folders_own_threshold():
    """Only an image scored on its own is judged at the raised threshold for new kinds; in a folder the new kind is
    named but its threshold is the folder's own. A checkpoint calibrated when the folder mode kept a raised top of
    its own still loads, and saving its config again drops that unused key."""
    from assistant.calibration import Calibration
    from assistant.config import AnomalyAssistantConfig
    from assistant.inference import novelty_warning

    calibration = Calibration(0.5, 0.5, domain_threshold=0.2, novel_threshold=0.1, novel_image_threshold=0.8)
    single, folder = (novelty_warning(calibration, 0.15, mode) for mode in ("single", "batch"))
    assert "threshold is raised to 0.80" in single[0] and "references" in single[0]
    assert "new to the model" in folder[0] and "raised" not in folder[0]
    assert novelty_warning(calibration, 0.05, "batch") == []
    old = AnomalyAssistantConfig(batch_thresholds=(0.7, 0.8), novel_batch_threshold=0.85)
    assert Calibration.of(old).modes["batch"] == [0.7, 0.8] and "novel_batch_threshold" not in old.to_dict()


def test_a_folder_whose_typical_image_scores_above_every_training_folder_is_shifted_back():
    """`with_typical_top` keeps the highest median score of a held-out folder's normal images; `anchor_folder`
    leaves a folder alone while its typical image (10th percentile) is at or below it, and otherwise shifts its
    scores down in logit terms so that the typical image lands on it, keeping their order (a folder of a surface the expert calls
    anomalous throughout, its defect still the highest); normal references' median moves scores the same way."""
    import pytest
    import torch

    from assistant.calibration import Calibration

    held_out = [[0.01, 0.02, 0.03, 0.9, 0.95], [0.04, 0.05, 0.06, 0.8, 0.9, 0.95]]
    labels = [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]  # only the normal images count
    calibration, report = Calibration(image_threshold=0.5).with_typical_top(held_out, labels)
    assert report["normal_medians"] == pytest.approx([0.02, 0.05]) and calibration.typical_score_top == 0.05
    assert Calibration.of(_written(calibration)).typical_score_top == 0.05  # stored in the config

    familiar = torch.tensor([0.01, 0.03, 0.04, 0.05, 0.9])
    assert torch.equal(calibration.anchor_folder(familiar), familiar)
    saturated = torch.tensor([0.96, 0.98, *[0.985] * 8, 0.9999])  # its 10th percentile: 0.98
    shifted = calibration.anchor_folder(saturated)
    assert float(shifted[1]) == pytest.approx(0.05, abs=1e-4)  # the typical image back at the top
    assert torch.all(shifted[1:] >= shifted[:-1]) and float(shifted[-1]) > 0.9  # order kept, the outlier stays high
    assert torch.equal(calibration.replace(typical_score_top=None).anchor_folder(saturated), saturated)
    assert calibration.without_mode("batch").typical_score_top == 0.05  # the few-shot mode uses it too
    references = torch.tensor([0.96, 0.9999])  # scored with normal references whose median is 0.98
    assert torch.allclose(calibration.anchor(references, 0.98), shifted[[0, 10]])
    with pytest.raises(ValueError, match="held-out folders"):
        calibration.with_typical_top([[0.9]], [[1]])


def test_typical_top_can_be_a_lower_quantile_of_the_surfaces_medians_so_one_high_surface_does_not_set_it():
    # one training surface whose normal images score high (0.3) would otherwise leave new surfaces' scores unshifted
    import pytest
    import torch

    from assistant.calibration import Calibration, CalibrationConfig

    held_out = [[0.01, 0.01, 0.9], [0.02, 0.02, 0.9], [0.3, 0.3, 0.95]]
    labels = [[0, 0, 1], [0, 0, 1], [0, 0, 1]]
    highest, _ = Calibration(image_threshold=0.5).with_typical_top(held_out, labels)
    middle, report = Calibration(image_threshold=0.5).with_typical_top(
        held_out + [[0.9]], labels + [[1]], CalibrationConfig(typical_quantile=0.5), ["a", "b", "c", "defects only"]
    )
    assert report["surfaces"] == ["a", "b", "c"]  # each median named; a folder without normal images has none
    assert highest.typical_score_top == pytest.approx(0.3) and middle.typical_score_top == pytest.approx(0.02)
    assert report["typical_quantile"] == 0.5 and report["typical_score_top"] == pytest.approx(0.02)
    references = torch.tensor([0.2, 0.4, 0.95])  # a new surface's images, its normal references' median 0.3
    assert torch.equal(highest.anchor(references, 0.3), references)  # not shifted at all
    assert torch.all(middle.anchor(references, 0.3) < references)  # shifted down, order kept
    with pytest.raises(ValueError, match="typical_quantile must be in"):
        CalibrationConfig(typical_quantile=1.5)


def _written(calibration):
    from types import SimpleNamespace

    config = SimpleNamespace()
    calibration.write(config)
    return config


def test_a_verdict_line_shows_which_side_of_the_threshold_a_score_is_on():
    """Scores and thresholds are printed to 3 decimals, or more where 3 would read the same or round a threshold
    under 1 up to 1.000 (a threshold fitted to a far product, `train.calibrate --all-images`, sat at 0.9998)."""
    from assistant.calibration import shown

    assert shown(0.977, 0.937) == ("0.977", "0.937")
    assert shown(0.999, 0.99981) == ("0.9990", "0.9998")
    assert shown(1.0, 0.99981) == ("1.0000", "0.9998")
    assert shown(0.93712, 0.93705) == ("0.93712", "0.93705")
    assert shown(0.5, 0.5) == ("0.500", "0.500")
    for score, threshold in [(0.9999991, 0.9999992), (0.12345678, 0.12345679)]:
        assert len(shown(score, threshold)[0]) == len("0.123456")  # at most 6 decimals
