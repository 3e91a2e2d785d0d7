"""One generation request as every API makes it: settings, seeds, the queue, the wait, the PNGs.

The APIs differ only in how they read their fields and shape their answers; this module turns a
``Spec`` into images through the engine, and every failure into an ``ApiError`` (429 on a full queue,
503 while loading or draining, 504 past the timeout, 4xx for what the request asks wrongly).
"""

from __future__ import annotations

import asyncio
import io
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from PIL.PngImagePlugin import PngInfo
from starlette.requests import Request

from sun_edge.errors import SunEdgeError
from sun_edge.pipeline import Generated, Job
from sun_edge.settings import Settings
from sun_edge_server.engine import Cancelled, Draining, Engine, Interrupted, NotReady, QueueFull, ShutDown
from sun_edge_server.images import Edit
from sun_edge_server.limits import ApiError, one_line

# The server's words for the library's fixes (sun_edge.errors.FIXES): what a client can change.
SERVER_FIXES = {
    "adapter_or_cfg": ": this server's model has no SUN adapter; ask for mode cfg",
    "export_baseline": "; this bundle has no CFG baseline: ask for mode sun",
}
TEXT_TOKENS = 77


@dataclass(frozen=True)
class Spec:
    """What a client asked for, in the library's terms."""

    prompt: str
    negative_prompt: str = ""
    seed: int | None = None  # None: random
    count: int = 1
    mode: str = "sun"
    steps: int | None = None
    scheduler: str | None = None
    width: int | None = None
    height: int | None = None
    guidance: float | None = None
    edit: Edit | None = None  # img2img, inpainting, ControlNet: the images and their settings


@dataclass
class Outcome:
    images: list[Generated]
    settings: Settings
    seeds: list[int]
    warnings: list[str] = field(default_factory=list)
    png: list[bytes] = field(default_factory=list)


def serving(engine: Engine) -> Any:
    """The source being served, or 503 while it loads (or if it failed to)."""
    if engine.source is None or not engine.ready:
        if engine.failed:
            raise ApiError(503, f"the server cannot serve: {one_line(engine.failed)}", kind="server_error")
        raise ApiError(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"}, kind="server_error")
    return engine.source


def controlnet_title(source: Any) -> tuple[str | None, tuple[str, ...]]:
    """The loaded ControlNet's title (``name [hash]``, as sd-webui-controlnet lists models and the library's PNG
    parameters name it) and the other names a request may give it; (None, ()) without one."""
    name = source.runtime.info.get("controlnet") if source.runtime.has("controlnet") else None
    if not name:
        return None, ()
    from sun_edge.models import CONTROLNETS

    sha, stem = source.runtime.info.get("controlnet_sha256"), Path(str(name)).stem
    shipped = tuple(entry.name for entry in CONTROLNETS.values() if entry.folder == str(name))  # pocket-silhouette
    return (f"{stem} [{sha[:8]}]" if sha else stem), (str(name), stem, *shipped)


def settings_for(engine: Engine, spec: Spec) -> Settings:
    source = serving(engine)
    try:
        return source.settings(spec.mode, steps=spec.steps, scheduler=spec.scheduler, height=spec.height,
                               width=spec.width, guidance=spec.guidance)
    except SunEdgeError as e:
        text = one_line(e.render(SERVER_FIXES))
        field_name = next((w for w in ("height", "width", "steps", "mode", "scheduler", "guidance")
                           if text.startswith(w) or f" {w} " in text[:40]), None)
        raise ApiError(422, text, field_name) from None


def edit_settings(engine: Engine, edit: Edit, settings: Settings) -> Settings:
    """``settings`` with the edit's fields, checked by ``Settings.validate``, on a source that can run them."""
    source = serving(engine)
    if not hasattr(source.pipeline, "prepare_edit"):  # serve --triton: the remote model takes text only
        raise ApiError(422, f"this server's {source.runtime.name} pipeline makes images from text only; serve the "
                            "bundle or model directly for img2img, inpainting and ControlNet", "init_images")
    if edit.init_images and not source.runtime.has("vae_encoder"):
        raise ApiError(422, f"{source.name} has no VAE encoder, which img2img needs; re-export the bundle with it",
                       "init_images")
    if edit.control and not source.runtime.has("controlnet"):
        raise ApiError(422, "this server loads no ControlNet (start it with sun-edge serve --controlnet FILE); drop "
                            "alwayson_scripts.controlnet", "alwayson_scripts")
    edited = edit.settings(settings)
    try:
        edited.validate()
    except SunEdgeError as e:
        raise ApiError(422, one_line(e.render(SERVER_FIXES))) from None
    return edited


def truncation_warnings(engine: Engine, spec: Spec) -> list[str]:
    """The text encoder reads 77 tokens (BOS, 75, EOS): say what was cut from each prompt."""
    tokenizer = engine.source.pipeline.tokenizer
    notes = []
    for what, text in (("prompt", spec.prompt), ("negative_prompt", spec.negative_prompt)):
        tokens = tokenizer.tokenize(text)
        if len(tokens) > TEXT_TOKENS - 2:
            cut = tokenizer.decode(tokens[TEXT_TOKENS - 2:])
            notes.append(f"{what} is {len(tokens) + 2} tokens; the text encoder reads {TEXT_TOKENS}, "
                         f"so this was cut: {cut[:200]!r}")
    return notes


def seeds_for(seed: int | None, count: int) -> list[int]:
    """``seed, seed + 1, ...`` as A1111 numbers a batch; a random first seed below 2**32 when none is given."""
    first = secrets.randbelow(2**32 - count) if seed is None else seed
    return [first + i for i in range(count)]


def png_bytes(generated: Generated) -> bytes:
    """The PNG ``sun-edge generate`` writes: the image and its A1111 ``parameters`` text chunk."""
    info = PngInfo()
    info.add_text("parameters", generated.parameters)
    out = io.BytesIO()
    generated.image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read: the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def generate(request: Request, spec: Spec) -> Outcome:
    """Queue ``spec``, wait for its images (or the timeout, or the client leaving), encode them."""
    state = request.app.state.sun
    engine: Engine = state.engine
    settings = settings_for(engine, spec)
    if spec.edit is not None:
        settings = edit_settings(engine, spec.edit, settings)
    warnings = truncation_warnings(engine, spec) + list(spec.edit.notes if spec.edit else ())
    seeds = seeds_for(spec.seed, spec.count)
    images = [spec.edit.images_for(i, settings.width, settings.height) if spec.edit else {} for i in range(len(seeds))]
    jobs = [Job(spec.prompt, spec.negative_prompt, s, **extra) for s, extra in zip(seeds, images)]
    try:
        ticket = engine.submit(jobs, settings)
    except QueueFull as e:
        raise ApiError(429, f"the queue is full ({engine.config.queue} images waiting at most); retry in "
                            f"{e.retry_after} s", headers={"Retry-After": str(e.retry_after)}, kind="rate_limit_error") from None
    except NotReady:
        raise ApiError(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"},
                       kind="server_error") from None
    except Draining:
        raise ApiError(503, "the server is shutting down and takes no new requests", kind="server_error") from None
    waiting = asyncio.wrap_future(ticket.future)
    waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, whatever happens
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({waiting, gone}, timeout=state.timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if waiting not in done:
        engine.cancel(ticket)
        state.metrics.cancelled("disconnect" if gone in done else "timeout")
        if gone in done:
            raise ApiError(499, "the client closed the connection")
        raise ApiError(504, f"the request took longer than the server's timeout of {state.timeout_s:g} s; "
                            "ask for fewer images or steps", kind="server_error")
    try:
        results = waiting.result()
    except Interrupted:
        raise ApiError(409, "generation was interrupted (POST /sdapi/v1/interrupt)", kind="server_error") from None
    except ShutDown:
        raise ApiError(503, "the server shut down (drain timeout) before this request finished", kind="server_error") from None
    except Cancelled:
        raise ApiError(409, "the request was cancelled", kind="server_error") from None
    except SunEdgeError as e:
        raise ApiError(500, one_line(e.render(SERVER_FIXES)), kind="server_error") from None
    except Exception as e:  # noqa: BLE001: the engine logged it
        raise ApiError(500, one_line(str(e)), kind="server_error") from None
    png = await anyio.to_thread.run_sync(lambda: [png_bytes(g) for g in results])
    state.metrics.images(len(results))
    return Outcome(results, settings, seeds, warnings, png)
