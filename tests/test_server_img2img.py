"""The server's image inputs: base64 decoding under the limits, A1111's img2img and ControlNet fields, the
engine batching edits, and ``POST /sdapi/v1/img2img`` over real HTTP on pocket-base (through ``webuiapi``,
each image equal to the library's ``Pipeline`` with the same settings), with its bad inputs and the page.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from test_server_support import Server, one_line_error, pixels, same_image

from sun_edge_server.images import decode_image, read_controlnet, read_img2img
from sun_edge_server.limits import ApiError, Limits

PROMPT, NEGATIVE = "a red circle", "blue"


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def b64(image: Image.Image | bytes) -> str:
    return base64.b64encode(image if isinstance(image, bytes) else png(image)).decode()


def picture(seed: int = 0, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A smooth random picture (what an init image looks like to the VAE, unlike white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def square_mask(size: tuple[int, int] = (64, 64), box: tuple[int, int, int, int] = (16, 16, 48, 48)) -> Image.Image:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[box[1]:box[3], box[0]:box[2]] = 255
    return Image.fromarray(mask, "L")


def bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (its data is a 1x1 image's)."""
    data = png(Image.new("L", (1, 1)))
    header = struct.pack(">II", width, height) + data[24:29]  # IHDR: size, then depth, colour, methods
    chunk = b"IHDR" + header
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def api_error(call: Any, *words: str, status: int = 422) -> str:
    with pytest.raises(ApiError) as excinfo:
        call()
    e = excinfo.value
    assert e.status == status and "\n" not in e.message, (e.status, e.message)
    for word in words:
        assert word in e.message, (word, e.message)
    return e.message


# --- decoding under the limits (no model)

def test_decode_reads_base64_and_data_urls_of_the_image_formats():
    image = picture(1)
    for fmt in ("PNG", "JPEG", "WEBP", "BMP"):
        out = io.BytesIO()
        image.save(out, format=fmt)
        got = decode_image(b64(out.getvalue()), "init_images[0]", Limits())
        assert got.mode == "RGB" and got.size == (64, 64)
        if fmt in ("PNG", "BMP"):
            assert np.array_equal(np.asarray(got), np.asarray(image))
    url = "data:image/png;base64," + b64(image)
    assert np.array_equal(np.asarray(decode_image(url, "x", Limits())), np.asarray(image))
    wrapped = "\n".join(b64(image)[i:i + 76] for i in range(0, len(b64(image)), 76))  # MIME line breaks
    assert np.array_equal(np.asarray(decode_image(wrapped, "x", Limits())), np.asarray(image))


def test_a_mask_is_grey_or_its_alpha():
    mask = decode_image(b64(square_mask().convert("RGB")), "mask", Limits(), kind="L")
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), np.asarray(square_mask()))
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 3] = np.asarray(square_mask())  # a painted layer: transparent where nothing is painted
    mask = decode_image(b64(Image.fromarray(rgba, "RGBA")), "mask", Limits(), kind="L")
    assert np.array_equal(np.asarray(mask), np.asarray(square_mask()))


@pytest.mark.parametrize("value, status, words", [
    (b64(b"GIF89a not really an image at all"), 422, ["init_images[0] is not a PNG, JPEG, WebP or BMP image"]),
    (b64(b"just some text"), 422, ["is not a PNG"]),
    ("not base64 at all!", 422, ["is not valid base64"]),
    ("data:image/png,abc", 422, ["without base64 data"]),
    ("", 422, ["must be a base64"]),
    (12, 422, ["must be a base64", "int"]),
    (b64(png(picture())[:200]), 422, ["not a whole PNG image"]),
    (b64(bomb(5000, 5000)), 422, ["5000x5000 pixels", "over the limit of 16777216"]),
    (b64(bomb(60000, 60000)), 422, ["far more pixels than the limit"]),
    (b64(picture(size=(1024, 1024))), 413, ["characters of base64", "the limit is 100000"]),
])
def test_bad_images_are_one_line(value, status, words):
    limits = Limits(max_image_bytes=100_000)
    api_error(lambda: decode_image(value, "init_images[0]", limits), *words, status=status)


def test_the_pixel_limit_is_read_from_the_header_before_decoding():
    start = time.process_time()
    api_error(lambda: decode_image(b64(bomb(4097, 4096)), "mask", Limits()), "4097x4096 pixels")
    assert decode_image(b64(picture(size=(128, 64))), "x", Limits(max_image_pixels=128 * 64)).size == (128, 64)
    api_error(lambda: decode_image(b64(picture(size=(128, 64))), "x", Limits(max_image_pixels=128 * 64 - 1)),
              "128x64 pixels")
    assert time.process_time() - start < 60  # sanity only: a decoded 16M-pixel bomb would still pass this


# --- A1111's img2img and ControlNet fields (no model)

def test_img2img_fields():
    body = {"init_images": [b64(picture())], "denoising_strength": 0.4}
    edit = read_img2img(body, Limits(), 1)
    assert edit.strength == 0.4 and edit.mask is None and edit.resize == "just resize" and not edit.control
    assert read_img2img({"init_images": [b64(picture())]}, Limits(), 1).strength == 0.75  # A1111's default
    masked = read_img2img({**body, "mask": "data:image/png;base64," + b64(square_mask()), "mask_blur": 2,
                           "inpainting_mask_invert": 1, "inpaint_full_res": False, "inpainting_fill": 1}, Limits(), 1)
    assert masked.mask.size == (64, 64) and masked.mask_blur == 2 and masked.invert_mask and masked.paste_back
    assert masked.notes == ()
    assert read_img2img({**body, "mask": b64(square_mask())}, Limits(), 1).mask_blur == 4  # A1111's default
    assert read_img2img({**body, "mask": b64(square_mask()), "inpainting_fill": 0}, Limits(), 1).notes  # said, not used
    assert read_img2img({**body, "inpaint_full_res": True}, Limits(), 1).mask is None  # no mask: nothing to refuse
    two = read_img2img({"init_images": [b64(picture(1)), b64(picture(2))]}, Limits(), 2)
    assert len(two.init_images) == 2
    assert np.array_equal(np.asarray(two.images_for(1, 64, 64)["init_image"]), np.asarray(picture(2)))


def test_just_resize_stretches_the_init_image_and_its_mask():
    edit = read_img2img({"init_images": [b64(picture(size=(96, 64)))], "mask": b64(square_mask((96, 64))),
                         "inpaint_full_res": 0}, Limits(), 1)
    job = edit.images_for(0, 64, 64)
    assert job["init_image"].size == (64, 64) and job["mask"].size == (64, 64)
    cropped = replace(edit, resize="crop and resize").images_for(0, 64, 64)
    assert cropped["init_image"].size == (96, 64)  # the library crops


@pytest.mark.parametrize("change, words", [
    ({"init_images": None}, ["init_images is required"]),
    ({"init_images": []}, ["init_images is required"]),
    ({"init_images": "abc"}, ["init_images is required"]),
    ({"init_images": [b64(picture())] * 3}, ["init_images has 3 images", "one per image (2)"]),
    ({"denoising_strength": 0}, ["denoising_strength 0 is outside (0, 1]"]),
    ({"denoising_strength": 1.5}, ["denoising_strength 1.5 is outside (0, 1]"]),
    ({"denoising_strength": "half"}, ["denoising_strength must be a number in (0, 1]"]),
    ({"mask": b64(square_mask((32, 32)))}, ["mask is 32x32 but init_images[0] is 64x64"]),
    ({"mask": b64(square_mask()), "inpaint_full_res": True}, ["inpaint_full_res", "not supported"]),
    ({"mask": b64(square_mask()), "inpaint_full_res": 1}, ["inpaint_full_res", "false"]),
    ({"mask": b64(square_mask()), "mask_blur": 65}, ["mask_blur 65 is outside [0, 64]"]),
    ({"mask": b64(square_mask()), "inpainting_mask_invert": "yes"}, ["inpainting_mask_invert must be true or false"]),
    ({"mask": b64(b"not an image")}, ["mask is not a PNG"]),
    ({"resize_mode": 2}, ["resize_mode 2 (resize and fill) is not supported"]),
    ({"resize_mode": 7}, ["resize_mode 7 is outside [0, 3]"]),
])
def test_bad_img2img_fields_are_one_line(change, words):
    body = {"init_images": [b64(picture()), b64(picture(1))], **change}
    api_error(lambda: read_img2img(body, Limits(), 2), *words)


CN = "pocket-controlnet [0123abcd]"


def unit(**kw: Any) -> dict[str, Any]:
    return {"alwayson_scripts": {"controlnet": {"args": [{"image": b64(picture(5)), "model": CN, **kw}]}}}


def test_controlnet_units():
    assert read_controlnet({}, Limits(), CN, (), False) is None
    assert read_controlnet({"alwayson_scripts": {"ADetailer": {"args": [False]}}}, Limits(), None, (), False) is None
    image, weight, notes = read_controlnet(unit(weight=0.5, module="none"), Limits(), CN, (), False)
    assert image.size == (64, 64) and weight == 0.5 and notes == ()
    image, weight, _ = read_controlnet(unit(image=None, model="pocket-controlnet"), Limits(), CN,
                                       ("pocket-controlnet",), True)
    assert image is None and weight == 1.0  # img2img without a unit image: conditioned on the init image
    newer = {"alwayson_scripts": {"ControlNet": {"args": [{"input_image": {"image": b64(picture(5))}}]}}}
    assert read_controlnet(newer, Limits(), CN, (), False)[0].size == (64, 64)
    skipped = read_controlnet(unit(model="None"), Limits(), None, (), False)
    assert skipped is None  # sd-webui-controlnet skips a unit with model None, even on a server without one
    off = unit(enabled=False)
    assert read_controlnet(off, Limits(), None, (), False) is None


@pytest.mark.parametrize("body, served, words", [
    (unit(), None, ["this server loads no ControlNet", "--controlnet FILE"]),
    (unit(model="control_v11p_sd15_canny [d14c016b]"), CN, ["model 'control_v11p_sd15_canny [d14c016b]' is not loaded",
                                                             CN]),
    (unit(module="canny"), CN, ["module 'canny'", "preprocessors are not run"]),
    (unit(weight=3), CN, ["weight must be a number in [0, 2]"]),
    (unit(guidance_end=0.5), CN, ["guidance_end 0.5", "only 1 is supported"]),
    (unit(control_mode="ControlNet is more important"), CN, ["control_mode", "Balanced"]),
    (unit(image=""), CN, ["image is required on txt2img"]),
    (unit(image=b64(b"text")), CN, ["args[0].image is not a PNG"]),
    ({"alwayson_scripts": {"controlnet": {"args": [{"image": b64(picture())}, {"image": b64(picture())}]}}}, CN,
     ["has 2 enabled units", "one ControlNet at a time"]),
    ({"alwayson_scripts": {"controlnet": {"args": "x"}}}, CN, ["must be a list of ControlNet units"]),
    ({"alwayson_scripts": []}, CN, ["alwayson_scripts must be an object"]),
])
def test_bad_controlnet_units_are_one_line(body, served, words):
    api_error(lambda: read_controlnet(body, Limits(), served, (), False), *words)


# --- the engine batches edits whose settings are equal (no model: a recording pipeline)

@dataclass(frozen=True)
class FakeJob:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    init_image: Any = None
    mask: Any = None
    control_image: Any = None


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[FakeJob]] = []

    def generate_batch(self, jobs, *, settings, progress=None, max_batch=1):
        from sun_edge.pipeline import Generated

        self.calls.append(list(jobs))
        return [Generated(job.init_image, job.seed, job.prompt, "", settings, 0.0, 1, 0.0, batch=len(jobs))
                for job in jobs]


def test_the_engine_batches_jobs_with_their_own_images_when_settings_are_equal():
    from types import SimpleNamespace

    from sun_edge.settings import Settings
    from sun_edge_server.engine import Engine, EngineConfig

    recorder = Recorder()
    source = SimpleNamespace(pipeline=recorder, runtime=SimpleNamespace(max_batch=8), name="fake", modes=("sun",))
    engine = Engine(EngineConfig(max_batch=8, batch_window_s=0.5))
    engine.start(lambda: source, warm=False)
    deadline = time.monotonic() + 10
    while not engine.ready and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        edit = Settings(height=64, width=64)
        other = Settings(height=64, width=64, steps=3)
        a, b, c = picture(1), picture(2), picture(3)
        tickets = [engine.submit([FakeJob("x", seed=1, init_image=a)], edit),
                   engine.submit([FakeJob("y", seed=2, init_image=b), FakeJob("y", seed=3, init_image=b)], edit),
                   engine.submit([FakeJob("z", seed=4, init_image=c, mask=a)], edit),  # a mask: another kind
                   engine.submit([FakeJob("w", seed=5, init_image=c)], other),  # other settings
                   engine.submit([FakeJob("t", seed=6)], edit)]  # a txt2img job
        results = [t.future.result(30) for t in tickets]
    finally:
        engine.stop()
    batches = sorted(sorted(j.seed for j in call) for call in recorder.calls)
    assert batches == [[1, 2, 3], [4], [5], [6]], batches
    assert [[g.image for g in r] for r in results] == [[a], [b, b], [c], [c], [None]]  # each its own images back


# --- over HTTP on pocket-base (needs the library's img2img)

def _editing() -> bool:
    from sun_edge.pipeline import Job

    return {"init_image", "mask", "control_image"} <= {f.name for f in fields(Job)}


EDITING = _editing()
needs_editing = pytest.mark.skipif(not EDITING, reason="the library has no Job.init_image yet")
