"""Request parsing for the server: OpenAI chat-completions bodies checked and turned into a `ChatRequest`.

Every refusal is an `APIError`, answered in OpenAI's error shape ``{"error": {"message", "type", "code",
"param"}}`` with a 4xx status. The rules are listed in `assistant.server`'s module doc.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

from .imageio import ImageInputError, image_from_upload
from .limits import MAX_IMAGE_PIXELS, MAX_QUESTION_CHARS

if TYPE_CHECKING:
    from .server import ServerSettings

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_UNSUPPORTED = (
    "tools",
    "functions",
    "tool_choice",
    "function_call",
    "logprobs",
    "top_logprobs",
    "response_format",
    "stop",
)


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
        raise APIError(
            400, "the image data URL must be base64-encoded (data:image/png;base64,...)", "invalid_image_url", param
        )
    media = header[5:-7].strip().lower()
    if media and not media.startswith("image/"):
        raise APIError(
            400, f"the data URL's media type must be image/*, not '{media[:40]}'", "invalid_image_url", param
        )
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
        raise APIError(
            400,
            f"messages[{index}].content must be a string or a list of parts",
            "invalid_content",
            f"messages[{index}].content",
        )
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
                raise APIError(
                    400,
                    f"images must all be in {where} (the first is inspected, the others are normal references)",
                    "misplaced_image",
                    param,
                )
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            images.append(_image_bytes(url, param, max_bytes))
        else:
            raise APIError(
                400, f"unsupported content part type {kind!r}; use 'text' or 'image_url'", "invalid_content", param
            )
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
            raise APIError(
                400,
                f"messages[{i}] needs a role of system, developer, user or assistant",
                "invalid_messages",
                f"messages[{i}]",
            )
        role = _ROLES[message["role"]]
        first_user = role == "user" and not seen_user
        seen_user = seen_user or role == "user"
        text = _text_of(message.get("content"), i, role, settings.max_request_bytes, images if first_user else None)
        if len(text) > MAX_QUESTION_CHARS:
            raise APIError(
                400,
                f"messages[{i}] is too long ({len(text)} characters; at most {MAX_QUESTION_CHARS})",
                "prompt_too_long",
                f"messages[{i}]",
            )
        chars += len(text)
        plain.append({"role": role, "content": text})
    if chars > settings.max_prompt_chars:
        raise APIError(
            400,
            f"the messages are too long ({chars} characters; at most {settings.max_prompt_chars})",
            "prompt_too_long",
            "messages",
        )
    if plain[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user", "invalid_messages", "messages")
    if not plain[-1]["content"].strip():
        raise APIError(400, "the last user message has no text", "invalid_messages", "messages")
    if not images:
        raise APIError(
            400,
            "no image: put one in the first user message as an image_url part with a data:image/...;base64 URL",
            "missing_image",
            "messages",
        )
    if len(images) > settings.max_images:
        raise APIError(
            400, f"too many images ({len(images)}; at most {settings.max_images})", "too_many_images", "messages"
        )

    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = (
        settings.default_max_tokens
        if requested is None
        else _number({"max_tokens": requested}, "max_tokens", 1, 1 << 31, integer=True)
    )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", "invalid_value", "stream")
    temperature = _number(body, "temperature", 0, 2, default=0)
    top_p = _number(body, "top_p", 0, 1, default=1)
    seed = _number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
    generate = (
        {}
        if temperature == 0
        else {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p) or 1e-6}
    )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise APIError(400, "'user' must be a string", "invalid_value", "user")
    return ChatRequest(
        plain, images, min(max_tokens, settings.max_tokens), stream, generate, seed, session_id(token, user)
    )


def check_model(body: dict, served: tuple[str, ...]) -> None:
    """Refuse a `model` this server does not serve, as OpenAI does (404, code ``model_not_found``)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' must be a non-empty string (GET /v1/models lists it)", "invalid_value", "model")
    if model not in served:
        names = " or ".join(f"'{name}'" for name in served)
        raise APIError(
            404, f"the model '{model[:100]}' does not exist; this server serves {names}", "model_not_found", "model"
        )


def decode_images(images: list[bytes], max_bytes: int):
    """The inspected image and the references, decoded by `image_from_upload`; a bad one is a 400."""
    decoded = []
    for i, data in enumerate(images):
        name = "the image" if i == 0 else f"reference image {i}"
        try:
            decoded.append(image_from_upload(data, max_bytes=max_bytes, max_pixels=MAX_IMAGE_PIXELS, name=name))
        except ImageInputError as error:
            raise APIError(400, str(error), "invalid_image", "messages") from None
    return decoded[0], decoded[1:]
