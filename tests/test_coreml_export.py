"""The Core ML target on the tiny model: bundles, parity through the NumPy MIL evaluator, bad inputs.

Three bundles are exported once per session, in parallel processes (conversion is single-threaded
Python): float16 through the CLI, 6-bit palettized with its parity recorded at export, and float16
with a tiny random ControlNet through the CLI (``ControlledUnet`` + ``controlnet/<Name>.mlpackage``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("coremltools")

from no_torch import run_without_torch  # noqa: E402

from sun_edge.bundle import open_bundle  # noqa: E402
from sun_edge.errors import SunEdgeError  # noqa: E402
from sun_edge.export.targets import COREML_FP16, COREML_FP16_PAL6, COREML_FP32  # noqa: E402

SIZE = 64  # latents [1, 4, 8, 8]
PACKAGES = {"text_encoder": "TextEncoder.mlpackage", "unet": "Unet.mlpackage", "vae_decoder": "VAEDecoder.mlpackage",
            "vae_encoder": "VAEEncoder.mlpackage"}
PALETTIZED_EXPORT = """
import sys
from sun_edge.export import export
from sun_edge.export.coreml import CoreMLOptions, coreml_parity
export("coreml", "tiny-random", sys.argv[1], options=CoreMLOptions(height={size}, width={size}, quantize_nbits=6),
       parity=coreml_parity, progress=False)
"""


@pytest.fixture(scope="session")
def _coreml_exports(tmp_path_factory, tiny_home, control_files):
    root = tmp_path_factory.mktemp("coreml")
    env = {**os.environ, "SUN_EDGE_HOME": str(tiny_home), "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "sun_edge.cli", "export", "--model", "tiny-random", "--target", "coreml",
           "--height", str(SIZE), "--width", str(SIZE)]
    commands = {
        "fp16": [*cli, "-o", str(root / "fp16")],
        "pal6": [sys.executable, "-c", PALETTIZED_EXPORT.format(size=SIZE), str(root / "pal6")],
        "controlnet": [*cli, "--controlnet", str(control_files["ldm"]), "-o", str(root / "controlnet")],
    }
    jobs = {}
    for name, cmd in commands.items():
        log = root / f"{name}.log"
        with log.open("w") as stream:
            jobs[name] = (root / name, log, subprocess.Popen(cmd, env=env, stdout=stream, stderr=subprocess.STDOUT))
    yield jobs
    for _, _, process in jobs.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def _exported(jobs, name: str) -> Path:
    out, log, process = jobs[name]
    if process.wait(timeout=900):
        pytest.fail(f"Core ML export {name} failed:\n{log.read_text()[-3000:]}")
    return out


@pytest.fixture(scope="session")
def coreml_bundle(_coreml_exports) -> Path:
    """The tiny model as a float16 Core ML bundle at 64x64 (do not modify: copy first)."""
    return _exported(_coreml_exports, "fp16")


@pytest.fixture(scope="session")
def palettized_bundle(_coreml_exports) -> Path:
    """The same, UNet and text encoder palettized to 6 bits, parity recorded at export."""
    return _exported(_coreml_exports, "pal6")


@pytest.fixture(scope="session")
def controlnet_bundle(_coreml_exports) -> Path:
    """The tiny model with the tiny ControlNet as a float16 Core ML bundle, parity recorded at export."""
    return _exported(_coreml_exports, "controlnet")


@pytest.fixture(scope="session")
def fp16_parity(coreml_bundle, tiny_reference):
    from sun_edge.export.coreml import coreml_parity

    return coreml_parity(tiny_reference, coreml_bundle)


def test_bundle_layout_and_manifest(coreml_bundle):
    bundle = open_bundle(coreml_bundle)  # every listed file present with its size
    m = bundle.manifest
    assert m.target == "coreml" and m.precision == "fp16"
    assert {name: c.file for name, c in m.components.items()} == PACKAGES
    assert sorted(p.name for p in coreml_bundle.iterdir()) == sorted([*PACKAGES.values(), "manifest.json", "merges.txt",
                                                                      "vocab.json"])
    for name, comp in m.components.items():
        package = coreml_bundle / comp.file
        on_disk = sorted(str(p.relative_to(coreml_bundle)) for p in package.rglob("*") if p.is_file())
        assert sorted(comp.files) == on_disk and set(comp.sha256) == set(comp.files)
        assert f"{comp.file}/Manifest.json" in comp.files
        assert f"{comp.file}/Data/com.apple.CoreML/weights/weight.bin" in comp.files
        assert comp.precision == ("fp32" if name.startswith("vae") else "fp16")
    unet = m.components["unet"]
    assert [s.name for s in unet.inputs] == ["sample", "timestep", "encoder_hidden_states", "negative_encoder_hidden_states"]
    assert [(s.name, s.dtype, s.shape) for s in unet.outputs] == [("noise_pred", "float32", (1, 4, 8, 8))]
    assert m.components["text_encoder"].inputs[0].dtype == "int32"
    assert m.extra["deployment_target"] == "macOS13" and m.extra["attention"] == "original"
    assert m.extra["compression"] is None and m.extra["converter"].startswith("coremltools 9.")
    assert all(b["before"] == b["after"] > 0 for b in m.extra["bytes"].values())
    assert (m.image, m.latent["height"]) == ({"height": SIZE, "width": SIZE}, 8)


def test_every_op_is_covered_and_the_io_matches(coreml_bundle):
    from sun_edge.runtimes.coreml_mil import MILEvaluator
    from sun_edge.runtimes.coreml_mil_ops import KERNELS

    m = open_bundle(coreml_bundle).manifest
    seen: set[str] = set()
    for name, comp in m.components.items():
        evaluator = MILEvaluator.load(coreml_bundle / comp.file)  # raises naming any op without a kernel
        assert (evaluator.inputs, evaluator.outputs) == (comp.inputs, comp.outputs)
        seen |= set(evaluator.op_types())
    assert seen <= set(KERNELS)
    assert {"conv", "linear", "matmul", "softmax", "layer_norm", "reduce_l2_norm", "upsample_nearest_neighbor"} <= seen


def test_fp16_parity_through_the_evaluator(fp16_parity):
    figures = fp16_parity
    assert figures["passed"] and figures["target"] == "coreml"
    assert figures["candidate"] == "coreml-mil (NumPy evaluator, for checking only)"
    comps = figures["components"]
    assert set(comps) == {"text_encoder", "unet", "vae_decoder", "vae_encoder", "image", "image_img2img",
                          "image_inpaint"}
    for name in ("image_img2img", "image_inpaint"):  # the whole edit through the evaluator (issue 19)
        assert comps[name]["psnr_db"] >= comps[name]["threshold_db"] > 0, (name, comps[name])
    for name in ("text_encoder", "unet", "image"):
        assert 35.0 <= comps[name]["psnr_db"] < 100.0, (name, comps[name])  # fp16 rounding, measurably
    assert comps["unet"]["threshold_db"] == COREML_FP16.unet == 35.0
    assert comps["vae_decoder"]["threshold_db"] == COREML_FP32.vae_decoder and comps["vae_decoder"]["psnr_db"] > 90
    assert figures["inputs"]["timesteps"] == [999, 749, 499, 249]


def test_palettized_bundle(palettized_bundle, fp16_parity):
    m = open_bundle(palettized_bundle).manifest
    assert m.precision == "fp16-pal6"
    assert {n: c.precision for n, c in m.components.items()} == {"text_encoder": "fp16-pal6", "unet": "fp16-pal6",
                                                                 "vae_decoder": "fp32", "vae_encoder": "fp32"}
    compression = m.extra["compression"]
    assert compression["nbits"] == 6 and compression["components"] == ["text_encoder", "unet"]
    sizes = m.extra["bytes"]
    for name in ("text_encoder", "unet"):
        assert sizes[name]["after"] < 0.75 * sizes[name]["before"], sizes
    assert sizes["vae_decoder"]["after"] == sizes["vae_decoder"]["before"]
    parity = m.parity  # recorded at export, against the palettized thresholds
    assert parity["passed"]
    for name in ("text_encoder", "unet", "image"):
        row = parity["components"][name]
        assert row["threshold_db"] == getattr(COREML_FP16_PAL6, name) and row["psnr_db"] >= row["threshold_db"]
        assert row["psnr_db"] < fp16_parity["components"][name]["psnr_db"]  # the weight error shows


def test_runtime_through_the_evaluator(coreml_bundle, tiny_reference):
    from sun_edge.runtimes.coreml import MIL_NAME, CoreMLRuntime

    with pytest.warns(UserWarning, match="NumPy MIL evaluator"):
        runtime = CoreMLRuntime.open(coreml_bundle, backend="mil")
    assert runtime.name == MIL_NAME and runtime.info["backend"] == "mil"
    ids = runtime.tokenizer().encode("a cat")
    np.testing.assert_allclose(runtime.encode_text(ids), tiny_reference.encode_text(ids), atol=0.05)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    image = runtime.decode(latents)
    assert image.shape == (1, 3, SIZE, SIZE) and image.dtype == np.float32
    assert runtime.encode(image).shape == (1, 4, 8, 8)
    emb = runtime.encode_text(ids)
    with pytest.raises(SunEdgeError, match=r"^unet input sample: expected dtype float32, got float64$"):
        runtime.unet(latents.astype(np.float64), np.array([999.0]), emb, emb)
    with pytest.raises(SunEdgeError, match=r"^unet input encoder_hidden_states: expected shape \[1,77,32\], got \[1,77,16\]$"):
        runtime.unet(latents, np.array([999.0]), emb[..., :16], emb)
    with pytest.raises(SunEdgeError, match=r"^input_ids: expected dtype int64, got int32$"):
        runtime.encode_text(ids.astype(np.int32))
    with pytest.raises(SunEdgeError, match="holds the SUN UNet only: CFG mode needs the UNet without the adapter"):
        runtime.require_baseline()


def test_generate_from_a_coreml_bundle_without_torch(coreml_bundle, tmp_path):
    out = tmp_path / "cat.png"
    result = run_without_torch(f"""
        import sys
        from sun_edge.cli import main
        code = main(["generate", "--bundle", {str(coreml_bundle)!r}, "--runtime", "coreml-mil", "--prompt", "a cat",
                     "--negative-prompt", "blurry", "-o", {str(out)!r}])
        assert "torch" not in sys.modules and "diffusers" not in sys.modules
        sys.exit(code)
    """, capture_output=True, text=True)
    assert out.is_file(), result.stderr
    assert "NumPy MIL evaluator" in result.stderr and result.stderr.count("warning:") == 1


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS Core ML predicts")
def test_generate_off_macos_needs_the_evaluator_by_name(coreml_bundle, tmp_path, capsys):
    from cli_helpers import error_line, run

    out = tmp_path / "cat.png"
    code, _, err = run(capsys, "generate", "--bundle", str(coreml_bundle), "--prompt", "a cat", "-o", str(out))
    assert code == 2 and not out.exists()
    assert error_line(err).startswith("error: Core ML prediction needs macOS; elsewhere a Core ML bundle can only be "
                                      "checked, with the NumPy MIL evaluator (runtime coreml-mil")
    code, _, err = run(capsys, "bench", "--bundle", str(coreml_bundle), "--repeats", "1")
    assert code == 2 and "Core ML prediction needs macOS" in error_line(err)


def test_parity_command_on_a_coreml_bundle(coreml_bundle, home_env, tmp_path, capsys):
    """``sun-edge parity --bundle`` re-runs the check through the evaluator (Core ML itself on macOS)."""
    from sun_edge.cli import main

    figures = tmp_path / "parity.json"
    assert main(["parity", "--bundle", str(coreml_bundle), "--json", str(figures)]) == 0
    out = capsys.readouterr().out
    assert "coreml-mil (NumPy evaluator, for checking only)" in out
    assert [line for line in out.splitlines() if line.endswith(": PASS")], out
    assert json.loads(figures.read_text())["components"]["unet"]["psnr_db"] >= 35.0


def test_bad_options_are_one_line():
    from sun_edge.export.coreml import CoreMLOptions

    cases = [
        (CoreMLOptions(attention="flash"), r"^unknown attention form 'flash'; valid forms: original, split-einsum$"),
        (CoreMLOptions(quantize_nbits=3), r"^3-bit palettization needs deployment target macOS15/iOS18 or newer; "
                                          r"--deployment-target is macOS13: pass --deployment-target macOS15$"),
        (CoreMLOptions(quantize_nbits=4, quantize_granularity="per-grouped-channel", deployment_target="iOS17"),
         r"^per-grouped-channel palettization needs deployment target macOS15/iOS18 or newer; "
         r"--deployment-target is iOS17: pass --deployment-target iOS18$"),
        (CoreMLOptions(quantize_nbits=5), r"^cannot palettize to 5 bits; valid: 8, 6, 4, 3$"),
        (CoreMLOptions(deployment_target="macOS12"), r"^unknown deployment target 'macOS12'; valid: macOS13, macOS14"),
        (CoreMLOptions(with_baseline=True), r"^the coreml target exports the SUN UNet only; drop --with-baseline"),
        (CoreMLOptions(precision="fp32", quantize_nbits=6), r"^--quantize-nbits palettizes float16 weights"),
    ]
    for options, message in cases:
        with pytest.raises(SunEdgeError, match=message):
            options.validate()
    CoreMLOptions(quantize_nbits=3, deployment_target="macOS15").validate()  # new enough
    CoreMLOptions(quantize_nbits=6, deployment_target="iOS16").validate()


def test_cli_errors(home_env, tmp_path, capsys):
    from sun_edge.cli import main

    for argv, message in [
        (["--target", "coreml", "--attention", "flash"], "error: unknown attention form 'flash'; valid forms: original, split-einsum"),
        (["--target", "coreml", "--quantize-nbits", "3"], "error: 3-bit palettization needs deployment target macOS15/iOS18"),
        (["--target", "onnx", "--attention", "split-einsum"], "error: --attention applies to --target coreml only"),
    ]:
        assert main(["export", *argv, "-o", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "b").exists()


def test_broken_bundles_are_one_line(coreml_bundle, tmp_path):
    from sun_edge.runtimes.coreml import CoreMLRuntime

    missing = tmp_path / "missing"
    shutil.copytree(coreml_bundle, missing)
    shutil.rmtree(missing / "Unet.mlpackage")
    with pytest.raises(SunEdgeError, match=r"^bundle .*missing is missing Unet.mlpackage/\S+; re-export it"):
        open_bundle(missing)

    unlisted = tmp_path / "unlisted"
    shutil.copytree(coreml_bundle, unlisted)
    data = json.loads((unlisted / "manifest.json").read_text())
    del data["components"]["unet"]
    (unlisted / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(SunEdgeError, match=r"^bundle .*unlisted lacks the unet component\(s\); re-export it$"):
        CoreMLRuntime.open(unlisted, backend="mil")

    edited = tmp_path / "edited"
    shutil.copytree(coreml_bundle, edited)
    data = json.loads((edited / "manifest.json").read_text())
    data["components"]["vae_decoder"]["inputs"][0]["name"] = "z"
    (edited / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(SunEdgeError, match=r"components.vae_decoder.inputs are z float32 \[1,4,8,8\], but the bundle's "
                                           r"image 64x64, latent 4x8x8, text 77x32 needs latent_sample float32 \[1,4,8,8\]"):
        CoreMLRuntime.open(edited, backend="mil")  # caught on opening, before any model loads

    with pytest.raises(SunEdgeError, match=r"^unknown compute units 'ane'; valid: all, cpu-and-gpu, cpu-and-ne, cpu-only$"):
        CoreMLRuntime.open(coreml_bundle, compute_units="ane")
    if sys.platform != "darwin":
        with pytest.raises(SunEdgeError, match="^Core ML prediction needs macOS"):
            CoreMLRuntime.open(coreml_bundle, backend="coreml")


def test_failed_export_leaves_nothing(tiny_reference, tmp_path, monkeypatch):
    from sun_edge.export import coreml, coreml_convert

    traced = []
    trace = coreml_convert.trace

    def failing(module, args):
        traced.append(type(module).__name__)
        if len(traced) == 2:  # the UNet, after the text encoder was converted and saved
            raise SunEdgeError("simulated tracing failure")
        return trace(module, args)

    monkeypatch.setattr(coreml_convert, "trace", failing)
    out = tmp_path / "bundle"
    with pytest.raises(SunEdgeError, match="simulated tracing failure"):
        coreml.export_bundle(tiny_reference, out, coreml.CoreMLOptions(height=SIZE, width=SIZE), progress=False)
    assert traced == ["TextEncoderGraph", "SUNUNetGraph"] and list(tmp_path.iterdir()) == []


def test_split_einsum_equals_original_in_pytorch(tiny_sun_unet):
    import torch

    from sun_edge.export.coreml_attention import (
        SplitEinsumAttnProcessor,
        SplitEinsumSUNAttnProcessor,
        attention_form,
    )
    from sun_edge.parity import psnr

    unet = tiny_sun_unet.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([499.0]), torch.randn(1, 77, 32, generator=gen),
            torch.randn(1, 77, 32, generator=gen))
    with torch.no_grad():
        want = tiny_sun_unet(*args).numpy()
        with attention_form(unet, "split-einsum"):
            kinds = {type(v) for v in unet.attn_processors.values()}
            got = tiny_sun_unet(*args).numpy()
    assert kinds == {SplitEinsumAttnProcessor, SplitEinsumSUNAttnProcessor}
    assert psnr(want, got) > 100.0 and np.abs(want - got).max() < 1e-4
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before  # restored


@pytest.mark.slow
def test_split_einsum_bundle(tiny_reference, tmp_path):
    """The Neural Engine form end to end (slow: the per-head graph converts in minutes, not seconds)."""
    from sun_edge.export.coreml import CoreMLOptions, coreml_parity, export_bundle

    out = export_bundle(tiny_reference, tmp_path / "se", CoreMLOptions(height=SIZE, width=SIZE, attention="split-einsum"),
                        parity=coreml_parity, progress=False)
    m = open_bundle(out).manifest
    assert m.extra["attention"] == "split-einsum" and m.parity["passed"]
    assert m.parity["components"]["unet"]["psnr_db"] >= 35.0


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS")
def test_core_ml_prediction_matches_the_evaluator(coreml_bundle):
    from sun_edge.runtimes.coreml import CoreMLRuntime
    from sun_edge.parity import psnr

    native = CoreMLRuntime.open(coreml_bundle, compute_units="cpu-only", backend="coreml")
    with pytest.warns(UserWarning):
        evaluator = CoreMLRuntime.open(coreml_bundle, backend="mil")
    ids = native.tokenizer().encode("a cat")
    emb = evaluator.encode_text(ids)
    assert psnr(evaluator.encode_text(ids), native.encode_text(ids)) > 40
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    t = np.array([999.0], np.float32)
    assert psnr(evaluator.unet(latents, t, emb, emb), native.unet(latents, t, emb, emb)) > 35
    assert math.isfinite(float(native.decode(latents).sum()))


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS")
def test_core_ml_parity_on_every_compute_unit(coreml_bundle, tiny_reference):
    from sun_edge.export.coreml import coreml_parity

    for units in ("cpu-only", "cpu-and-gpu", "cpu-and-ne", "all"):
        assert coreml_parity(tiny_reference, coreml_bundle, backend="coreml", compute_units=units)["passed"], units


def test_controlnet_bundle_layout_and_parity(controlnet_bundle, control_files):
    """ml-stable-diffusion's layout: ControlledUnet with the 13 residual inputs, controlnet/<Name>.mlpackage beside
    it (batch 1: Core ML runs SUN only); every row, ControlNet's included, passed the fp16 floors at export."""
    from sun_edge.runtimes.coreml_mil import MILEvaluator
    from sun_edge.weights import sha256_file

    m = open_bundle(controlnet_bundle).manifest
    files = {name: c.file for name, c in m.components.items()}
    assert files == {**PACKAGES, "unet": "ControlledUnet.mlpackage", "controlnet": "controlnet/ControlTinyLdm.mlpackage"}
    assert sorted(p.name for p in (controlnet_bundle / "controlnet").iterdir()) == ["ControlTinyLdm.mlpackage"]
    assert m.controlnet["sha256"] == sha256_file(control_files["ldm"])
    residuals = [f"down_block_res_{i}" for i in range(12)] + ["mid_block_res"]
    unet, control = m.components["unet"], m.components["controlnet"]
    assert [s.name for s in unet.inputs][4:] == residuals == [s.name for s in control.outputs]
    assert all(s.shape[0] == 1 for s in control.inputs[:1] + control.inputs[2:5] + control.outputs)
    assert control.precision == "fp16" and unet.inputs[-1].shape == control.outputs[-1].shape == (1, 64, 1, 1)
    for name in ("unet", "controlnet"):  # the packages declare what the manifest lists
        evaluator = MILEvaluator.load(controlnet_bundle / m.components[name].file)
        assert (evaluator.inputs, evaluator.outputs) == (m.components[name].inputs, m.components[name].outputs)
    rows = m.parity["components"]
    assert m.parity["passed"] and m.parity["target"] == "coreml"
    for row in ("controlnet", "image_controlnet", "unet", "image"):
        assert rows[row]["passed"] and rows[row]["psnr_db"] >= rows[row]["threshold_db"] > 0, (row, rows[row])
    assert rows["controlnet"]["threshold_db"] == COREML_FP16.controlnet
    assert rows["controlnet"]["inputs"] == 4 * 13  # every residual of the 4 steps; no CFG pair at batch 1
    assert rows["controlnet"]["psnr_db"] < 100.0  # fp16 rounding, measurably: the evaluator ran the fp16 program


def test_controlnet_image_through_the_evaluator_equals_pytorch(controlnet_bundle, control_files, tiny_home):
    """A whole ControlNet image from the Core ML bundle (NumPy MIL evaluator) against the PyTorch reference with the
    same ControlNet file; the condition changes the picture; CFG mode and a batch of 2 get one line each."""
    from controlnet_helpers import condition_image
    from sun_edge.parity import psnr
    from sun_edge.pipeline import Pipeline, Settings
    from sun_edge.runtimes.coreml import CoreMLRuntime
    from sun_edge.runtimes.pytorch import TorchRuntime

    with pytest.warns(UserWarning, match="NumPy MIL evaluator"):
        runtime = CoreMLRuntime.open(controlnet_bundle, backend="mil")
    reference = TorchRuntime.load(str(tiny_home / "models" / "tiny-random"), controlnet=control_files["ldm"])
    condition = condition_image(SIZE, SIZE)
    settings = Settings.for_mode("sun", height=SIZE, width=SIZE, steps=4)
    pipe = Pipeline(runtime, runtime.tokenizer())
    got = pipe.generate("a ring", "box", seeds=[5], settings=settings, control_image=condition)[0]
    want = Pipeline(reference).generate("a ring", "box", seeds=[5], settings=settings, control_image=condition)[0]
    a, b = (np.asarray(x.image, np.float64) / 127.5 - 1 for x in (want, got))
    assert psnr(a, b) >= COREML_FP16.image_controlnet
    plain = pipe.generate("a ring", "box", seeds=[5], settings=settings)[0]  # the same bundle, residuals all zero
    assert np.abs(np.asarray(plain.image, int) - np.asarray(got.image, int)).mean() > 1.0
    assert "ControlNet" in got.parameters and "control_tiny_ldm" in got.parameters
    with pytest.raises(SunEdgeError, match="has no UNet without the adapter; CFG mode needs one"):
        pipe.generate("a ring", "box", seeds=[5], settings=Settings.for_mode("cfg", height=SIZE, width=SIZE),
                      control_image=condition)
    x = np.zeros((2, 4, 8, 8), np.float32)
    emb = np.zeros((2, 77, 32), np.float32)
    with pytest.raises(SunEdgeError, match=r"^controlnet input sample: expected shape \[1,4,8,8\], got \[2,4,8,8\]$"):
        runtime.controlnet(x, 999.0, emb, emb, np.zeros((2, 3, SIZE, SIZE), np.float32), 1.0)
