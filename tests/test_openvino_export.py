"""``sun-edge export --target openvino``: an OpenVINO IR bundle of the tiny model (fp16 weights, a batch range),
checked at export by the OpenVINO runtime against PyTorch, opened by the OpenVINO runtime (and refused by ONNX
Runtime), its weights really float16 where the manifest says so, generation without torch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("openvino")

from cli_helpers import error_line, run  # noqa: E402
from no_torch import run_without_torch  # noqa: E402
from sun_edge.bundle import open_bundle  # noqa: E402
from sun_edge.errors import SunEdgeError  # noqa: E402
from sun_edge.export.targets import TARGETS  # noqa: E402
from sun_edge.noise import initial_noise  # noqa: E402
from sun_edge.parity import psnr  # noqa: E402
from sun_edge.runtimes import open_bundle_runtime  # noqa: E402
from sun_edge.tokenizer import CLIPTokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def ir_bundle(tiny_reference, tmp_path_factory):
    from sun_edge.bundle_parity import export_parity
    from sun_edge.export.openvino import OpenVinoOptions, export_bundle

    out = tmp_path_factory.mktemp("ov") / "ir"
    return export_bundle(tiny_reference, out, OpenVinoOptions(height=64, width=64, max_batch=2, with_baseline=True),
                         parity=export_parity, progress=False)


def _constant_types(xml) -> set[str]:
    """The element types of the IR's constants (weights; int8 ones as u8 with their scales), read from the saved graph."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    return {op.get_output_element_type(0).get_type_name() for op in model.get_ops()
            if op.get_type_name() == "Constant"}


def test_the_bundle_is_ir_with_fp16_weights_and_export_parity(ir_bundle):
    m = open_bundle(ir_bundle).manifest
    assert m.target == "openvino" and m.precision == "fp16" and m.batch == {"min": 1, "max": 2}
    assert set(m.components) >= {"text_encoder", "unet", "unet_plain", "vae_decoder", "vae_encoder"}
    for name, comp in m.components.items():
        assert comp.file == f"{name}.xml" and set(comp.files) == {f"{name}.xml", f"{name}.bin"}
        assert (ir_bundle / f"{name}.bin").stat().st_size == comp.files[f"{name}.bin"]
    assert not list(ir_bundle.rglob("*.onnx")) and not [p for p in ir_bundle.iterdir() if p.name.startswith(".")]
    assert {m.components[n].precision for n in ("text_encoder", "unet", "unet_plain")} == {"fp16"}
    assert {m.components[n].precision for n in ("vae_decoder", "vae_encoder")} == {"fp32"}  # the VAE's policy
    assert "f16" in _constant_types(ir_bundle / "unet.xml")  # compressed: f16 weights (decompressed at compile)
    assert "f16" not in _constant_types(ir_bundle / "vae_decoder.xml")
    assert m.components["unet"].inputs[0].shape == (-1, 4, 8, 8)  # the batch range stays a free dimension
    parity = m.parity
    assert parity["passed"] and parity["candidate"] == "openvino" and parity["inputs"]["batches"] == [1, 2]
    assert m.extra["weights"] == "fp16" and m.extra["openvino"]


def test_the_openvino_runtime_runs_it_and_onnxruntime_refuses(ir_bundle, tiny_reference):
    bundle = open_bundle(ir_bundle)
    runtime = open_bundle_runtime(bundle, ov_precision="f32")
    assert runtime.name == "openvino" and runtime.max_batch == 2
    tok = CLIPTokenizer.default()
    pos, neg = (tiny_reference.encode_text(tok.encode(text)) for text in ("a red circle", "blue"))
    x = np.concatenate([initial_noise(s, (1, 4, 8, 8), kind="torch") for s in (0, 1)]).astype(np.float32)
    t = np.array([749.0], np.float32)
    floors = TARGETS["openvino"].thresholds["fp16"]
    ref = tiny_reference.unet(x, t, np.repeat(pos, 2, 0), np.repeat(neg, 2, 0))  # the PyTorch reference, batch 2
    out = runtime.unet(x, t, np.repeat(pos, 2, 0), np.repeat(neg, 2, 0))
    for k in range(2):
        assert psnr(ref[k], out[k]) >= floors.unet
    one = runtime.unet(x[:1], t, pos, neg)
    assert psnr(out[0], one[0]) >= floors.unet
    assert set(runtime.compiled_models()) == {"unet"}  # one compiled model for batch 2 and batch 1
    with pytest.raises(SunEdgeError, match="runtime onnxruntime does not run openvino bundles; openvino bundles run "
                                           "on: openvino"):
        open_bundle_runtime(bundle, "onnxruntime")


def test_generate_from_the_ir_bundle_without_torch(ir_bundle, tmp_path):
    out = tmp_path / "ir.png"
    run_without_torch(f"""
        import sys
        from sun_edge.cli import main
        code = main(["generate", "--bundle", {str(ir_bundle)!r}, "--prompt", "a red circle", "--seed", "1", "2",
                     "--batch", "2", "-o", {str(out)!r}])
        assert code == 0, code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))
        assert not heavy, heavy
    """, capture_output=True)
    written = sorted(tmp_path.glob("ir*.png"))
    assert written and all(Image.open(p).size == (64, 64) for p in written)


@pytest.fixture(scope="module")
def int8_bundle(tiny_reference, tmp_path_factory):
    pytest.importorskip("nncf")
    from sun_edge.bundle_parity import export_parity
    from sun_edge.export.openvino import OpenVinoOptions, export_bundle

    out = tmp_path_factory.mktemp("ov8") / "ir8"
    return export_bundle(tiny_reference, out, OpenVinoOptions(height=64, width=64, ov_weights="int8"),
                         parity=export_parity, progress=False)


@pytest.mark.slow  # a second export with NNCF (minutes on a shared CPU); run with -m slow
def test_int8_weights_are_8_bit_smaller_and_within_their_floors(int8_bundle, ir_bundle, tiny_reference):
    """NNCF int8 weights: u8 constants in the UNet IR, the VAE untouched (fp32), the UNet's .bin under 60% of the
    fp16 one, parity at export passed, and the UNet at f32 within the int8 floors against PyTorch."""
    m = open_bundle(int8_bundle).manifest
    assert m.precision == "int8" and m.extra["weights"] == "int8" and m.parity["passed"]
    assert {m.components[n].precision for n in ("text_encoder", "unet")} == {"int8"}
    assert m.components["vae_decoder"].precision == "fp32"
    assert "u8" in _constant_types(int8_bundle / "unet.xml") and "u8" not in _constant_types(int8_bundle / "vae_decoder.xml")
    fp16_bin = open_bundle(ir_bundle).manifest.components["unet"].files["unet.bin"]
    assert m.components["unet"].files["unet.bin"] < 0.6 * fp16_bin
    runtime = open_bundle_runtime(open_bundle(int8_bundle), ov_precision="f32")
    tok = CLIPTokenizer.default()
    pos, neg = (tiny_reference.encode_text(tok.encode(text)) for text in ("a red circle", "blue"))
    x, t = initial_noise(2, (1, 4, 8, 8), kind="torch").astype(np.float32), np.array([499.0], np.float32)
    floors = TARGETS["openvino"].thresholds["int8"]
    assert psnr(tiny_reference.unet(x, t, pos, neg), runtime.unet(x, t, pos, neg)) >= floors.unet


def test_openvino_export_options_are_one_line(home_env, tmp_path, capsys):
    from sun_edge.export.openvino import OpenVinoOptions

    with pytest.raises(SunEdgeError, match=r"^unknown OpenVINO weights 'int4'; valid: int8 \(fp16 or fp32 weights: "):
        OpenVinoOptions(ov_weights="int4").validate()
    code, _, err = run(capsys, "export", "--target", "onnx", "--model", "tiny-random", "-o", str(tmp_path / "b"),
                       "--ov-weights", "int8")
    assert code == 2 and error_line(err) == "error: --ov-weights applies to --target openvino only"


@pytest.fixture(scope="module")
def controlnet_ir_bundle(tiny_home, control_files, tmp_path_factory):
    from sun_edge.bundle_parity import export_parity
    from sun_edge.export import export
    from sun_edge.export.openvino import OpenVinoOptions

    out = tmp_path_factory.mktemp("ovc") / "ir"
    export("openvino", str(tiny_home / "models" / "tiny-random"), out, controlnet=control_files["ldm"], parity=export_parity,
           options=OpenVinoOptions(height=64, width=64, with_baseline=True, precision="fp32"), progress=False)
    return out


@pytest.mark.slow  # a third IR export, with the ControlNet and its parity (minutes on a shared CPU); run with -m slow
def test_a_controlnet_ir_bundle_passes_every_row(controlnet_ir_bundle):
    """The ControlNet in an IR bundle (the ONNX target's graphs, converted): controlnet.xml beside the UNet IRs with
    the residual inputs, and every parity row, the CFG pair's residuals included, within the OpenVINO floors."""
    m = open_bundle(controlnet_ir_bundle).manifest
    assert m.components["controlnet"].file == "controlnet.xml" and m.controlnet["name"] == "control_tiny_ldm.safetensors"
    assert [s.name for s in m.components["unet"].inputs][-1] == "mid_block_res"
    rows = m.parity["components"]
    assert m.parity["passed"] and rows["controlnet"]["inputs"] == 4 * 13 + 13
    for row in ("controlnet", "image_controlnet", "unet", "unet_plain"):
        assert rows[row]["passed"], (row, rows[row])
