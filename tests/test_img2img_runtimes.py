"""img2img and inpainting on the bundle runtimes (issue 19): ONNX Runtime equals the PyTorch reference within its
thresholds on the VAE encoder's two outputs and on whole img2img and inpainting images (the rows every export now
records); bundles of the older one-output VAE encoder still open and refuse img2img in one line; a 9-channel
inpainting UNet's manifest, bundle runtime checks and TensorRT profiles."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from bundle_helpers import GEOMETRY, make_manifest
from sun_edge.bundle import Manifest, open_bundle, write_manifest
from sun_edge.components import COMPONENTS
from sun_edge.errors import SunEdgeError
from sun_edge.parity import EDIT_ROWS, compare_runtimes
from sun_edge.pipeline import Pipeline, Settings

EDIT_CHECK = ("vae_encoder", *EDIT_ROWS)


@pytest.mark.parametrize("which", ["onnx_fp32_bundle", "onnx_fp16_bundle"])
def test_onnxruntime_equals_pytorch_on_img2img_and_inpainting(which, request, tiny_reference, one_thread):
    from sun_edge.runtimes.onnxruntime import OnnxRuntime

    bundle = open_bundle(request.getfixturevalue(which))
    manifest = bundle.manifest
    assert [s.name for s in manifest.components["vae_encoder"].outputs] == ["latent_sample", "latent_std"]
    for row in EDIT_ROWS:  # recorded by the export's own parity check
        assert manifest.parity["components"][row]["passed"], row
    report = compare_runtimes(tiny_reference, OnnxRuntime(bundle), precision=manifest.precision,
                              components=EDIT_CHECK, settings=Settings.from_manifest(manifest),
                              precisions={n: c.precision for n, c in manifest.components.items()})
    assert report.passed, report.table()
    assert {r.component for r in report.rows} == set(EDIT_CHECK)
    assert report.row("vae_encoder").inputs == 2  # the posterior's mean and its std


def test_a_bundle_runtime_makes_the_reference_img2img_image(onnx_fp32_bundle, tiny_reference, one_thread):
    from sun_edge.runtimes.onnxruntime import OnnxRuntime

    runtime = OnnxRuntime.open(onnx_fp32_bundle)
    init = Image.new("RGB", (80, 64), (200, 40, 40))
    settings = Settings(height=64, width=64, strength=0.5)
    ours = Pipeline(runtime, runtime.tokenizer()).generate("a circle", "", seeds=[2], settings=settings,
                                                          init_image=init)[0]
    ref = Pipeline(tiny_reference).generate("a circle", "", seeds=[2], settings=settings, init_image=init)[0]
    assert ours.unet_calls == ref.unet_calls == 2
    assert np.abs(np.asarray(ours.image, float) - np.asarray(ref.image, float)).max() <= 2  # 8-bit rounding


def _older(bundle_dir, tmp_path):
    """A copy of a bundle whose manifest is an older export's: the VAE encoder's mean alone."""
    old = tmp_path / "old"
    shutil.copytree(bundle_dir, old)
    data = json.loads((old / "manifest.json").read_text())
    data["components"]["vae_encoder"]["outputs"] = data["components"]["vae_encoder"]["outputs"][:1]
    del data["latent"]["unet_in_channels"]
    (old / "manifest.json").write_text(json.dumps(data))
    return old


def test_an_older_bundle_opens_and_refuses_img2img_in_one_line(onnx_fp32_bundle, tmp_path, one_thread):
    from sun_edge.runtimes.onnxruntime import OnnxRuntime

    runtime = OnnxRuntime.open(_older(onnx_fp32_bundle, tmp_path))
    pipe = Pipeline(runtime, runtime.tokenizer())
    assert pipe.generate("a circle", seeds=[0], settings=Settings(height=64, width=64))[0].unet_calls == 4
    with pytest.raises(SunEdgeError) as e:
        pipe.generate("a circle", seeds=[0], settings=Settings(height=64, width=64, strength=0.5),
                      init_image=Image.new("RGB", (64, 64)))
    assert "returns the posterior mean alone" in str(e.value) and "re-export" in str(e.value)
    assert "\n" not in str(e.value)
    assert not any(row in EDIT_ROWS for row in COMPONENTS)  # parity rows, not components


def test_parity_skips_the_edit_rows_of_an_older_bundle(onnx_fp32_bundle, tiny_reference, tmp_path, one_thread):
    from sun_edge.runtimes.onnxruntime import OnnxRuntime

    runtime = OnnxRuntime.open(_older(onnx_fp32_bundle, tmp_path))  # (its graph has two outputs: not run here)
    report = compare_runtimes(tiny_reference, runtime, precision="fp32", components=("image", *EDIT_ROWS),
                              settings=Settings(height=64, width=64))
    assert report.passed and [r.component for r in report.rows] == ["image"]
    assert set(report.skipped) == set(EDIT_ROWS)


def _nine_channel_manifest(tmp_path) -> Manifest:
    geometry = dataclasses.replace(GEOMETRY, unet_in_channels=9)
    manifest = make_manifest(tmp_path, ("text_encoder", "unet", "unet_plain", "vae_decoder", "vae_encoder"))
    comps = {name: dataclasses.replace(c, inputs=COMPONENTS[name].io(geometry)[0]) for name, c in
             manifest.components.items()}
    return dataclasses.replace(manifest, components=comps, latent={**manifest.latent, "unet_in_channels": 9})


def test_a_nine_channel_bundle_records_and_checks_its_unet_sample(tmp_path):
    from sun_edge.runtimes.base import GraphRuntime

    manifest = _nine_channel_manifest(tmp_path)
    write_manifest(tmp_path, manifest)
    bundle = open_bundle(tmp_path)
    assert bundle.manifest.components["unet"].inputs[0].shape == (1, 9, 8, 8)
    assert bundle.manifest.components["unet_plain"].inputs[0].shape == (-1, 9, 8, 8)
    assert bundle.manifest.components["unet"].outputs[0].shape == (1, 4, 8, 8)

    class Fake(GraphRuntime):
        name, TARGETS = "fake", ("onnx",)

        def __init__(self, bundle):
            self._open_bundle(bundle)
            self.info = {}

        def run(self, component, *arrays):
            return np.zeros((len(arrays[0]), 4, 8, 8), np.float32)

    runtime = Fake(bundle)
    assert runtime.unet_in_channels == 9 and Pipeline(runtime).inpainting_unet
    with pytest.raises(SunEdgeError, match=r"expected shape \[\?,9,\?,\?\]"):
        runtime.unet_plain(np.zeros((2, 4, 8, 8), np.float32), np.array([999.0], np.float32),
                           np.zeros((2, 77, 32), np.float32))
    # a manifest whose UNet sample disagrees with its recorded channels is refused on opening
    bad = dataclasses.replace(manifest, latent={**manifest.latent, "unet_in_channels": 4})
    write_manifest(tmp_path, bad)
    with pytest.raises(SunEdgeError, match="components.unet.inputs"):
        open_bundle(tmp_path)


def test_tensorrt_profiles_take_the_nine_channel_sample(tmp_path):
    from sun_edge.runtimes.tensorrt_rules import binding_plan, profile_shapes

    manifest = _nine_channel_manifest(tmp_path)
    shapes = profile_shapes(manifest.components["unet"])
    assert shapes["sample"] == {"min": (1, 9, 8, 8), "opt": (1, 9, 8, 8), "max": (1, 9, 8, 8)}
    plain = profile_shapes(manifest.components["unet_plain"], 2)
    assert plain["sample"]["min"] == (1, 9, 8, 8) and plain["sample"]["max"] == (2, 9, 8, 8)
    outputs = {b.name: b.shape for b in binding_plan(manifest.components["unet_plain"], 2) if not b.is_input}
    assert outputs == {"noise_pred": (2, 4, 8, 8)}


def test_tensorrt_binds_both_vae_encoder_outputs(tmp_path):
    from sun_edge.runtimes.tensorrt_rules import binding_plan

    manifest = _nine_channel_manifest(tmp_path)
    plan = binding_plan(manifest.components["vae_encoder"])
    assert [(b.name, b.shape) for b in plan if not b.is_input] == [("latent_sample", (1, 4, 8, 8)),
                                                                  ("latent_std", (1, 4, 8, 8))]
