"""One exit-code wrapper for every entry point: what a user sees when something goes wrong."""

import subprocess
import sys
from pathlib import Path

import pytest

from assistant.errors import UsageError, run_main
from assistant.imageio import ImageInputError

ROOT = Path(__file__).resolve().parents[1]


class Custom(Exception):
    pass


def raising(error):
    def main(argv):
        raise error

    return main


@pytest.mark.parametrize(
    "error, code",
    [
        (UsageError("--n must be at least 1"), 2),
        (ImageInputError("'x.png'", "file is empty"), 2),
        (Custom("an entry point's own bad input"), 2),
        (RuntimeError("the disk\nis full"), 1),
        (KeyboardInterrupt(), 130),
    ],
)
def test_errors_map_to_one_line_and_an_exit_code(error, code, capsys, monkeypatch):
    monkeypatch.delenv("ANOMALY_ASSISTANT_DEBUG", raising=False)
    assert run_main(raising(error), [], bad_input=(Custom,)) == code
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    if code != 130:
        assert err == f"error: {' '.join(str(error).split())}\n"


def test_the_debug_variable_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("ANOMALY_ASSISTANT_DEBUG", "1")
    with pytest.raises(RuntimeError):
        run_main(raising(RuntimeError("boom")), [])


def test_a_return_code_passes_through():
    assert run_main(lambda argv: len(argv), ["a", "b", "c"]) == 3


@pytest.mark.parametrize(
    "command, message",
    [
        (["-m", "assistant", "ask", "missing.png"], "missing.png"),
        (["-m", "data_prep", "synth", "--out", "{tmp}/synth", "--n", "0"], "--n must be at least 1"),
        (["-m", "eval.run", "ad", "--data", "/nonexistent", "--model", "m", "--out", "{tmp}/run"], "/nonexistent"),
        (["-m", "train", "stage2", "configs/train/debug_tiny.yaml", "lora.rr=3", "output_dir={tmp}/train"], "lora.rr"),
        (["app.py", "--port", "99999"], "--port"),
    ],
    ids=["anomaly-assistant", "data_prep", "eval.run", "train", "app"],
)
def test_every_entry_point_answers_bad_input_with_one_line_and_exit_2(command, message, tmp_path):
    command = [part.replace("{tmp}", str(tmp_path)) for part in command]
    done = subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1] and "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())  # nothing written
