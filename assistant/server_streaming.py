"""Streaming for the server: a chat completion as server-sent events, OpenAI's chunk format.

The first chunk carries the role, then one chunk per piece of text; the last chunk carries the finish
reason, ``usage`` and the ``anomaly_report``, and ``data: [DONE]`` ends the stream. An error after the
stream began is sent as an ``{"error": ...}`` event (the status is already 200).
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi.responses import StreamingResponse

from .server_admission import Slot
from .server_requests import APIError, ChatRequest

log = logging.getLogger("assistant.server")


def sse(payload) -> bytes:
    """One server-sent event holding `payload` as compact JSON."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def streaming(worker, chat: ChatRequest, image, references, meta: dict, slot: Slot) -> StreamingResponse:
    """The SSE response of `chat`, generated on `worker`'s thread; `slot` is released when the job ends."""
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
        return sse({"object": "chat.completion.chunk", **meta, "choices": [choice], **extra})

    async def events():
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield chunk({"content": value})
                elif kind == "done":
                    finish, usage, report = value
                    yield chunk({}, finish, usage=usage, anomaly_report=report)
                    break
                else:
                    error = value
                    yield sse(
                        {
                            "error": {
                                "message": error.message,
                                "type": "server_error" if error.status >= 500 else "invalid_request_error",
                                "code": error.code,
                            }
                        }
                    )
                    break
            yield b"data: [DONE]\n\n"
        finally:
            if future.cancel():  # the client left before the job started: it never runs
                slot.release()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
