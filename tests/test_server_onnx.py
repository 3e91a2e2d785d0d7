"""``sun-edge serve --bundle`` on the tiny model's ONNX bundle (ONNX Runtime, CPU), with an API key.

Every route but /healthz (and the static page) needs ``Authorization: Bearer KEY``; the three APIs
work through their clients with the key; images equal ``sun-edge generate --bundle`` with their seed.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from test_server_support import Server, one_line_error, pixels, same_image

KEY = "test-key-5f2c"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, onnx_fp32_bundle):
    folder = tmp_path_factory.mktemp("serve-onnx")
    s = Server(folder / "serve.log", "--bundle", str(onnx_fp32_bundle), "--batch-window-ms", "50",
               env={"SUN_EDGE_API_KEY": KEY})
    try:
        yield s.wait_ready(headers=AUTH)
    finally:
        assert s.terminate() == 0, s.log()


@pytest.fixture(scope="module")
def generated(tmp_path_factory, onnx_fp32_bundle):
    """``sun-edge generate --bundle`` for seeds 2 and 3 (pixels by seed)."""
    from PIL import Image

    from sun_edge.cli import main

    folder = tmp_path_factory.mktemp("generate-onnx")
    assert main(["generate", "--bundle", str(onnx_fp32_bundle), "--prompt", "a cat", "--negative-prompt", "a dog",
                 "--seed", "2", "3", "-o", str(folder / "g.png")]) == 0
    return {seed: np.asarray(Image.open(folder / f"g-s{seed}.png").convert("RGB")) for seed in (2, 3)}


@pytest.mark.parametrize("path", ["/readyz", "/v1/info", "/metrics", "/sdapi/v1/sd-models", "/v1/models"])
def test_every_route_needs_the_key(server, path):
    status, headers, data = server.request("GET", path)
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    one_line_error(data, "Authorization")
    assert server.request("GET", path, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert server.request("GET", path, headers={"Authorization": KEY})[0] == 401  # the scheme is needed too
    assert server.request("GET", path, headers=AUTH)[0] == 200


def test_health_and_page_need_no_key(server):
    assert server.json("GET", "/healthz") == (200, {"alive": True})
    assert server.request("GET", "/")[0] == 200
    assert server.request("POST", "/v1/generate", {"prompt": "x"})[0] == 401


def test_info_names_the_bundle(server, onnx_fp32_bundle):
    status, info = server.json("GET", "/v1/info", headers=AUTH)
    assert status == 200 and info["bundle"] == onnx_fp32_bundle.name and info["runtime"]["runtime"] == "onnxruntime"
    assert info["sizes"] == "64x64" and info["default_size"] == {"width": 64, "height": 64} and info["auth"] is True
    assert info["modes"] == ["sun", "cfg"]  # exported --with-baseline


def test_native_is_the_generate_image(server, generated):
    status, headers, data = server.request("POST", "/v1/generate", {"prompt": "a cat", "negative_prompt": "a dog",
                                                                    "seed": 2}, headers=AUTH)
    assert status == 200 and headers["x-seed"] == "2"
    assert np.array_equal(pixels(data), generated[2])
    status, body = server.json("POST", "/v1/generate", {"prompt": "a cat", "negative_prompt": "a dog", "seed": 2, "n": 2},
                               headers=AUTH)
    assert status == 200 and body["seeds"] == [2, 3]
    for image, seed in zip(body["images"], (2, 3)):
        assert same_image(pixels(base64.b64decode(image)), generated[seed])


def test_a1111_with_the_key(server, generated):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    api.session.headers.update(AUTH)
    result = api.txt2img(prompt="a cat", negative_prompt="a dog", seed=3, width=64, height=64, steps=4,
                         sampler_name="DDIM")
    assert np.array_equal(np.asarray(result.images[0].convert("RGB")), generated[3])
    assert result.info["all_seeds"] == [3] and result.info["sd_model_name"]
    status, body = server.json("POST", "/sdapi/v1/txt2img", {"prompt": "x", "width": 128, "height": 128}, headers=AUTH)
    assert status == 422 and "64x64" in body["detail"]


def test_openai_with_the_key(server, generated):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    result = client.images.generate(prompt="a cat", size="64x64", extra_body={"negative_prompt": "a dog", "seed": 2})
    assert np.array_equal(pixels(base64.b64decode(result.data[0].b64_json)), generated[2])
    with pytest.raises(openai.AuthenticationError, match="wrong API key"):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_cfg_baseline_on_the_bundle(server):
    status, body = server.json("POST", "/v1/generate", {"prompt": "a cat", "mode": "cfg", "n": 1,
                                                        "response_format": "json", "seed": 1}, headers=AUTH)
    assert status == 200 and body["mode"] == "cfg" and "Steps: 25" in body["parameters"][0]
    assert json.dumps(body).count("Traceback") == 0
