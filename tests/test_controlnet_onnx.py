"""ControlNet through an exported bundle: the tiny model exported to ONNX with a tiny random ControlNet (its
original ControlNet/LDM-layout file), checked by the export's own parity (controlnet, unet with residuals,
image_controlnet rows), then ONNX Runtime against PyTorch on whole ControlNet images, SUN and CFG; TensorRT's
profile for the graph; the CLI's flags."""

from __future__ import annotations

import numpy as np
import pytest

from controlnet_helpers import condition_image

SIZE = 64


@pytest.fixture(scope="module")
def bundle(tiny_home, control_files, tmp_path_factory):
    """The tiny model's fp32 ONNX bundle with the CFG baseline and the ControlNet (export parity included)."""
    from sun_edge.bundle_parity import export_parity
    from sun_edge.export import ExportOptions, export

    out = tmp_path_factory.mktemp("controlnet-bundle") / "onnx"
    return export("onnx", str(tiny_home / "models" / "tiny-random"), out, controlnet=control_files["ldm"],
                  options=ExportOptions(height=SIZE, width=SIZE, with_baseline=True), parity=export_parity,
                  progress=False)


@pytest.fixture(scope="module")
def reference(tiny_home, control_files):
    from sun_edge.runtimes.pytorch import TorchRuntime

    return TorchRuntime.load(str(tiny_home / "models" / "tiny-random"), controlnet=control_files["ldm"])


def test_manifest_records_the_controlnet_and_the_residual_inputs(bundle, control_files):
    from sun_edge.bundle import open_bundle
    from sun_edge.weights import sha256_file

    m = open_bundle(bundle).manifest
    assert m.controlnet["sha256"] == sha256_file(control_files["ldm"]) and m.controlnet["name"] == "control_tiny_ldm.safetensors"
    names = [s.name for s in m.components["unet"].inputs]
    assert names[4:] == [f"down_block_res_{i}" for i in range(12)] + ["mid_block_res"]
    assert [s.name for s in m.components["unet_plain"].inputs][3:] == names[4:]
    assert [s.shape for s in m.components["controlnet"].outputs][-1] == (-1, 64, 1, 1)  # mid: 64 channels at 8x8 / 8
    rows = m.parity["components"]
    for row in ("controlnet", "image_controlnet", "unet", "image"):
        assert rows[row]["passed"], row
    assert rows["controlnet"]["inputs"] == 4 * 13 + 13  # every residual of the 4 steps, and of the CFG pair


@pytest.mark.parametrize("mode", ["sun", "cfg"])
def test_onnxruntime_controlnet_image_equals_pytorch(bundle, reference, mode):
    from sun_edge.parity import psnr
    from sun_edge.pipeline import Pipeline, Settings
    from sun_edge.runtimes.onnxruntime import OnnxRuntime

    runtime = OnnxRuntime.open(bundle)
    settings = Settings.for_mode(mode, height=SIZE, width=SIZE, steps=4)
    image = condition_image(SIZE, SIZE)
    got = Pipeline(runtime, runtime.tokenizer()).generate("a ring", "box", seeds=[5], settings=settings,
                                                         control_image=image)[0]
    want = Pipeline(reference).generate("a ring", "box", seeds=[5], settings=settings, control_image=image)[0]
    a, b = (np.asarray(x.image, np.float64) / 127.5 - 1 for x in (want, got))
    assert psnr(a, b) >= 40.0  # the ONNX fp32 image floor
    plain = Pipeline(runtime, runtime.tokenizer()).generate("a ring", "box", seeds=[5], settings=settings)[0]
    assert np.abs(np.asarray(plain.image, int) - np.asarray(got.image, int)).mean() > 1.0  # the residuals matter
    assert "control_tiny_ldm" in got.parameters


def test_a_controlnet_bundle_without_a_condition_is_the_plain_model(bundle, tiny_home):
    """No control image: the UNet graphs get zero residuals, which is the model without a ControlNet."""
    from sun_edge.pipeline import Pipeline, Settings
    from sun_edge.runtimes.onnxruntime import OnnxRuntime
    from sun_edge.runtimes.pytorch import TorchRuntime

    runtime = OnnxRuntime.open(bundle)
    settings = Settings(height=SIZE, width=SIZE)
    got = Pipeline(runtime, runtime.tokenizer()).generate("a cat", seeds=[1], settings=settings)[0]
    want = Pipeline(TorchRuntime.load(str(tiny_home / "models" / "tiny-random"))).generate("a cat", seeds=[1],
                                                                                          settings=settings)[0]
    assert np.abs(np.asarray(got.image, int) - np.asarray(want.image, int)).max() <= 1


def test_tensorrt_profiles_span_the_cfg_pair(bundle):
    from sun_edge.bundle import open_bundle
    from sun_edge.runtimes import tensorrt_rules as rules

    m = open_bundle(bundle).manifest
    top = rules.free_batch_max(m, "controlnet")
    shapes = rules.profile_shapes(m.components["controlnet"], top)
    assert top == 2 and shapes["controlnet_cond"] == {"min": (1, 3, SIZE, SIZE), "opt": (2, 3, SIZE, SIZE),
                                                      "max": (2, 3, SIZE, SIZE)}
    unet = rules.profile_shapes(m.components["unet"], rules.free_batch_max(m, "unet"))
    assert unet["mid_block_res"]["max"] == (1, 64, 1, 1)


def test_cli_generates_with_a_bundles_controlnet(bundle, tmp_path, home_env):
    from sun_edge.cli import main
    from sun_edge.imaging import read_parameters

    cond = tmp_path / "edges.png"
    condition_image(SIZE, SIZE).save(cond)
    out = tmp_path / "out.png"
    assert main(["generate", "--bundle", str(bundle), "--prompt", "a ring", "--control-image", str(cond),
                 "--control-scale", "0.5", "-o", str(out)]) == 0
    assert "Weight: 0.5" in read_parameters(out)


def test_cli_flags_that_need_each_other_get_one_line(bundle, tmp_path, capsys, control_files, home_env):
    from cli_helpers import error_line, run

    cond = tmp_path / "edges.png"
    condition_image(SIZE, SIZE).save(cond)
    cases = [
        (["--bundle", str(bundle), "--control-scale", "0.5"], "need --control-image"),
        (["--bundle", str(bundle), "--control-image", str(cond), "--controlnet", str(control_files["ldm"])],
         "--controlnet applies to --model"),
        (["--model", "tiny-random", "--control-image", str(cond)], "--control-image needs --controlnet"),
        (["--bundle", str(bundle), "--control-image", str(tmp_path)], "does not exist"),
        (["--bundle", str(bundle), "--control-image", str(cond), "--control-scale", "3"], "control scale must be"),
    ]
    for args, words in cases:
        code, _, err = run(capsys, "generate", "--prompt", "x", "-o", str(tmp_path / "x.png"), *args)
        assert code == 2 and words in error_line(err), (args, err)


def test_triton_packaging_refuses_a_controlnet_in_one_line(home_env, tmp_path, capsys, control_files):
    """The Triton model's requests carry no control image, so --controlnet is refused, not silently dropped."""
    from cli_helpers import error_line, run

    for source in (["--model", "tiny-random"], ["--bundle", str(tmp_path / "missing")]):
        code, _, err = run(capsys, "export", "--target", "triton", *source, "--controlnet", str(control_files["ldm"]),
                           "-o", str(tmp_path / "repo"))
        assert code == 2 and "--controlnet: the triton model serves text-to-image" in error_line(err), err
    assert not (tmp_path / "repo").exists()



@pytest.mark.parametrize("precision", ["f32"])
def test_openvino_controlnet_rows_pass_their_floors(bundle, reference, precision):
    """The same ONNX bundle on OpenVINO: every row, ControlNet's included, at that runtime's floors."""
    pytest.importorskip("openvino")
    from sun_edge.bundle import open_bundle
    from sun_edge.parity import compare_runtimes
    from sun_edge.pipeline import Settings
    from sun_edge.runtimes.openvino import OpenVinoRuntime

    opened = open_bundle(bundle)
    candidate = OpenVinoRuntime(opened, ov_precision=precision)
    report = compare_runtimes(reference, candidate, precision="fp32", settings=Settings.from_manifest(opened.manifest),
                              components=("controlnet", "unet", "image_controlnet"))
    assert report.passed, report.table()
    assert report.row("controlnet").inputs == 4 * 13 + 13
