"""MMAD: the two answer rules on hand-written answers, and `python -m eval.run mmad` on a miniature of the layout."""

import csv
import json
from pathlib import Path

import pytest

from eval import run as eval_run
from eval.tasks.mmad import aggregate, build_prompt, published_choice, structured_choice, verdict_choice
from tests.conftest import random_image, strict_json

YES_NO = {"A": "Yes", "B": "No"}
DEFECTS = {"A": "Crack", "B": "A scratch on the neck", "C": "Contamination"}


# -- answer rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, options, structured, published",
    [
        ("B. A scratch on the neck", DEFECTS, "B", "A"),  # the published scorer keeps the last letter
        ("A scratch on the neck", DEFECTS, "B", "A"),  # an option's text, its article is no letter
        ("Answer: A scratch on the neck", DEFECTS, "B", "A"),
        ("Answer: C", DEFECTS, "C", "C"),
        ("The answer is (C).", DEFECTS, "C", "C"),
        ("I would pick option B here.", DEFECTS, "B", "B"),
        ("**B**", DEFECTS, "B", "B"),
        ("It is contamination.", DEFECTS, "C", "C"),
        ("crack or contamination", DEFECTS, None, "C"),  # two options named: unparsable for the structured rule
        ("No, there is no defect.", YES_NO, "B", "B"),
        ("Yes, there is a defect. No other issue.", YES_NO, None, "A"),
        ("", YES_NO, None, None),  # blank: wrong for the structured rule, dropped by the published one
    ],
)
def test_answer_rules_on_hand_written_answers(response, options, structured, published):
    assert structured_choice(response, options) == structured
    assert published_choice(response, options) == published


def test_verdict_picks_the_yes_or_no_option():
    assert verdict_choice(True, {"A": "Yes.", "B": "No."}) == "A"
    assert verdict_choice(False, {"A": "Yes.", "B": "No."}) == "B"
    assert verdict_choice(False, {"A": "No", "B": "Yes"}) == "A"
    assert verdict_choice(None, YES_NO) is None


def test_aggregation_balances_detection_and_pools_object_analysis():
    records = [
        # dataset X: AD 3 anomalous all right, 1 normal wrong -> balanced 0.5 (plain accuracy would say 0.75)
        *[{"dataset": "X", "type": "Anomaly Detection", "normal": False, "correct": True}] * 3,
        {"dataset": "X", "type": "Anomaly Detection", "normal": True, "correct": False},
        {"dataset": "X", "type": "Object Structure", "normal": False, "correct": True},
        {"dataset": "X", "type": "Object Details", "normal": True, "correct": False},
        {"dataset": "X", "type": "Object Details", "normal": True, "correct": None},  # dropped
        # dataset Y: one type, all right
        {"dataset": "Y", "type": "Defect Classification", "normal": False, "correct": True},
    ]
    result = aggregate(records)
    assert result["by_dataset"]["X"]["by_type"] == {"Anomaly Detection": 0.5, "Object Analysis": 0.5}
    assert result["by_dataset"]["X"]["average"] == pytest.approx(0.5)
    assert result["by_dataset"]["Y"]["average"] == 1.0
    assert result["overall"] == pytest.approx(0.75)  # datasets weigh the same, whatever their sizes
    assert result["by_type"] == {"Anomaly Detection": 0.5, "Defect Classification": 1.0, "Object Analysis": 0.5}


def test_prompt_says_where_the_template_went():
    prompt = build_prompt("Is there any defect in the object?", YES_NO, 1)
    assert prompt.startswith("You are an industrial inspector who checks products by images.")
    assert "1 image was of normal sample given to the anomaly expert as a template" in prompt
    assert prompt.endswith("Question 1: Is there any defect in the object? \nA. Yes\nB. No")
    assert "template" not in build_prompt("Is there any defect in the object?", YES_NO, 0)


# -- the miniature benchmark ------------------------------------------------------------------------------

AD = "Is there any defect in the object?"


def qa(question, options, answer, kind):
    return {"Question": question, "Options": options, "Answer": answer, "type": kind, "annotation": True}


# (query image, its questions, the answers "a model" gave); random templates are MVTec-AD/<class>/train/good/...
ENTRIES = [
    (
        "DS-MVTec/bottle/image/broken_large/000.png",
        [
            (qa(AD, YES_NO, "A", "Anomaly Detection"), "A"),
            (qa("What is the defect?", DEFECTS, "B", "Defect Classification"), "B. A scratch on the neck"),
            (qa("What shape is it?", {"A": "Round", "B": "Square"}, "A", "Object Structure"), "The bottle is round."),
            (qa("What colour is the glass?", {"A": "Brown", "B": "Green"}, "B", "Object Details"), ""),
        ],
    ),
    (
        "DS-MVTec/bottle/image/good/001.png",
        [
            (qa(AD, YES_NO, "B", "Anomaly Detection"), "Answer: A"),
            (qa("What shape is it?", {"A": "Round", "B": "Square"}, "A", "Object Structure"), "A"),
        ],
    ),
    (
        "VisA/candle/test/bad/002.JPG",
        [
            (qa(AD, YES_NO, "A", "Anomaly Detection"), "No."),
            (
                qa("Where is the defect?", {"A": "Top", "B": "Bottom", "C": "Left"}, "C", "Defect Localization"),
                "(C) on the left",
            ),
        ],
    ),
    (
        "VisA/candle/test/good/003.JPG",
        [
            (qa(AD, YES_NO, "B", "Anomaly Detection"), "B"),
            (
                qa("What is the object?", {"A": "Candle", "B": "Capsule"}, "A", "Object Classification"),
                "It is a candle, A.",
            ),
        ],
    ),
]
# hand-computed from the answers above
# DS-MVTec: AD anomalous right, normal wrong -> 0.5; DC structured 1, published 0 ("B. A scratch..." read as A);
#           Object Analysis structured 2/3 (the blank counts wrong), published 2/2 (the blank is dropped)
# VisA:     AD anomalous wrong ("No."), normal right -> 0.5; DL 1; OC 1
EXPECTED = {
    "structured": {"DS-MVTec": (0.5 + 1 + 2 / 3) / 3, "VisA": (0.5 + 1 + 1) / 3},
    "published": {"DS-MVTec": (0.5 + 0 + 1) / 3, "VisA": (0.5 + 1 + 1) / 3},
}
MISSING_TEMPLATE = "MVTec-AD/missing/train/good/404.png"


def template_of(image: str, kind: str) -> str:
    dataset, category = image.split("/")[:2]
    folder = "MVTec-AD" if dataset == "DS-MVTec" else dataset
    return f"{folder}/{category}/train/good/{kind}-{Path(image).stem}.png"


def write_mmad(root: Path, with_images: bool = True) -> Path:
    data = {}
    for image, questions in ENTRIES:
        data[image] = {
            "image_path": image,
            "mask_path": None,
            "random_templates": [template_of(image, "random"), template_of(image, "random2")],
            "similar_templates": [template_of(image, "similar")],
            "conversation": [question for question, _ in questions],
        }
    # an unscorable entry (its only answer is not an option) and one whose template is not on disk
    data["GoodsAD/drink_bottle/test/good/004.png"] = {
        "random_templates": [],
        "conversation": [qa(AD, YES_NO, "F", "Anomaly Detection")],
    }
    data["VisA/candle/test/good/003.JPG"]["random_templates"][0] = MISSING_TEMPLATE
    root.mkdir(parents=True, exist_ok=True)
    (root / "mmad.json").write_text(json.dumps(data, indent=1))
    if with_images:
        for seed, (image, _) in enumerate(ENTRIES):
            paths = [image, template_of(image, "random"), template_of(image, "similar")]
            for offset, path in enumerate(paths):
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                random_image(32, 40, seed=10 * seed + offset).save(root / path)
    return root


def write_answers(path: Path, skip: tuple = ()) -> Path:
    lines = []
    for image, questions in ENTRIES:
        if image in skip:
            continue
        for number, (_, response) in reversed(list(enumerate(questions))):  # any order: matched by image and index
            lines.append(json.dumps({"image": image, "question": number, "response": response}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run(*argv) -> int:
    return eval_run.main([str(a) for a in argv])


def results(out: Path) -> dict:
    return strict_json((out / "results.json").read_text())


def test_predictions_scored_both_ways_and_aggregated(tmp_path, capsys):
    data = write_mmad(tmp_path / "MMAD", with_images=False)  # scoring answers made elsewhere needs no images
    out = tmp_path / "run"
    assert run("mmad", "--data", data, "--predictions", write_answers(tmp_path / "answers.jsonl"), "--out", out) == 0
    result = results(out)
    assert result["complete"] and result["n_scored"] == 4
    for rule, by_dataset in EXPECTED.items():
        section = result[rule]
        for dataset, average in by_dataset.items():
            assert section["by_dataset"][dataset]["average"] == pytest.approx(average)
        assert section["overall"] == pytest.approx(sum(by_dataset.values()) / 2)
        assert section["by_type"]["Anomaly Detection"] == pytest.approx(0.5)
    assert result["structured"]["by_type"]["Defect Classification"] == 1.0
    assert result["published"]["by_type"]["Defect Classification"] == 0.0
    assert result["structured"]["by_dataset"]["DS-MVTec"]["by_type"]["Object Analysis"] == pytest.approx(2 / 3)
    assert result["published"]["by_dataset"]["DS-MVTec"]["by_type"]["Object Analysis"] == 1.0
    assert result["structured"]["unparsed"] == 1 and result["published"]["unparsed"] == 1
    assert "verdict" not in result  # a file holds no calibrated verdict
    assert any("drink_bottle" in problem and "'F'" in problem for problem in result["problems"])

    with open(out / "per_class.csv") as handle:
        rows = {(row["dataset"], row["class"]): row for row in csv.DictReader(handle)}
    assert set(rows) == {
        ("all", "all"),
        ("DS-MVTec", "all"),
        ("DS-MVTec", "bottle"),
        ("VisA", "all"),
        ("VisA", "candle"),
    }
    assert (
        float(rows[("DS-MVTec", "bottle")]["structured_DC"]) == 1.0
        and float(rows[("DS-MVTec", "bottle")]["published_DC"]) == 0.0
    )
    assert float(rows[("all", "all")]["published_average"]) == pytest.approx(result["published"]["overall"])
    assert rows[("VisA", "candle")]["structured_DC"] == ""  # no such question there
    table = (out / "results.md").read_text()
    assert "structured_overall" in table and "| DS-MVTec | bottle | 2 | 6 |" in table
    assert "structured_overall" in capsys.readouterr().out

    # scoring the cache again (no model, no predictions file) gives the same numbers
    assert run("mmad", "--data", data, "--out", out, "--mode", "eval") == 0
    assert results(out)["structured"] == result["structured"]

    # the run's own answers file re-scores to the same numbers
    again = tmp_path / "again"
    assert run("mmad", "--data", data / "mmad.json", "--predictions", out / "answers.jsonl", "--out", again) == 0
    assert results(again)["structured"] == result["structured"] and results(again)["published"] == result["published"]


def test_an_image_missing_from_the_predictions_is_listed_not_fatal(tmp_path):
    data = write_mmad(tmp_path / "MMAD", with_images=False)
    answers = write_answers(tmp_path / "answers.jsonl", skip=("VisA/candle/test/bad/002.JPG",))
    out = tmp_path / "run"
    assert run("mmad", "--data", data, "--predictions", answers, "--out", out) == 0
    result = results(out)
    assert not result["complete"] and result["n_errors"] == 1 and "VisA/candle/test/bad/002.JPG" in result["errors"][0]
    assert result["structured"]["by_dataset"]["VisA"]["by_type"]["Anomaly Detection"] == 1.0  # the normal image only


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            [{"image": "VisA/candle/test/good/003.JPG", "question": 0, "response": "B"}] * 2,
            "a second response for question 0",
        ),
        ([{"image": "VisA/candle/test/good/003.JPG", "question": "first", "response": "B"}], "question index"),
    ],
)
def test_bad_predictions_file_is_one_line_and_exit_2(tmp_path, capsys, lines, message):
    data = write_mmad(tmp_path / "MMAD", with_images=False)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert run("mmad", "--data", data, "--predictions", answers, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    answers = write_answers(tmp_path / "answers.jsonl")
    assert run("mmad", "--data", tmp_path / "empty", "--predictions", answers, "--out", tmp_path / "a") == 2
    assert "no mmad.json" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[]")
    assert run("mmad", "--data", tmp_path / "list.json", "--predictions", answers, "--out", tmp_path / "b") == 2
    assert "must map image paths" in capsys.readouterr().err
    assert run("ad", "--data", tmp_path, "--model", "x", "--out", tmp_path / "c", "--similar-template") == 2
    err = capsys.readouterr().err.strip()
    assert "--similar-template is for the mmad task" in err and "\n" not in err
    assert run("visa-dr-detection", "--data", tmp_path, "--model", "x", "--out", tmp_path / "d", "--shots", "1") == 2
    assert "ad, mmad" in capsys.readouterr().err


def test_model_gets_the_template_as_reference_and_scores_its_verdict(tmp_path, clip_llama, monkeypatch, capsys):
    from assistant.inference import AnomalyAssistant

    calls = []
    original = AnomalyAssistant.analyze

    def analyze(assistant, image, question=None, references=None, **kwargs):
        calls.append(
            (
                Path(image).relative_to(data).as_posix(),
                [Path(r).relative_to(data).as_posix() for r in references],
                question,
            )
        )
        return original(assistant, image, question, references, **kwargs)

    monkeypatch.setattr(AnomalyAssistant, "analyze", analyze)
    data = write_mmad(tmp_path / "MMAD")
    out = tmp_path / "run"
    assert run("mmad", "--data", data, "--model", clip_llama, "--out", out, "--max-new-tokens", "3") == 0
    # each question on its own, the first random template to the expert; the image whose template is gone is not asked
    assert len(calls) == 4 + 2 + 2
    assert {tuple(refs) for image, refs, _ in calls if image.startswith("DS-MVTec")} == {
        (template_of(ENTRIES[0][0], "random"),),
        (template_of(ENTRIES[1][0], "random"),),
    }
    assert all(
        "anomaly expert as a template" in question and question.count("Question 1:") == 1 for _, _, question in calls
    )
    assert not any(image == "VisA/candle/test/good/003.JPG" for image, _, _ in calls)

    result = results(out)
    assert (
        result["n_errors"] == 1 and MISSING_TEMPLATE in result["errors"][0] and "file not found" in result["errors"][0]
    )
    cache = {line["id"]: line for line in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    scored = [c for c in cache.values() if "error" not in c]
    assert len(scored) == 3 and all(isinstance(c["verdict"], bool) and c["map"] for c in scored)
    # the verdict column: balanced accuracy per dataset from the cached verdicts, recomputed here
    truth = {image: "good" not in image for image, _ in ENTRIES}
    by_dataset = {}
    for key, line in cache.items():
        if "error" not in line:
            by_dataset.setdefault(key.split("/")[0], {}).setdefault(truth[key], []).append(
                line["verdict"] == truth[key]
            )
    expected = [sum(sum(v) / len(v) for v in groups.values()) / len(groups) for groups in by_dataset.values()]
    assert result["verdict"]["Anomaly Detection"] == pytest.approx(sum(expected) / len(expected))
    assert result["summary"]["verdict_AD"] == pytest.approx(result["verdict"]["Anomaly Detection"])
    assert {"structured", "published"} <= set(result) and result["structured"]["unparsed"] <= 8

    # the answers file a model run writes re-scores without the model
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 8 and {a["image"] for a in answers} == {image for image, _ in ENTRIES[:3]}
    again = tmp_path / "again"
    assert run("mmad", "--data", data, "--predictions", out / "answers.jsonl", "--out", again) == 0
    assert results(again)["structured"] == result["structured"] and results(again)["published"] == result["published"]

    # similar templates: their own run folder, never mixed into the random-template cache
    calls.clear()
    capsys.readouterr()
    assert run("mmad", "--data", data, "--model", clip_llama, "--out", out, "--similar-template") == 2
    assert "templates" in capsys.readouterr().err
    similar = tmp_path / "similar"
    assert (
        run(
            "mmad",
            "--data",
            data,
            "--model",
            clip_llama,
            "--out",
            similar,
            "--similar-template",
            "--limit",
            "1",
            "--max-new-tokens",
            "2",
        )
        == 0
    )
    assert {tuple(refs) for _, refs, _ in calls} == {(template_of(ENTRIES[0][0], "similar"),)}


def test_plain_llava_onevision_answers_without_template_or_verdict(tmp_path, llava_ov):
    data = write_mmad(tmp_path / "MMAD")
    out = tmp_path / "run"
    assert run("mmad", "--data", data, "--model", llava_ov, "--out", out, "--limit", "2", "--max-new-tokens", "2") == 0
    result = results(out)
    assert result["n_scored"] == 2 and "verdict" not in result and "verdict_AD" not in result["summary"]
    assert any("no template reached the model" in note for note in result["notes"])
    cache = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(
        line["templates"] == [] and line["verdict"] is None and len(line["responses"]) == len(line["questions"])
        for line in cache
    )
