"""OpenAI's Images API: ``POST /v1/images/generations`` and ``GET /v1/models``, for the official clients.

Reads prompt, n, size ("WxH" or "auto"), response_format (b64_json; "url" is refused: this server
keeps no files) and, as extra fields (``extra_body`` in the Python client), negative_prompt, seed,
steps and mode. ``model``, ``quality``, ``style`` and the rest are ignored. Errors come in OpenAI's
shape, ``{"error": {"message", "type", "param", "code"}}``, which its clients raise as exceptions.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sun_edge.settings import MAX_SIDE
from sun_edge_server.api_native import common_spec
from sun_edge_server.generation import Spec, generate, serving
from sun_edge_server.limits import ApiError, field_choice, field_int, read_json

router = APIRouter(prefix="/v1")
SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


@router.post("/images/generations")
async def generations(request: Request) -> JSONResponse:
    limits = request.app.state.sun.limits
    body = await read_json(request, limits)
    if not isinstance(body.get("prompt"), str) or not body["prompt"]:
        raise ApiError(400, "prompt is required: a non-empty string", "prompt")
    count = field_int(body, "n", 1, 1, limits.max_images)
    field_choice(body, "response_format", "b64_json", ("b64_json",))
    size = body.get("size")
    fields = {k: v for k, v in body.items() if k not in ("width", "height")}
    if size not in (None, "auto"):
        match = SIZE.match(size) if isinstance(size, str) else None
        if match is None:
            raise ApiError(400, f"size must be \"WIDTHxHEIGHT\" (e.g. \"512x512\") or \"auto\", got {str(size)[:40]!r}",
                           "size")
        fields["width"], fields["height"] = int(match[1]), int(match[2])
        for side in ("width", "height"):
            if not 8 <= fields[side] <= MAX_SIDE:
                raise ApiError(400, f"size {size}: {side} {fields[side]} is outside [8, {MAX_SIDE}]", "size")
    spec = Spec(**common_spec(fields, limits, count))
    outcome = await generate(request, spec)
    s = outcome.settings
    return JSONResponse({
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(p).decode(), "revised_prompt": spec.prompt, "seed": seed}
                 for p, seed in zip(outcome.png, outcome.seeds)],
        "output_format": "png",
        "size": f"{s.width}x{s.height}",
        "warnings": outcome.warnings,
    })


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    state = request.app.state.sun
    source = serving(state.engine)
    return {"object": "list", "data": [{"id": source.name, "object": "model", "created": int(state.started),
                                        "owned_by": "sun-edge"}]}
