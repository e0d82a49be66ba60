"""`python -m train.fit_check`: the expert's figures on its training split against its held-out split."""

from __future__ import annotations

import json

import pytest

from data_prep.synth import SynthPlan, write_dataset
from tests.conftest import strict_json


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from assistant.testing import tiny_assistant

    root = tmp_path_factory.mktemp("fitcheck")
    data = root / "data"
    write_dataset(data, SynthPlan(n=40, families=("wood", "metal"), size=64, seed=5, anomaly_ratio=0.5))
    return tiny_assistant(root / "model"), data


def test_report_covers_both_parts_per_truth(setup, tmp_path, capsys):
    from data_prep.records import ANOMALOUS
    from train.data import read_masked
    from train.fit_check import main

    model, data = setup
    out = tmp_path / "fit.json"
    assert main(["--model", str(model), "--data", str(data), "--n", "30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("training sample (30 images): image AUROC") and printed[1].startswith(
        "held-out (8 images)"
    )
    report = strict_json(out.read_text())
    records, _ = read_masked(data)
    types = {r.defect_type for r in records if r.label == ANOMALOUS}
    for key, n in (("training_sample", 30), ("held_out", 8)):  # no training_config.yaml: a 10% split of 80 images
        part = report[key]
        counts = part["right_per_truth"]
        assert sum(total for _, total in counts.values()) == part["n"] == n
        assert set(counts) <= types | {"normal"} and "normal" in counts
        right = sum(ok for ok, _ in counts.values())
        assert part["verdict_accuracy"] == pytest.approx(right / n)


def test_the_split_is_the_checkpoints_own(setup, tmp_path, capsys):
    """The held-out part is the one the checkpoint's training run held out (its training_config.yaml)."""
    import shutil

    from train.fit_check import main

    model, data = setup
    trained = tmp_path / "model"
    shutil.copytree(model, trained)
    (trained / "training_config.yaml").write_text("data:\n  val_fraction: 0.25\n  split_seed: 1\n")
    out = tmp_path / "fit.json"
    assert main(["--model", str(trained), "--data", str(data), "--n", "100", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["val_fraction"], report["split_seed"]) == (0.25, 1)
    assert report["held_out"]["n"] == 20 and report["training_sample"]["n"] == 60  # --n above the 60 training images


@pytest.mark.parametrize("case", ["not_a_checkpoint", "no_data", "bad_n", "out_exists"])
def test_bad_input_is_one_line(setup, tmp_path, capsys, case):
    from train.fit_check import main

    model, data = setup
    args = {"--model": str(model), "--data": str(data)}
    if case == "not_a_checkpoint":
        args["--model"] = str(tmp_path)
    elif case == "no_data":
        args["--data"] = str(tmp_path / "missing")
    elif case == "bad_n":
        args["--n"] = "1"
    else:
        existing = tmp_path / "kept.json"
        existing.write_text("mine")
        args["--out"] = str(existing)
    assert main([v for pair in args.items() for v in pair]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    if case == "out_exists":
        assert (tmp_path / "kept.json").read_text() == "mine"
