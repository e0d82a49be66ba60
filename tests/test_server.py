"""The OpenAI-compatible endpoint, driven by the official `openai` client against a real uvicorn server on loopback."""

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from conftest import random_image
from PIL import Image

KEY = "test-key-0123"
MODEL = "clip-llama"  # the id the server lists: the checkpoint folder's name
QUESTION = "Is there any anomaly in the image?"


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user_turn(*urls: str, text: str = QUESTION) -> dict:
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls],
    }


@contextlib.contextmanager
def running(app):
    """uvicorn in a thread on a free loopback port; stopped (should_exit) and joined on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def client(port, key=KEY, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120, **options)


@pytest.fixture(scope="module")
def assistant(clip_llama):
    from assistant.inference import AnomalyAssistant

    return AnomalyAssistant.from_pretrained(str(clip_llama))


@pytest.fixture(scope="module")
def server(assistant):
    from assistant.server import ServerSettings, build_app

    settings = ServerSettings(api_key=KEY, max_request_bytes=300_000, max_tokens=16, queue_size=32, max_images=3)
    with running(build_app(assistant, settings)) as port:
        yield port


def test_plain_completion_carries_the_answer_and_this_images_report(server, assistant):
    image = random_image(48, 64, seed=1)
    reply = client(server).chat.completions.create(model=MODEL, messages=[user_turn(png_data_url(image))], max_tokens=8)

    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    answer = reply.choices[0].message.content
    assert isinstance(answer, str) and answer.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")

    report = reply.model_extra["anomaly_report"]
    expected = assistant.detect(image)
    assert report["score"] == pytest.approx(expected.pred_score, abs=1e-5)
    assert report["anomalous"] == expected.pred_label
    assert report["threshold"] == pytest.approx(expected.threshold)
    assert report["boxes"] == expected.boxes
    overlay = Image.open(io.BytesIO(base64.b64decode(report["heatmap_png"])))
    assert (
        overlay.format == "PNG" and overlay.width == image.width and overlay.height >= image.height
    )  # a title band on top
    # the same answer the library gives for the same conversation (greedy)
    assert answer == assistant.chat([{"role": "user", "content": QUESTION}], image, stream=False, max_new_tokens=8)
    # usage counts the answer's tokens and a prompt that holds the image's tokens
    answer_tokens = len(assistant.processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
    assert reply.usage.completion_tokens == answer_tokens
    question_tokens = len(assistant.processor.tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    assert reply.usage.prompt_tokens > question_tokens + 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # the report is the one `ask --json` prints (same serialiser), plus the overlay
    assert set(report) == set(expected.evidence()) | {"heatmap_png"}


def test_an_unknown_model_name_is_refused_like_openai_does(server):
    with pytest.raises(openai.NotFoundError) as caught:
        client(server).chat.completions.create(model="gpt-4o", messages=[user_turn(png_data_url(random_image(32, 32)))])
    error = caught.value.body
    assert caught.value.status_code == 404 and error["code"] == "model_not_found" and error["param"] == "model"
    assert "gpt-4o" in error["message"] and MODEL in error["message"]


def test_streamed_completion_matches_the_plain_one_and_ends_with_the_report(server):
    image = random_image(40, 40, seed=2)
    messages = [{"role": "system", "content": "You inspect parts."}, user_turn(png_data_url(image))]
    api = client(server)
    plain = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)

    chunks = list(api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content
    last = chunks[-1]
    assert last.choices[0].finish_reason == plain.choices[0].finish_reason
    assert last.model_extra["anomaly_report"]["score"] == plain.model_extra["anomaly_report"]["score"]
    assert last.usage == plain.usage and last.usage.total_tokens > 0
    assert all("anomaly_report" not in (c.model_extra or {}) for c in chunks[:-1])

    # on the wire: server-sent events, the report on the last chunk, then [DONE]
    body = {"model": MODEL, "messages": messages, "max_tokens": 10, "stream": True}
    raw = httpx.post(
        f"http://127.0.0.1:{server}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: ") :] for line in raw.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "anomaly_report" in json.loads(events[-2])


def test_follow_ups_reuse_the_clients_own_cache_and_clients_stay_apart(server, assistant):
    image = random_image(32, 32, seed=3)
    api = client(server)
    first = [user_turn(png_data_url(image))]
    answer = (
        api.chat.completions.create(model=MODEL, messages=first, max_tokens=6, user="alice").choices[0].message.content
    )
    before = len(assistant.kv_cache)
    api.chat.completions.create(model=MODEL, messages=first, max_tokens=6, user="bob")
    assert len(assistant.kv_cache) == before + 1  # bob's cache is his own, not alice's

    hits = assistant.kv_cache.hits
    follow_up = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Where is it?"}]
    reply = api.chat.completions.create(model=MODEL, messages=follow_up, max_tokens=6, user="alice")
    assert assistant.kv_cache.hits == hits + 1
    expected = assistant.chat(
        [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "Where is it?"},
        ],
        image,
        stream=False,
        max_new_tokens=6,
        session="fresh-session",
    )
    assert reply.choices[0].message.content == expected


def _refusal(call):
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    error = caught.value
    body = error.response.json()["error"]
    assert body["type"] and body["code"] and body["message"]
    return error.status_code, body


def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server):
    api = client(server)
    good = png_data_url(random_image(32, 32, seed=4))
    ask = lambda messages, **kw: lambda: api.chat.completions.create(model=MODEL, messages=messages, **kw)  # noqa: E731

    # a URL is never fetched: a listener that the URL points at sees no connection
    with socket.socket() as trap:
        trap.bind(("127.0.0.1", 0))
        trap.listen()
        trap.settimeout(0.5)
        status, body = _refusal(ask([user_turn(f"http://127.0.0.1:{trap.getsockname()[1]}/part.png")]))
        assert status == 400 and body["code"] == "unsupported_image_url" and "data" in body["message"]
        with pytest.raises(socket.timeout):
            trap.accept()

    status, body = _refusal(ask([user_turn("data:image/png;base64,@@not base64@@")]))
    assert status == 400 and "base64" in body["message"]
    status, body = _refusal(
        ask([user_turn("data:image/png;base64," + base64.b64encode(b"hello, not an image").decode())])
    )
    assert status == 400 and body["code"] == "invalid_image" and "image" in body["message"]
    status, body = _refusal(ask([{"role": "user", "content": QUESTION}]))
    assert status == 400 and body["code"] == "missing_image"
    status, body = _refusal(ask([user_turn(png_data_url(random_image(400, 400, seed=5)))]))  # ~480 KB > 300 KB
    assert status == 413 and "limit" in body["message"]
    status, body = _refusal(ask([user_turn(good, good, good, good)]))
    assert status == 400 and body["code"] == "too_many_images"
    status, body = _refusal(ask([user_turn(good, text="x" * 20_000)]))
    assert status == 400 and body["code"] == "prompt_too_long"
    status, body = _refusal(ask([user_turn(good)], n=2))
    assert status == 400 and body["param"] == "n"
    with pytest.raises(openai.AuthenticationError) as caught:
        client(server, key="wrong-key").chat.completions.create(model=MODEL, messages=[user_turn(good)])
    assert caught.value.status_code == 401 and "API key" in caught.value.message
    no_token = httpx.post(
        f"http://127.0.0.1:{server}/v1/chat/completions", json={"model": MODEL, "messages": [user_turn(good)]}
    )
    assert no_token.status_code == 401 and no_token.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong-key").models.list()

    # still serving; max_tokens above the cap (16) is clamped, not refused
    reply = api.chat.completions.create(model=MODEL, messages=[user_turn(good)], max_tokens=10_000)
    assert reply.choices[0].message.content is not None and reply.model_extra["anomaly_report"]["score"] is not None
    assert [m.id for m in api.models.list()] == ["clip-llama"]
    assert httpx.get(f"http://127.0.0.1:{server}/health").json() == {"status": "ok"}


def _concurrent(port, n=20, max_tokens=6):
    """n clients at once, each with its own image; returns [(seed, reply or error)]."""
    barrier, results = threading.Barrier(n), [None] * n

    def one(i):
        api = client(port)
        barrier.wait(timeout=30)
        try:
            results[i] = api.chat.completions.create(
                model=MODEL,
                messages=[user_turn(png_data_url(random_image(32, 40, seed=100 + i)))],
                max_tokens=max_tokens,
                user=f"c{i}",
            )
        except openai.APIStatusError as error:
            results[i] = error

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    return results


def _check_own_reports(assistant, results):
    answered = [(i, r) for i, r in enumerate(results) if not isinstance(r, openai.APIStatusError)]
    expected = {i: assistant.detect(random_image(32, 40, seed=100 + i)).pred_score for i, _ in answered}
    assert len({round(s, 5) for s in expected.values()}) > len(expected) // 2  # the scores tell the images apart
    for i, reply in answered:
        assert reply.model_extra["anomaly_report"]["score"] == pytest.approx(expected[i], abs=1e-5), (
            f"client {i} got another report"
        )
    return answered


def test_twenty_clients_are_all_answered_each_with_its_own_report(server, assistant):
    results = _concurrent(server)
    assert not [r for r in results if isinstance(r, openai.APIStatusError)]
    assert len(_check_own_reports(assistant, results)) == 20


def test_a_full_queue_answers_429_at_once_and_the_rest_are_served(assistant):
    from assistant.server import ServerSettings, build_app

    app = build_app(assistant, ServerSettings(api_key=KEY, queue_size=2, max_tokens=16, retry_after_s=3))
    with running(app) as port:
        results = _concurrent(port, max_tokens=16)
        refused = [r for r in results if isinstance(r, openai.APIStatusError)]
        assert refused and all(r.status_code == 429 and r.response.headers["retry-after"] == "3" for r in refused)
        assert "busy" in refused[0].message
        assert len(_check_own_reports(assistant, results)) >= 2
        assert app.state.admission.active == 0
        # once the rush is over, requests are served again
        reply = client(port).chat.completions.create(
            model=MODEL, messages=[user_turn(png_data_url(random_image(32, 32)))], max_tokens=4
        )
        assert reply.choices[0].message.content is not None


def test_a_model_without_an_expert_reports_a_null_score(tmp_path):
    from fastapi.testclient import TestClient

    from assistant.inference import AnomalyAssistant
    from assistant.server import build_app
    from assistant.testing import tiny_assistant

    plain = AnomalyAssistant.from_pretrained(str(tiny_assistant(tmp_path / "plain", expert=False)))
    with TestClient(build_app(plain)) as http:
        body = {"model": "plain", "messages": [user_turn(png_data_url(random_image(32, 32)))], "max_tokens": 4}
        reply = http.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        report = reply.json()["anomaly_report"]
        assert report["score"] is None and report["anomalous"] is None and report["heatmap_png"] is None
        assert isinstance(reply.json()["choices"][0]["message"]["content"], str)
        assert http.post("/v1/chat/completions", content=b"{not json").json()["error"]["code"] == "invalid_json"
        assert http.get("/v1/nothing").status_code == 404


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--api-key-env", "ANOMALY_TEST_UNSET_VAR"], "ANOMALY_TEST_UNSET_VAR"),
        (["--api-key-file", "/nonexistent/key"], "--api-key-file"),
        (["--port", "70000"], "--port"),
        (["--queue-size", "0"], "--queue-size"),
    ],
)
def test_serve_refuses_bad_options_in_one_line(argv, message, capsys, monkeypatch):
    from assistant.cli import main

    monkeypatch.delenv("ANOMALY_TEST_UNSET_VAR", raising=False)
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_serve_command_answers_on_loopback(clip_llama, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    command = [
        sys.executable,
        "-m",
        "assistant",
        "serve",
        "--model",
        str(clip_llama),
        "--port",
        str(port),
        "--api-key-file",
        str(key_file),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        # the model named as it was given to --model is accepted too
        messages = [user_turn(png_data_url(random_image(32, 32)))]
        reply = client(port).chat.completions.create(model=str(clip_llama), messages=messages, max_tokens=4)
        assert reply.model_extra["anomaly_report"]["score"] is not None
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ask_cli(port, *argv, key_var="ANOMALY_TEST_KEY", key=KEY, via_env=False):
    """`anomaly-assistant ask ... --server` in a fresh process (`via_env`: the address in $ANOMALY_ASSISTANT_SERVER
    instead); it also says whether torch was imported there."""
    code = (
        "import sys\n"
        "from assistant.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    address = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", code, "ask", *argv, *([] if via_env else ["--server", address])]
    command += ["--api-key-env", key_var] if key_var else []
    env = {k: v for k, v in os.environ.items() if k != "ANOMALY_ASSISTANT_SERVER"}
    env.update({key_var or "UNUSED_VAR": key}, **({"ANOMALY_ASSISTANT_SERVER": address} if via_env else {}))
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_ask_with_server_prints_what_a_local_ask_prints_without_loading_a_model(server, assistant, tmp_path):
    image_path, reference_path = tmp_path / "part.png", tmp_path / "good.png"
    image, reference = random_image(48, 64, seed=5), random_image(48, 64, seed=6)
    image.save(image_path)
    reference.save(reference_path)
    heatmap = tmp_path / "out" / "overlay.png"

    done = _ask_cli(server, str(image_path), "--reference", str(reference_path), "--json", "--heatmap", str(heatmap))
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stderr  # the reason it answers in about a second
    printed = json.loads(done.stdout)
    # the same answer and evidence as the library's own `ask` path on the served model (16: the server's token cap)
    local = assistant.analyze(image, None, references=[reference], max_new_tokens=16)
    expected = local.to_dict(heatmap=str(heatmap))
    assert printed["answer"] == expected["answer"] and printed["answer"]
    assert printed["score"] == pytest.approx(expected["score"], abs=1e-5)
    assert {k: printed[k] for k in ("anomalous", "threshold", "boxes", "location", "model", "heatmap")} == {
        k: expected[k] for k in ("anomalous", "threshold", "boxes", "location", "model", "heatmap")
    }
    assert set(printed) == set(expected)
    with Image.open(heatmap) as overlay:  # the server's overlay, written where --heatmap said
        assert overlay.format == "PNG" and overlay.width == image.width
    assert not list(heatmap.parent.glob(".*partial*"))

    # the plain output: the verdict line and the answer, as a local run prints them
    done = _ask_cli(server, str(image_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    single = assistant.analyze(image, None, max_new_tokens=16)
    verdict = "ANOMALOUS" if single.pred_label else "normal"
    from assistant.calibration import shown

    score, threshold = shown(single.pred_score, single.threshold)
    assert lines[0].startswith(f"verdict: {verdict} (score {score}, threshold {threshold}")
    assert lines[1:] == [single.answer]


def test_ask_with_server_fails_in_one_line_when_the_server_cannot_answer(server, tmp_path):
    image_path = tmp_path / "part.png"
    random_image(32, 32).save(image_path)
    heatmap = tmp_path / "keep.png"
    heatmap.write_bytes(b"mine")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]

    cases = [
        (_ask_cli(closed, str(image_path)), "anomaly-assistant serve"),
        (_ask_cli(server, str(image_path), key="wrong-key"), "(401)"),
        (_ask_cli(server, str(image_path), key_var=None), "(401)"),  # no key given to a server that wants one
        (_ask_cli(server, str(tmp_path / "missing.png")), "no such file"),
        (_ask_cli(server, str(image_path), "--heatmap", str(heatmap)), "already exists"),
        (_ask_cli(server, str(image_path), "--model", "another"), "does not exist"),
    ]
    for done, message in cases:
        err = done.stderr.replace("torch imported: False", "").strip()
        assert done.returncode == 2, err
        assert err.startswith("error:") and message in err and "\n" not in err, err
    assert heatmap.read_bytes() == b"mine"  # nothing the user gave is written over


def test_the_server_named_in_the_environment_answers_every_ask(server, assistant, tmp_path):
    image_path = tmp_path / "part.png"
    image = random_image(48, 64, seed=7)
    image.save(image_path)

    done = _ask_cli(server, str(image_path), "--json", via_env=True)  # no --server on the command line
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stderr
    printed = json.loads(done.stdout)
    assert printed["answer"] == assistant.analyze(image, None, max_new_tokens=16).answer

    # an option that only a model loaded here can honour says where the server came from and how to load here
    done = _ask_cli(server, str(image_path), "--device", "cuda", via_env=True)
    err = done.stderr.replace("torch imported: False", "").strip()
    assert done.returncode == 2 and "ANOMALY_ASSISTANT_SERVER" in err and "--local" in err and "\n" not in err, err
    done = _ask_cli(server, str(image_path), "--local")  # --local and --server together
    err = done.stderr.replace("torch imported: False", "").strip()
    assert done.returncode == 2 and err.startswith("error: --local") and "\n" not in err, err
