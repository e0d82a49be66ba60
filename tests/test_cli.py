"""`anomaly-assistant ask`: the JSON a script reads, and one-line errors with exit code 2 on bad input."""

import io
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from conftest import random_image
from PIL import Image

from assistant.cli import main

KEYS = {
    "answer",
    "anomalous",
    "score",
    "threshold",
    "boxes",
    "location",
    "heatmap",
    "model",
    "warnings",
    "out_of_domain",
}


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_with_heatmap(clip_llama, image_file, tmp_path, capsys):
    heatmap = tmp_path / "overlay.png"
    code, out, err = run(
        [
            "ask",
            str(image_file),
            "--model",
            str(clip_llama),
            "--json",
            "--heatmap",
            str(heatmap),
            "--max-new-tokens",
            "6",
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads(out)
    assert set(report) == KEYS
    assert isinstance(report["anomalous"], bool) and 0.0 <= report["score"] <= 1.0
    assert report["anomalous"] == (report["score"] >= report["threshold"])  # the verdict's own threshold
    assert report["heatmap"] == str(heatmap)
    assert Image.open(heatmap).size[0] == 80  # the input's width
    for box in report["boxes"]:
        assert len(box["box"]) == 4 and 0 <= box["score"] <= 1


def test_the_readme_command_can_be_run_twice(clip_llama, image_file, tmp_path, capsys):
    heatmap = tmp_path / "outputs" / "overlay.png"  # its folder does not exist yet: it is created
    argv = ["ask", str(image_file), "--model", str(clip_llama), "--heatmap", str(heatmap), "--max-new-tokens", "3"]
    code, out, err = run([*argv, "--overwrite"], capsys)
    assert code == 0 and f"heatmap: {heatmap}" in out, err
    first = heatmap.read_bytes()
    heatmap.write_bytes(b"the user's own file")
    code, out, err = run(argv, capsys)  # without --overwrite an existing file is refused and kept
    assert code == 2 and err.count("\n") == 1 and "--overwrite" in err and out == ""
    assert heatmap.read_bytes() == b"the user's own file"
    code, _, err = run([*argv, "--overwrite"], capsys)
    assert code == 0 and heatmap.read_bytes() == first, err
    assert [p.name for p in heatmap.parent.iterdir()] == ["overlay.png"]  # no partial file left behind


def test_a_reference_of_another_kind_of_part_is_warned_about(clip_llama, tmp_path, capsys):
    query, alike, other = tmp_path / "query.png", tmp_path / "alike.png", tmp_path / "other.png"
    Image.fromarray(np.full((48, 48, 3), (200, 180, 40), np.uint8)).save(query)
    Image.fromarray(np.full((48, 48, 3), (205, 178, 44), np.uint8)).save(alike)
    Image.fromarray(np.full((48, 48, 3), (20, 40, 200), np.uint8)).save(other)
    base = ["ask", str(query), "--model", str(clip_llama), "--max-new-tokens", "3"]
    code, out, _ = run([*base, "--json", "--reference", str(alike)], capsys)
    assert code == 0 and json.loads(out)["warnings"] == []
    code, out, _ = run([*base, "--json", "--reference", str(alike), str(other)], capsys)
    warnings = [w for w in json.loads(out)["warnings"] if "normal references score up to" not in w]  # (their spread)
    assert code == 0 and len(warnings) == 1 and warnings[0].startswith("reference 2 may show another kind of part")
    code, out, err = run([*base, "--reference", str(other)], capsys)  # plain text: the warning on stderr
    assert code == 0 and out.startswith("verdict: ") and "warning: reference 1 may show another kind of part" in err


def test_a_reference_that_is_the_image_itself_is_warned_about(tmp_path, capsys):
    """The image given as one of its own references matches itself everywhere: the default model calls the stained
    board normal then, and the report says why (a copy under another name counts; an image of a like part does not)."""
    import shutil

    copy = tmp_path / "copy.png"
    shutil.copy("examples/wood_stain.png", copy)
    base = ["ask", "examples/wood_stain.png", "--json", "--max-new-tokens", "3"]
    code, out, _ = run([*base, "--reference", str(copy)], capsys)
    report = json.loads(out)
    assert code == 0 and report["anomalous"] is False
    assert [w for w in report["warnings"] if "itself" in w] == [
        "reference 1 is this image itself: an image matches itself everywhere, so it scores as normal whatever it "
        "shows; leave it out of the references"
    ]
    pill = ["ask", "examples/pill_contamination.png", "--json", "--max-new-tokens", "3"]
    code, out, _ = run([*pill, "--reference", "examples/pill_good.png"], capsys)
    assert code == 0 and json.loads(out)["anomalous"] is True
    assert not any("itself" in w for w in json.loads(out)["warnings"])


def test_a_reference_folder_stands_for_its_images(clip_llama, tmp_path, capsys):
    """`ask --reference DIR` uses the image files in DIR, as `inspect --reference` does: the same report as listing
    them; an empty folder is a one-line error."""
    query, good = tmp_path / "query.png", tmp_path / "good"
    good.mkdir()
    Image.fromarray(np.full((48, 48, 3), (200, 180, 40), np.uint8)).save(query)
    for i, tint in enumerate((205, 195)):
        Image.fromarray(np.full((48, 48, 3), (tint, 178, 44), np.uint8)).save(good / f"good_{i}.png")
    (good / "notes.txt").write_text("not an image")
    base = ["ask", str(query), "--model", str(clip_llama), "--json", "--max-new-tokens", "3"]
    code, by_folder, err = run([*base, "--reference", str(good)], capsys)
    assert code == 0, err
    code, by_files, err = run([*base, "--reference", str(good / "good_0.png"), str(good / "good_1.png")], capsys)
    assert code == 0 and json.loads(by_folder)["score"] == json.loads(by_files)["score"], err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run([*base, "--reference", str(empty)], capsys)
    assert code == 2 and "no image files in --reference" in err and err.count("\n") == 1


def test_json_for_a_model_without_expert(llava_ov, image_file, capsys):
    code, out, _ = run(["ask", str(image_file), "--model", str(llava_ov), "--json", "--max-new-tokens", "4"], capsys)
    report = json.loads(out)
    assert code == 0 and report["anomalous"] is None and report["score"] is None and report["boxes"] == []
    assert report["threshold"] is None


def test_plain_text_output(siglip_qwen2, image_file, capsys):
    code, out, _ = run(
        ["ask", str(image_file), "--model", str(siglip_qwen2), "-q", "Where?", "--max-new-tokens", "4"], capsys
    )
    assert code == 0 and out.startswith("verdict: ")


def _png_header(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def _bad_images(tmp_path):
    png = io.BytesIO()
    random_image(64, 64).save(png, format="PNG")
    jpeg = io.BytesIO()
    random_image(64, 64).save(jpeg, format="JPEG")
    files = {
        "missing": None,
        "corrupt": b"\x89PNG\r\n\x1a\n" + b"garbage" * 20,
        "truncated-png": png.getvalue()[: len(png.getvalue()) // 2],
        "truncated-jpeg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "unsupported": b"<svg xmlns='http://www.w3.org/2000/svg'></svg>",
        "bomb": _png_header(100_000, 100_000) + b"\x00" * 64,
        "zero-pixels": _png_header(0, 10) + b"\x00" * 16,
        "empty": b"",
    }
    paths = {}
    for name, data in files.items():
        path = tmp_path / f"{name}.png"
        if data is not None:
            path.write_bytes(data)
        paths[name] = path
    return paths


def test_each_bad_image_is_one_line_and_exit_2(tmp_path, clip_llama, capsys):
    for name, path in _bad_images(tmp_path).items():
        before = path.read_bytes() if path.exists() else None
        code, out, err = run(["ask", str(path), "--model", str(clip_llama)], capsys)
        assert code == 2, (name, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, (name, err)
        assert str(path.name) in err, (name, err)
        assert out == ""
        assert (path.read_bytes() if path.exists() else None) == before  # nothing written over


def test_bad_model_path_question_and_outputs(image_file, tmp_path, clip_llama, capsys):
    cases = [
        (["--model", str(tmp_path / "no-such-model")], "no model"),
        (["--model", str(image_file)], "is a file"),
        (["--model", str(tmp_path)], "no config.json"),
        (["--model", "someone/not-cached"], "cannot fetch"),
        (["--model", str(clip_llama), "-q", "x" * 5000], "too long"),
        (["--model", str(clip_llama), "--heatmap", str(image_file)], "already exists"),
        (["--model", str(clip_llama), "--heatmap", str(tmp_path / "out.txt")], "must end in"),
        (["--model", str(clip_llama), "--reference", str(tmp_path / "gone.png")], "gone.png"),
    ]
    original = image_file.read_bytes()
    for extra, message in cases:
        code, _, err = run(["ask", str(image_file), *extra], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (extra, err)
    assert image_file.read_bytes() == original


def test_a_blank_question_asks_the_default_one_as_the_app_does(clip_llama, image_file, capsys):
    base = ["ask", str(image_file), "--model", str(clip_llama), "--json", "--max-new-tokens", "5"]
    code, default, err = run(base, capsys)
    assert code == 0, err
    code, blank, err = run([*base, "-q", "  "], capsys)
    assert code == 0 and json.loads(blank)["answer"] == json.loads(default)["answer"], err


def test_model_folder_with_broken_config(image_file, tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = run(["ask", str(image_file), "--model", str(tmp_path)], capsys)
    assert code == 2 and "config.json" in err


@pytest.mark.parametrize(
    "name,make",
    [
        ("gray", lambda: random_image(40, 50, mode="L")),
        ("rgba", lambda: random_image(40, 50, mode="RGBA")),
        ("16bit", lambda: Image.fromarray((np.arange(40 * 50).reshape(40, 50) * 30).astype(np.uint16))),
        ("one-pixel", lambda: random_image(1, 1)),
        ("extreme-aspect", lambda: random_image(3, 900)),
        ("palette", lambda: random_image(30, 30).convert("P")),
    ],
)
def test_odd_images_are_handled(name, make, tmp_path, clip_llama, capsys):
    path = tmp_path / f"{name}.png"
    make().save(path)
    code, out, err = run(["ask", str(path), "--model", str(clip_llama), "--json", "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    assert set(json.loads(out)) == KEYS


def test_real_process_prints_no_traceback(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    result = subprocess.run(
        [sys.executable, "-m", "assistant", "ask", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr and result.stdout == ""
