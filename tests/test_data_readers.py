"""Readers on fixtures written in the exact published layouts, with planted problems.

Every reader must account for every entry: records in = records out + records reported.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_prep.readers import read_llava, read_mvtec, read_visa, read_visa_dr_detection, read_visa_dr_reasoning


def _png(path, size=(32, 24), value=120, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(np.full(shape, value, np.uint8), mode).save(path)
    return path


def _corrupt(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return path


def _assert_accounted(result):
    assert result.n_seen == len(result.records) + len(result.dropped)


@pytest.fixture
def mvtec(tmp_path):
    root = tmp_path / "mvtec"
    for name in ("000", "001"):
        _png(root / "bottle/train/good" / f"{name}.png")
        _png(root / "bottle/test/broken_large" / f"{name}.png")
        _png(root / "bottle/ground_truth/broken_large" / f"{name}_mask.png", value=255, mode="L")
    _png(root / "bottle/test/good/000.png")
    _png(root / "bottle/test/broken_large/002.png")  # planted: no mask
    _corrupt(root / "bottle/test/good/001.png")  # planted: corrupt image
    _png(root / "bottle/ground_truth/broken_large/009_mask.png", mode="L")  # planted: orphan mask
    _png(root / "screw/train/good/000.png")
    return root


def test_mvtec_reads_labels_masks_and_reports_planted_problems(mvtec):
    result = read_mvtec(mvtec)
    by_name = {(r.category, r.split, r.defect_type, r.image.rsplit("/", 1)[-1]): r for r in result.records}
    assert len(result.records) == 6
    anomalous = by_name[("bottle", "test", "broken_large", "001.png")]
    assert anomalous.label == 1 and anomalous.mask.endswith("ground_truth/broken_large/001_mask.png")
    normal = by_name[("bottle", "test", None, "000.png")]
    assert normal.label == 0 and normal.mask is None
    assert ("screw", "train", None, "000.png") in by_name
    reasons = {p.file.rsplit("/", 1)[-1]: p.reason for p in result.problems}
    assert reasons["002_mask.png"] == "missing ground-truth mask"
    assert "unreadable image" in reasons["001.png"]
    assert reasons["009_mask.png"] == "mask without a test image"
    _assert_accounted(result)
    assert len(result.dropped) == 2


def test_mvtec_single_class_folder_and_mask_size_mismatch(mvtec):
    _png(mvtec / "bottle/ground_truth/broken_large/000_mask.png", size=(8, 8), mode="L")
    result = read_mvtec(mvtec / "bottle")
    assert {r.category for r in result.records} == {"bottle"}
    assert any("differs from image size" in p.reason for p in result.dropped)
    _assert_accounted(result)


def test_mvtec_records_become_a_dataset_with_image_features(mvtec):
    dataset = read_mvtec(mvtec).to_dataset()
    assert len(dataset) == 6
    row = next(r for r in dataset if r["label"] == 1)
    assert row["image"].size == (32, 24) and row["mask"].size == (32, 24)
    assert next(r for r in dataset if r["label"] == 0)["mask"] is None


@pytest.fixture
def visa(tmp_path):
    root = tmp_path / "VisA"
    images = root / "candle/Data/Images"
    (images / "Normal").mkdir(parents=True)
    for name in ("000", "001"):
        Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(images / "Normal" / f"{name}.JPG")  # JPEG, like VisA
    _png(images / "Anomaly/000.JPG")
    _png(root / "candle/Data/Masks/Anomaly/000.png", mode="L", value=3, size=(32, 24))
    (root / "split_csv").mkdir()
    rows = [
        "object,split,label,image,mask",
        "candle,train,normal,candle/Data/Images/Normal/000.JPG,",
        "candle,test,normal,candle/Data/Images/Normal/001.JPG,",
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png",
        "candle,test,broken,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png",  # bad label
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,",  # anomaly without mask
        "candle,test,normal,candle/Data/Images/Normal/404.JPG,",  # missing image
    ]
    (root / "split_csv/1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_visa_reads_split_csv_and_reports_bad_rows(visa):
    result = read_visa(visa)
    assert [(r.split, r.label) for r in result.records] == [("train", 0), ("test", 0), ("test", 1)]
    assert result.records[2].mask.endswith("Masks/Anomaly/000.png") and result.records[2].category == "candle"
    reasons = [p.reason for p in result.dropped]
    assert any("not normal/anomaly" in r for r in reasons)
    assert any("without a mask" in r for r in reasons)
    assert any("file not found" in r for r in reasons)
    _assert_accounted(result)
    assert result.n_seen == 6
    # image-level labels only (the `ad` evaluation): the anomaly row without a mask is kept, with mask=None
    labels_only = read_visa(visa, masks_required=False)
    assert [(r.label, r.mask is None) for r in labels_only.records] == [(0, True), (0, True), (1, False), (1, True)]
    assert not any("without a mask" in p.reason for p in labels_only.dropped)
    from train.data import read_masked  # what `train.calibrate --all-images` reads

    assert len(read_masked(visa, full_check=False, masks_required=False)[0]) == len(labels_only.records)


def test_visa_missing_csv_is_a_problem_not_a_crash(tmp_path):
    result = read_visa(tmp_path)
    assert result.records == [] and "split CSV not found" in result.problems[0].reason


def _conversation(first="<image>\nIs there a defect?"):
    return [{"from": "human", "value": first}, {"from": "gpt", "value": "Yes, a scratch in the center."}]


def test_llava_json_reports_missing_image_token_and_bad_turns(tmp_path):
    _png(tmp_path / "images/a.png")
    entries = [
        {"id": "ok", "image": "images/a.png", "conversations": _conversation()},
        {"id": "no-token", "image": "images/a.png", "conversations": _conversation("Is there a defect?")},
        {"id": "roles", "image": "images/a.png", "conversations": _conversation()[::-1]},
        {"id": "gone", "image": "images/missing.png", "conversations": _conversation()},
        "not an object",
    ]
    path = tmp_path / "instruct.json"
    path.write_text(json.dumps(entries))
    result = read_llava(path)
    assert [r.extra["id"] for r in result.records] == ["ok"]
    assert result.records[0].extra["conversations"][0]["value"].startswith("<image>")
    reasons = {p.record: p.reason for p in result.dropped}
    assert "no <image> token" in reasons["#1 id=no-token"]
    assert "expected 'human'" in reasons["#2 id=roles"]
    assert reasons["#3 id=gone"].endswith("file not found")
    assert reasons["#4"] == "entry is not an object"
    _assert_accounted(result)
    dataset = result.to_dataset()
    assert json.loads(dataset[0]["conversations"])[1]["from"] == "gpt"


def test_bad_json_is_reported_with_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": 1, "image": "a.png",')
    result = read_llava(path)
    assert result.records == [] and result.problems[0].file == str(path)
    assert result.problems[0].reason.startswith("bad JSON") and "line 1" in result.problems[0].reason


@pytest.fixture
def visa_dr(tmp_path):
    _png(tmp_path / "VisA/candle/Data/Images/Anomaly/000.JPG")
    _png(tmp_path / "VisA/pcb1/Data/Images/Normal/000.JPG")
    return tmp_path


def test_visa_dr_detection_takes_the_class_from_the_path(visa_dr):
    entries = [
        {"image": "VisA/candle/Data/Images/Anomaly/000.JPG", "anomaly": True, "defect": "wax"},
        {"image": "VisA/pcb1/Data/Images/Normal/000.JPG", "anomaly": False},
        {"image": "VisA/pcb1/Data/Images/Normal/000.JPG"},  # no label
        {"image": "VisA/pcb1/Data/Images/Normal/999.JPG", "anomaly": False},  # missing file
    ]
    (visa_dr / "test_data.json").write_text(json.dumps(entries))
    result = read_visa_dr_detection(visa_dr / "test_data.json")
    assert [(r.category, r.label) for r in result.records] == [("candle", 1), ("pcb1", 0)]
    assert result.records[0].extra == {"defect": "wax"}
    assert len(result.dropped) == 2
    _assert_accounted(result)


def test_visa_dr_reasoning_accepts_answers_in_either_place(visa_dr):
    image = "VisA/candle/Data/Images/Anomaly/000.JPG"
    entries = [
        {"image": image, "questions": ["Is it defective?", "Where?"], "answers": ["Yes.", "Top left."]},
        {"image": image, "questions": [{"question": "Is it defective?", "answer": "Yes."}, {"q": "Why?"}]},
        {"image": image, "questions": ["Only one?"], "answers": ["a", "b"]},  # mismatch
        {"image": image},  # no questions
    ]
    (visa_dr / "visa_dr.json").write_text(json.dumps(entries))
    result = read_visa_dr_reasoning(visa_dr / "visa_dr.json")
    assert [r.extra["answers"] for r in result.records] == [["Yes.", "Top left."], ["Yes.", None]]
    assert result.records[1].extra["questions"] == ["Is it defective?", "Why?"]
    assert {p.reason for p in result.dropped} == {"2 answers for 1 questions", "'questions' must be a non-empty list"}
    _assert_accounted(result)
    assert len(result.to_dataset()) == 2


@pytest.mark.parametrize("task, name", [("detection", "test_data.json"), ("reasoning", "visa_dr.json")])
def test_the_reader_and_the_eval_task_agree_on_every_visa_dr_entry(visa_dr, task, name):
    from eval.tasks import get_task

    image = "VisA/candle/Data/Images/Anomaly/000.JPG"
    entries = [
        {"image": image, "anomaly": True, "questions": ["Is it defective?"], "answers": ["Yes."]},
        {"image": "VisA/pcb1/Data/Images/Normal/000.JPG", "anomaly": "normal", "questions": [{"q": "Why?"}]},
        {"image": image, "anomaly": "maybe", "questions": []},  # a bad label, no questions
        {"anomaly": False, "questions": ["Where?"]},  # no image
        {"image": "VisA/pcb1/Data/Images/Normal/999.JPG", "anomaly": False, "questions": ["Where?"]},  # missing file
    ]
    (visa_dr / "VisA" / name).write_text(json.dumps(entries))
    reader = read_visa_dr_detection if task == "detection" else read_visa_dr_reasoning
    read = reader(visa_dr / "VisA" / name, image_root=visa_dr)
    loaded = get_task(f"visa-dr-{task}").load(visa_dr, need_images=True)
    samples = [(s.image, s.label, s.category) for s in loaded.samples]
    assert samples == [(r.image, r.label, r.category) for r in read.records]
    if task == "reasoning":
        assert [s.extra for s in loaded.samples] == [r.extra for r in read.records]
    assert len(loaded.problems) == len(read.dropped) == len(entries) - len(read.records)
    assert [p.reason for p in read.dropped] == [p.split(": ", 1)[1] for p in loaded.problems]


def test_core_package_imports_without_datasets():
    code = "import sys; sys.modules['datasets'] = None; import data_prep.readers, data_prep.synth, data_prep.instruct, data_prep.cli, data_prep.check"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_full_check_in_worker_processes_drops_the_same_truncated_files(tmp_path, monkeypatch):
    """Large sources are fully checked in one process per core (`PARALLEL_CHECK_FROM`): a file whose header is
    fine but whose pixels are cut off is still dropped with its reason, and the records keep their order."""
    import data_prep.images

    for i in range(6):
        _png(tmp_path / "d" / "wood" / "train" / "good" / f"{i:03d}.png", value=20 * i)
    _png(tmp_path / "d" / "wood" / "test" / "cut" / "000.png")
    _png(tmp_path / "d" / "wood" / "ground_truth" / "cut" / "000_mask.png", mode="L")
    truncated = tmp_path / "d" / "wood" / "train" / "good" / "003.png"
    truncated.write_bytes(truncated.read_bytes()[:-30])  # the header survives: only a full decode sees it
    assert not read_mvtec(tmp_path / "d").dropped
    serial = read_mvtec(tmp_path / "d", full_check=True)
    monkeypatch.setattr(data_prep.images, "PARALLEL_CHECK_FROM", 2)
    calls = []
    real = data_prep.parallel.ordered_map
    monkeypatch.setattr(
        data_prep.parallel,
        "ordered_map",
        lambda f, items, workers, **kw: calls.append(workers) or real(f, items, workers, **kw),
    )
    parallel = read_mvtec(tmp_path / "d", full_check=True)
    assert calls and calls[0] == data_prep.parallel.default_workers()
    assert [p.file for p in parallel.dropped] == [p.file for p in serial.dropped] == [str(truncated)]
    assert [p.reason for p in parallel.dropped] == [p.reason for p in serial.dropped]
    assert [r.image for r in parallel.records] == [r.image for r in serial.records]
    assert len(parallel.records) == 6
