"""The ONNX Runtime runtime: parity with the PyTorch reference, generating from bundles, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from no_torch import run_without_torch
from sun_edge.errors import SunEdgeError
from sun_edge.imaging import read_parameters
from sun_edge.noise import initial_noise
from sun_edge.runtimes import RUNTIMES, runtime_module
from sun_edge.runtimes.onnxruntime import PROVIDERS, OnnxRuntime
from sun_edge.tokenizer import CLIPTokenizer
from cli_helpers import error_line, run


def psnr(ref: np.ndarray, out: np.ndarray) -> float:
    """20 log10(max|ref| / rms(ref - out)), as DESIGN.md defines parity."""
    rms = np.sqrt(np.mean((ref.astype(np.float64) - out.astype(np.float64)) ** 2))
    return float(20 * np.log10(np.abs(ref).max() / rms)) if rms else float("inf")


@pytest.fixture(scope="module")
def step(tiny_reference):
    """A real first SUN step: embeddings of tokenized prompts, the seed-0 initial noise, t=999."""
    tok = CLIPTokenizer.default()
    ids = tok.encode("two red circles on a blue background")
    pos, neg = tiny_reference.encode_text(ids), tiny_reference.encode_text(tok.encode("green, blurry"))
    latents = initial_noise(0, (1, 4, 8, 8), kind="torch").astype(np.float32)
    return {"ids": ids, "pos": pos, "neg": neg, "latents": latents, "t": np.array([999.0], dtype=np.float32)}


def test_fp32_bundle_matches_the_reference(onnx_fp32_bundle, tiny_reference, step):
    ref, rt = tiny_reference, OnnxRuntime.open(onnx_fp32_bundle)
    x, t, pos, neg = step["latents"], step["t"], step["pos"], step["neg"]
    close = {"rtol": 1e-4, "atol": 1e-5}
    np.testing.assert_allclose(rt.encode_text(step["ids"]), pos, **close)
    np.testing.assert_allclose(rt.unet(x, t, pos, neg), ref.unet(x, t, pos, neg), **close)
    both, context = np.concatenate([x, x]), np.concatenate([neg, pos])
    np.testing.assert_allclose(rt.unet_plain(both, t, context), ref.unet_plain(both, t, context), **close)  # CFG batch
    np.testing.assert_allclose(rt.unet_plain(x, t, pos), ref.unet_plain(x, t, pos), **close)  # plain batch 1
    image = ref.decode(x)
    np.testing.assert_allclose(rt.decode(x), image, **close)
    np.testing.assert_allclose(rt.encode(image), ref.encode(image), **close)


def test_fp16_bundle_is_close_to_the_reference(onnx_fp16_bundle, tiny_reference, step):
    ref, rt = tiny_reference, OnnxRuntime.open(onnx_fp16_bundle)
    x, t, pos, neg = step["latents"], step["t"], step["pos"], step["neg"]
    assert psnr(pos, rt.encode_text(step["ids"])) >= 30
    assert psnr(ref.unet(x, t, pos, neg), rt.unet(x, t, pos, neg)) >= 30
    assert psnr(ref.unet(x, t, pos, neg), rt.unet(x, t, rt.encode_text(step["ids"]), neg)) >= 30
    both, context = np.concatenate([x, x]), np.concatenate([neg, pos])
    assert psnr(ref.unet_plain(both, t, context), rt.unet_plain(both, t, context)) >= 30
    np.testing.assert_allclose(rt.decode(x), ref.decode(x), rtol=1e-4, atol=1e-5)  # the VAE stays fp32


def test_a_whole_image_matches_the_reference_pipeline(onnx_fp32_bundle, tiny_reference):
    from sun_edge.pipeline import Pipeline, Settings

    rt = OnnxRuntime.open(onnx_fp32_bundle)
    settings = Settings(height=64, width=64)
    ours = Pipeline(rt, rt.tokenizer()).generate("a red circle", "blue", seeds=[3], settings=settings)[0]
    theirs = Pipeline(tiny_reference).generate("a red circle", "blue", seeds=[3], settings=settings)[0]
    diff = np.abs(np.asarray(ours.image, dtype=int) - np.asarray(theirs.image, dtype=int))
    assert diff.max() <= 1 and ours.unet_calls == 4


def test_release_drops_the_session_and_gives_its_memory_back(onnx_fp32_bundle, step, monkeypatch):
    """``release`` drops a session (the next call opens it again) and returns the freed heap to the OS once."""
    from sun_edge.runtimes.base import return_freed_memory

    return_freed_memory()  # callable here (glibc's malloc_trim, or only gc where there is none)
    trims = []
    monkeypatch.setattr("sun_edge.runtimes.onnxruntime.return_freed_memory", lambda: trims.append(1))
    rt = OnnxRuntime.open(onnx_fp32_bundle)
    first = rt.unet(step["latents"], step["t"], step["pos"], step["neg"])
    session = rt.session("unet")
    rt.release("unet")
    rt.release("unet")
    assert trims == [1]
    again = rt.unet(step["latents"], step["t"], step["pos"], step["neg"])
    assert rt.session("unet") is not session
    np.testing.assert_array_equal(first, again)


def test_parity_holds_one_graph_at_a_time_and_none_after(onnx_fp32_bundle, tiny_reference, monkeypatch):
    """Parity's whole-pipeline rows run four graphs in turn; the candidate holds only the one running (a full-size
    batch-4 bundle's parity does not fit 24 GB otherwise), and nothing once parity is done."""
    from sun_edge.parity import compare_runtimes
    from sun_edge.pipeline import Settings

    held = []
    opened = OnnxRuntime.session

    def session(self, component):
        made = opened(self, component)
        held.append(tuple(self._sessions))
        return made

    monkeypatch.setattr(OnnxRuntime, "session", session)
    rt = OnnxRuntime.open(onnx_fp32_bundle)
    report = compare_runtimes(tiny_reference, rt, precision="fp32", settings=Settings.from_manifest(rt.manifest))
    assert report.passed and report.row("image_img2img").inputs >= 1
    assert {name for names in held for name in names} >= {"text_encoder", "unet", "unet_plain", "vae_decoder",
                                                           "vae_encoder"}
    assert max(len(names) for names in held) == 1, held
    assert rt._sessions == {} and rt.hold_one_graph is False
    rt.encode_text(np.zeros((1, 77), np.int64))  # outside parity: sessions stay until released
    rt.unet(*[np.zeros(s.shape, s.dtype) for s in rt.manifest.components["unet"].inputs])
    assert set(rt._sessions) == {"text_encoder", "unet"}


def test_runtime_attributes_come_from_the_manifest(onnx_fp32_bundle, tiny_reference):
    assert RUNTIMES["onnxruntime"].module == "sun_edge.runtimes.onnxruntime"
    rt = runtime_module("onnxruntime").OnnxRuntime.open(onnx_fp32_bundle)
    assert rt.name == "onnxruntime"
    assert (rt.latent_channels, rt.vae_scale_factor, rt.text_tokens, rt.text_dim) == (4, 8, 77, 32)
    for key in ("model", "model_sha256", "adapter", "adapter_sha256", "adapter_parameters"):
        assert rt.info[key] == tiny_reference.info[key], key
    assert rt._sessions == {}  # sessions are made on first use


def test_generate_from_a_bundle_sun_and_cfg(onnx_fp32_bundle, tmp_path, capsys):
    sun, cfg = tmp_path / "sun.png", tmp_path / "cfg.png"
    code, stdout, err = run(capsys, "generate", "--bundle", str(onnx_fp32_bundle), "--prompt", "a red circle",
                            "--negative-prompt", "blue", "-o", str(sun))
    assert code == 0, err
    assert Image.open(sun).size == (64, 64) and f"wrote {sun}" in stdout
    params = read_parameters(sun)
    assert "Steps: 4, Sampler: DDIM" in params and "Runtime: onnxruntime" in params and "Model: tiny-random" in params
    assert "SUN adapter sha256: " in params
    code, _, err = run(capsys, "generate", "--bundle", str(onnx_fp32_bundle), "--prompt", "x", "--mode", "cfg",
                       "--steps", "3", "-o", str(cfg))
    assert code == 0, err
    assert "Steps: 3, Sampler: DPM++ 2M" in read_parameters(cfg) and "SUN: off" in read_parameters(cfg)


def test_generate_compare_from_an_fp16_bundle(onnx_fp16_bundle, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    code, _, err = run(capsys, "generate", "--bundle", str(onnx_fp16_bundle), "--prompt", "a circle", "--compare",
                       "-o", str(out))
    assert code == 0, err
    assert "sun: " in err and "cfg: " in err and "25 UNet calls" in err
    assert Image.open(out).width > 2 * 256


def test_generate_without_torch(onnx_fp32_bundle, tmp_path):
    out = tmp_path / "no-torch.png"
    run_without_torch(f"""
        import sys
        from sun_edge.cli import main
        code = main(["generate", "--bundle", {str(onnx_fp32_bundle)!r}, "--prompt", "a red circle", "-o", {str(out)!r}])
        assert code == 0, code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))
        assert not heavy, heavy
    """, capture_output=True)
    assert Image.open(out).size == (64, 64)


@pytest.fixture()
def bundle_copy(onnx_fp32_bundle, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(onnx_fp32_bundle, dst)
    return dst


def edit_manifest(bundle: Path, edit) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    edit(data)
    (bundle / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("args,message", [
    (["--mode", "cfg"], "has no UNet without the adapter, which CFG mode needs; re-export it with --with-baseline"),
    (["--height", "128"], "makes 64x64 images (its graphs have static shapes)"),
    (["--adapter", "x.safetensors"], "--adapter and --lora are fused into a bundle at export"),
    (["--provider", "gpu"], "unknown provider 'gpu'; valid providers: cpu, cuda, tensorrt, coreml"),
    (["--precision", "fp16"], "--precision and --device apply to --model"),
])
def test_bad_generate_from_bundle_is_one_line(bundle_copy, tmp_path, capsys, args, message):
    (bundle_copy / "unet_plain.onnx").unlink()  # a bundle exported without --with-baseline
    edit_manifest(bundle_copy, lambda d: d["components"].pop("unet_plain"))
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run(capsys, "generate", "--bundle", str(bundle_copy), "--prompt", "x", *args, "-o", str(out / "x.png"))
    assert code == 2 and message in error_line(err)
    assert list(out.iterdir()) == []


def test_bundle_problems_are_one_clear_line(bundle_copy):
    (bundle_copy / "unet.onnx").unlink()
    with pytest.raises(SunEdgeError, match=r"is missing unet\.onnx; re-export it"):
        OnnxRuntime.open(bundle_copy)
    (bundle_copy / "manifest.json").write_text('{"format": "sun-edge-bundle", ')
    with pytest.raises(SunEdgeError, match=r"manifest\.json: not valid JSON .*re-export the bundle"):
        OnnxRuntime.open(bundle_copy)


def test_a_manifest_from_another_format_version_is_refused(bundle_copy):
    edit_manifest(bundle_copy, lambda d: d.update(format_version=99))
    with pytest.raises(SunEdgeError, match="bundle format version 99 is not supported"):
        OnnxRuntime.open(bundle_copy)


def test_a_manifest_claiming_other_shapes_fails_at_session_creation(bundle_copy, step):
    def claim_16x16(data):  # a consistent manifest for 128x128 images, over graphs made for 64x64
        data["image"] = {"height": 128, "width": 128}
        data["latent"].update(height=16, width=16)
        for comp in data["components"].values():
            for spec in comp["inputs"] + comp["outputs"]:
                spec["shape"] = [{8: 16, 64: 128}.get(d, d) if i >= 2 else d for i, d in enumerate(spec["shape"])]

    one_line = r"components\.unet\.inputs are sample float32 \[1,4,16,16\].* needs sample float32 \[1,4,8,8\]"
    edit_manifest(bundle_copy, lambda d: d["components"]["unet"]["inputs"][0].update(shape=[1, 4, 16, 16]))
    with pytest.raises(SunEdgeError, match=one_line):  # an inconsistent manifest is refused on opening
        OnnxRuntime.open(bundle_copy)
    edit_manifest(bundle_copy, claim_16x16)
    rt = OnnxRuntime.open(bundle_copy)  # consistent with itself: only the graph itself can tell
    message = (r"unet\.onnx declares inputs sample float32 \[1,4,8,8\], .* but manifest\.json says "
               r"sample float32 \[1,4,16,16\], .*the manifest was edited")
    with pytest.raises(SunEdgeError, match=message):
        rt.session("unet")
    latents = np.zeros((1, 4, 16, 16), np.float32)
    with pytest.raises(SunEdgeError, match="the manifest was edited"):
        rt.unet(latents, step["t"], step["pos"], step["neg"])


def test_wrong_inputs_are_named_precisely(onnx_fp32_bundle, step):
    rt = OnnxRuntime.open(onnx_fp32_bundle)
    x, t, pos, neg = step["latents"], step["t"], step["pos"], step["neg"]
    with pytest.raises(SunEdgeError, match=r"^unet input sample: expected shape \[1,4,8,8\], got \[1,4,16,16\]$"):
        rt.unet(np.zeros((1, 4, 16, 16), np.float32), t, pos, neg)
    with pytest.raises(SunEdgeError, match=r"^unet input sample: expected dtype float32, got float64$"):
        rt.unet(x.astype(np.float64), t, pos, neg)
    with pytest.raises(SunEdgeError, match=r"^unet input negative_encoder_hidden_states: expected shape \[1,77,32\]"):
        rt.unet(x, t, pos, neg[:, :10])
    with pytest.raises(SunEdgeError, match=r"^text_encoder input input_ids: expected dtype int64, got int32$"):
        rt.encode_text(step["ids"].astype(np.int32))
    with pytest.raises(SunEdgeError, match=r"^unet_plain input encoder_hidden_states: expected shape \[2,77,32\]"):
        rt.unet_plain(np.concatenate([x, x]), t, pos)
    with pytest.raises(SunEdgeError, match="expected a numpy array, got list"):
        rt.decode(x.tolist())


def test_providers_by_name(onnx_fp32_bundle):
    import onnxruntime as ort

    assert set(PROVIDERS) == {"cpu", "cuda", "tensorrt", "coreml"}
    with pytest.raises(SunEdgeError, match="unknown provider 'rocm'; valid providers: cpu, cuda, tensorrt, coreml"):
        OnnxRuntime.open(onnx_fp32_bundle, provider="rocm")
    missing = [name for name, ort_name in PROVIDERS.items() if ort_name not in ort.get_available_providers()]
    if not missing:
        pytest.skip("every provider is available in this onnxruntime")
    with pytest.raises(SunEdgeError, match=rf"provider {missing[0]} \(.*\) is not available in this onnxruntime .*"
                                           r"available: .*cpu \(CPUExecutionProvider\)"):
        OnnxRuntime.open(onnx_fp32_bundle, provider=missing[0])
