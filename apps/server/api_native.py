"""The native API: ``POST /v1/generate`` and ``GET /v1/info``.

``/v1/generate`` takes JSON (prompt, negative_prompt, seed (-1 or absent: random), n, mode sun|cfg,
steps, scheduler, width, height, guidance (the CFG baseline's scale), response_format png|json) and
answers ``image/png`` for one image (headers ``X-Seed``, ``X-Warning``) or, for several or with
``response_format: json``, JSON: base64 PNGs, their seeds and their A1111 ``parameters`` text.
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from sun_edge import __version__, sampling
from sun_edge.settings import MAX_GUIDANCE, MAX_SIDE
from sun_edge_server.generation import Outcome, Spec, controlnet_title, generate, serving
from sun_edge_server.limits import ApiError, Limits, field_choice, field_float, field_int, field_seed, field_text, read_json

router = APIRouter()


def common_spec(body: dict[str, Any], limits: Limits, count: int, prompt_field: str = "prompt") -> dict[str, Any]:
    """The fields every API shares, read and bounded (each failure one line naming the field)."""
    return {
        "prompt": field_text(body, prompt_field, limits),
        "negative_prompt": field_text(body, "negative_prompt", limits),
        "seed": field_seed(body, "seed", count),
        "count": count,
        "mode": field_choice(body, "mode", "sun", ("sun", "cfg")),
        "steps": field_int(body, "steps", None, 1, limits.max_steps),
        "width": field_int(body, "width", None, 8, MAX_SIDE),
        "height": field_int(body, "height", None, 8, MAX_SIDE),
    }


def meaning(outcome: Outcome) -> dict[str, str]:
    """What steps and the guidance scale mean for this image (SUN's differ from A1111's)."""
    s = outcome.settings
    if s.mode == "sun":
        return {"mode": "sun", "steps": f"{s.steps} single-forward UNet calls (the SUN adapter is trained for 4)",
                "cfg_scale": "not used: SUN applies the negative prompt inside attention with learnt guidance, "
                             "one UNet call per step (recorded as CFG scale 1)"}
    return {"mode": "cfg", "steps": f"{s.steps} steps of classifier-free guidance, a batch of 2 per UNet call",
            "cfg_scale": f"{s.guidance:g}, the CFG baseline's guidance scale"}


@router.post("/v1/generate")
async def generate_native(request: Request) -> Response:
    limits = request.app.state.sun.limits
    body = await read_json(request, limits)
    if not isinstance(body.get("prompt"), str):
        raise ApiError(422, "prompt is required: a string", "prompt")
    count = field_int(body, "n", 1, 1, limits.max_images)
    spec = Spec(**common_spec(body, limits, count),
                scheduler=field_choice(body, "scheduler", None, tuple(sampling.SCHEDULERS)),  # type: ignore[arg-type]
                guidance=field_float(body, "guidance", None, 0.0, MAX_GUIDANCE))  # type: ignore[arg-type]
    form = field_choice(body, "response_format", "png" if count == 1 else "json", ("png", "json"))
    if form == "png" and count > 1:
        raise ApiError(422, "response_format png returns one image; with n > 1 use json", "response_format")
    outcome = await generate(request, spec)
    if form == "png":
        headers = {"X-Seed": str(outcome.seeds[0]), "X-Mode": outcome.settings.mode}
        if outcome.warnings:
            headers["X-Warning"] = " | ".join(outcome.warnings).encode("ascii", "backslashreplace").decode()
        return Response(outcome.png[0], media_type="image/png", headers=headers)
    return JSONResponse({
        "images": [base64.b64encode(p).decode() for p in outcome.png],
        "seeds": outcome.seeds,
        "parameters": [g.parameters for g in outcome.images],
        "mode": outcome.settings.mode,
        "meaning": meaning(outcome),
        "warnings": outcome.warnings,
        "seconds": [round(g.seconds, 4) for g in outcome.images],
        "batch": [g.batch for g in outcome.images],
    })


@router.get("/v1/info")
async def info(request: Request) -> dict[str, Any]:
    state = request.app.state.sun
    engine = state.engine
    source = serving(engine)
    runtime_info = source.runtime.info
    limits = state.limits
    return {
        "version": f"sun-edge {__version__}",
        "model": source.name,
        "model_sha256": runtime_info.get("model_sha256"),
        "adapter": runtime_info.get("adapter"),
        "adapter_sha256": runtime_info.get("adapter_sha256"),
        "bundle": source.description.get("bundle"),
        "runtime": source.description,
        "modes": list(source.modes),
        "default_size": {"width": source.settings(source.modes[0]).width, "height": source.settings(source.modes[0]).height},
        "sizes": source.sizes_text(),
        "batch": {"min": 1, "max": engine.max_batch, "window_ms": round(engine.config.batch_window_s * 1000, 3)},
        "queue": engine.config.queue,
        "timeout_s": state.timeout_s,
        "limits": {"max_steps": limits.max_steps, "max_images": limits.max_images,
                   "max_body_bytes": limits.max_body_bytes, "max_prompt_chars": limits.max_prompt_chars,
                   "text_tokens": 77, "max_image_body_bytes": limits.max_image_body_bytes,
                   "max_image_bytes": limits.max_image_bytes, "max_image_pixels": limits.max_image_pixels},
        "img2img": bool(source.runtime.has("vae_encoder")) and hasattr(source.pipeline, "prepare_edit"),
        "controlnet": controlnet_title(source)[0],
        "auth": state.config.api_key is not None,
    }
