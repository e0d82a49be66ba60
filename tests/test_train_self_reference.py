"""`python -m train.self_reference`: add the fitted self-reference map to a trained checkpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from data_prep.synth import SynthPlan, write_dataset
from tests.conftest import strict_json


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from assistant.testing import tiny_assistant

    root = tmp_path_factory.mktemp("selfref")
    data = root / "data"
    write_dataset(data, SynthPlan(n=60, families=("wood", "metal"), size=64, seed=3, anomaly_ratio=0.5))
    return tiny_assistant(root / "model"), data


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_fit_raises_held_out_pixel_auroc_and_the_checkpoint_loads(setup, tmp_path):
    from assistant import AnomalyAssistant
    from train.self_reference import main

    model, data = setup
    before = _files(model)
    out = tmp_path / "final"
    assert (
        main(
            ["--model", str(model), "--data", str(data), "--out", str(out), "--val-fraction", "0.5", "--weight", "0.8"]
        )
        == 0
    )
    assert _files(model) == before  # the input checkpoint is untouched
    report = strict_json((out / "self_reference.json").read_text())
    strict_json((out / "calibration.json").read_text())
    assert report["scale"] > 0
    # the tiny model's expert is random, so its map is near chance; the self-reference finds the defects
    assert report["held_out_after"]["pixel_auroc"] > report["held_out_before"]["pixel_auroc"] + 0.05
    config = json.loads((out / "config.json").read_text())
    assert config["expert_config"]["self_weight"] == 0.8
    assert config["pixel_threshold"] == pytest.approx(report["calibration"]["pixel_threshold"])
    loaded = AnomalyAssistant.from_pretrained(out)
    scale, bias = loaded.model.expert.self_calibration.tolist()
    assert (scale, bias) == pytest.approx((report["scale"], report["bias"]), rel=1e-5)
    image = next(data.glob("*/test/*/*.png"))
    plain = AnomalyAssistant.from_pretrained(model).detect(image)
    assert not np.allclose(loaded.detect(image).anomaly_map, plain.anomaly_map)


@pytest.mark.parametrize(
    "case",
    ["same_folder", "out_exists", "not_a_checkpoint", "bad_weight", "no_data", "bad_training_config", "bad_few_shot"],
)
def test_bad_input_is_one_line_and_nothing_is_overwritten(setup, tmp_path, capsys, case):
    from train.self_reference import main

    model, data = setup
    out = tmp_path / "out"
    args = {"--model": str(model), "--data": str(data), "--out": str(out)}
    if case == "same_folder":
        args["--out"] = str(model)
    elif case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "not_a_checkpoint":
        args["--model"] = str(tmp_path)
    elif case == "bad_weight":
        args["--weight"] = "1.5"
    elif case == "no_data":
        args["--data"] = str(tmp_path / "missing")
    elif case == "bad_few_shot":
        args["--few-shot"] = "-2"
    elif case == "bad_training_config":  # the checkpoint's recorded split cannot be read
        import shutil

        model = shutil.copytree(model, tmp_path / "copy")
        (model / "training_config.yaml").write_text("data: [val_fraction\n")
        args["--model"] = str(model)
    before = _files(model)
    code = main([item for pair in args.items() for item in pair])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    assert _files(model) == before
    if case == "out_exists":
        assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_default_split_is_the_one_training_held_out(setup, tmp_path):
    import yaml

    from train.data import read_masked, split_records
    from train.self_reference import add_self_reference

    model, data = setup
    copy = tmp_path / "trained"
    shutil.copytree(model, copy)
    (copy / "training_config.yaml").write_text(yaml.safe_dump({"data": {"val_fraction": 0.3, "split_seed": 5}}))
    report = add_self_reference(copy, data, tmp_path / "out")
    records, _ = read_masked(data)
    assert report["held_out"] == len(split_records(records, 0.3, 5)[1])
    assert report["held_out"] != len(
        split_records(records, 0.1, 0)[1]
    )  # not the fallback used without a training config


def test_detection_views_are_saved_and_the_thresholds_calibrated_for_them(setup, tmp_path):
    from assistant import AnomalyAssistant
    from assistant.calibration import CalibrationConfig, image_threshold
    from train.data import read_masked, split_records
    from train.self_reference import main

    model, data = setup
    out = {}
    for views in (1, 8):
        out[views] = tmp_path / f"views{views}"
        args = ["--model", str(model), "--data", str(data), "--out", str(out[views]), "--val-fraction", "0.5"]
        assert main(args + ["--detection-views", str(views)]) == 0
    reports = {v: json.loads((folder / "self_reference.json").read_text()) for v, folder in out.items()}
    assert reports[8]["detection_views"] == 8
    eight = AnomalyAssistant.from_pretrained(out[8])
    assert eight.model.config.detection_views == 8
    # the threshold is fitted (`image_threshold`) on what the saved checkpoint itself scores on the held-out split
    _, held_out = split_records(read_masked(data)[0], 0.5, 0)
    labels = np.array([int(r.label == 1) for r in held_out])
    scores = np.array([r.pred_score for r in eight.detect_batch([r.image for r in held_out])])
    fitted = image_threshold(labels, scores, CalibrationConfig().threshold_slack)[1]
    assert eight.model.config.image_threshold == pytest.approx(fitted, abs=1e-5)
    assert reports[8]["calibration"]["image_threshold"] != pytest.approx(
        reports[1]["calibration"]["image_threshold"], abs=1e-6
    )


def test_few_shot_thresholds_put_the_few_shot_verdict_where_calibration_put_it(setup, tmp_path):
    """`--few-shot K`: the few-shot mode gets its own thresholds on the held-out split, and the saved
    checkpoint's few-shot scores are mapped so that the zero-shot threshold decides: an image is anomalous with
    references exactly when its raw few-shot score reaches the few-shot threshold; zero-shot reports do not change."""
    from assistant import AnomalyAssistant
    from train.data import read_masked, split_records
    from train.self_reference import main

    model, data = setup
    plain, calibrated = tmp_path / "plain", tmp_path / "few"
    common = ["--model", str(model), "--data", str(data), "--val-fraction", "0.5"]
    assert main(common + ["--out", str(plain)]) == 0
    assert main(common + ["--out", str(calibrated), "--few-shot", "3"]) == 0
    report = json.loads((calibrated / "self_reference.json").read_text())["few_shot"]
    assert report["shots"] == 3 and report["n"] == 60 and 0 < report["n_anomalous"] < 60
    few, raw = AnomalyAssistant.from_pretrained(calibrated), AnomalyAssistant.from_pretrained(plain)
    for assistant in (few, raw):  # the calibrated mapping alone: no raising to the references' own spread here
        found = assistant.model.reference_set  # its floor is tested in test_real_photos.py
        assistant.model.reference_set = lambda *args, found=found: found(*args)._replace(floor=None)
    assert few.model.config.few_shot_thresholds == pytest.approx([report["image_threshold"], report["pixel_threshold"]])
    assert raw.model.config.few_shot_thresholds is None
    assert few.model.config.typical_score_top is not None  # refitted with the zero-shot scores it judges surfaces by
    _, held_out = split_records(read_masked(data)[0], 0.5, 0)
    references = [r.image for r in held_out if r.label != 1 and r.category == held_out[0].category][:3]
    images = [r.image for r in held_out if r.category == held_out[0].category]
    with_refs, raw_refs = few.detect_batch(images, references), raw.detect_batch(images, references)
    for mapped, unmapped in zip(with_refs, raw_refs):
        assert mapped.pred_label == (unmapped.pred_score >= report["image_threshold"])
    order = np.argsort([r.pred_score for r in raw_refs], kind="stable")
    assert np.all(np.diff(np.array([r.pred_score for r in with_refs])[order]) >= -1e-6)  # the ranking is kept
    for a, b in zip(few.detect_batch(images[:4]), raw.detect_batch(images[:4])):  # zero-shot: as before
        assert a.pred_score == pytest.approx(b.pred_score) and a.pred_label == b.pred_label
    # refitting without --few-shot drops them: they belonged to the map and scale that were replaced
    assert (
        main(
            ["--model", str(calibrated), "--data", str(data), "--val-fraction", "0.5", "--out", str(tmp_path / "again")]
        )
        == 0
    )
    assert AnomalyAssistant.from_pretrained(tmp_path / "again").model.config.few_shot_thresholds is None


def test_few_shot_scoring_with_kept_reference_features_gives_the_reference_pixels_scores(setup, monkeypatch):
    """Few-shot scoring computes each reference's features once (`reference_bank`) and reuses them for every image it
    is drawn for: the scores and maps are those of scoring each image with its references' pixels, also when the
    references outgrow the memory kept for them."""
    import torch

    from assistant import checkpoint
    from train import scoring
    from train.data import read_masked

    path, data = setup
    model, processor, _, _ = checkpoint.load(path)
    model.eval()
    records = [r for r in read_masked(data)[0] if r.category == "wood"][:8]
    normals = [r for r in records if r.label != 1]
    references = lambda record: [n for n in normals if n is not record][:2]  # noqa: E731 - shared by several images
    prepared = scoring.Prepared(processor, 32, keep_bytes=1 << 30)
    calls = []
    bank = model.reference_bank
    monkeypatch.setattr(model, "reference_bank", lambda *a: calls.append(1) or bank(*a))
    labels, scores, maps, _ = scoring.score_records(model, processor, records, 32, references, prepared=prepared)
    assert len(calls) == len({n.image for r in records for n in references(r)}) < 2 * len(records)
    for index, record in enumerate(records):
        pixels, size, _, zoom = prepared(record)
        assert zoom is None  # this model does not zoom
        refs = [prepared(n) for n in references(record)]
        with torch.no_grad():
            crop_maps, score = model.detect(pixels, [size], torch.cat([r[0][0] for r in refs]), [r[1] for r in refs])
        assert scores[index] == pytest.approx(float(score[0]), abs=1e-5)
        assert np.allclose(maps[index], scoring.small_maps(model, crop_maps, [size], 32)[0].numpy(), atol=1e-5)
    monkeypatch.setattr(scoring, "REFERENCE_BANK_BYTES", 0)  # nothing kept: each image computes its references again
    calls.clear()
    again = scoring.score_records(model, processor, records, 32, references, prepared=prepared)
    assert len(calls) == 2 * len(records) and np.allclose(again[1], scores, atol=1e-6)
