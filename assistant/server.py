"""An OpenAI-compatible chat-completions endpoint, so existing OpenAI clients talk to the assistant unchanged.

    anomaly-assistant serve                                   # the embedded model on http://127.0.0.1:8000/v1
    ANOMALY_KEY=s3cret anomaly-assistant serve --model ./my-checkpoint --api-key-env ANOMALY_KEY --queue-size 4

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="s3cret")
    reply = client.chat.completions.create(model="default", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Is there a defect?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}])
    reply.choices[0].message.content, reply.model_extra["anomaly_report"]

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health`` (no token needed, no details).

Request rules (every refusal is ``{"error": {"message", "type", "code", "param"}}`` with a 4xx status):

- Images are ``image_url`` parts holding a ``data:image/...;base64,`` URL, all in the first user message:
  the first one is the image inspected, any further ones are images of the same object known to be
  normal (references). No URL is ever fetched: any other URL is refused with 400.
- The body is capped in bytes (413), the text of all messages in characters (400), the number of images
  (400). ``max_tokens`` (or ``max_completion_tokens``) above the server's cap is clamped to the cap,
  not refused; ``finish_reason`` is ``"length"`` when the answer used them all.
- ``temperature`` absent or 0 means greedy decoding; otherwise sampling with ``temperature``, ``top_p``
  and, when given, ``seed``. ``n`` must be 1; ``stop``, tools and logprobs are not supported (400).
- One model call runs at a time (a single worker thread); when ``queue_size`` requests are already
  waiting or running, a new one is answered 429 at once, with ``Retry-After``.
- A bearer token, when the server has one, is required on ``/v1`` routes (compared in constant time; 401).

The reply's assistant message is the answer; an extra top-level ``anomaly_report`` holds the evidence
(``score``, ``anomalous``, ``threshold``, ``boxes``, ``location``, ``heatmap_png`` — the overlay as
base64 PNG), computed from this request's own image (all ``null`` for a model without an expert). In a
stream it rides on the last chunk, just before ``data: [DONE]``. A follow-up turn of the same client with
the same image bytes reuses that client's report instead of running detection again.

Conversation KV caches are reused across turns per *session*, derived from the bearer token and the
request's ``user`` field, so different clients never share a cache.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import io
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .imageio import ImageInputError, image_from_upload
from .limits import MAX_IMAGE_PIXELS, MAX_QUESTION_CHARS

log = logging.getLogger("assistant.server")

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs", "response_format", "stop")


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None  #: bearer token required on /v1 routes; None: open (bind to loopback)
    max_request_bytes: int = 20 * 1024 * 1024  #: the whole JSON body
    max_tokens: int = 512  #: cap on generated tokens; larger requests are clamped to it
    default_max_tokens: int = 256  #: when the request gives none
    max_prompt_chars: int = 16_000  #: all message text together
    max_images: int = 5  #: the inspected image plus references
    queue_size: int = 8  #: requests waiting or running before 429
    retry_after_s: int = 2
    model_name: str | None = None  #: the id clients see; default: the checkpoint folder's name

    def __post_init__(self):
        for name in ("max_request_bytes", "max_tokens", "default_max_tokens", "max_prompt_chars", "max_images", "queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty")


class APIError(Exception):
    """A refusal in OpenAI's error shape."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers or {}

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        body = {"error": {"message": self.message, "type": kind, "code": self.code, "param": self.param}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class ChatRequest:
    """A validated request: plain-text messages, the images still as bytes, decoding options."""

    messages: list[dict]
    images: list[bytes]
    max_tokens: int
    stream: bool
    generate: dict
    seed: int | None
    session: str


class Admission:
    """Counts requests waiting or running; refuses beyond `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()

    def enter(self) -> "Slot | None":
        with self._lock:
            if self.active >= self.limit:
                return None
            self.active += 1
        return Slot(self)

    def _leave(self) -> None:
        with self._lock:
            self.active -= 1


class Slot:
    """One admitted request; `release` is idempotent, so every exit path may call it."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._admission._leave()


# -- parsing ---------------------------------------------------------------------------------------------
def _image_bytes(url, param: str, max_bytes: int) -> bytes:
    if not isinstance(url, str) or not url:
        raise APIError(400, "image_url.url must be a non-empty string", "invalid_image_url", param)
    if not url[:5].lower() == "data:":
        raise APIError(
            400,
            "image_url must be a data URL holding the image bytes (data:image/png;base64,...); "
            "this server never fetches URLs",
            "unsupported_image_url",
            param,
        )
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise APIError(400, "the image data URL must be base64-encoded (data:image/png;base64,...)", "invalid_image_url", param)
    media = header[5:-7].strip().lower()
    if media and not media.startswith("image/"):
        raise APIError(400, f"the data URL's media type must be image/*, not '{media[:40]}'", "invalid_image_url", param)
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise APIError(413, f"an image is over the limit of {max_bytes:,} bytes", "image_too_large", param)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "the image data is not valid base64", "invalid_base64", param) from None
    if not data:
        raise APIError(400, "the image data is empty", "invalid_image", param)
    return data


def _text_of(content, index: int, role: str, max_bytes: int, images: list | None) -> str:
    """The message's text; its image parts go to `images` (None: images are not allowed here)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"messages[{index}].content must be a string or a list of parts", "invalid_content", f"messages[{index}].content")
    texts = []
    for j, part in enumerate(content):
        param = f"messages[{index}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, "a text part needs a string 'text'", "invalid_content", param)
            texts.append(part["text"])
        elif kind == "image_url":
            if images is None:
                where = "the first user message" if role == "user" else "a user message"
                raise APIError(400, f"images must all be in {where} (the first is inspected, the others are normal references)", "misplaced_image", param)
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            images.append(_image_bytes(url, param, max_bytes))
        else:
            raise APIError(400, f"unsupported content part type {kind!r}; use 'text' or 'image_url'", "invalid_content", param)
    return "\n".join(texts)


def _number(body: dict, name: str, low: float, high: float, default=None, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", "invalid_value", name)
    if not low <= value <= high:
        raise APIError(400, f"'{name}' must be between {low} and {high}", "invalid_value", name)
    return value


def session_id(token: str | None, user) -> str:
    """The KV-cache session of a client: a digest of its bearer token and `user` field."""
    material = json.dumps([token or "", user if isinstance(user, str) else ""])
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def parse_request(body, settings: ServerSettings, token: str | None) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", "invalid_body")
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False, [], {"type": "text"}):
            raise APIError(400, f"'{name}' is not supported by this server", "unsupported_parameter", name)
    if body.get("n", 1) != 1:
        raise APIError(400, "'n' must be 1", "unsupported_parameter", "n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "invalid_messages", "messages")

    plain, images, seen_user, chars = [], [], False, 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise APIError(400, f"messages[{i}] needs a role of system, developer, user or assistant", "invalid_messages", f"messages[{i}]")
        role = _ROLES[message["role"]]
        first_user = role == "user" and not seen_user
        seen_user = seen_user or role == "user"
        text = _text_of(message.get("content"), i, role, settings.max_request_bytes, images if first_user else None)
        if len(text) > MAX_QUESTION_CHARS:
            raise APIError(400, f"messages[{i}] is too long ({len(text)} characters; at most {MAX_QUESTION_CHARS})", "prompt_too_long", f"messages[{i}]")
        chars += len(text)
        plain.append({"role": role, "content": text})
    if chars > settings.max_prompt_chars:
        raise APIError(400, f"the messages are too long ({chars} characters; at most {settings.max_prompt_chars})", "prompt_too_long", "messages")
    if plain[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user", "invalid_messages", "messages")
    if not plain[-1]["content"].strip():
        raise APIError(400, "the last user message has no text", "invalid_messages", "messages")
    if not images:
        raise APIError(400, "no image: put one in the first user message as an image_url part with a data:image/...;base64 URL", "missing_image", "messages")
    if len(images) > settings.max_images:
        raise APIError(400, f"too many images ({len(images)}; at most {settings.max_images})", "too_many_images", "messages")

    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = settings.default_max_tokens if requested is None else _number({"max_tokens": requested}, "max_tokens", 1, 1 << 31, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", "invalid_value", "stream")
    temperature = _number(body, "temperature", 0, 2, default=0)
    top_p = _number(body, "top_p", 0, 1, default=1)
    seed = _number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
    generate = {} if temperature == 0 else {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p) or 1e-6}
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise APIError(400, "'user' must be a string", "invalid_value", "user")
    return ChatRequest(plain, images, min(max_tokens, settings.max_tokens), stream, generate, seed, session_id(token, user))


# -- the model's side ------------------------------------------------------------------------------------
def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def anomaly_report(assistant, image, references) -> dict:
    """This image's evidence: score, verdict, boxes, location and the overlay as base64 PNG."""
    if not assistant.has_expert:
        return {"score": None, "anomalous": None, "threshold": None, "boxes": [], "location": None, "heatmap_png": None, "model": assistant.name}
    report = assistant.detect(image, references)
    return {
        "score": round(float(report.pred_score), 6),
        "anomalous": bool(report.pred_label),
        "threshold": None if report.threshold is None else float(report.threshold),
        "boxes": report.boxes,
        "location": report.location or None,
        "heatmap_png": _png_base64(assistant.visualize(report)),
        "model": assistant.name,
    }


class ModelWorker:
    """Runs every model call on one thread, one at a time.

    Reports are kept for the last few (session, images) pairs, so a follow-up turn does not run detection
    again; the key includes the session, so one client's cached report never serves another client.
    """

    def __init__(self, assistant, report_cache_size: int = 16):
        self.assistant = assistant
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anomaly-model")
        self._reports: OrderedDict[str, dict] = OrderedDict()  # touched on the worker thread only
        self._report_cache_size = report_cache_size

    def report(self, request: ChatRequest, image, references) -> dict:
        digest = hashlib.sha256(request.session.encode())
        for data in request.images:
            digest.update(hashlib.sha256(data).digest())
        key = digest.hexdigest()
        if key in self._reports:
            self._reports.move_to_end(key)
            return self._reports[key]
        report = anomaly_report(self.assistant, image, references)
        self._reports[key] = report
        while len(self._reports) > self._report_cache_size:
            self._reports.popitem(last=False)
        return report

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _options(self, request: ChatRequest) -> dict:
        if request.seed is not None and request.generate:
            import torch

            torch.manual_seed(request.seed)  # safe: generation runs one request at a time
        return dict(max_new_tokens=request.max_tokens, session=request.session, **request.generate)

    def _finish(self, answer: str, max_tokens: int) -> str:
        tokens = len(self.assistant.processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
        return "length" if tokens >= max_tokens else "stop"

    def complete(self, request: ChatRequest, image, references) -> tuple[str, str, dict]:
        report = self.report(request, image, references)
        answer = self.assistant.chat(request.messages, image, references, stream=False, **self._options(request))
        return answer, self._finish(answer, request.max_tokens), report

    def stream(self, request: ChatRequest, image, references, emit) -> None:
        """Emit ("text", chunk)…, then ("done", (finish_reason, report)). A vanished client only stops emission:
        generation runs to its end so that the next request never overlaps it."""
        report = self.report(request, image, references)
        parts = []
        for chunk in self.assistant.chat(request.messages, image, references, stream=True, **self._options(request)):
            parts.append(chunk)
            emit(("text", chunk))
        emit(("done", (self._finish("".join(parts), request.max_tokens), report)))

    def submit(self, fn, *args):
        return self._executor.submit(fn, *args)


# -- the app ---------------------------------------------------------------------------------------------
def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _check_token(request: Request, settings: ServerSettings) -> str | None:
    token = _bearer(request)
    if settings.api_key is None:
        return token
    if token is None or not hmac.compare_digest(token.encode(), settings.api_key.encode()):
        raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", "invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    return token


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = APIError(413, f"the request body is over the limit of {limit:,} bytes", "request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_images(images: list[bytes], max_bytes: int):
    decoded = []
    for i, data in enumerate(images):
        name = "the image" if i == 0 else f"reference image {i}"
        try:
            decoded.append(image_from_upload(data, max_bytes=max_bytes, max_pixels=MAX_IMAGE_PIXELS, name=name))
        except ImageInputError as error:
            raise APIError(400, str(error), "invalid_image", "messages") from None
    return decoded[0], decoded[1:]


def _sse(payload) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def build_app(assistant, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving `assistant` (an `AnomalyAssistant`) under `settings`."""
    settings = settings or ServerSettings()
    model_id = settings.model_name or Path(str(assistant.name)).name or "default"
    worker = ModelWorker(assistant)
    admission = Admission(settings.queue_size)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(worker.close)

    app = FastAPI(title="anomaly-assistant", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.admission = admission
    app.state.settings = settings

    @app.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return APIError(error.status_code, str(error.detail), code).response()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        _check_token(request, settings)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "anomaly-assistant"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        token = _check_token(request, settings)
        busy = APIError(429, f"the server is busy ({settings.queue_size} requests in progress); retry shortly", "server_busy",
                        headers={"Retry-After": str(settings.retry_after_s)})
        if admission.active >= admission.limit:  # refuse before reading the body
            raise busy
        raw = await _read_body(request, settings.max_request_bytes)
        slot = admission.enter()
        if slot is None:
            raise busy
        try:
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise APIError(400, "the body is not valid JSON", "invalid_json") from None
            chat = parse_request(body, settings, token)
            image, references = await run_in_threadpool(_decode_images, chat.images, settings.max_request_bytes)
            meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
            if chat.stream:
                return _streaming(worker, chat, image, references, meta, slot)
            return await _complete(worker, chat, image, references, meta, slot)
        except BaseException:
            slot.release()
            raise

    return app


async def _complete(worker: ModelWorker, chat: ChatRequest, image, references, meta: dict, slot: Slot) -> JSONResponse:
    def job():
        try:
            return worker.complete(chat, image, references)
        finally:
            slot.release()

    future = worker.submit(job)
    try:
        answer, finish, report = await asyncio.wrap_future(future)
    except asyncio.CancelledError:  # the client left; a job not yet started never runs
        if future.cancel():
            slot.release()
        raise
    except ValueError as error:  # the assistant refused the input (e.g. a message over its limit)
        raise APIError(400, " ".join(str(error).split()), "invalid_request") from None
    except Exception:
        log.exception("chat completion failed")
        raise APIError(500, "the model failed on this request; see the server log", "internal_error") from None
    body = {
        "object": "chat.completion",
        **meta,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish, "logprobs": None}],
        "anomaly_report": report,
    }
    return JSONResponse(body)


def _streaming(worker: ModelWorker, chat: ChatRequest, image, references, meta: dict, slot: Slot) -> StreamingResponse:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    def job():
        try:
            worker.stream(chat, image, references, emit)
        except ValueError as error:
            emit(("error", APIError(400, " ".join(str(error).split()), "invalid_request")))
        except Exception:
            log.exception("streamed chat completion failed")
            emit(("error", APIError(500, "the model failed on this request; see the server log", "internal_error")))
        finally:
            slot.release()

    future = worker.submit(job)

    def chunk(delta: dict, finish=None, **extra) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return _sse({"object": "chat.completion.chunk", **meta, "choices": [choice], **extra})

    async def events():
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield chunk({"content": value})
                elif kind == "done":
                    finish, report = value
                    yield chunk({}, finish, anomaly_report=report)
                    break
                else:
                    error = value
                    yield _sse({"error": {"message": error.message, "type": "server_error" if error.status >= 500 else "invalid_request_error", "code": error.code}})
                    break
            yield b"data: [DONE]\n\n"
        finally:
            if future.cancel():  # the client left before the job started: it never runs
                slot.release()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def serve(
    model: str = "default",
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServerSettings | None = None,
    device: str = "cpu",
    expert: str | None = None,
    log_level: str = "info",
) -> None:
    """Load `model` and serve it with uvicorn until interrupted."""
    import uvicorn

    from .inference import AnomalyAssistant

    assistant = AnomalyAssistant.from_pretrained(model, device=device, expert=expert)
    app = build_app(assistant, settings or ServerSettings())
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
