"""The chat app (app.py) as its users meet it: a live server on loopback, driven by `gradio_client`.

Every expected value is computed in-process with the same `AnomalyAssistant` on the same image, so a
response that belongs to another request or another session cannot pass.
"""

import concurrent.futures
import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import random_image
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 6


def load_app():
    """app.py is a script at the repository root, not part of the installed package: load it once."""
    if "app" not in sys.modules:
        spec = importlib.util.spec_from_file_location("app", ROOT / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["app"] = module  # before running it: dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["app"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(assistant, **settings):
    """Serve the app on a free loopback port for the duration of the block; always closed."""
    app = load_app()
    settings = app.AppSettings(port=free_port(), max_new_tokens=MAX_NEW_TOKENS, **settings)
    demo = app.build_app(assistant, settings)
    app.launch(demo, settings, block=False, quiet=True)
    try:
        yield f"http://127.0.0.1:{settings.port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def assistant(clip_llama):
    from assistant.inference import AnomalyAssistant

    return AnomalyAssistant.from_pretrained(str(clip_llama))


@pytest.fixture(scope="module")
def server(assistant):
    with running_app(assistant, max_upload_mb=1, concurrency=1, queue_size=32) as url:
        yield url


@pytest.fixture
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def _png(tmp_path, name, height=48, width=64, seed=0) -> Path:
    path = tmp_path / name
    random_image(height, width, seed=seed).save(path)
    return path


def _analyze(client, path, question="Is there a defect?", references=()):
    from gradio_client import handle_file

    return client.predict(
        handle_file(str(path)), question, [handle_file(str(r)) for r in references], api_name="/analyze"
    )


def _assert_serving(client, tmp_path, assistant):
    path = _png(tmp_path, "after.png", seed=99)
    answer, overlay, report = _analyze(client, path)
    assert report["score"] == pytest.approx(assistant.detect(Image.open(path)).pred_score, abs=1e-5)


# -- the named endpoint -------------------------------------------------------------------------------
def test_analyze_returns_the_answer_the_overlay_and_the_report(client, assistant, tmp_path):
    path = _png(tmp_path, "part.png", 56, 72, seed=3)
    answer, overlay, report = _analyze(client, path, "Where is the defect?")

    expected = assistant.analyze(Image.open(path), "Where is the defect?", max_new_tokens=MAX_NEW_TOKENS)
    assert answer == expected.answer and answer  # greedy decoding: the same words as in-process
    assert report == json.loads(json.dumps(expected.to_dict()))
    assert report["score"] is not None and report["anomalous"] == (report["score"] >= expected.threshold)
    shown = np.asarray(Image.open(overlay).convert("RGB"))
    assert np.array_equal(shown, np.asarray(assistant.visualize(expected)))  # PNG: pixel for pixel


def test_analyze_uses_the_references_and_a_default_question(client, assistant, tmp_path):
    path, good = _png(tmp_path, "part.png", seed=4), _png(tmp_path, "good.png", seed=5)
    answer, _, report = _analyze(client, path, "", references=[good])

    expected = assistant.analyze(Image.open(path), None, references=[Image.open(good)], max_new_tokens=MAX_NEW_TOKENS)
    assert report["score"] == pytest.approx(expected.pred_score, abs=1e-5)
    assert report["score"] != pytest.approx(assistant.detect(Image.open(path)).pred_score, abs=1e-5)
    assert answer == expected.answer


# -- bad input ----------------------------------------------------------------------------------------
def _corrupt_png(tmp_path):
    good = _png(tmp_path, "whole.png").read_bytes()
    path = tmp_path / "corrupt.png"
    path.write_bytes(good[: len(good) // 2])
    return path


def _text_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are notes, not pixels\n" * 20)
    return path


def _svg_named_png(tmp_path):
    path = tmp_path / "drawing.png"
    path.write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (_corrupt_png, "rejected: .*truncated"),
        (_text_named_png, "rejected: not a PNG"),
        (_svg_named_png, "rejected: not a PNG"),
    ],
    ids=["corrupt-bytes", "text-renamed-png", "svg-renamed-png"],
)
def test_a_bad_upload_gets_an_error_and_the_server_keeps_serving(client, assistant, tmp_path, make, message, capfd):
    from gradio_client.exceptions import AppError

    capfd.readouterr()
    with pytest.raises(AppError, match=message):
        _analyze(client, make(tmp_path))
    with pytest.raises(AppError, match="reference image was rejected"):
        _analyze(client, _png(tmp_path, "ok.png"), references=[make(tmp_path)])
    _assert_serving(client, tmp_path, assistant)
    assert "Traceback" not in capfd.readouterr().err  # refused on purpose: nothing for the log


def test_an_oversize_upload_is_refused_by_the_server(server, client, assistant, tmp_path):
    big = tmp_path / "big.png"
    random_image(700, 700, seed=1).save(big)  # noise does not compress: about 1.4 MB, over the 1 MB cap
    assert big.stat().st_size > 1024 * 1024
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # gradio_client checks first
        _analyze(client, big)
    with big.open("rb") as stream:  # a client that does not check is refused by the server itself
        response = httpx.post(
            server + "gradio_api/upload", files={"files": ("big.png", stream, "image/png")}, timeout=60
        )
    assert response.status_code == 413
    _assert_serving(client, tmp_path, assistant)


def _join(server, data, session="raw-session", headers=None):
    """Call /analyze the way a hand-written client would: no upload, file references made up."""
    config = httpx.get(server + "config", timeout=30).json()
    fn = next(dep["id"] for dep in config["dependencies"] if dep.get("api_name") == "analyze")
    body = {"data": data, "fn_index": fn, "session_hash": session, "event_data": None, "trigger_id": None}
    headers = {"content-type": "application/json"} if headers is None else headers
    join = httpx.post(server + "gradio_api/queue/join", content=json.dumps(body), headers=headers, timeout=30)
    if join.status_code != 200:
        return join.status_code, join.json()
    with httpx.stream("GET", server + "gradio_api/queue/data", params={"session_hash": session}, timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if event.get("msg") == "process_completed":
                    return 200, event
    raise AssertionError("the event stream ended without a result")


def _file(path):
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


@pytest.mark.parametrize(
    "reference",
    [
        _file("https://example.com/part.png"),
        {**_file("data:image/png;base64,iVBORw0KGgo="), "url": "data:image/png;base64,iVBORw0KGgo="},
    ],
    ids=["url", "data-url"],
)
def test_urls_are_refused_before_anything_is_fetched(server, client, assistant, tmp_path, reference):
    status, reply = _join(server, [reference, "q", []])
    assert status == 400 and "must be uploaded" in reply["error"]
    status, reply = _join(server, [_file(str(ROOT / "examples" / "pill_good.png")), "q", [reference]])
    assert status == 400
    status, reply = _join(server, [reference, "q", []], headers={})  # whatever content type is claimed
    assert status == 400
    _assert_serving(client, tmp_path, assistant)


def test_a_path_on_the_server_is_not_read(server, client, assistant, tmp_path):
    secret = _png(tmp_path, "secret.png", seed=7)  # a real image, readable by the server, never uploaded
    status, event = _join(server, [_file(str(secret)), "q", []])
    assert status == 200 and event["success"] is False and "data" not in event["output"]
    _assert_serving(client, tmp_path, assistant)


def test_an_over_long_question_is_refused(client, capfd):
    from gradio_client.exceptions import AppError

    capfd.readouterr()
    with pytest.raises(AppError, match="too long"):
        _analyze(client, ROOT / "examples" / "pill_good.png", "why? " * 1000)
    assert "Traceback" not in capfd.readouterr().err


# -- chat sessions ------------------------------------------------------------------------------------
def _texts(chat):
    """Gradio 6 chat messages carry their content as a list of typed parts."""
    return [(m["role"], "".join(p["text"] for p in m["content"] if p.get("type") == "text")) for m in chat]


def test_chat_keeps_each_sessions_conversation_and_image_apart(server, assistant, tmp_path):
    from gradio_client import Client, handle_file

    first, second = Client(server, verbose=False), Client(server, verbose=False)
    wood, cap = ROOT / "examples" / "wood_stain.png", ROOT / "examples" / "cap_cut_paste.png"

    def ask(client, question, path):
        _, chat, _, _, report = client.predict(question, handle_file(str(path)), [], api_name="/ask")
        return _texts(chat), report

    chat_1, report_1 = ask(first, "Is the wood damaged?", wood)
    chat_2, report_2 = ask(second, "Is the cap damaged?", cap)
    chat_3, report_3 = ask(first, "Where exactly?", wood)

    # each session's own turns, nothing from the other; the follow-up answer continues the first chat
    turns = [
        {"role": "user", "content": "Is the wood damaged?"},
        {"role": "assistant", "content": chat_1[1][1]},
        {"role": "user", "content": "Where exactly?"},
    ]
    follow_up = assistant.chat(turns, Image.open(wood), stream=False, max_new_tokens=MAX_NEW_TOKENS).strip()
    assert [text for _, text in chat_3] == ["Is the wood damaged?", chat_1[1][1], "Where exactly?", follow_up]
    assert [role for role, _ in chat_3] == ["user", "assistant", "user", "assistant"]
    assert [text for _, text in chat_2][0] == "Is the cap damaged?" and len(chat_2) == 2
    assert report_3["answer"] == follow_up
    for report, path in [(report_1, wood), (report_2, cap), (report_3, wood)]:
        assert report["score"] == pytest.approx(assistant.detect(Image.open(path)).pred_score, abs=1e-5)


def test_a_blank_chat_question_asks_the_default_question_as_the_cli_does(server, assistant):
    from gradio_client import Client, handle_file

    from assistant.inference import DEFAULT_QUESTION

    wood = ROOT / "examples" / "wood_stain.png"
    _, chat, _, _, report = Client(server, verbose=False).predict("   ", handle_file(str(wood)), [], api_name="/ask")
    expected = assistant.analyze(Image.open(wood), None, max_new_tokens=MAX_NEW_TOKENS)
    assert _texts(chat) == [("user", DEFAULT_QUESTION), ("assistant", expected.answer)]
    assert report["answer"] == expected.answer


def test_twenty_concurrent_clients_each_get_their_own_verdict(server, assistant, tmp_path):
    from gradio_client import Client

    paths = [_png(tmp_path, f"part{i}.png", 40 + 2 * i, 48 + 3 * i, seed=100 + i) for i in range(20)]
    expected = [assistant.detect(Image.open(path)).pred_score for path in paths]
    assert min(abs(a - b) for i, a in enumerate(expected) for b in expected[i + 1 :]) > 1e-4  # tellable apart

    def one(path):
        return _analyze(Client(server, verbose=False), path)

    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, paths, timeout=150))

    assert len(results) == 20
    for path, score, (answer, overlay, report) in zip(paths, expected, results):
        assert report["score"] == pytest.approx(score, abs=1e-5)
        assert Image.open(overlay).width == Image.open(path).width  # the overlay is drawn on this image


def test_auth_is_required_when_set(assistant, tmp_path):
    from gradio_client import Client

    path = _png(tmp_path, "login.png", seed=11)
    with running_app(assistant, auth=("inspector", "s3cret")) as url:
        assert httpx.get(url + "config", timeout=30).status_code == 401
        with pytest.raises(Exception):
            Client(url, auth=("inspector", "wrong"), verbose=False)
        client = Client(url, auth=("inspector", "s3cret"), verbose=False)
        _, _, report = _analyze(client, path)
        assert report["score"] == pytest.approx(assistant.detect(Image.open(path)).pred_score, abs=1e-5)


# -- command line and shipped files -------------------------------------------------------------------
def test_bad_model_is_one_line_and_exit_2_before_gradio_loads(tmp_path):
    # with no --model the shipped default model loads and the app serves, so bad models are named explicitly
    code = "import sys; sys.path.insert(0, sys.argv[1]); import app; rc = app.main(sys.argv[2:]); print(rc, 'gradio' in sys.modules)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for argv, expected in (
        (["--model", str(ROOT / "no-such-checkpoint")], "no-such-checkpoint"),
        (["--model", str(tmp_path)], "config.json"),
    ):
        result = subprocess.run(
            [sys.executable, "-c", code, str(ROOT), *argv], capture_output=True, text=True, timeout=120, env=env
        )
        assert result.stdout.split() == ["2", "False"], result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], result.stderr


def test_settings_default_to_loopback_and_refuse_bad_values():
    app = load_app()
    args, settings = app.parse_settings([], environ={})
    assert settings.host == "127.0.0.1" and settings.auth is None
    assert args.model == "default"  # the embedded default model when none is named
    _, settings = app.parse_settings(["--auth", "me:pa:ss", "--max-upload-mb", "2"], environ={})
    assert settings.auth == ("me", "pa:ss") and settings.max_upload_bytes == 2 * 1024 * 1024
    _, settings = app.parse_settings([], environ={app.AUTH_ENV: "env:pw"})
    assert settings.auth == ("env", "pw")
    for argv in (
        ["--auth", "nopassword"],
        ["--auth", ":pw"],
        ["--concurrency", "0"],
        ["--queue-size", "0"],
        ["--max-upload-mb", "0"],
    ):
        with pytest.raises(app.UsageError):
            app.parse_settings(argv, environ={})


def test_uploads_are_read_from_the_upload_folder_only(tmp_path):
    app = load_app()
    settings = app.AppSettings(max_upload_mb=0.01)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    small, big, outside = uploads / "small.png", uploads / "big.png", tmp_path / "outside.png"
    random_image(20, 20).save(small)
    random_image(120, 120).save(big)  # noise: about 43 KB, over the 10 KB cap
    random_image(20, 20).save(outside)

    from assistant.app_uploads import UploadRejected, read_upload

    assert read_upload({"path": str(small)}, str(uploads), settings.max_upload_bytes, "image").size == (20, 20)
    for value, reason in [
        ({"path": str(big)}, "over the limit"),
        ({"path": str(outside)}, "not an upload"),
        ({"path": str(uploads / ".." / "outside.png")}, "not an upload"),
        ({"path": "https://example.com/x.png"}, "URLs"),
        ({"path": None, "url": "data:image/png;base64,AAAA"}, "as files"),
        ("/etc/passwd", "as files"),
    ]:
        with pytest.raises(UploadRejected, match=reason):
            read_upload(value, str(uploads), settings.max_upload_bytes, "image")


def test_examples_are_small_images_of_the_kinds_promised():
    examples = sorted((ROOT / "examples").glob("*.png"))
    assert 2 <= len(examples) <= 6
    for path in examples:
        assert path.stat().st_size < 150_000
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 64
    assert any("good" in path.stem for path in examples) and any("good" not in path.stem for path in examples)
