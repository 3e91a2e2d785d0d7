"""AUTOMATIC1111's web UI API (``/sdapi/v1``), so tools built for it work unchanged.

``txt2img`` reads prompt, negative_prompt, seed (-1: random), steps, cfg_scale, width, height,
batch_size, n_iter and sampler_name (DDIM, Euler, DPM++ 2M; any other keeps the mode's own), plus
``mode`` (sun|cfg, ours); every other field is ignored, as clients send many. Seeds number a batch
``seed, seed + 1, ...`` as A1111 does. In SUN mode ``steps`` counts single-forward UNet calls and
``cfg_scale`` is not used (the adapter applies the negative prompt inside attention); ``info`` says so.
``img2img`` reads the same plus init_images, mask (white = repaint), denoising_strength, mask_blur,
inpainting_mask_invert, resize_mode 0/1 and inpaint_full_res (false only); both take a ControlNet
in sd-webui-controlnet's ``alwayson_scripts.controlnet.args`` shape when the server loads one
(``images.py`` reads these fields). ``/controlnet/model_list`` lists it, as that extension does.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sun_edge import __version__
from sun_edge.imaging import SAMPLER_LABELS
from sun_edge.settings import MAX_GUIDANCE
from sun_edge_server.api_native import common_spec, meaning
from sun_edge_server.generation import Spec, controlnet_title, generate, serving
from sun_edge_server.images import Edit, read_controlnet, read_img2img
from sun_edge_server.limits import ApiError, field_float, field_int, field_text, read_json

router = APIRouter(prefix="/sdapi/v1")
controlnet_router = APIRouter(prefix="/controlnet")  # sd-webui-controlnet's own routes, for its clients
SCHEDULER_OF = {label: name for name, label in SAMPLER_LABELS.items()}  # "DDIM" -> "ddim"


def _title(source: Any) -> tuple[str, str | None]:
    sha = source.runtime.info.get("model_sha256")
    return (f"{source.name} [{sha[:10]}]" if sha else source.name), sha


def _batch(body: dict[str, Any], limits: Any) -> tuple[int, int]:
    batch_size = field_int(body, "batch_size", 1, 1, limits.max_images)
    n_iter = field_int(body, "n_iter", 1, 1, limits.max_images)
    if batch_size * n_iter > limits.max_images:
        raise ApiError(422, f"batch_size * n_iter is {batch_size * n_iter}; at most {limits.max_images} images "
                            "per request", "batch_size")
    return batch_size, n_iter


def _control(request: Request, body: dict[str, Any], edit: Edit, img2img: bool) -> Edit | None:
    """``edit`` with the request's ControlNet unit, if it names one (None: a plain txt2img)."""
    state = request.app.state.sun
    served, names = controlnet_title(serving(state.engine))
    unit = read_controlnet(body, state.limits, served, names, img2img)
    if unit is None:
        return edit if img2img else None
    image, weight, notes = unit
    return replace(edit, control=True, control_image=image, control_scale=weight, notes=edit.notes + notes)


async def _images(request: Request, body: dict[str, Any], edit: Edit | None) -> JSONResponse:
    """txt2img and img2img: generate, and answer in A1111's shape (images, parameters, info as a JSON string)."""
    limits = request.app.state.sun.limits
    batch_size, n_iter = _batch(body, limits)
    sampler = field_text(body, "sampler_name", limits) or field_text(body, "sampler_index", limits)
    cfg_scale = field_float(body, "cfg_scale", 7.0, 0.0, MAX_GUIDANCE)
    common = common_spec(body, limits, batch_size * n_iter)
    spec = Spec(**common, scheduler=SCHEDULER_OF.get(sampler), guidance=cfg_scale, edit=edit)
    outcome = await generate(request, spec)
    source = request.app.state.sun.engine.source
    title, sha = _title(source)
    s, images, n = outcome.settings, outcome.images, len(outcome.images)
    sun = s.mode == "sun"
    init = bool(edit and edit.init_images)
    masked = bool(edit and edit.mask is not None)
    extra: dict[str, Any] = {"SUN": "on" if sun else "off (CFG baseline)"}
    if masked:
        extra["Mask blur"] = s.mask_blur
    if edit is not None and edit.control:
        extra["ControlNet"] = f"{controlnet_title(source)[0]}, weight {s.control_scale:g}"
    info = {
        "prompt": spec.prompt, "all_prompts": [spec.prompt] * n,
        "negative_prompt": spec.negative_prompt, "all_negative_prompts": [spec.negative_prompt] * n,
        "seed": outcome.seeds[0], "all_seeds": outcome.seeds,
        "subseed": outcome.seeds[0], "all_subseeds": outcome.seeds, "subseed_strength": 0,
        "width": s.width, "height": s.height,
        "sampler_name": SAMPLER_LABELS.get(s.scheduler, s.scheduler), "scheduler": s.spacing,
        "cfg_scale": 1 if sun else s.guidance, "steps": s.steps, "batch_size": batch_size, "n_iter": n_iter,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": source.name, "sd_model_hash": sha[:10] if sha else None,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": s.strength if init else None, "clip_skip": 1,
        "is_using_inpainting_conditioning": bool(init and getattr(source.pipeline, "inpainting_unet", False)),
        "extra_generation_params": extra,
        "index_of_first_image": 0, "infotexts": [g.parameters for g in images], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "version": f"sun-edge {__version__}",
        "sun": meaning(outcome), "warnings": outcome.warnings,
    }
    parameters = {**{k: body.get(k) for k in ("prompt", "negative_prompt", "styles", "seed", "sampler_name",
                                               "batch_size", "n_iter", "steps", "cfg_scale", "width", "height")},
                  "prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "seed": outcome.seeds[0],
                  "batch_size": batch_size, "n_iter": n_iter, "steps": s.steps, "width": s.width, "height": s.height,
                  "sampler_name": info["sampler_name"], "cfg_scale": cfg_scale, "mode": s.mode}
    if init:  # A1111 answers without the images it was sent (unless include_init_images)
        parameters.update(init_images=None, mask=None, denoising_strength=s.strength, resize_mode=body.get("resize_mode", 0),
                          mask_blur=s.mask_blur if masked else body.get("mask_blur"), inpaint_full_res=False,
                          inpainting_mask_invert=int(s.invert_mask) if masked else body.get("inpainting_mask_invert"))
    return JSONResponse({"images": [base64.b64encode(p).decode() for p in outcome.png],
                         "parameters": parameters, "info": json.dumps(info)})


@router.post("/txt2img")
async def txt2img(request: Request) -> JSONResponse:
    body = await read_json(request, request.app.state.sun.limits, images=True)
    return await _images(request, body, _control(request, body, Edit(), img2img=False))


@router.post("/img2img")
async def img2img(request: Request) -> JSONResponse:
    """A1111's img2img and inpainting: init_images, mask (white = repaint), denoising_strength and the rest."""
    limits = request.app.state.sun.limits
    body = await read_json(request, limits, images=True)
    batch_size, n_iter = _batch(body, limits)
    edit = read_img2img(body, limits, batch_size * n_iter)
    return await _images(request, body, _control(request, body, edit, img2img=True))


@router.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    state = request.app.state.sun
    title, sha = _title(serving(state.engine))
    return {**state.options, "sd_model_checkpoint": title, "sd_checkpoint_hash": sha, "samples_format": "png",
            "CLIP_stop_at_last_layers": 1}


@router.post("/options")
async def set_options(request: Request) -> JSONResponse:
    state = request.app.state.sun
    body = await read_json(request, state.limits)
    source = serving(state.engine)
    title, _ = _title(source)
    wanted = body.get("sd_model_checkpoint")
    if wanted is not None and wanted not in (title, source.name):
        raise ApiError(422, f"sd_model_checkpoint {str(wanted)[:60]!r} is not served; this server serves {title!r} only",
                       "sd_model_checkpoint")
    state.options.update({k: v for k, v in body.items() if k != "sd_model_checkpoint" and len(state.options) < 200})
    return JSONResponse(None)


@router.get("/sd-models")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    source = serving(request.app.state.sun.engine)
    title, sha = _title(source)
    return [{"title": title, "model_name": source.name, "hash": sha[:10] if sha else None, "sha256": sha,
             "filename": source.description.get("bundle") or source.name, "config": None}]


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    return [{"name": label, "aliases": [name], "options": {}} for name, label in SAMPLER_LABELS.items()]


@router.get("/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    return [{"name": "automatic", "label": "Automatic (SUN: trailing; CFG baseline: linspace)", "aliases": None,
             "default_rho": -1, "need_inner_model": False}]


@router.get("/scripts")
async def scripts(request: Request) -> dict[str, list[str]]:
    served = controlnet_title(serving(request.app.state.sun.engine))[0]
    names = ["controlnet"] if served else []
    return {"txt2img": names, "img2img": list(names)}


@controlnet_router.get("/version")
async def controlnet_version() -> dict[str, int]:
    return {"version": 2}


@controlnet_router.get("/model_list")
async def controlnet_models(request: Request) -> dict[str, list[str]]:
    served = controlnet_title(serving(request.app.state.sun.engine))[0]
    return {"model_list": [served] if served else []}


@controlnet_router.get("/module_list")
async def controlnet_modules() -> dict[str, Any]:
    return {"module_list": ["none"], "module_detail": {"none": {"model_free": False, "sliders": []}}}


@router.get("/progress")
async def progress(request: Request) -> dict[str, Any]:
    engine = request.app.state.sun.engine
    p = engine.progress
    running = engine.jobs_in_flight() > 0 and p["total"] > 0 and p["done"] < p["total"]
    fraction = p["done"] / p["total"] if running else 0.0
    elapsed = time.time() - p["started"] if running else 0.0
    eta = elapsed / fraction * (1 - fraction) if running and fraction > 0 else 0.0
    return {"progress": round(fraction, 4), "eta_relative": round(eta, 3),
            "state": {"skipped": False, "interrupted": False, "job": "", "job_count": engine.jobs_in_flight(),
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "job_no": 0,
                      "sampling_step": p["done"] // max(1, p["batch"]) if running else 0,
                      "sampling_steps": p["steps"]},
            "current_image": None, "textinfo": None}


@router.post("/interrupt")
async def interrupt(request: Request) -> JSONResponse:
    request.app.state.sun.engine.interrupt()
    return JSONResponse({})


@router.post("/skip")
async def skip(request: Request) -> JSONResponse:
    request.app.state.sun.engine.interrupt()
    return JSONResponse({})
