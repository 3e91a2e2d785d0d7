"""The server's image inputs: base64 decoding under the limits, A1111's img2img and ControlNet fields, the
engine batching edits, and ``POST /sdapi/v1/img2img`` over real HTTP on pocket-base (through ``webuiapi``,
each image equal to the library's ``Pipeline`` with the same settings), with its bad inputs and the page.
"""

from __future__ import annotations

import base64
import json
import io
import struct
import time
import zlib
from dataclasses import dataclass, replace
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


# --- over HTTP on pocket-base



def test_a_text_only_pipeline_refuses_edits_in_one_line():
    """``serve --triton``'s pipeline makes images from text only: an img2img request is a 422, not a failed batch."""
    from types import SimpleNamespace

    from sun_edge.settings import Settings
    from sun_edge_server.generation import edit_settings
    from sun_edge_server.images import Edit

    runtime = SimpleNamespace(name="triton", has=lambda component: True)
    engine = SimpleNamespace(source=SimpleNamespace(pipeline=object(), runtime=runtime, name="m"), ready=True, failed=None)
    edit = Edit(init_images=(picture(),), strength=0.5)
    api_error(lambda: edit_settings(engine, edit, Settings()), "triton pipeline makes images from text only")
    engine.source.pipeline = SimpleNamespace(prepare_edit=None)
    runtime.has = lambda component: component != "vae_encoder"
    api_error(lambda: edit_settings(engine, edit, Settings()), "m has no VAE encoder")
    runtime.has = lambda component: component != "controlnet"
    api_error(lambda: edit_settings(engine, replace(edit, control=True), Settings()), "loads no ControlNet")
    assert edit_settings(engine, edit, Settings()).strength == 0.5


def random_controlnet(path):
    """A ControlNet of pocket-base's UNet (``ControlNetModel.from_unet``), its zero convolutions re-drawn so that
    its residuals matter, saved as one diffusers-layout ``.safetensors`` file."""
    import torch
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from sun_edge.runtimes.pytorch import TorchRuntime

    runtime = TorchRuntime.load("pocket-base", None, device="cpu", precision="fp32", optimize="none")
    torch.manual_seed(19)
    steps = int(np.log2(runtime.vae_scale_factor))  # the condition embedding downsamples to the latent grid
    net = ControlNetModel.from_unet(runtime.unet_module, conditioning_embedding_out_channels=(16, 32, 96, 256)[:steps + 1])
    gen = torch.Generator().manual_seed(20)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                param.copy_(torch.randn(param.shape, generator=gen) * (0.5 / param[0].numel() ** 0.5))
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def controlnet_file(tmp_path_factory):
    return random_controlnet(tmp_path_factory.mktemp("controlnet") / "pocket-random-controlnet.safetensors")


@pytest.fixture(scope="module")
def server(tmp_path_factory, controlnet_file):
    folder = tmp_path_factory.mktemp("serve-img2img")
    s = Server(folder / "serve.log", "--max-batch", "8", "--batch-window-ms", "150", "--threads", "1",
               "--controlnet", str(controlnet_file))
    try:
        yield s.wait_ready()
    finally:
        assert s.terminate() == 0, s.log()


@pytest.fixture(scope="module")
def pipeline(controlnet_file):
    """The library's Pipeline on what the server serves (pocket-base on PyTorch, the same ControlNet), one thread."""
    import torch

    from sun_edge.pipeline import Pipeline
    from sun_edge.runtimes.pytorch import TorchRuntime

    torch.set_num_threads(1)
    return Pipeline(TorchRuntime.load("pocket-base", None, device="cpu", precision="fp32", optimize="none",
                                      controlnet=controlnet_file))


def reference(pipeline, seeds, **kw) -> list[Any]:
    """The library's images with the settings the server builds (``sun-edge generate``'s: SUN, 4 DDIM steps,
    64x64, guidance 8 unused) and ``kw``'s editing settings and images, each made alone."""
    from sun_edge.settings import Settings

    images = {k: kw.pop(k) for k in ("init_image", "mask", "control_image") if k in kw}
    settings = replace(Settings.for_mode("sun", width=64, height=64, guidance=8.0, noise="torch"), **kw)
    return [pipeline.generate(PROMPT, NEGATIVE, seeds=[seed], settings=settings, **images)[0] for seed in seeds]


def array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_img2img_and_inpainting_through_webuiapi(server, pipeline):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    init, mask = picture(7), square_mask()
    result = api.img2img(images=[init], prompt=PROMPT, negative_prompt=NEGATIVE, seed=3, width=64, height=64,
                         steps=4, denoising_strength=0.5)
    want = reference(pipeline, [3], strength=0.5, init_image=init)[0]
    assert np.array_equal(array(result.images[0]), array(want.image))  # made alone: bit-exact
    assert result.info["infotexts"] == [want.parameters] and "Denoising strength: 0.5" in want.parameters
    assert result.info["denoising_strength"] == 0.5 and result.parameters["init_images"] is None

    result = api.img2img(images=[init], mask_image=mask, denoising_strength=0.75, inpaint_full_res=False,
                         prompt=PROMPT, negative_prompt=NEGATIVE, seed=4, width=64, height=64, steps=4, batch_size=2)
    want = reference(pipeline, [4, 5], strength=0.75, mask_blur=4, paste_back=True, init_image=init, mask=mask)
    assert len(result.images) == 2 and result.info["all_seeds"] == [4, 5]
    for got, expected in zip(result.images, want):
        assert same_image(array(got), array(expected.image))
    assert result.info["infotexts"] == [w.parameters for w in want] and "Mask blur: 4" in want[0].parameters
    got, original = array(result.images[0]).astype(int), array(init).astype(int)
    outside = np.asarray(square_mask((64, 64), (12, 12, 52, 52))) == 0  # beyond the blurred edge
    assert psnr(got[outside], original[outside]) >= 30  # pasted back: the kept region is the init image
    assert psnr(got[24:40, 24:40], original[24:40, 24:40]) < 25  # the masked region was repainted
    assert result.info["warnings"] and "inpainting_fill" in result.info["warnings"][0]  # webuiapi sends fill 0

    inverted = api.img2img(images=[init], mask_image=mask, denoising_strength=0.75, inpaint_full_res=False,
                           inpainting_mask_invert=1, mask_blur=0, prompt=PROMPT, negative_prompt=NEGATIVE, seed=4,
                           width=64, height=64, steps=4)
    want = reference(pipeline, [4], strength=0.75, invert_mask=True, paste_back=True, init_image=init, mask=mask)
    assert np.array_equal(array(inverted.images[0]), array(want[0].image))


def test_controlnet_through_webuiapi(server, pipeline):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    condition, init = picture(11), picture(7)
    models = api.session.get(f"{server.url}/controlnet/model_list").json()["model_list"]
    assert len(models) == 1 and models[0].startswith("pocket-random-controlnet [")
    assert api.get_scripts() == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}
    info = server.json("GET", "/v1/info")[1]
    assert info["controlnet"] == models[0] and info["img2img"] is True
    unit = webuiapi.ControlNetUnit(image=condition, model=models[0], weight=0.8)
    # A fresh alwayson_scripts each call: webuiapi adds the units to the dict it is given, and its default
    # is one shared dict, so later calls in this process would carry them.
    result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=6, width=64, height=64, steps=4,
                         controlnet_units=[unit], alwayson_scripts={})
    want = reference(pipeline, [6], control_scale=0.8, control_image=condition)[0]
    assert np.array_equal(array(result.images[0]), array(want.image))
    assert result.info["infotexts"] == [want.parameters] and "ControlNet 0" in want.parameters
    plain = reference(pipeline, [6])[0]
    assert not np.array_equal(array(want.image), array(plain.image))  # the ControlNet changed the picture
    result = api.img2img(images=[init], denoising_strength=0.6, prompt=PROMPT, negative_prompt=NEGATIVE, seed=6,
                         width=64, height=64, steps=4, controlnet_units=[webuiapi.ControlNetUnit(model=models[0])],
                         alwayson_scripts={})
    want = reference(pipeline, [6], strength=0.6, init_image=init, control_image=init)[0]  # conditioned on the init
    assert np.array_equal(array(result.images[0]), array(want.image))


def test_img2img_requests_with_different_pictures_share_a_batch(server, pipeline):
    from concurrent.futures import ThreadPoolExecutor

    inits = [picture(20 + i) for i in range(4)]
    bodies = [{"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 30 + i, "steps": 4, "width": 64, "height": 64,
               "init_images": [b64(init)], "denoising_strength": 0.5} for i, init in enumerate(inits)]
    before = _batched(server)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: server.json("POST", "/sdapi/v1/img2img", b), bodies))
    assert _batched(server) > before, "no batch of more than one image: the img2img requests were not gathered"
    for (status, body), init, i in zip(answers, inits, range(4)):
        assert status == 200, body
        want = reference(pipeline, [30 + i], strength=0.5, init_image=init)[0]
        assert same_image(pixels(base64.b64decode(body["images"][0])), array(want.image)), i


def _batched(server) -> float:
    """How many batches held more than one image, from /metrics."""
    text = server.request("GET", "/metrics")[2].decode()
    buckets = {line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line.startswith("sun_edge_batch_size_bucket")}
    total = float(next(l for l in text.splitlines() if l.startswith("sun_edge_batch_size_count")).rsplit(" ", 1)[1])
    return total - buckets["1.0"]


GOOD = {"prompt": PROMPT, "seed": 1, "steps": 4, "width": 64, "height": 64, "init_images": [b64(picture(3))]}
BAD_HTTP = [  # body changes, status, words of the one line
    ({"mask": b64(square_mask((32, 32)))}, 422, ["mask is 32x32 but init_images[0] is 64x64"]),
    ({"init_images": [b64(b"%PDF-1.4 not an image")]}, 422, ["init_images[0] is not a PNG, JPEG, WebP or BMP"]),
    ({"init_images": ["data:image/png;base64,@@@@"]}, 422, ["init_images[0] is not valid base64"]),
    ({"denoising_strength": 0}, 422, ["denoising_strength 0 is outside (0, 1]"]),
    ({"denoising_strength": 1.01}, 422, ["denoising_strength 1.01 is outside (0, 1]"]),
    ({"init_images": [b64(bomb(8000, 8000))]}, 422, ["8000x8000 pixels", "over the limit"]),
    ({"init_images": ["A" * (12 << 20 | 4)]}, 413, ["characters of base64", "the limit is"]),
    ({"mask": b64(square_mask()), "inpaint_full_res": True}, 422, ["inpaint_full_res", "not supported"]),
    ({"init_images": []}, 422, ["init_images is required"]),
    ({"width": 100}, 422, ["width 100", "multiples of 8"]),
    ({"alwayson_scripts": {"controlnet": {"args": [{"model": "control_v11p_sd15_canny"}]}}}, 422,
     ["'control_v11p_sd15_canny' is not loaded"]),
]


@pytest.mark.parametrize("change, status, words", BAD_HTTP, ids=[str(i) for i in range(len(BAD_HTTP))])
def test_bad_img2img_requests_get_one_line_and_the_server_keeps_serving(server, change, status, words):
    got, _, data = server.request("POST", "/sdapi/v1/img2img", {**GOOD, **change})
    assert got == status, data[:300]
    one_line_error(data, *words)
    status, body = server.json("POST", "/sdapi/v1/img2img", {**GOOD, "denoising_strength": 0.25})
    assert status == 200 and pixels(base64.b64decode(body["images"][0])).shape == (64, 64, 3)


def test_a_server_without_a_controlnet_says_so(tmp_path):
    s = Server(tmp_path / "serve.log", "--threads", "1")
    try:
        s.wait_ready()
        unit = {"image": b64(picture(1)), "model": "anything"}
        for route, body in (("/sdapi/v1/txt2img", {"prompt": "x"}), ("/sdapi/v1/img2img", GOOD)):
            status, _, data = s.request("POST", route, {**body, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
            assert status == 422, data
            one_line_error(data, "this server loads no ControlNet", "--controlnet FILE")
        assert s.json("GET", "/controlnet/model_list") == (200, {"model_list": []})
        assert s.json("GET", "/v1/info")[1]["controlnet"] is None
        status, body = s.json("POST", "/sdapi/v1/img2img", GOOD)  # img2img itself works without one
        assert status == 200 and len(body["images"]) == 1
    finally:
        assert s.terminate() == 0, s.log()


def test_the_page_sends_a_dropped_image_and_a_painted_mask(server, pipeline, tmp_path):
    """Headless Chromium: an init image through the file picker, then another dropped on the drop zone (96x64),
    a stroke painted on the mask canvas, Generate: the page posts A1111's img2img with the dropped picture and
    a mask of its size (white where painted), and shows the image the library makes from what it sent."""
    import os
    from pathlib import Path

    from test_server import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run installs it with apt-get install -y chromium")
        pytest.skip(f"no {CHROMIUM} on this machine (apt-get install chromium); CI runs this test")
    sync_api = pytest.importorskip("playwright.sync_api")
    picked, dropped = tmp_path / "picked.png", picture(9, (96, 64))
    picture(8).save(picked)
    shot = Path(os.environ.get("SUN_EDGE_IMG2IMG_SCREENSHOT", tmp_path / "page-img2img.png"))
    sent: list[dict] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/sdapi/v1/img2img") else None)
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('pocket-base')")
            page.fill("#prompt", PROMPT)
            page.fill("#negative", NEGATIVE)
            page.fill("#seed", "3")
            page.set_input_files("#init-file", str(picked))  # the file picker
            page.wait_for_selector("#editor", state="visible")
            page.wait_for_function("document.getElementById('mask').width === 64")
            transfer = page.evaluate_handle("""(data) => {
                const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                const t = new DataTransfer();
                t.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
                return t; }""", b64(dropped))
            page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})  # drag and drop
            page.wait_for_function("document.getElementById('mask').width === 96 && "
                                   "document.getElementById('mask').height === 64")
            box = page.locator("#mask").bounding_box()
            page.fill("#brush", "30")
            page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.5, steps=8)
            page.mouse.up()
            page.click("#generate")
            page.wait_for_selector(".result img", timeout=120_000)
            page.wait_for_function("[...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth)")
            sources = page.eval_on_selector_all(".result img", "els => els.map(e => e.src)")
            captions = page.inner_text(".result")
            page.screenshot(path=str(shot), full_page=True)
            page.click("#clear-mask")
            page.uncheck("#compare")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('.result').length === 2", timeout=120_000)
        finally:
            browser.close()
    assert len(sources) == 2 and "SUN inpainting · seed 3" in captions and "CFG baseline inpainting · seed 3" in captions
    sun = next(b for b in sent if b["mode"] == "sun")
    assert sun["denoising_strength"] == 0.75 and sun["inpaint_full_res"] is False and sun["mask_blur"] == 4
    init = decode_image(sun["init_images"][0], "init", Limits())
    mask = decode_image(sun["mask"], "mask", Limits(), kind="L")
    assert np.array_equal(array(init), array(dropped))  # the dropped file, not the picked one
    m = np.asarray(mask)
    assert mask.size == (96, 64) and m[32, 48] == 255 and m[32, 36] == 255 and m[2, 2] == 0 and m[32, 5] == 0
    assert 0.03 < float(np.mean(m > 127)) < 0.5  # the stroke, not the whole picture
    want = reference(pipeline, [3], strength=0.75, mask_blur=4, paste_back=True, init_image=init, mask=mask)[0]
    assert np.array_equal(pixels(base64.b64decode(sources[0].split(",", 1)[1])), array(want.image))
    assert "mask" not in sent[-1] and sent[-1]["mode"] == "sun" and len(sent) == 3  # cleared: plain img2img
    assert shot.stat().st_size > 1000


def test_a_controlnet_that_does_not_exist_stops_the_server_with_status_2(tmp_path, capsys):
    from cli_helpers import error_line, run

    s = Server(tmp_path / "serve.log", "--controlnet", str(tmp_path / "no-such-controlnet.safetensors"))
    try:
        assert s.process.wait(120) == 2
        assert "error: ControlNet path" in s.log() and "does not exist" in s.log()
    finally:
        s.terminate()
    code, _, err = run(capsys, "serve", "--bundle", str(tmp_path), "--controlnet", "pocket-silhouette")
    assert code == 2 and error_line(err).endswith("--controlnet is exported into a bundle (sun-edge export "
                                                  "--controlnet FILE); drop it with --bundle")


def test_the_shipped_pocket_controlnet_by_name(tmp_path):
    """``serve --controlnet pocket-silhouette``: requests may name it by its registry name, and get the library's
    image for that ControlNet and condition (a white disc on black, the silhouettes it was trained on)."""
    import torch

    from sun_edge.models import resolve_controlnet
    from sun_edge.pipeline import Pipeline
    from sun_edge.runtimes.pytorch import TorchRuntime

    disc = np.zeros((64, 64), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    disc[(yy - 30) ** 2 + (xx - 36) ** 2 < 15**2] = 255
    condition = Image.fromarray(disc).convert("RGB")
    s = Server(tmp_path / "serve.log", "--threads", "1", "--controlnet", "pocket-silhouette")
    try:
        s.wait_ready()
        title = s.json("GET", "/controlnet/model_list")[1]["model_list"][0]
        assert title.startswith("controlnet-silhouette [")
        body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 8, "steps": 4, "width": 64, "height": 64,
                "alwayson_scripts": {"controlnet": {"args": [{"image": b64(condition), "model": "pocket-silhouette",
                                                              "module": "none", "weight": 1.0}]}}}
        status, answer = s.json("POST", "/sdapi/v1/txt2img", body)
        assert status == 200, answer
    finally:
        assert s.terminate() == 0, s.log()
    torch.set_num_threads(1)
    runtime = TorchRuntime.load("pocket-base", None, device="cpu", precision="fp32", optimize="none",
                                controlnet=resolve_controlnet("pocket-silhouette"))
    want = reference(Pipeline(runtime), [8], control_image=condition)[0]
    assert np.array_equal(pixels(base64.b64decode(answer["images"][0])), array(want.image))
    assert json.loads(answer["info"])["infotexts"] == [want.parameters] and title in want.parameters
