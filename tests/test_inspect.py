"""`anomaly-assistant inspect DIR --out DIR`: scores.csv, overlays, problems and an HTML gallery."""

import csv
import html
import re

import pytest
from PIL import Image

from assistant.cli import main
from tests.conftest import random_image


@pytest.fixture
def folder(tmp_path):
    parts = tmp_path / "parts"
    (parts / "line2").mkdir(parents=True)
    for seed, name in enumerate(["a.png", "b.jpg", "x <&> 'odd'.png"]):
        random_image(36, 44, seed=seed).save(parts / name)
    random_image(30, 30, seed=7).save(parts / "line2" / "deep.png")
    good = tmp_path / "good.png"
    random_image(36, 44, seed=9).save(good)
    (parts / "broken.png").write_bytes(good.read_bytes()[:120])  # truncated: the header reads, the pixels do not
    (parts / "notes.txt").write_text("not an image")
    return parts


def read_rows(out):
    with open(out / "scores.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_inspect_writes_scores_overlays_gallery_and_lists_the_broken_file(tmp_path, folder, clip_llama, capsys):
    out = tmp_path / "report"
    assert main(["inspect", str(folder), "--model", str(clip_llama), "--out", str(out)]) == 0

    rows = {row["path"]: row for row in read_rows(out)}
    assert sorted(rows) == ["a.png", "b.jpg", "broken.png", "x <&> 'odd'.png"]  # not recursive, .txt skipped
    assert rows["broken.png"]["score"] == "" and "truncated" in rows["broken.png"]["error"]
    assert (out / "problems.txt").read_text().startswith("broken.png: ")
    assert (out / "warnings.txt").read_text() == ""  # no domain bank, no references: nothing to warn about
    for name in ("a.png", "b.jpg", "x <&> 'odd'.png"):
        row = rows[name]
        assert 0.0 <= float(row["score"]) <= 1.0 and row["label"] in ("normal", "anomalous") and row["error"] == ""
        with Image.open(out / row["overlay"]) as overlay:
            assert overlay.width == 44  # the image's width; a title strip above
    assert re.fullmatch(r"overlays/\d{5}-x_odd_\.png", rows["x <&> 'odd'.png"]["overlay"])

    page = (out / "index.html").read_text()
    assert "x <&>" not in page and html.escape("x <&> 'odd'.png") in page
    assert "Unreadable files" in page and "broken.png" in page
    shown = re.findall(r"<figcaption>(.*?)<br>", page)
    by_score = sorted((r for r in rows.values() if r["score"]), key=lambda r: -float(r["score"]))
    assert shown == [html.escape(r["path"]) for r in by_score]
    assert "1 unreadable" in capsys.readouterr().out


def test_recursive_and_references(tmp_path, folder, clip_llama):
    references = tmp_path / "references"
    references.mkdir()
    random_image(36, 44, seed=11).save(references / "ok.png")
    plain = tmp_path / "plain"
    assert main(["inspect", str(folder), "--recursive", "--model", str(clip_llama), "--out", str(plain)]) == 0
    out = folder / "inspection"  # inside the inspected folder: never inspected itself
    assert (
        main(
            [
                "inspect",
                str(folder),
                "--recursive",
                "--reference",
                str(references),
                "--model",
                str(clip_llama),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    paths = [row["path"] for row in read_rows(out)]
    assert "line2/deep.png" in paths and not any(p.startswith("inspection/") for p in paths)
    with_refs = {row["path"]: row["score"] for row in read_rows(out)}
    without = {row["path"]: row["score"] for row in read_rows(plain)}
    assert with_refs.keys() == without.keys() and with_refs != without  # the normal references change the scores


@pytest.mark.parametrize("case", ["not-empty", "missing-folder", "no-images", "bad-reference"])
def test_bad_input_exits_2_and_touches_nothing(tmp_path, folder, clip_llama, capsys, case):
    out = tmp_path / "out"
    argv = ["inspect", str(folder), "--model", str(clip_llama), "--out", str(out)]
    if case == "not-empty":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    elif case == "missing-folder":
        argv[1] = str(tmp_path / "nope")
    elif case == "no-images":
        (tmp_path / "empty").mkdir()
        argv[1] = str(tmp_path / "empty")
    else:
        refs = tmp_path / "refs"
        refs.mkdir()
        (refs / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
        argv += ["--reference", str(refs)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    if case == "not-empty":
        assert [p.name for p in out.iterdir()] == ["mine.txt"]
    else:
        assert not out.exists()


def test_a_model_without_expert_is_refused(tmp_path, folder, llava_ov, capsys):
    assert main(["inspect", str(folder), "--model", str(llava_ov), "--out", str(tmp_path / "out")]) == 2
    assert "no anomaly expert" in capsys.readouterr().err


def test_reports_and_maps_carry_each_images_evidence(tmp_path, folder, clip_llama):
    import json

    import numpy as np

    from assistant.batch import MAP_SCALE
    from assistant.inference import AnomalyAssistant

    out = tmp_path / "report"
    argv = ["inspect", str(folder), "--model", str(clip_llama), "--out", str(out), "--zero-shot", "single"]
    assert main([*argv, "--save-maps"]) == 0

    rows = {row["path"]: row for row in read_rows(out)}
    records = {r["path"]: r for r in map(json.loads, (out / "reports.jsonl").read_text().splitlines())}
    assert set(records) == set(rows)  # one line per file, the unreadable one too
    assert records["broken.png"]["error"] and records["broken.png"]["map"] is None
    assistant = AnomalyAssistant.from_pretrained(str(clip_llama))
    for name in ("a.png", "b.jpg"):
        record, row = records[name], rows[name]
        expected = assistant.detect(folder / name)
        assert record["score"] == pytest.approx(expected.pred_score, abs=1e-5)
        assert record["anomalous"] == expected.pred_label
        assert [b["box"] for b in record["boxes"]] == [b["box"] for b in expected.boxes]
        assert [b["score"] for b in record["boxes"]] == pytest.approx([b["score"] for b in expected.boxes], abs=1e-5)
        assert record["overlay"] == row["overlay"] and record["map"] == row["map"] and record["error"] is None
        assert float(row["threshold"]) == pytest.approx(expected.threshold, abs=1e-6)
        assert row["location"] == (expected.location or "")
        with Image.open(out / row["map"]) as saved:  # the model's map at the image's size, 16-bit
            assert saved.size == Image.open(folder / name).size
            values = np.asarray(saved, dtype=np.float64) / MAP_SCALE
        assert np.abs(values - np.asarray(expected.anomaly_map, dtype=np.float64)).max() <= 1 / MAP_SCALE

    # without --save-maps no map is written, and the columns say so
    out2 = tmp_path / "report2"
    assert main(["inspect", str(folder), "--model", str(clip_llama), "--out", str(out2)]) == 0
    assert not (out2 / "maps").exists()
    assert all(row["map"] == "" for row in read_rows(out2))
