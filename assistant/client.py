"""`anomaly-assistant ask --server URL`: ask a running `anomaly-assistant serve` instead of loading a model.

A local `ask` spends most of its time importing torch and transformers (4-5 s of 6-7 s on 2 CPU cores;
docs/benchmarks.md) before the model answers in about a second. A server loads them once; this client
imports neither (the standard library's `urllib` and `json` only), sends the image files' own bytes in the
server's OpenAI-style request (`assistant.server`) and returns the answer with the same evidence
`ask --json` prints locally, so the command's output does not depend on where the model ran.

Errors are `UsageError`s (one line, exit 2) when the request or the address is at fault, `ServerError`
(exit 1) when the server failed or is busy (429: try again).
"""

from __future__ import annotations

import base64
import json
import mimetypes
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .errors import UsageError

#: seconds to wait for one answer (detection and generation on a busy CPU server, a first set of references)
TIMEOUT_S = 600.0


class ServerError(RuntimeError):
    """The server answered with a failure of its own (5xx) or something that is not its API."""


def api_base(server: str) -> str:
    """The server's address as ``http(s)://host[:port][/prefix]``; a trailing ``/v1`` is accepted and dropped."""
    parsed = urllib.parse.urlsplit(server.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UsageError(f"--server must be an http:// or https:// address, e.g. http://127.0.0.1:8000, not '{server}'")
    path = parsed.path.rstrip("/")
    path = path[: -len("/v1")] if path.endswith("/v1") else path
    return f"{parsed.scheme}://{parsed.netloc}{path}"


def _image_url(path: Path) -> str:
    """The file's bytes as a data URL; the server decodes them by their content, the media type is a label."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"cannot read '{path}': no such file") from None
    except IsADirectoryError:
        raise UsageError(f"cannot read '{path}': is a directory, not an image file") from None
    except OSError as error:
        raise UsageError(f"cannot read '{path}': {error.strerror or error}") from None
    if not data:
        raise UsageError(f"cannot read '{path}': file is empty")
    media = mimetypes.guess_type(path.name)[0] or "image/png"
    if not media.startswith("image/"):
        media = "image/png"
    return f"data:{media};base64," + base64.b64encode(data).decode("ascii")


def _call(url: str, api_key: str | None, body: dict | None = None, timeout: float = TIMEOUT_S) -> dict:
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
    except urllib.error.HTTPError as error:
        message = _error_message(error)
        if error.code == 429:  # busy: nothing wrong with the request, try again
            raise ServerError(f"the server is busy (429): {message}") from None
        if error.code < 500:
            raise UsageError(f"the server refused the request ({error.code}): {message}") from None
        raise ServerError(f"the server failed ({error.code}): {message}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        raise UsageError(
            f"cannot reach the server at {url} ({reason}); start one with `anomaly-assistant serve`"
        ) from None
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ServerError(f"{url} did not answer with JSON: is it an anomaly-assistant server?") from None


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read())
        message = body["error"]["message"]
    except Exception:  # noqa: BLE001 - not the server's error shape: fall back to the status line
        message = error.reason
    return " ".join(str(message).split())


def served_model(base: str, api_key: str | None) -> str:
    """The id of the model the server serves (``GET /v1/models``)."""
    listing = _call(f"{base}/v1/models", api_key, timeout=30)
    try:
        return listing["data"][0]["id"]
    except (KeyError, IndexError, TypeError):
        raise ServerError(f"{base}/v1/models lists no model: is it an anomaly-assistant server?") from None


def ask_server(
    server: str,
    image: Path,
    references: list[Path],
    question: str,
    *,
    model: str | None = None,
    api_key: str | None = None,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> tuple[str, dict]:
    """Ask the server about `image` (with `references`, images known to be normal): the answer and the
    report (`AnomalyReport.evidence`'s fields plus ``heatmap_png``, the overlay as base64 PNG or None).

    `model` None asks whatever the server serves; a name it does not serve is refused by the server.
    `temperature` 0 is greedy decoding, as `ask` does without ``--sample``.
    """
    base = api_base(server)
    content = [{"type": "text", "text": question}]
    content += [{"type": "image_url", "image_url": {"url": _image_url(path)}} for path in [image, *references]]
    body = {
        "model": model or served_model(base, api_key),
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    if temperature > 0:
        body["top_p"] = top_p
        if seed is not None:
            body["seed"] = seed
    reply = _call(f"{base}/v1/chat/completions", api_key, body)
    try:
        answer = reply["choices"][0]["message"]["content"]
        report = reply["anomaly_report"]
    except (KeyError, IndexError, TypeError):
        raise ServerError(
            f"{base} answered without an anomaly report: is it an anomaly-assistant server (`anomaly-assistant serve`)?"
        ) from None
    return (answer or "").strip(), report
