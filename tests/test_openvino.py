"""The OpenVINO runtime on the tiny ONNX bundle, at f32 and bf16: parity with the PyTorch reference,
generation without torch, batch 2 against two batch-1 calls, the precision default, the compiled-model
cache, bench side by side with ONNX Runtime, and one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("openvino")

from cli_helpers import error_line, run  # noqa: E402
from no_torch import run_without_torch  # noqa: E402
from sun_edge.bundle import open_bundle  # noqa: E402
from sun_edge.errors import SunEdgeError  # noqa: E402
from sun_edge.export.targets import OPENVINO_BF16, RUNTIME_THRESHOLDS, parity_threshold, runtime_precision  # noqa: E402
from sun_edge.imaging import read_parameters  # noqa: E402
from sun_edge.noise import initial_noise  # noqa: E402
from sun_edge.parity import compare_runtimes, psnr  # noqa: E402
from sun_edge.pipeline import Settings  # noqa: E402
from sun_edge.runtimes import RUNTIMES, open_bundle_runtime  # noqa: E402
from sun_edge.runtimes import openvino as ovrt  # noqa: E402
from sun_edge.runtimes.openvino import OpenVinoRuntime  # noqa: E402
from sun_edge.tokenizer import CLIPTokenizer  # noqa: E402

PRECISIONS = ("f32", "bf16")


def _bf16_native() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.fixture(scope="module")
def step(tiny_reference):
    tok = CLIPTokenizer.default()
    pos = tiny_reference.encode_text(tok.encode("two red circles on a blue background"))
    neg = tiny_reference.encode_text(tok.encode("green, blurry"))
    return {"pos": pos, "neg": neg, "t": np.array([999.0], np.float32),
            "x1": initial_noise(0, (1, 4, 8, 8), kind="torch").astype(np.float32),
            "x2": initial_noise(1, (1, 4, 8, 8), kind="torch").astype(np.float32)}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_parity_with_the_reference(onnx_fp32_bundle, tiny_reference, precision):
    """Every component and the whole 4-step image, at that precision's named floors."""
    if precision == "bf16" and not _bf16_native():
        pytest.skip("this CPU has no native bf16")
    bundle = open_bundle(onnx_fp32_bundle)
    candidate = OpenVinoRuntime(bundle, ov_precision=precision)
    assert candidate.info["inference_precision"] == precision and candidate.info["ov_device"] == "CPU"
    report = compare_runtimes(tiny_reference, candidate, precision="fp32", settings=Settings.from_manifest(bundle.manifest),
                              precisions={n: c.precision for n, c in bundle.manifest.components.items()})
    assert report.passed, report.table()
    assert {r.component for r in report.rows} >= {"text_encoder", "unet", "unet_plain", "vae_decoder", "vae_encoder",
                                                 "image"}
    if precision == "f32":  # the bundle's own fp32 floors; float32 rounding only
        assert report.precision == "fp32" and report.row("unet").threshold_db == 40.0
        assert min(r.psnr_db for r in report.rows) > 100
    else:  # OpenVINO's bf16 floors, named in export/targets.py
        assert report.precision == "bf16" and all(r.precision == "bf16" for r in report.rows)
        assert report.row("unet").threshold_db == OPENVINO_BF16.unet
        assert report.row("image").threshold_db == OPENVINO_BF16.image == 30.0
        assert report.row("unet").psnr_db < 80  # bf16 really ran: not float32 figures


def test_f32_equals_onnxruntime(onnx_fp32_bundle, step):
    from sun_edge.runtimes.onnxruntime import OnnxRuntime

    ort, ov = OnnxRuntime.open(onnx_fp32_bundle), OpenVinoRuntime.open(onnx_fp32_bundle, ov_precision="f32")
    x, t, pos, neg = step["x1"], step["t"], step["pos"], step["neg"]
    np.testing.assert_allclose(ov.unet(x, t, pos, neg), ort.unet(x, t, pos, neg), rtol=1e-4, atol=3e-5)
    np.testing.assert_allclose(ov.decode(x), ort.decode(x), rtol=1e-4, atol=3e-5)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_batch_of_two_equals_two_single_calls(onnx_fp32_bundle, step, precision):
    """The CFG baseline UNet has a free batch: its batch-2 output equals two batch-1 calls (each graph else is batch 1)."""
    if precision == "bf16" and not _bf16_native():
        pytest.skip("this CPU has no native bf16")
    rt = OpenVinoRuntime.open(onnx_fp32_bundle, ov_precision=precision)
    x1, x2, t, pos, neg = step["x1"], step["x2"], step["t"], step["pos"], step["neg"]
    both = rt.unet_plain(np.concatenate([x1, x2]), t, np.concatenate([neg, pos]))  # [2, 4, 8, 8]
    singles = np.concatenate([rt.unet_plain(x1, t, neg), rt.unet_plain(x2, t, pos)])
    assert both.shape == (2, 4, 8, 8)
    if precision == "f32":
        np.testing.assert_allclose(both, singles, rtol=1e-5, atol=1e-5)
    else:
        for k in range(2):
            assert psnr(singles[k], both[k]) >= parity_threshold("unet_plain", "bf16", "onnx", "openvino")


def test_one_compiled_model_per_component_across_batch_sizes(onnx_fp32_bundle, step, monkeypatch):
    """The free-batch CFG UNet is compiled once (batch bounded to 1..2) and serves both sizes; release drops it."""
    rt = OpenVinoRuntime.open(onnx_fp32_bundle, ov_precision="f32")
    x1, x2, t, pos, neg = step["x1"], step["x2"], step["t"], step["pos"], step["neg"]
    one = rt.unet_plain(x1, t, pos)
    both = rt.unet_plain(np.concatenate([x1, x2]), t, np.concatenate([pos, neg]))
    rt.unet(x1, t, pos, neg)
    models = rt.compiled_models()
    assert set(models) == {"unet_plain", "unet"}
    batch = models["unet_plain"].inputs[0].get_partial_shape()[0]
    assert batch.is_dynamic and (batch.get_min_length(), batch.get_max_length()) == (1, 2)
    np.testing.assert_allclose(both[:1], one, rtol=1e-5, atol=1e-5)
    with pytest.raises(SunEdgeError, match=r"^unet_plain: batch 3 is above the bundle's range \(at most 2\)"):
        rt.unet_plain(np.concatenate([x1, x1, x2]), t, np.concatenate([pos, pos, neg]))
    trims = []
    monkeypatch.setattr("sun_edge.runtimes.openvino.return_freed_memory", lambda: trims.append(1))
    rt.release("unet_plain")
    assert set(rt.compiled_models()) == {"unet"} and trims == [1]  # the freed pages go back to the OS
    rt.release("unet_plain")  # nothing held: nothing to give back
    assert trims == [1]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_generate_without_torch(onnx_fp32_bundle, tmp_path, precision):
    if precision == "bf16" and not _bf16_native():
        pytest.skip("this CPU has no native bf16")
    out = tmp_path / "ov.png"
    run_without_torch(f"""
        import sys
        from sun_edge.cli import main
        code = main(["generate", "--bundle", {str(onnx_fp32_bundle)!r}, "--runtime", "openvino", "--ov-precision",
                     {precision!r}, "--prompt", "a red circle", "--negative-prompt", "blue", "-o", {str(out)!r}])
        assert code == 0, code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))
        assert not heavy, heavy
    """, capture_output=True)
    assert Image.open(out).size == (64, 64)
    params = read_parameters(out)
    assert "Runtime: openvino" in params and "Steps: 4, Sampler: DDIM" in params


def test_cli_parity_and_provider_openvino(onnx_fp32_bundle, home_env, tmp_path, capsys):
    """`sun-edge parity --provider openvino` is --runtime openvino; the table and JSON name the bf16 floors."""
    if not _bf16_native():
        pytest.skip("this CPU has no native bf16")
    out = tmp_path / "parity.json"
    code, stdout, err = run(capsys, "parity", "--bundle", str(onnx_fp32_bundle), "--provider", "openvino",
                            "--ov-precision", "bf16", "--json", str(out))
    assert code == 0, err + stdout
    figures = json.loads(out.read_text())
    assert figures["candidate"] == "openvino" and figures["precision"] == "bf16" and figures["passed"]
    assert figures["components"]["image"]["threshold_db"] == OPENVINO_BF16.image
    assert "openvino vs pytorch, onnx bf16 thresholds" in stdout


def test_bench_side_by_side(onnx_fp32_bundle, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, err = run(capsys, "bench", "--bundle", str(onnx_fp32_bundle), "--runtime", "onnxruntime", "openvino",
                            "--ov-precision", "f32", "--repeats", "1", "--json", str(out))
    assert code == 0, err
    assert "onnxruntime vs openvino" in stdout and "openvino speedup" in stdout
    figures = json.loads(out.read_text())
    assert figures["runtimes"] == ["onnxruntime", "openvino"]
    forms = {"text_encode", "unet_sun_b1", "unet_plain_b1", "unet_cfg_b2", "vae_decode", "sun4", "cfg25"}
    for name in figures["runtimes"]:
        assert set(figures["results"][name]["median_seconds"]) == forms
    assert figures["results"]["openvino"]["inference_precision"] == "f32"
    assert set(figures["speedup_over_first"]["openvino"]) == forms


def test_single_runtime_bench_keeps_its_table(onnx_fp32_bundle, capsys):
    code, stdout, err = run(capsys, "bench", "--bundle", str(onnx_fp32_bundle), "--provider", "openvino",
                            "--ov-precision", "f32", "--repeats", "1", "--steps-only")
    assert code == 0, err
    assert stdout.startswith("openvino at 64x64, 1 repeat(s), median after one warm-up")
    assert "(sun_over_plain)" in stdout


def test_compiled_models_are_cached(onnx_fp32_bundle, tmp_path, step):
    cache = tmp_path / "cache"
    first = OpenVinoRuntime.open(onnx_fp32_bundle, ov_precision="f32", ov_cache_dir=cache)
    x, t, pos, neg = step["x1"], step["t"], step["pos"], step["neg"]
    eps = first.unet(x, t, pos, neg)
    folders = [p for p in cache.iterdir() if p.name.startswith("unet-")]
    assert len(folders) == 1 and any(folders[0].iterdir())  # keyed by the component's sha256
    second = OpenVinoRuntime.open(onnx_fp32_bundle, ov_precision="f32", ov_cache_dir=cache)
    np.testing.assert_array_equal(second.unet(x, t, pos, neg), eps)
    assert [p.name for p in cache.iterdir() if p.name.startswith("unet-")] == [folders[0].name]


class _Core:
    def __init__(self, caps):
        self.caps = caps

    def get_property(self, device, key):
        assert (device, key) == ("CPU", "OPTIMIZATION_CAPABILITIES")
        return self.caps


def test_default_precision_follows_the_device():
    assert ovrt.default_precision(_Core(["FP32", "BF16", "INT8"]), "CPU")[0] == "bf16"
    assert ovrt.default_precision(_Core(["FP32", "INT8"]), "CPU")[0] == "f32"
    assert ovrt.default_precision(_Core([]), "GPU")[0] == "f16"
    assert ovrt.default_precision(_Core([]), "NPU")[0] == "f16"
    assert ovrt.default_precision(_Core([]), "AUTO")[0] is None


def test_default_runtime_reports_its_choice(onnx_fp32_bundle):
    rt = open_bundle_runtime(open_bundle(onnx_fp32_bundle), "openvino")
    assert rt.info["inference_precision"] == ("bf16" if _bf16_native() else "f32")
    assert rt.info["precision_reason"]


def test_thresholds_follow_the_runtime_precision():
    assert set(RUNTIME_THRESHOLDS) == {("openvino", "bf16"), ("openvino", "f16")}
    assert runtime_precision("openvino", {"inference_precision": "bf16"}) == "bf16"
    assert runtime_precision("openvino", {"inference_precision": "f32"}) is None  # the bundle's floors
    assert runtime_precision("onnxruntime", {"inference_precision": "bf16"}) is None
    assert parity_threshold("unet", "fp32", "onnx", "openvino") == 40.0
    assert parity_threshold("unet", "bf16", "onnx", "openvino") == OPENVINO_BF16.unet
    with pytest.raises(SunEdgeError, match="unknown parity component"):
        parity_threshold("nope", "bf16", "onnx", "openvino")


def test_registry_entry():
    entry = RUNTIMES["openvino"]
    assert (entry.module, entry.cls, entry.targets) == ("sun_edge.runtimes.openvino", "OpenVinoRuntime",
                                                        ("onnx", "openvino"))
    assert entry.options["ov_device"] == "CPU" and entry.options["ov_precision"] is None


def test_bad_input_is_one_line(onnx_fp32_bundle, step):
    bundle = open_bundle(onnx_fp32_bundle)
    with pytest.raises(SunEdgeError, match=r"unknown OpenVINO device 'cuda'; valid devices: CPU, GPU, NPU, AUTO"):
        OpenVinoRuntime(bundle, ov_device="cuda")
    with pytest.raises(SunEdgeError, match=r"unknown OpenVINO precision 'fp8'"):
        OpenVinoRuntime(bundle, ov_precision="fp8")
    import openvino as ov

    if not any(d.startswith("GPU") for d in ov.Core().available_devices):
        with pytest.raises(SunEdgeError, match=r"has no GPU device here; available: CPU"):
            OpenVinoRuntime(bundle, ov_device="GPU")
    if "FP16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        rt = OpenVinoRuntime(bundle, ov_precision="f16")
        with pytest.raises(SunEdgeError, match=r"runs unet at \w+, not the f16 asked for"):
            rt.unet(step["x1"], step["t"], step["pos"], step["neg"])
    rt = OpenVinoRuntime(bundle, ov_precision="f32")
    with pytest.raises(SunEdgeError, match=r"unet input sample: expected shape \[1,4,8,8\], got \[1,4,8,9\]"):
        rt.unet(np.zeros((1, 4, 8, 9), np.float32), step["t"], step["pos"], step["neg"])
    with pytest.raises(SunEdgeError, match="option compute_units applies to the coreml runtime"):
        open_bundle_runtime(bundle, "openvino", compute_units="cpu-only")


@pytest.mark.parametrize("args,message", [
    (["--runtime", "openvino", "--device", "cuda"], "error: --device cuda is a torch device (for --model); with "
                                                    "--runtime openvino give an OpenVINO device"),
    (["--ov-precision", "bf16"], "error: --ov-precision applies to --runtime openvino"),
    (["--device", "GPU"], "error: --precision and --device apply to --model"),  # an onnxruntime bundle: as before
    (["--provider", "openvino", "--runtime", "onnxruntime"], "error: --provider openvino runs the bundle with the "
                                                             "openvino runtime; drop --runtime onnxruntime"),
])
def test_cli_refusals(onnx_fp32_bundle, tmp_path, capsys, args, message):
    code, _, err = run(capsys, "generate", "--bundle", str(onnx_fp32_bundle), "--prompt", "x", *args,
                       "-o", str(tmp_path / "x.png"))
    assert code == 2 and error_line(err).startswith(message), err
