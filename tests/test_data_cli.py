"""The `python -m data_prep` CLI: exit codes, refusal to overwrite, and `check` on planted problems."""

import json
import subprocess
import sys

import pytest

from data_prep.cli import main


@pytest.fixture
def synth_dir(tmp_path):
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--n", "8", "--families", "wood,cap", "--size", "64", "--seed", "3"]) == 0
    return out


def _reported(out, file, reason):
    return any(str(file) in line and reason in line for line in out.splitlines() if line.startswith("problem: "))


def _one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


def test_synth_refuses_a_non_empty_out_unless_overwrite(synth_dir, capsys):
    capsys.readouterr()
    args = ["synth", "--out", str(synth_dir), "--n", "4", "--families", "wood", "--size", "32"]
    assert main(args) == 2
    assert "not empty" in _one_error_line(capsys)
    assert main([*args, "--overwrite"]) == 0
    assert len(list((synth_dir / "wood/train/good").glob("*.png"))) < 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["synth", "--n", "3"], "required"),
        (["synth", "--out", "X", "--n", "0"], "--n"),
        (["synth", "--out", "X", "--n", "2", "--families", "wood,plastic"], "unknown family plastic"),
        (["synth", "--out", "X", "--n", "2", "--anomaly-ratio", "1.5"], "--anomaly-ratio"),
        (["synth", "--out", "X", "--n", "2", "--defects", "scratch,dent"], "unknown defect type dent"),
        (["synth", "--out", "X", "--n", "2", "--normals", "no/such/dir"], "not a folder"),
        (["instruct", "--source", "no/such/dir", "--out", "x.json"], "not a folder"),
        (["check", "no/such/path"], "no such file"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "X").exists()


def test_synth_draws_the_large_shading_region_only_when_asked(synth_dir, tmp_path):
    assert not list(synth_dir.glob("*/ground_truth/shading"))  # not among the standard types
    out = tmp_path / "shaded"
    assert (
        main(
            ["synth", "--out", str(out), "--n", "6", "--families", "wood", "--size", "64", "--defects", "shading,crack"]
        )
        == 0
    )
    assert {p.name for p in (out / "wood/ground_truth").iterdir()} == {"shading", "crack"}


def test_instruct_then_check_is_clean_and_output_is_never_overwritten(synth_dir, tmp_path, capsys):
    out = tmp_path / "instruct.json"
    assert main(["instruct", "--source", str(synth_dir), "--out", str(out), "--seed", "1"]) == 0
    first = out.read_text()
    assert len(json.loads(first)) == 16
    assert main(["instruct", "--source", str(synth_dir), "--out", str(out), "--seed", "2"]) == 2
    assert "exists" in _one_error_line(capsys) and out.read_text() == first
    assert main(["check", str(out)]) == 0
    assert main(["check", str(synth_dir)]) == 0
    assert "llava" in capsys.readouterr().out


def test_check_lists_every_planted_problem_in_an_mvtec_folder(synth_dir, capsys):
    missing_mask = next((synth_dir / "cap/ground_truth").glob("*/000_mask.png"))
    missing_mask.unlink()
    corrupt = synth_dir / "wood/train/good/000.png"
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated: only a full decode notices
    capsys.readouterr()
    assert main(["check", str(synth_dir)]) == 1
    out = capsys.readouterr().out
    assert _reported(out, missing_mask, "missing ground-truth mask")
    assert _reported(out, corrupt, "unreadable image")
    assert "16 entries, 14 ok, 2 problems" in out


def test_check_finds_bad_json_and_missing_image_token(synth_dir, tmp_path, capsys):
    out = tmp_path / "instruct.json"
    assert main(["instruct", "--source", str(synth_dir), "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    records[0]["conversations"][0]["value"] = records[0]["conversations"][0]["value"].replace("<image>", "")
    out.write_text(json.dumps(records))
    capsys.readouterr()
    assert main(["check", str(out)]) == 1
    assert f"[#0 id={records[0]['id']}]: first human turn has no <image> token" in capsys.readouterr().out
    out.write_text(json.dumps(records)[:-20])
    assert main(["check", str(out)]) == 1
    assert "bad JSON" in capsys.readouterr().out


def test_check_detects_visa_dr_files_by_content(tmp_path, capsys):
    data = tmp_path / "test_data.json"
    data.write_text(json.dumps([{"image": "VisA/candle/Data/Images/Normal/0000.JPG", "anomaly": False}]))
    assert main(["check", str(data)]) == 1
    out = capsys.readouterr().out
    assert "visa_dr_detection" in out and _reported(out, "0000.JPG", "file not found")
    unknown = tmp_path / "notes.txt"
    unknown.write_text("hello")
    assert main(["check", str(unknown)]) == 2


def test_module_entry_point_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "data_prep", "check", str(tmp_path)], capture_output=True, text=True)
    assert ok.returncode == 2 and ok.stderr.startswith("error: ") and "Traceback" not in ok.stderr


def test_check_labels_only_reads_defects_without_masks_as_labels(synth_dir, capsys):
    """Masks removed: a problem each for training (with the hint to --labels-only), image-level labels with it."""
    import shutil

    defects = sum(1 for _ in synth_dir.glob("*/ground_truth/*/*.png"))
    for family in ("wood", "cap"):
        shutil.rmtree(synth_dir / family / "ground_truth")
    capsys.readouterr()
    assert main(["check", str(synth_dir)]) == 1
    out = capsys.readouterr().out
    assert _reported(out, "wood", "missing ground-truth mask") and "--labels-only" in out.splitlines()[-1]
    assert main(["check", str(synth_dir), "--labels-only"]) == 0
    out = capsys.readouterr().out
    assert "problem:" not in out and "16 ok, 0 problems" in out and defects > 0
    assert f"({defects} defective images without a mask: image-level labels)" in out
