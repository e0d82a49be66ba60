"""The app's HTTP hardening: an ASGI middleware that refuses files named by URL and caps non-upload bodies."""

from __future__ import annotations

import json


class RefuseFileURLs:
    """ASGI middleware: refuse requests that name a file by URL instead of uploading it.

    Gradio would fetch a public URL given as a file's path before any handler runs; the app takes
    images as uploads only. Bodies other than uploads are also capped (files travel as uploads).
    """

    def __init__(self, app, max_json_bytes: int = 1_000_000):
        self.app = app
        self.max_json_bytes = max_json_bytes

    async def __call__(self, scope, receive, send):
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        # every POST but file uploads, whatever content type the client claims
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or headers.get(b"content-type", b"").startswith(b"multipart/")
        ):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_json_bytes:
                return await _reply(send, 413, "request body too large")
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            payload = None  # not ours to judge: the app answers it
        if payload is not None and _names_file_by_url(payload):
            return await _reply(send, 400, "files must be uploaded; URLs and paths are not accepted")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def _names_file_by_url(payload) -> bool:
    """Whether any gradio file reference in a JSON payload has a URL (or inline data) as its path."""
    stack = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            meta = item.get("meta")
            path = item.get("path")
            if isinstance(meta, dict) and meta.get("_type") == "gradio.FileData" and isinstance(path, str):
                if "://" in path or path.startswith("data:"):
                    return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


async def _reply(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
