"""Scripted evaluation: `python -m eval.run` / `python -m eval.report` on fixtures in the published layouts."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval import report as eval_report
from eval import run as eval_run
from tests.conftest import random_image, strict_json

ROOT = Path(__file__).resolve().parents[1]

# VisA-D&R detection, as in <data_dir>/VisA/test_data.json: (image, anomaly)
DETECTION_ENTRIES = [
    ("VisA/candle/Data/Images/Normal/0000.JPG", False),
    ("VisA/candle/Data/Images/Normal/0001.JPG", False),
    ("VisA/candle/Data/Images/Anomaly/000.JPG", True),
    ("VisA/candle/Data/Images/Anomaly/001.JPG", True),
    ("VisA/pcb1/Data/Images/Normal/0000.JPG", False),
    ("VisA/pcb1/Data/Images/Anomaly/000.JPG", True),
]
# what a model "answered": candle TN, FP ("eyes" counts, as published), TP, FN; pcb1 TN, TP
RESPONSES = ["No.", "The eyes of the inspector see nothing.", "Yes, a crack.", "No defect.", "No", "yes"]


def write_detection_benchmark(data_dir: Path, with_images: bool) -> Path:
    path = data_dir / "VisA" / "test_data.json"
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps([{"image": image, "anomaly": anomaly} for image, anomaly in DETECTION_ENTRIES], indent=4)
    )
    if with_images:
        for seed, (image, _) in enumerate(DETECTION_ENTRIES):
            (data_dir / image).parent.mkdir(parents=True, exist_ok=True)
            random_image(40, 48, seed=seed).save(data_dir / image)
    return path


def write_mvtec(root: Path, n_good: int = 3, n_bad: int = 3, classes=("bottle",)) -> Path:
    """MVTec AD layout: <class>/train/good, <class>/test/{good,crack}, <class>/ground_truth/crack/<n>_mask.png."""
    for c, name in enumerate(classes):
        for split, defect, count in (("train", "good", 2), ("test", "good", n_good), ("test", "crack", n_bad)):
            folder = root / name / split / defect
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                random_image(
                    32, 32, seed=100 * c + 10 * (defect == "crack") + i + (50 if split == "train" else 0)
                ).save(folder / f"{i:03d}.png")
                if defect == "crack":
                    mask = np.zeros((32, 32), dtype=np.uint8)
                    mask[4 + 3 * i : 12 + 3 * i, 8:20] = 255
                    (root / name / "ground_truth" / "crack").mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask).save(root / name / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    return root


def run(*argv) -> int:
    return eval_run.main([str(a) for a in argv])


def results(out: Path) -> dict:
    return strict_json((out / "results.json").read_text())


def cache_lines(out: Path) -> list[dict]:
    lines = []
    for path in sorted(out.glob("predictions*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def cached_scores(out: Path) -> dict:
    return {line["id"]: line["score"] for line in cache_lines(out)}


def spy_detect_batch(monkeypatch) -> list:
    """Records (number of images, zero_shot) of every AnomalyAssistant.detect_batch call, while calling the real one."""
    from assistant.inference import AnomalyAssistant

    calls = []
    original = AnomalyAssistant.detect_batch

    def spy(self, images, references=None, batch_size=8, zero_shot="single"):
        calls.append((len(images), zero_shot))
        return original(self, images, references, batch_size, zero_shot)

    monkeypatch.setattr(AnomalyAssistant, "detect_batch", spy)
    return calls


class CountingDetect:
    """Counts calls of AnomalyAssistant.detect, per image, while calling the real one."""

    def __init__(self, monkeypatch):
        from assistant.inference import AnomalyAssistant

        self.calls = []
        original = AnomalyAssistant.detect

        def detect(assistant, image, references=None):
            self.calls.append(str(image))
            return original(assistant, image, references)

        monkeypatch.setattr(AnomalyAssistant, "detect", detect)


# -- predictions files: hand-computable numbers --------------------------------------------------


def expected_text_metrics():
    # candle: TN, FP, TP, FN -> acc 0.5, precision 0.5, recall 0.5, f1 0.5; pcb1: TN, TP -> all 1.0
    return {"text_accuracy": 0.75, "text_precision": 0.75, "text_recall": 0.75, "text_f1": 0.75}


def test_detection_from_published_json_list(tmp_path, capsys):
    data = tmp_path / "data"
    write_detection_benchmark(data, with_images=False)  # scoring answers made elsewhere needs no images
    predictions = tmp_path / "detection_results_7b.json"
    predictions.write_text(json.dumps(RESPONSES, indent=4))
    out = tmp_path / "run"
    assert run("visa-dr-detection", "--data", data, "--predictions", predictions, "--out", out) == 0

    result = results(out)
    assert result["complete"] and result["n_scored"] == 6
    for key, value in expected_text_metrics().items():
        assert result["summary"][key] == pytest.approx(value)
    # no structured verdict in a predictions file: counted wrong, and said so
    assert result["summary"]["verdict_missing"] == 6
    assert result["summary"]["verdict_accuracy"] == 0.0
    assert any("no structured verdict" in note for note in result["notes"])
    rows = {row["class"]: row for row in csv.DictReader(open(out / "per_class.csv"))}
    assert set(rows) == {"candle", "pcb1"}
    assert float(rows["candle"]["text_accuracy"]) == pytest.approx(0.5)
    assert float(rows["pcb1"]["text_f1"]) == pytest.approx(1.0)
    table = (out / "results.md").read_text()
    assert "| candle | 4 | 2 |" in table and "text_f1" in table
    assert "text_accuracy" in capsys.readouterr().out


def test_detection_from_jsonl_equals_json_list(tmp_path):
    data = tmp_path / "data"
    write_detection_benchmark(data, with_images=False)
    jsonl = tmp_path / "answers.jsonl"
    order = [3, 0, 5, 1, 4, 2]  # any order: matched by image path
    jsonl.write_text(
        "".join(json.dumps({"image": DETECTION_ENTRIES[i][0], "response": RESPONSES[i]}) + "\n" for i in order)
    )
    listed = tmp_path / "answers.json"
    listed.write_text(json.dumps(RESPONSES))
    assert (
        run(
            "visa-dr-detection",
            "--data",
            data / "VisA" / "test_data.json",
            "--predictions",
            jsonl,
            "--out",
            tmp_path / "a",
        )
        == 0
    )
    assert run("visa-dr-detection", "--data", data, "--predictions", listed, "--out", tmp_path / "b") == 0
    assert results(tmp_path / "a")["summary"] == results(tmp_path / "b")["summary"]
    assert results(tmp_path / "a")["summary"]["text_recall"] == pytest.approx(0.75)


def test_predictions_file_with_wrong_count_is_bad_input(tmp_path, capsys):
    data = tmp_path / "data"
    write_detection_benchmark(data, with_images=False)
    predictions = tmp_path / "short.json"
    predictions.write_text(json.dumps(RESPONSES[:4]))
    assert run("visa-dr-detection", "--data", data, "--predictions", predictions, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "4 responses for 6 benchmark entries" in err
    assert not (tmp_path / "run" / "results.json").exists()


# -- a model: detection with verdicts, reasoning multi-turn -----------------------------------------


def test_detection_with_model_scores_both_columns(tmp_path, clip_llama):
    data = tmp_path / "data"
    write_detection_benchmark(data, with_images=True)
    out = tmp_path / "run"
    assert run("visa-dr-detection", "--data", data, "--model", clip_llama, "--out", out, "--max-new-tokens", "4") == 0
    result = results(out)
    lines = cache_lines(out)
    assert len(lines) == 6 and all(isinstance(line["verdict"], bool) and line["map"] for line in lines)
    assert result["summary"]["verdict_missing"] == 0
    # disagreement rate recomputed by hand from the cache
    truth = {image: anomaly for image, anomaly in DETECTION_ENTRIES}
    disagree = sum(line["verdict"] != ("Yes" in line["response"] or "yes" in line["response"]) for line in lines)
    assert result["summary"]["disagreement_rate"] == pytest.approx(disagree / 6)
    verdict_correct = [line["verdict"] == truth[line["id"]] for line in lines if "candle" in line["id"]]
    row = next(r for r in result["per_class"] if r["class"] == "candle")
    assert row["verdict_accuracy"] == pytest.approx(sum(verdict_correct) / 4)
    # worst cases drawn from the cached scores and maps
    assert len(result["worst"]["normal"]) == 3 and len(result["worst"]["anomalous"]) == 3
    assert all((out / case["overlay"]).is_file() for case in result["worst"]["normal"])


def write_reasoning_benchmark(data_dir: Path) -> None:
    entries = [
        {
            "image": "VisA/candle/Data/Images/Anomaly/000.JPG",
            "questions": ["Is there an anomaly?", "Where is it?"],
            "answers": ["Yes, there is a crack.", "It is in the upper left."],
        },
        {
            "image": "VisA/pcb1/Data/Images/Normal/0000.JPG",
            "questions": ["Is there an anomaly?"],
            "answers": ["No, the board looks normal."],
        },
    ]
    path = data_dir / "VisA" / "visa_dr.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(entries))
    for seed, entry in enumerate(entries):
        (data_dir / entry["image"]).parent.mkdir(parents=True, exist_ok=True)
        random_image(40, 48, seed=seed).save(data_dir / entry["image"])


def test_reasoning_scores_rouge_and_similarity(tmp_path):
    data = tmp_path / "data"
    write_reasoning_benchmark(data)
    predictions = tmp_path / "reasoning.jsonl"
    predictions.write_text(
        json.dumps(
            {"image": "VisA/candle/Data/Images/Anomaly/000.JPG", "response": ["Yes, there is a crack.", "bottom right"]}
        )
        + "\n"
        + json.dumps({"image": "VisA/pcb1/Data/Images/Normal/0000.JPG", "response": ["No, the board looks normal."]})
        + "\n"
    )
    out = tmp_path / "run"
    assert run("visa-dr-reasoning", "--data", data, "--predictions", predictions, "--out", out) == 0
    summary = results(out)["summary"]
    assert summary["n_scored"] == 3
    # two exact answers (ROUGE-L 1) and one with no word in common (0)
    assert summary["rougeL"] == pytest.approx(2 / 3)
    assert summary["rougeL_macro"] == pytest.approx((0.5 + 1.0) / 2)
    assert 2 / 3 - 0.01 < summary["similarity"] < 1.0  # the exact pairs give 1, the other less
    rows = {row["class"]: row for row in results(out)["per_class"]}
    assert rows["pcb1"]["similarity"] == pytest.approx(1.0, abs=1e-5)


def test_reasoning_asks_each_question_with_the_history():
    from eval.adapters import ModelAdapter
    from eval.tasks import Sample

    class Recorder:
        def __init__(self):
            self.seen = []

        def chat(self, messages, image, stream, max_new_tokens):
            self.seen.append([dict(m) for m in messages])
            return f" answer {len(self.seen)} "

    adapter = ModelAdapter("unused")
    adapter._assistant = Recorder()
    sample = Sample(key="k", index=0, image="x.png", label=None, category="c")
    assert adapter.converse(sample, ["Q1", "Q2", "Q3"]) == ["answer 1", "answer 2", "answer 3"]
    assert adapter._assistant.seen[2] == [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "answer 1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "answer 2"},
        {"role": "user", "content": "Q3"},
    ]


def test_reasoning_with_plain_llava_onevision(tmp_path, llava_ov):
    data = tmp_path / "data"
    write_reasoning_benchmark(data)
    out = tmp_path / "run"
    code = run(
        "visa-dr-reasoning",
        "--data",
        data,
        "--model",
        llava_ov,
        "--out",
        out,
        "--max-new-tokens",
        "3",
        "--no-similarity",
    )
    assert code == 0
    lines = {line["id"]: line for line in cache_lines(out)}
    assert [len(line["responses"]) for line in lines.values()] == [2, 1]
    summary = results(out)["summary"]
    assert summary["n_scored"] == 3 and 0.0 <= summary["rougeL"] <= 1.0 and "similarity" not in summary


# -- the AD task: resume, kill, shards, eval-only ----------------------------------------------------


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    return write_mvtec(tmp_path_factory.mktemp("mvtec") / "mvtec", n_good=4, n_bad=4)


@pytest.fixture(scope="module")
def reference_run(mvtec, clip_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert run("ad", "--data", mvtec, "--model", clip_llama, "--out", out, "--zero-shot", "single") == 0
    return out


def test_ad_metrics_and_cached_maps(reference_run):
    result = results(reference_run)
    assert result["complete"] and result["n_scored"] == 8
    for name in ("image_AUROC", "image_AP", "image_F1max", "pixel_AUROC", "pixel_AUPRO"):
        assert 0.0 <= result["summary"][name] <= 1.0
    # the summary is recomputable from the cache alone
    from eval.metrics import image_auroc

    lines = cache_lines(reference_run)
    labels = [int("/crack/" in line["id"]) for line in lines]
    assert result["summary"]["image_AUROC"] == pytest.approx(image_auroc(labels, [line["score"] for line in lines]))
    # the model's own verdicts, as cached: false alarms among the normal images, misses among the anomalous ones
    flagged = {0: [], 1: []}
    for label, line in zip(labels, lines):
        flagged[label].append(line["verdict"])
    assert result["summary"]["false_alarms"] == pytest.approx(np.mean(flagged[0]))
    assert result["summary"]["missed"] == pytest.approx(1 - np.mean(flagged[1]))
    right = np.mean([line["verdict"] == bool(label) for label, line in zip(labels, lines)])
    assert result["summary"]["verdict_accuracy"] == pytest.approx(right)
    stored = np.load(reference_run / lines[0]["map"])
    assert stored.dtype == np.float16 and stored.shape == (32, 32)
    assert (reference_run / "worst").is_dir() and len(list((reference_run / "worst").glob("*.png"))) == 8


def test_ad_batch_mode_scores_each_class_against_itself_and_shards_agree(mvtec, clip_llama, tmp_path, monkeypatch):
    folders = spy_detect_batch(monkeypatch)
    whole = tmp_path / "whole"
    assert run("ad", "--data", mvtec, "--model", clip_llama, "--out", whole, "--zero-shot", "batch") == 0
    assert folders == [(8, "batch")]  # one class: its 8 test images scored together, once
    assert results(whole)["complete"] and 0.0 <= results(whole)["summary"]["image_AUROC"] <= 1.0
    sharded = tmp_path / "sharded"
    for shard in ("0/2", "1/2"):
        assert (
            run(
                "ad", "--data", mvtec, "--model", clip_llama, "--out", sharded, "--zero-shot", "batch", "--shard", shard
            )
            == 0
        )
    scores = {line["id"]: line["score"] for line in cache_lines(sharded)}
    assert scores == pytest.approx({line["id"]: line["score"] for line in cache_lines(whole)})
    assert run("ad", "--data", mvtec, "--model", clip_llama, "--out", whole) == 2  # the default (auto) is another run


def test_ad_scores_a_class_of_8_test_images_together_by_default_and_a_smaller_one_image_by_image(
    mvtec, clip_llama, tmp_path, monkeypatch
):
    """Without --zero-shot, a class with at least 8 test images is scored as a folder (each image against the class's
    others), as `inspect` does for a folder, and a class with fewer one image at a time."""
    modes = spy_detect_batch(monkeypatch)
    assert run("ad", "--data", mvtec, "--model", clip_llama, "--out", tmp_path / "eight") == 0
    assert modes == [(8, "batch")]
    modes.clear()
    counter = CountingDetect(monkeypatch)
    small = write_mvtec(tmp_path / "small", n_good=3, n_bad=3)
    assert run("ad", "--data", small, "--model", clip_llama, "--out", tmp_path / "six") == 0
    assert len(counter.calls) == 6 and all(mode == "single" for _, mode in modes)  # (`detect` is a batch of one)


def test_resume_after_limit_and_a_torn_line_infers_nothing_twice(
    tmp_path, mvtec, clip_llama, reference_run, monkeypatch
):
    out = tmp_path / "run"
    single = ["--zero-shot", "single"]  # each image on its own: one detect call per image inferred
    assert run("ad", "--data", mvtec, "--model", clip_llama, "--out", out, "--limit", "3", *single) == 0
    assert len(cache_lines(out)) == 3 and results(out)["n_missing"] == 5
    first = (out / "predictions.jsonl").read_bytes()
    with open(out / "predictions.jsonl", "a") as handle:  # killed in the middle of writing sample 4
        handle.write('{"id": "bottle/test/good/000.png", "sco')

    counter = CountingDetect(monkeypatch)
    assert run("ad", "--data", mvtec, "--model", clip_llama, "--out", out, *single) == 0
    assert len(counter.calls) == 5
    assert (out / "predictions.jsonl").read_bytes().startswith(first)
    ids = [line["id"] for line in cache_lines(out)]
    assert len(ids) == len(set(ids)) == 8
    assert results(out)["summary"] == results(reference_run)["summary"]
    assert results(out)["per_class"] == results(reference_run)["per_class"]

    counter.calls.clear()  # a third run finds everything cached
    assert run("ad", "--data", mvtec, "--model", clip_llama, "--out", out, *single) == 0
    assert counter.calls == []


def test_resume_after_killing_the_process(tmp_path, clip_llama, monkeypatch):
    data = write_mvtec(tmp_path / "many", n_good=20, n_bad=20)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "eval.run",
        "ad",
        "--data",
        str(data),
        "--model",
        str(clip_llama),
        "--out",
        str(out),
        "--mode",
        "infer",
        "--zero-shot",
        "single",  # one image at a time, so that a kill lands between cached lines
    ]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache_file = out / "predictions.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None:
        if cache_file.is_file() and cache_file.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = {line["id"] for line in cache_lines(out)}
    assert 2 <= len(done_before) < 40, "the run should have been killed part way"

    counter = CountingDetect(monkeypatch)
    assert run("ad", "--data", data, "--model", clip_llama, "--out", out, "--zero-shot", "single") == 0
    inferred = {Path(call).relative_to(data).as_posix() for call in counter.calls}
    assert len(counter.calls) == 40 - len(done_before) and not inferred & done_before
    ids = [line["id"] for line in cache_lines(out)]
    assert len(ids) == len(set(ids)) == 40 and results(out)["complete"]


def test_shards_merged_equal_one_run(tmp_path, mvtec, clip_llama, reference_run, capsys):
    out = tmp_path / "run"
    single = ["--zero-shot", "single"]  # as the reference run
    assert run("ad", "--data", mvtec, "--model", clip_llama, "--out", out, "--shard", "0/2", *single) == 0
    assert not (out / "results.json").exists()  # the other shard is not done yet
    assert "eval.report" in capsys.readouterr().err
    monkeypatch_env = {"RANK": "1", "WORLD_SIZE": "2"}
    assert eval_run.parse_shard(None, monkeypatch_env) == (1, 2)
    assert (
        run("ad", "--data", mvtec, "--model", clip_llama, "--out", out, "--shard", "1/2", "--mode", "infer", *single)
        == 0
    )
    assert sorted(p.name for p in out.glob("predictions*.jsonl")) == [
        "predictions.shard-0-of-2.jsonl",
        "predictions.shard-1-of-2.jsonl",
    ]
    assert eval_report.main([str(out)]) == 0
    assert results(out)["summary"] == results(reference_run)["summary"]
    assert cached_scores(out) == cached_scores(reference_run)


def test_torchrun_rank_picks_the_shard(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert eval_run.parse_shard(None) == (2, 3)
    assert eval_run.parse_shard("0/1") == (0, 1)  # an explicit --shard wins
    with pytest.raises(eval_run.UsageError):
        eval_run.parse_shard("3/3")


def test_eval_mode_scores_the_cache_without_a_model(tmp_path, reference_run, monkeypatch):
    import shutil

    from assistant.inference import AnomalyAssistant

    def refuse(*args, **kwargs):
        raise AssertionError("--mode eval must not load a model")

    monkeypatch.setattr(AnomalyAssistant, "from_pretrained", refuse)
    copy = tmp_path / "copy"
    shutil.copytree(reference_run, copy)
    (copy / "results.json").unlink()
    assert run("ad", "--data", "/", "--out", copy, "--mode", "eval") == 0
    assert results(copy)["summary"] == results(reference_run)["summary"]


# -- the run folder is the run's own ---------------------------------------------------------------


def test_refuses_a_folder_that_is_not_its_own(tmp_path, mvtec, capsys):
    data = tmp_path / "data"
    write_detection_benchmark(data, with_images=False)
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps(RESPONSES))

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert run("visa-dr-detection", "--data", data, "--predictions", predictions, "--out", user) == 2
    assert (user / "notes.txt").read_text() == "keep me" and sorted(p.name for p in user.iterdir()) == ["notes.txt"]

    out = tmp_path / "run"
    assert run("visa-dr-detection", "--data", data, "--predictions", predictions, "--out", out) == 0
    capsys.readouterr()
    assert run("visa-dr-reasoning", "--data", data, "--predictions", predictions, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "another run" in err and "\n" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ad", "--data", "/no/such/dir", "--model", "x", "--out", "o"], "does not exist"),
        (["ad", "--data", ".", "--out", "o"], "give --model or --predictions"),
        (["ad", "--data", ".", "--model", "x", "--out", "o", "--limit", "0"], "--limit"),
        (["ad", "--data", ".", "--model", "x", "--out", "o", "--shard", "2"], "--shard"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_visa_csv_layout_with_defect_id_masks(tmp_path, clip_llama):
    """VisA root: split_csv/1cls.csv (object,split,label,image,mask); masks hold defect ids, not 255."""
    root = tmp_path / "VisA_20220922"
    rows = ["object,split,label,image,mask"]
    for i in range(4):
        anomalous = i >= 2
        image = f"candle/Data/Images/{'Anomaly' if anomalous else 'Normal'}/{i:03d}.JPG"
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        random_image(32, 32, seed=i).save(root / image)
        mask = ""
        if anomalous:
            mask = f"candle/Data/Masks/Anomaly/{i:03d}.png"
            (root / mask).parent.mkdir(parents=True, exist_ok=True)
            values = np.zeros((32, 32), dtype=np.uint8)
            values[8:16, 8:16] = i  # defect id
            Image.fromarray(values).save(root / mask)
        rows.append(f"candle,test,{'anomaly' if anomalous else 'normal'},{image},{mask}")
    rows.append("candle,train,normal,candle/Data/Images/Normal/000.JPG,")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert run("ad", "--data", root / "split_csv" / "1cls.csv", "--model", clip_llama, "--out", out) == 0
    result = results(out)
    assert result["n_scored"] == 4 and [r["class"] for r in result["per_class"]] == ["candle"]
    assert result["summary"]["pixel_AUROC"] is not None and 0.0 <= result["summary"]["pixel_AUPRO"] <= 1.0


def test_defective_images_without_masks_count_for_the_image_metrics(tmp_path, clip_llama, capsys):
    """Image-level labels only (no ground_truth/, or masks for some defects): every test image is scored, the image
    metrics read all of them and the pixel metrics only the images whose truth is known."""
    from eval.metrics import image_auroc

    data = write_mvtec(tmp_path / "labels_only", n_good=4, n_bad=4)
    (data / "bottle" / "ground_truth" / "crack" / "000_mask.png").unlink()
    (data / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
    some = tmp_path / "some"
    assert run("ad", "--data", data, "--model", clip_llama, "--out", some, "--zero-shot", "single") == 0
    result, lines = results(some), cache_lines(some)
    assert result["n_scored"] == 8 and len(lines) == 8
    labels = [int("/crack/" in line["id"]) for line in lines]
    assert sum(labels) == 4
    assert result["summary"]["image_AUROC"] == pytest.approx(image_auroc(labels, [line["score"] for line in lines]))
    assert 0.0 <= result["summary"]["pixel_AUROC"] <= 1.0
    assert "2 of 4 anomalous images have no ground-truth mask" in capsys.readouterr().out

    shutil.rmtree(data / "bottle" / "ground_truth")
    none = tmp_path / "none"
    assert run("ad", "--data", data, "--model", clip_llama, "--out", none, "--zero-shot", "single") == 0
    result = results(none)
    assert result["n_scored"] == 8 and result["summary"]["image_AUROC"] == pytest.approx(
        image_auroc(labels, [line["score"] for line in lines])
    )
    assert "pixel_AUROC" not in result["summary"]


def test_images_sorted_into_good_and_defect_folders_are_scored_as_they_lie(tmp_path, clip_llama, capsys):
    """Label folders (<class>/good, <class>/<defect>, masks in <class>/ground_truth): the same scores and metrics as
    the same images in MVTec layout; with --shots the references come from good/ and leave the test set."""
    data = write_mvtec(tmp_path / "mvtec", n_good=4, n_bad=3)
    part = tmp_path / "sorted" / "bottle"
    shutil.copytree(data / "bottle" / "test", part)
    shutil.copytree(data / "bottle" / "ground_truth", part / "ground_truth")
    runs = {}
    for name, root in (("mvtec", data), ("sorted", part)):
        out = tmp_path / f"run_{name}"
        assert run("ad", "--data", root, "--model", clip_llama, "--out", out, "--zero-shot", "single") == 0
        runs[name] = results(out)
        runs[name]["scores"] = sorted(line["score"] for line in cache_lines(out))
    assert runs["sorted"]["n_scored"] == 7 and runs["sorted"]["scores"] == runs["mvtec"]["scores"]
    for metric in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
        assert runs["sorted"]["summary"][metric] == pytest.approx(runs["mvtec"]["summary"][metric])

    capsys.readouterr()
    assert run("ad", "--data", part, "--model", clip_llama, "--out", tmp_path / "shots", "--shots", "2") == 0
    scored = {line["id"] for line in cache_lines(tmp_path / "shots")}
    assert results(tmp_path / "shots")["n_scored"] == 5 and sum(key.startswith("good/") for key in scored) == 2
    assert "bottle: no training split, so its 2 references were drawn from its normal images" in capsys.readouterr().out

    assert run("ad", "--data", part, "--model", clip_llama, "--out", tmp_path / "too_many", "--shots", "4") == 2
    err = capsys.readouterr().err.strip()
    assert "--shots 4: class 'bottle' has only 3 normal images (no training split)" in err and "\n" not in err
    assert not (tmp_path / "too_many" / "results.json").exists()


def test_ad_scoring_without_masks_is_image_level_and_hand_computable():
    from eval.tasks import Sample
    from eval.tasks.ad import ADTask

    labels = [0, 0, 1, 1, 0, 1]
    scores = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    categories = ["a", "a", "a", "a", "b", "b"]
    samples = [
        Sample(f"{c}/{i}.png", i, f"{c}/{i}.png", label, c) for i, (label, c) in enumerate(zip(labels, categories))
    ]
    predictions = {s.key: {"score": score} for s, score in zip(samples, scores)}
    scored = ADTask().score(samples, predictions, {"load_map": None})
    rows = {row["class"]: row for row in scored.rows}
    # class a: anomalies 0.35, 0.8 vs normals 0.1, 0.4 -> 3 of 4 pairs ordered: AUROC 0.75; class b: 1.0
    assert rows["a"]["image_AUROC"] == pytest.approx(0.75) and rows["b"]["image_AUROC"] == pytest.approx(1.0)
    assert scored.summary["image_AUROC"] == pytest.approx(0.875)
    assert "pixel_AUROC" not in scored.summary and "image-level metrics only" in scored.notes[0]


def test_a_changed_model_does_not_mix_with_its_old_cached_predictions(tmp_path, mvtec, clip_llama, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(clip_llama, model)
    out = tmp_path / "run"
    assert run("ad", "--data", mvtec, "--model", model, "--out", out, "--limit", "2", "--mode", "infer") == 0
    cached = (out / "predictions.jsonl").read_bytes()
    config = json.loads((model / "config.json").read_text())
    config["image_threshold"] = 0.123  # re-calibrated in place: the same path, other verdicts
    (model / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert run("ad", "--data", mvtec, "--model", model, "--out", out, "--mode", "infer") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "changed" in err and "\n" not in err
    assert (out / "predictions.jsonl").read_bytes() == cached


def test_few_shot_ad_uses_normal_training_images_as_references(
    tmp_path, mvtec, clip_llama, reference_run, monkeypatch, capsys
):
    from assistant import AnomalyAssistant
    from eval.adapters import ModelAdapter

    seen, paths = [], []
    original, decode = AnomalyAssistant.detect, ModelAdapter._reference_images

    def spy(self, image, references=None):
        seen.append(references)
        return original(self, image, references=references)

    monkeypatch.setattr(AnomalyAssistant, "detect", spy)
    monkeypatch.setattr(
        ModelAdapter,
        "_reference_images",
        lambda self, sample: paths.append(sample.extra["references"]) or decode(self, sample),
    )
    out = tmp_path / "one_shot"
    assert run("ad", "--data", mvtec, "--model", clip_llama, "--out", out, "--shots", "1", "--shot-seed", "3") == 0
    assert len(seen) == 8 and all(r is not None and len(r) == 1 for r in seen)
    # one reference for the class, from train/good, decoded once for all its test images
    assert len({tuple(p) for p in paths}) == 1 and "/train/good/" in paths[0][0]
    assert all(r is seen[0] for r in seen)
    assert np.array_equal(np.asarray(seen[0][0]), np.asarray(Image.open(paths[0][0]).convert("RGB")))
    zero, one = cached_scores(reference_run), cached_scores(out)
    assert zero.keys() == one.keys() and any(
        abs(zero[k] - one[k]) > 1e-6 for k in zero
    )  # the references change the scores

    capsys.readouterr()
    assert (
        run("ad", "--data", mvtec, "--model", clip_llama, "--out", out, "--shots", "2") == 2
    )  # not mixed into the 1-shot cache
    assert "shots" in capsys.readouterr().err
    assert run("ad", "--data", mvtec, "--model", clip_llama, "--out", tmp_path / "too_many", "--shots", "5") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "only 2 normal training images" in err and "\n" not in err
