"""``sun-edge serve`` on pocket-base through PyTorch, over real HTTP on a free loopback port, without auth.

The A1111 API through the ``webuiapi`` package, the OpenAI API through the official ``openai`` package,
the native API over plain HTTP; every image equals the one ``sun-edge generate`` makes with its seed,
whoever shares its batch; every bad input gets its status and one line; a small load test.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from test_server_support import Server, one_line_error, pixels, same_image

PROMPT, NEGATIVE = "a red circle", "blue"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    s = Server(folder / "serve.log", "--max-batch", "8", "--batch-window-ms", "100", "--threads", "1")
    try:
        yield s.wait_ready()
    finally:
        assert s.terminate() == 0, s.log()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """``sun-edge generate`` (in this process) for seeds 3, 4, 5: pixels and PNG parameters by seed."""
    import torch

    from sun_edge.imaging import read_parameters
    from PIL import Image

    folder = tmp_path_factory.mktemp("generate")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from sun_edge.cli import main

        assert main(["generate", "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--seed", "3", "4", "5",
                     "-o", str(folder / "g.png")]) == 0
    finally:
        torch.set_num_threads(before)
    out = {}
    for seed in (3, 4, 5):
        path = folder / f"g-s{seed}.png"
        out[seed] = (np.asarray(Image.open(path).convert("RGB")), read_parameters(path))
    return out


def test_health_ready_info(server):
    assert server.json("GET", "/healthz") == (200, {"alive": True})
    assert server.json("GET", "/readyz")[0] == 200
    status, info = server.json("GET", "/v1/info")
    assert status == 200
    assert info["model"] == "pocket-base" and info["adapter"] == "sun-adapter.safetensors"
    assert info["batch"] == {"min": 1, "max": 8, "window_ms": 100.0}
    assert info["default_size"] == {"width": 64, "height": 64} and info["modes"] == ["sun", "cfg"]
    assert info["auth"] is False


def test_native_png_is_the_generate_image(server, generated):
    status, headers, data = server.request("POST", "/v1/generate",
                                           {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 3})
    assert status == 200 and headers["content-type"] == "image/png" and headers["x-seed"] == "3"
    assert np.array_equal(pixels(data), generated[3][0])
    from PIL import Image

    assert Image.open(io.BytesIO(data)).text["parameters"] == generated[3][1]  # the same A1111 text as the CLI's PNG


def test_native_json_several_seeds(server, generated):
    status, body = server.json("POST", "/v1/generate", {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 3, "n": 3})
    assert status == 200 and body["seeds"] == [3, 4, 5] and body["batch"] == [3, 3, 3]
    for seed, image, parameters in zip(body["seeds"], body["images"], body["parameters"]):
        assert same_image(pixels(base64.b64decode(image)), generated[seed][0]), seed
        assert parameters == generated[seed][1]
    assert body["meaning"]["mode"] == "sun" and "not used" in body["meaning"]["cfg_scale"]


def test_a1111_through_webuiapi(server, generated):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=4, width=64, height=64, steps=4,
                         sampler_name="DDIM", batch_size=2, n_iter=1, cfg_scale=7)
    assert len(result.images) == 2
    for image, seed in zip(result.images, (4, 5)):
        assert same_image(np.asarray(image.convert("RGB")), generated[seed][0])
    info = result.info
    assert info["seed"] == 4 and info["all_seeds"] == [4, 5]
    assert info["prompt"] == PROMPT and info["all_prompts"] == [PROMPT, PROMPT] and info["negative_prompt"] == NEGATIVE
    assert info["sd_model_name"] == "pocket-base" and info["sd_model_hash"] == "8d3c561199"
    assert info["infotexts"] == [generated[4][1], generated[5][1]]
    assert info["cfg_scale"] == 1 and "not used" in info["sun"]["cfg_scale"]
    assert result.parameters["seed"] == 4 and result.parameters["batch_size"] == 2
    random_seed = api.txt2img(prompt=PROMPT, seed=-1, width=64, height=64, steps=4).info["seed"]
    assert 0 <= random_seed < 2**32
    assert api.util_get_model_names() == ["pocket-base [8d3c561199]"]
    api.util_set_model("pocket-base")
    assert api.get_options()["sd_model_checkpoint"] == "pocket-base [8d3c561199]"
    assert {s["name"] for s in api.get_samplers()} == {"DDIM", "Euler", "DPM++ 2M"}
    assert api.get_schedulers()[0]["name"] == "automatic"
    assert api.get_progress()["state"]["job_count"] == 0
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert api.interrupt() == {}
    status, body = server.json("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "v1-5-pruned.safetensors"})
    assert status == 422 and "pocket-base" in body["detail"]


def test_openai_through_its_client(server, generated):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused-without-auth", max_retries=0)
    result = client.images.generate(prompt=PROMPT, n=2, size="64x64", response_format="b64_json",
                                    extra_body={"negative_prompt": NEGATIVE, "seed": 3})
    assert len(result.data) == 2
    for item, seed in zip(result.data, (3, 4)):
        assert same_image(pixels(base64.b64decode(item.b64_json)), generated[seed][0])
    assert [m.id for m in client.models.list().data] == ["pocket-base"]
    with pytest.raises(openai.BadRequestError, match="size must be"):
        client.images.generate(prompt=PROMPT, size="big")
    with pytest.raises(openai.UnprocessableEntityError, match=r"steps 5000 is outside \[1, 50\]"):
        client.images.generate(prompt=PROMPT, size="64x64", extra_body={"steps": 5000})


LONG = "a red circle " + " ".join(f"word{i}" for i in range(90))
BAD = [  # route, body (or raw bytes), status, words the one line must hold
    ("/v1/generate", {"prompt": "x", "steps": 0}, 422, ["steps 0", "[1, 50]"]),
    ("/v1/generate", {"prompt": "x", "steps": 51}, 422, ["steps 51", "[1, 50]"]),
    ("/v1/generate", {"prompt": "x", "steps": "four"}, 422, ["steps", "whole number"]),
    ("/v1/generate", {"prompt": "x", "n": 9}, 422, ["n 9", "[1, 8]"]),
    ("/v1/generate", {"prompt": "x", "n": 0}, 422, ["n 0"]),
    ("/v1/generate", {"prompt": "x", "width": 100}, 422, ["width 100", "multiples of 8", "[32, 128]"]),
    ("/v1/generate", {"prompt": "x", "height": 4096}, 422, ["height 4096", "[8, 2048]"]),
    ("/v1/generate", {"prompt": "x", "seed": -5}, 422, ["seed -5", "-1 for random"]),
    ("/v1/generate", {"prompt": "x", "seed": 2**64}, 422, ["seed", "outside"]),
    ("/v1/generate", {"prompt": "x", "mode": "turbo"}, 422, ["mode", "sun, cfg"]),
    ("/v1/generate", {"prompt": "x", "guidance": 99}, 422, ["guidance 99", "[0, 50]"]),
    ("/v1/generate", {"prompt": 5}, 422, ["prompt"]),
    ("/v1/generate", {"negative_prompt": "x"}, 422, ["prompt is required"]),
    ("/v1/generate", {"prompt": "x" * 4001}, 422, ["prompt is 4001 characters", "4000"]),
    ("/v1/generate", b'{"prompt": "\\ud800"}', 422, ["prompt", "Unicode"]),
    ("/v1/generate", b"{not json", 400, ["not valid JSON"]),
    ("/v1/generate", b"[1, 2]", 400, ["JSON object"]),
    ("/v1/generate", b'{"prompt": "' + b"x" * (1 << 20) + b'"}', 413, ["over the limit"]),
    ("/v1/generate", {"prompt": "x", "n": 2, "response_format": "png"}, 422, ["response_format"]),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 512, "height": 512}, 422, ["width 512", "[32, 128]"]),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 3, "n_iter": 3}, 422, ["batch_size * n_iter is 9"]),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": -1}, 422, ["cfg_scale -1"]),
    ("/v1/images/generations", {"prompt": "x", "size": "64"}, 400, ["size must be"]),
    ("/v1/images/generations", {"prompt": "x", "response_format": "url"}, 422, ["response_format", "b64_json"]),
    ("/v1/images/generations", {"prompt": ""}, 400, ["prompt is required"]),
    ("/v1/images/generations", {"prompt": "x", "size": "64x64", "n": 20}, 422, ["n 20", "[1, 8]"]),
]


@pytest.mark.parametrize("route, body, status, words", BAD, ids=[f"{r}-{i}" for i, (r, *_) in enumerate(BAD)])
def test_bad_input_is_one_line(server, route, body, status, words):
    raw = body if isinstance(body, bytes) else None
    got, _, data = server.request("POST", route, None if raw else body, raw=raw)
    assert got == status, data
    one_line_error(data, *words)


def test_still_serving_after_bad_inputs_and_unknown_fields(server):
    status, headers, data = server.request("POST", "/v1/generate", {"prompt": "x", "seed": 1, "hr_scale": 2,
                                                                    "alwayson_scripts": {"x": {}}})
    assert status == 200 and pixels(data).shape == (64, 64, 3)
    assert server.request("GET", "/no/such/route")[0] == 404
    assert server.request("GET", "/v1/generate")[0] == 405


def test_long_prompts_are_cut_and_the_answer_says_so(server):
    status, headers, _ = server.request("POST", "/v1/generate", {"prompt": LONG, "seed": 1})
    assert status == 200 and "prompt is" in headers["x-warning"] and "cut" in headers["x-warning"]
    status, body = server.json("POST", "/v1/generate", {"prompt": "x", "negative_prompt": LONG, "n": 2})
    assert status == 200 and len(body["warnings"]) == 1 and body["warnings"][0].startswith("negative_prompt is")
    status, body = server.json("POST", "/sdapi/v1/txt2img", {"prompt": LONG, "width": 64, "height": 64, "steps": 4})
    assert status == 200 and "cut" in json.loads(body["info"])["warnings"][0]


def test_cfg_baseline_and_its_meaning(server):
    status, body = server.json("POST", "/v1/generate", {"prompt": PROMPT, "mode": "cfg", "steps": 3, "guidance": 5,
                                                        "n": 2, "seed": 7})
    assert status == 200 and body["mode"] == "cfg" and "5, the CFG baseline" in body["meaning"]["cfg_scale"]
    assert "CFG scale: 5" in body["parameters"][0] and "SUN: off" in body["parameters"][0]


def test_metrics(server):
    status, _, data = server.request("GET", "/metrics")
    text = data.decode()
    assert status == 200
    for name in ('sun_edge_requests_total{route="/v1/generate",status="200"}', "sun_edge_images_total",
                 "sun_edge_queue_depth", "sun_edge_batch_size_bucket", "sun_edge_request_seconds_bucket",
                 "sun_edge_unet_step_seconds_bucket", 'route="/v1/generate",status="422"'):
        assert name in text, name


def test_load_concurrent_requests_share_batches_and_keep_their_images(server):
    """24 requests at concurrency 8: none lost, duplicated or invalid; each the image it gives alone."""
    from sun_edge_server.loadtest import Client, references, run_load

    client = Client(server.url)
    expected = references(client, 24, seed0=500)
    before = _batched(server)
    result = run_load(client, requests=24, concurrency=8, duration_s=120, seed0=500, expected=expected)
    assert (result.ok, result.lost, result.duplicated, result.invalid, result.mismatched) == (24, 0, 0, 0, 0), result
    assert _batched(server) > before, "no batch of more than one image: the requests were not gathered"


def _batched(server) -> float:
    """How many batches held more than one image, from /metrics."""
    text = server.request("GET", "/metrics")[2].decode()
    buckets = {line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line.startswith("sun_edge_batch_size_bucket")}
    total = float(next(l for l in text.splitlines() if l.startswith("sun_edge_batch_size_count")).rsplit(" ", 1)[1])
    return total - buckets["1.0"]


CHROMIUM = "/usr/bin/chromium"  # Debian's (.ci/run installs it); playwright never downloads a browser here
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


def test_the_page_in_a_real_browser(server, generated, tmp_path):
    """Headless Chromium types a prompt and a negative prompt, clicks Generate, waits for the pictures (SUN and
    the CFG baseline), checks they decode and equal the CLI's image, sees an error in words; saves a screenshot."""
    import os
    from pathlib import Path

    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run installs it with apt-get install -y chromium")
        pytest.skip(f"no {CHROMIUM} on this machine (apt-get install chromium); CI runs this test")
    sync_api = pytest.importorskip("playwright.sync_api")
    shot = Path(os.environ.get("SUN_EDGE_SCREENSHOT", tmp_path / "page.png"))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('pocket-base')")
            page.fill("#prompt", PROMPT)
            page.fill("#negative", NEGATIVE)
            page.fill("#seed", "3")
            page.click("#generate")
            page.wait_for_selector(".result img", timeout=120_000)
            page.wait_for_function("[...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth)")
            sources = page.eval_on_selector_all(".result img", "els => els.map(e => e.src)")
            widths = page.eval_on_selector_all(".result img", "els => els.map(e => e.naturalWidth)")
            captions = page.inner_text(".result")
            assert len(sources) == 2 and widths == [64, 64], captions  # SUN and the CFG baseline side by side
            sun = pixels(base64.b64decode(sources[0].split(",", 1)[1]))
            assert np.array_equal(sun, generated[3][0])
            assert "SUN · seed 3" in captions and "CFG baseline · seed 3" in captions and "Negative prompt: blue" in captions
            page.screenshot(path=str(shot), full_page=True)
            page.fill("#steps", "999")
            page.click("#generate")
            page.wait_for_selector("#error", state="visible")
            assert "steps 999 is outside [1, 50]" in page.inner_text("#error")
        finally:
            browser.close()
    assert shot.stat().st_size > 1000


def test_the_cli_imports_no_server_library_until_serve_runs():
    import subprocess
    import sys

    code = "import sys, sun_edge.cli; sun_edge.cli.build_parser(); print(sorted(m for m in ('fastapi', 'uvicorn', " \
           "'starlette', 'prometheus_client') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


@pytest.mark.parametrize("flags, words", [
    (["--max-batch", "0"], "--max-batch must be positive"),
    (["--timeout-s", "-1"], "--timeout-s must be positive"),
    (["--port", "70000"], "--port 70000 is outside [0, 65535]"),
    (["--bundle", "/nonexistent/bundle"], "is not a folder"),
])
def test_serve_flags_are_checked_before_loading(capsys, flags, words):
    from cli_helpers import error_line, run

    code, _, err = run(capsys, "serve", *flags)
    assert code == 2 and words in error_line(err)


def test_a_model_that_fails_to_load_stops_the_server_with_status_2(tmp_path):
    s = Server(tmp_path / "serve.log", "--model", str(tmp_path / "no-such-model"))
    try:
        assert s.process.wait(120) == 2
        assert "error: model path" in s.log() and "does not exist" in s.log()
    finally:
        s.terminate()
