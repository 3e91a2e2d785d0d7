"""What a request may ask for, and the one-line 4xx errors for what it may not.

Every API reads its JSON body through ``read_json`` (bounded, whatever the Content-Length says) and
its fields through the ``field_*`` helpers here, so a bad field is always answered the same way: one
line naming the field and the allowed range, never a traceback or a file path. Unknown fields are
ignored (A1111 clients send dozens).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from sun_edge.settings import MAX_SEED


@dataclass(frozen=True)
class Limits:
    """Bounds on one request. The sampling settings are also checked by ``Settings.validate``."""

    max_steps: int = 50  # SUN makes its images in 4; the CFG baseline in 25
    max_images: int = 8  # per request (A1111 batch_size * n_iter, OpenAI n, native n)
    max_body_bytes: int = 1 << 20  # A1111 clients send large bodies of settings they do not use
    max_prompt_chars: int = 4000  # the text encoder reads 77 tokens; the rest is cut, with a warning
    max_image_body_bytes: int = 32 << 20  # img2img and ControlNet requests carry base64 images
    max_image_bytes: int = 12 << 20  # one image's base64 text (about 9 MB of PNG or JPEG)
    max_image_pixels: int = 4096 * 4096  # one decoded image, read from its header before any pixel is decoded


class ApiError(Exception):
    """An answer that is not an image: HTTP status, one line, and the field it is about."""

    def __init__(self, status: int, message: str, field: str | None = None, *,
                 headers: dict[str, str] | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.headers, self.kind = status, message, field, headers or {}, kind


_PATH = re.compile(r"(?:[A-Za-z]:\\|/)(?:[^\s'\":,;]+/)+[^\s'\":,;]*")


def one_line(text: str) -> str:
    """A message fit for a client: its first line, with file paths taken out."""
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "error")
    return _PATH.sub("<path>", line)


async def read_json(request: Request, limits: Limits, images: bool = False) -> dict[str, Any]:
    """The body as a JSON object, read no further than ``limits.max_body_bytes`` (``max_image_body_bytes``
    on the routes that take images)."""
    most = limits.max_image_body_bytes if images else limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > most:
        if int(declared) <= 8 * most:  # read it away, so the client sees the 413, not a reset
            async for _ in request.stream():
                pass
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {most} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > most:
            raise ApiError(413, f"request body is over the limit of {most} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({type(e).__name__} at byte "
                            f"{getattr(e, 'pos', getattr(e, 'start', 0))})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def field_int(body: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    """An integer field in [low, high] (a float with no fraction counts: some clients send 20.0)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, f"{name} must be a whole number in [{low}, {high}], got {_show(value)}", name)
    if not low <= value <= high:
        raise ApiError(422, f"{name} {value} is outside [{low}, {high}]", name)
    return value


def field_float(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(422, f"{name} must be a number in [{low:g}, {high:g}], got {_show(value)}", name)
    if not low <= value <= high:
        raise ApiError(422, f"{name} {value:g} is outside [{low:g}, {high:g}]", name)
    return float(value)


def field_fraction(body: dict[str, Any], name: str, default: float) -> float:
    """A number in (0, 1], such as a denoising strength."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(422, f"{name} must be a number in (0, 1], got {_show(value)}", name)
    if not 0 < value <= 1:
        raise ApiError(422, f"{name} {value:g} is outside (0, 1]: 1 repaints everything, smaller keeps more of "
                            "the init image", name)
    return float(value)


def field_flag(body: dict[str, Any], name: str, default: bool) -> bool:
    """A yes/no field: true/false, or 0/1 as A1111 clients send some of them."""
    value = body.get(name)
    if value is None:
        return default
    if value in (0, 1) and not isinstance(value, float):
        return bool(value)
    raise ApiError(422, f"{name} must be true or false (or 0 or 1), got {_show(value)}", name)


def field_text(body: dict[str, Any], name: str, limits: Limits, default: str = "") -> str:
    """A prompt: a string of valid Unicode, at most ``max_prompt_chars`` long."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ApiError(422, f"{name} must be a string, got {type(value).__name__}", name)
    if len(value) > limits.max_prompt_chars:
        raise ApiError(422, f"{name} is {len(value)} characters; the limit is {limits.max_prompt_chars}", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, f"{name} is not valid Unicode text (a lone surrogate escape)", name) from None
    return value


def field_choice(body: dict[str, Any], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = body.get(name)
    if value is None:
        return default
    if value not in choices:
        raise ApiError(422, f"{name} {_show(value)} is not one of: {', '.join(choices)}", name)
    return value


def field_seed(body: dict[str, Any], name: str, count: int) -> int | None:
    """A seed in [0, 2**64 - count] (room for seed + i), or -1/absent: None, meaning random."""
    value = body.get(name)
    if value is None or value == -1:
        return None
    high = MAX_SEED - (count - 1)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, f"{name} must be a whole number in [0, {high}] or -1 for random, got {_show(value)}", name)
    if not 0 <= value <= high:
        raise ApiError(422, f"{name} {value} is outside [0, {high}] (or -1 for random)", name)
    return value


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
