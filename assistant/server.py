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
- ``model`` must name the served model: the id ``GET /v1/models`` lists (the checkpoint folder's name, or
  ``--model``'s value as given, e.g. ``default``); any other name is refused as OpenAI does (404,
  code ``model_not_found``).

The reply's assistant message is the answer and ``usage`` counts its tokens (the prompt's include the
image tokens); an extra top-level ``anomaly_report`` holds the evidence (``AnomalyReport.evidence``, the
same fields as ``anomaly-assistant ask --json``, plus ``heatmap_png``, the overlay as base64 PNG),
computed from this request's own image (all ``null`` for a model without an expert). In a
stream both ride on the last chunk, just before ``data: [DONE]``. A follow-up turn of the same client with
the same image bytes reuses that client's report instead of running detection again.

Conversation KV caches are reused across turns per *session*, derived from the bearer token and the
request's ``user`` field, so different clients never share a cache.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .server_admission import Admission, Slot
from .server_requests import APIError, ChatRequest, check_model, decode_images, parse_request
from .server_streaming import streaming

log = logging.getLogger("assistant.server")


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
        for name in (
            "max_request_bytes",
            "max_tokens",
            "default_max_tokens",
            "max_prompt_chars",
            "max_images",
            "queue_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty")


# -- the model's side ------------------------------------------------------------------------------------
def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def anomaly_report(assistant, image, references) -> dict:
    """This image's evidence (`AnomalyReport.evidence`, as `ask --json` has it) and the overlay as base64 PNG."""
    from .inference import AnomalyReport

    if not assistant.has_expert:
        return {**AnomalyReport("", None, None, None, None, model=assistant.name).evidence(), "heatmap_png": None}
    report = assistant.detect(image, references)
    return {**report.evidence(), "heatmap_png": _png_base64(assistant.visualize(report))}


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

    def _prompt_tokens(self, request: ChatRequest, image, references) -> int:
        """Tokens of the prompt the model reads, image tokens included (the encoding is cached: no extra work)."""
        image, visual, pixels = self.assistant.encode(image, references)
        return int(self.assistant._inputs(request.messages, image, visual, pixels)["input_ids"].shape[-1])

    def _finish(self, request: ChatRequest, image, references, answer: str) -> tuple[str, dict]:
        """The finish reason and OpenAI's ``usage`` of one answer."""
        completion = len(self.assistant.processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
        prompt = self._prompt_tokens(request, image, references)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        return ("length" if completion >= request.max_tokens else "stop"), usage

    def complete(self, request: ChatRequest, image, references) -> tuple[str, str, dict, dict]:
        report = self.report(request, image, references)
        answer = self.assistant.chat(request.messages, image, references, stream=False, **self._options(request))
        return answer, *self._finish(request, image, references, answer), report

    def stream(self, request: ChatRequest, image, references, emit) -> None:
        """Emit ("text", chunk)…, then ("done", (finish_reason, usage, report)). A vanished client only stops
        emission: generation runs to its end so that the next request never overlaps it."""
        report = self.report(request, image, references)
        parts = []
        for chunk in self.assistant.chat(request.messages, image, references, stream=True, **self._options(request)):
            parts.append(chunk)
            emit(("text", chunk))
        emit(("done", (*self._finish(request, image, references, "".join(parts)), report)))

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
        raise APIError(
            401,
            "missing or wrong API key (send 'Authorization: Bearer <key>')",
            "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
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


def build_app(assistant, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving `assistant` (an `AnomalyAssistant`) under `settings`."""
    settings = settings or ServerSettings()
    model_id = settings.model_name or Path(str(assistant.name)).name or "default"
    served = tuple(dict.fromkeys([model_id, str(assistant.name)]))  # the listed id, and --model as given
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
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "anomaly-assistant"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        token = _check_token(request, settings)
        busy = APIError(
            429,
            f"the server is busy ({settings.queue_size} requests in progress); retry shortly",
            "server_busy",
            headers={"Retry-After": str(settings.retry_after_s)},
        )
        if admission.full:  # refuse before reading the body
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
            if isinstance(body, dict):
                check_model(body, served)
            chat = parse_request(body, settings, token)
            image, references = await run_in_threadpool(decode_images, chat.images, settings.max_request_bytes)
            meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
            if chat.stream:
                return streaming(worker, chat, image, references, meta, slot)
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
        answer, finish, usage, report = await asyncio.wrap_future(future)
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
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish, "logprobs": None}
        ],
        "usage": usage,
        "anomaly_report": report,
    }
    return JSONResponse(body)


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
