"""A 9-channel inpainting UNet through the exporter (issue 19): the tiny random sd-1.5-inpainting-layout model
(tests/inpaint_helpers.py) exported to an fp32 ONNX bundle with its CFG baseline, its parity recorded at export
(the condition fed to both UNet graphs), then ONNX Runtime against PyTorch on whole inpainting images, SUN and CFG,
with the unmasked pixels kept by paste-back."""

from __future__ import annotations

import numpy as np
import pytest

from inpaint_helpers import SIZE, init_picture, psnr8, right_half
from sun_edge.bundle import open_bundle
from sun_edge.export.targets import ONNX_FP32
from sun_edge.pipeline import Pipeline, Settings


@pytest.fixture(scope="module")
def inpaint_bundle(inpaint_model, tmp_path_factory):
    from sun_edge.bundle_parity import export_parity
    from sun_edge.export import ExportOptions, export

    out = tmp_path_factory.mktemp("inpaint-bundle") / "onnx"
    return export("onnx", str(inpaint_model["folder"]), out, parity=export_parity, progress=False,
                  options=ExportOptions(precision="fp32", height=SIZE, width=SIZE, with_baseline=True))


@pytest.fixture(scope="module")
def inpaint_reference(inpaint_model):
    from sun_edge.runtimes.pytorch import TorchRuntime

    return TorchRuntime.load(str(inpaint_model["folder"]))


def test_the_manifest_records_nine_channels_and_parity_passed(inpaint_bundle):
    from sun_edge.export.onnx_graph import graph_io

    m = open_bundle(inpaint_bundle).manifest
    assert m.latent["unet_in_channels"] == 9 and m.latent["channels"] == 4
    assert m.components["unet"].inputs[0].shape == (1, 9, 8, 8)
    assert m.components["unet_plain"].inputs[0].shape == (-1, 9, 8, 8)
    assert m.components["unet"].outputs[0].shape == (1, 4, 8, 8)  # eps over the 4 latent channels
    inputs, _ = graph_io(inpaint_bundle / m.components["unet"].file)  # the graph itself, not only the manifest
    assert inputs[0].shape == (1, 9, 8, 8)
    rows = m.parity["components"]
    assert m.parity["passed"]
    for row in ("unet", "unet_plain", "image", "image_img2img", "image_inpaint"):
        assert rows[row]["passed"] and rows[row]["psnr_db"] >= getattr(ONNX_FP32, row), (row, rows[row])


@pytest.mark.parametrize("mode", ["sun", "cfg"])
def test_onnxruntime_inpainting_equals_pytorch(inpaint_bundle, inpaint_reference, mode, one_thread):
    from sun_edge.parity import psnr
    from sun_edge.runtimes.onnxruntime import OnnxRuntime

    runtime = OnnxRuntime.open(inpaint_bundle)
    assert runtime.unet_in_channels == 9
    settings = Settings.for_mode(mode, height=SIZE, width=SIZE, steps=4, strength=0.75, paste_back=True)
    job = dict(seeds=[7], settings=settings, init_image=init_picture(), mask=right_half())
    got = Pipeline(runtime, runtime.tokenizer()).generate("a green square", "blurry", **job)[0]
    want = Pipeline(inpaint_reference).generate("a green square", "blurry", **job)[0]
    assert got.unet_calls == want.unet_calls
    a, b = (np.asarray(x.image, np.float64) / 127.5 - 1 for x in (want, got))
    assert psnr(a, b) >= ONNX_FP32.image_inpaint
    kept, init = np.asarray(got.image), np.asarray(init_picture())
    assert psnr8(kept[:, :SIZE // 2], init[:, :SIZE // 2]) >= 30.0  # the unmasked half, pasted back
    assert psnr8(kept[:, SIZE // 2:], init[:, SIZE // 2:]) < 25.0  # the masked half, repainted
