"""TAESD in ONNX bundles: ``export --vae-decoder tiny:PATH``, ``generate --bundle --vae-decoder tiny``, parity, bench."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from PIL import Image

from no_torch import run_without_torch
from sun_edge import sampling
from sun_edge.bundle import TensorSpec, open_bundle
from sun_edge.cli import main
from sun_edge.errors import SunEdgeError
from sun_edge.export import ExportOptions, export
from sun_edge.export import onnx as onnx_target
from sun_edge.imaging import read_parameters
from sun_edge.bundle_parity import export_parity
from sun_edge.parity import psnr, threshold
from sun_edge.pipeline import Pipeline, Settings
from sun_edge.runtimes.onnxruntime import OnnxRuntime
from sun_edge.taesd import WEIGHTS_FILE
from test_tiny_decoder import error_line, run, small_taesd

SIZE = ["--height", "64", "--width", "64"]


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("taesd") / "taesd"
    small_taesd().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, tiny_home, taesd_dir) -> Path:
    """The tiny model exported through the CLI in fp32 at 64x64 with TAESD (do not modify: copy first)."""
    out = tmp_path_factory.mktemp("onnx-tiny") / "fp32"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUN_EDGE_HOME", str(tiny_home))
        code = main(["export", "--model", "tiny-random", "--target", "onnx", *SIZE, "--vae-decoder", f"tiny:{taesd_dir}", "-o", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def tiny_fp16_bundle(tmp_path_factory, tiny_home, taesd_dir) -> Path:
    """An fp16 export holding only the TAESD graph (fast), its parity checked and recorded as every export's is."""
    out = tmp_path_factory.mktemp("onnx-tiny") / "fp16"
    real = onnx_target.plan
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUN_EDGE_HOME", str(tiny_home))
        mp.setattr(onnx_target, "plan", lambda ref, options: [g for g in real(ref, options) if g.name == "vae_decoder_tiny"])
        export("onnx", "tiny-random", out, options=ExportOptions(precision="fp16", height=64, width=64),
               vae_decoder=f"tiny:{taesd_dir}", parity=export_parity, progress=False)
    return out


@pytest.fixture(scope="module")
def torch_tiny(tiny_home, taesd_dir):
    """The PyTorch reference with the same TAESD weights: the independent reference for the graphs."""
    from sun_edge.runtimes.pytorch import TorchRuntime

    return TorchRuntime.load(str(tiny_home / "models" / "tiny-random"), vae_decoder=f"tiny:{taesd_dir}")


def without_tiny(bundle: Path, dst: Path) -> Path:
    """A copy of ``bundle`` as an export without ``--vae-decoder`` writes it."""
    shutil.copytree(bundle, dst)
    (dst / "vae_decoder_tiny.onnx").unlink()
    data = json.loads((dst / "manifest.json").read_text())
    data["components"].pop("vae_decoder_tiny")
    data["vae_decoder_tiny"] = None
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def test_fp32_export_lists_the_tiny_decoder_with_its_parity(tiny_bundle, taesd_dir):
    from sun_edge.weights import sha256_file

    m = open_bundle(tiny_bundle).manifest
    comp = m.components["vae_decoder_tiny"]
    assert comp.file == "vae_decoder_tiny.onnx" and comp.precision == "fp32"
    assert comp.inputs == (TensorSpec("latents", "float32", (1, 4, 8, 8)),)
    assert comp.outputs == (TensorSpec("image", "float32", (1, 3, 64, 64)),)
    assert {"vae_decoder", "vae_encoder"} <= set(m.components)  # the full VAE stays
    assert m.vae_decoder_tiny == {"name": "taesd", "path": str(taesd_dir),
                                  "sha256": sha256_file(taesd_dir / WEIGHTS_FILE), "parameters": m.vae_decoder_tiny["parameters"]}
    assert m.vae_decoder_tiny["parameters"] > 0
    row = m.parity["components"]["vae_decoder_tiny"]
    assert row["passed"] and row["precision"] == "fp32" and row["threshold_db"] == threshold("vae_decoder_tiny", "fp32")
    assert float(row["psnr_db"]) >= row["threshold_db"] and m.parity["passed"]


def test_fp16_export_keeps_float32_io_around_a_float16_graph(tiny_fp16_bundle):
    m = open_bundle(tiny_fp16_bundle).manifest
    assert set(m.components) == {"vae_decoder_tiny"} and m.components["vae_decoder_tiny"].precision == "fp16"
    graph = onnx.load(str(tiny_fp16_bundle / "vae_decoder_tiny.onnx")).graph
    assert [v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]] == [TensorProto.FLOAT] * 2
    assert {init.data_type for init in graph.initializer if len(init.dims) == 4} == {TensorProto.FLOAT16}  # conv weights
    row = m.parity["components"]["vae_decoder_tiny"]
    assert row["passed"] and row["precision"] == "fp16" and row["threshold_db"] == threshold("vae_decoder_tiny", "fp16")
    assert "unet" in m.parity["skipped"]  # the rest of this test bundle was left out on purpose


def test_the_runtime_chooses_its_decoder(tiny_bundle, torch_tiny):
    x = 1.5 * np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    full = OnnxRuntime.open(tiny_bundle)
    assert full.decoder == "full" and full.has_tiny_decoder and "vae_decoder" not in full.info
    np.testing.assert_array_equal(full.decode(x), full.decode_full(x))
    fast = OnnxRuntime.open(tiny_bundle, vae_decoder="tiny")
    assert fast.decoder == "tiny" and fast.info["vae_decoder"] == torch_tiny.info["vae_decoder"] == "tiny:taesd"
    got = fast.decode(x)
    np.testing.assert_array_equal(got, fast.decode_tiny(x))
    assert got.shape == (1, 3, 64, 64) and -1 <= got.min() and got.max() <= 1
    assert psnr(torch_tiny.decode_tiny(x), got) >= threshold("vae_decoder_tiny", "fp32")
    assert psnr(torch_tiny.decode_full(x), fast.decode_full(x)) >= threshold("vae_decoder", "fp32")
    assert np.abs(got - full.decode(x)).mean() > 1e-2  # TAESD is another decoder than the VAE
    with pytest.raises(SunEdgeError, match="unknown VAE decoder 'taesd' for a bundle; valid decoders: full, tiny"):
        OnnxRuntime.open(tiny_bundle, vae_decoder="taesd")  # type: ignore[arg-type]


def test_a_whole_image_with_the_tiny_decoder_matches_pytorch(tiny_bundle, torch_tiny):
    """The 4-step chain through ONNX Runtime and TAESD against the PyTorch runtime with the same TAESD weights."""
    runtime = OnnxRuntime.open(tiny_bundle, vae_decoder="tiny")
    settings = Settings(height=64, width=64)
    images = []
    for pipe in (Pipeline(torch_tiny), Pipeline(runtime, runtime.tokenizer())):
        pos, neg = pipe.embed("a red circle"), pipe.embed("blue")
        latents = sampling.sample(pipe.eps_fn(pos, neg, settings), pipe.initial_latents(0, settings), steps=4,
                                  scheduler="ddim", spacing="trailing")
        images.append(pipe.runtime.decode(latents.astype(np.float32)))
    assert psnr(images[0], images[1]) >= threshold("image", "fp32")


def test_generate_from_a_bundle_with_the_tiny_decoder(tiny_bundle, taesd_dir, home_env, tmp_path, capsys):
    onnx_png, torch_png, full_png = tmp_path / "onnx.png", tmp_path / "torch.png", tmp_path / "full.png"
    prompt = ["--prompt", "a red circle", "--negative-prompt", "blue"]
    code, _, err = run(capsys, "generate", "--bundle", str(tiny_bundle), *prompt, "--vae-decoder", "tiny", "-o", str(onnx_png))
    assert code == 0, err
    code, _, err = run(capsys, "generate", "--model", "tiny-random", *prompt, *SIZE, "--vae-decoder", f"tiny:{taesd_dir}", "-o", str(torch_png))
    assert code == 0, err
    code, _, err = run(capsys, "generate", "--bundle", str(tiny_bundle), *prompt, "-o", str(full_png))
    assert code == 0, err
    for png in (onnx_png, torch_png):
        assert 'VAE decoder: "tiny:taesd"' in read_parameters(png)
    assert "VAE decoder" not in read_parameters(full_png)
    a, b, c = (np.asarray(Image.open(p), dtype=np.float32) for p in (onnx_png, torch_png, full_png))
    assert a.shape == (64, 64, 3) and np.abs(a - b).max() <= 1.0  # fp32 graphs: at most one 8-bit rounding apart
    assert np.abs(a - c).mean() > 1.0


def test_generate_without_torch_with_the_tiny_decoder(tiny_bundle, tmp_path):
    out = tmp_path / "no-torch.png"
    run_without_torch(f"""
        import sys
        from sun_edge.cli import main
        code = main(["generate", "--bundle", {str(tiny_bundle)!r}, "--prompt", "a red circle", "--vae-decoder", "tiny",
                     "-o", {str(out)!r}])
        assert code == 0, code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))
        assert not heavy, heavy
    """, capture_output=True)
    assert Image.open(out).size == (64, 64) and 'VAE decoder: "tiny:taesd"' in read_parameters(out)


def test_tiny_on_a_bundle_without_it_names_the_fix(tiny_bundle, tmp_path, capsys):
    bundle = without_tiny(tiny_bundle, tmp_path / "b")
    out = tmp_path / "x.png"
    code, _, err = run(capsys, "generate", "--bundle", str(bundle), "--prompt", "x", "--vae-decoder", "tiny", "-o", str(out))
    assert code == 2 and not out.exists()
    assert error_line(err) == (f"error: bundle {bundle} has no TAESD decoder (vae_decoder_tiny.onnx); re-export it with "
                               "--vae-decoder tiny:PATH, or use --vae-decoder full")
    runtime = OnnxRuntime.open(bundle)
    assert not runtime.has_tiny_decoder and runtime.decoder == "full"
    with pytest.raises(SunEdgeError, match="re-export it with a TAESD decoder"):
        runtime.decode_tiny(np.zeros((1, 4, 8, 8), np.float32))


def test_a_path_with_bundle_is_refused(tiny_bundle, taesd_dir, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--bundle", str(tiny_bundle), "--prompt", "x", "--vae-decoder",
                       f"tiny:{taesd_dir}", "-o", str(tmp_path / "x.png"))
    assert code == 2 and "applies to --model; with --bundle use full or tiny" in error_line(err)


def test_a_bad_tiny_path_at_export_is_one_line_and_writes_nothing(home_env, tmp_path, capsys):
    out = tmp_path / "b"
    code, _, err = run(capsys, "export", "--target", "onnx", *SIZE, "--vae-decoder", f"tiny:{tmp_path}/missing",
                       "-o", str(out))
    assert code == 2 and error_line(err).startswith(f"error: TAESD decoder {tmp_path}/missing does not exist")
    code, _, err = run(capsys, "export", "--target", "onnx", *SIZE, "--vae-decoder", "taesd", "-o", str(out))
    assert code == 2 and error_line(err).startswith("error: bad --vae-decoder 'taesd'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["tensorrt", "coreml"])
def test_other_targets_refuse_the_tiny_decoder(target, home_env, taesd_dir, tmp_path, capsys):
    code, _, err = run(capsys, "export", "--target", target, *SIZE, "--vae-decoder", f"tiny:{taesd_dir}",
                       "-o", str(tmp_path / "b"))
    assert code == 2
    assert error_line(err) == (f"error: --vae-decoder tiny:PATH applies to --target onnx, openvino; {target} bundles decode with "
                               "the model's VAE only (drop --vae-decoder)")
    assert list(tmp_path.iterdir()) == []


def test_parity_rechecks_the_tiny_decoder(tiny_bundle, home_env, tmp_path, capsys):
    out = tmp_path / "parity.json"
    code, stdout, err = run(capsys, "parity", "--bundle", str(tiny_bundle), "--json", str(out))
    assert code == 0, err
    assert "vae_decoder_tiny" in stdout and "warning" not in err
    data = json.loads(out.read_text())
    row = data["components"]["vae_decoder_tiny"]
    assert row["passed"] and row["threshold_db"] == threshold("vae_decoder_tiny", "fp32")
    assert data["reference_matches_bundle"] and "vae_decoder_tiny" not in data["skipped"]


def test_bench_times_the_tiny_decoder_of_a_bundle(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, _, err = run(capsys, "bench", "--bundle", str(tiny_bundle), "--repeats", "1", "--json", str(out))
    assert code == 0, err
    data = json.loads(out.read_text())
    assert {"vae_decode", "vae_decode_tiny", "sun4", "sun4_tiny"} <= set(data["seconds"])
    assert data["unet_calls"]["sun4_tiny"] == 4 and "tiny_decode_speedup" in data["ratios"]


def test_parity_reference_helpers_for_the_tiny_decoder(taesd_dir):
    from types import SimpleNamespace

    from sun_edge import bundle_parity as parity
    from sun_edge.weights import sha256_file

    manifest = SimpleNamespace(model={"path": "/m"}, adapter={"path": "/a"}, components={"vae_decoder_tiny": None},
                               vae_decoder_tiny={"name": "taesd", "sha256": "e" * 64})
    with pytest.raises(SunEdgeError, match=r"records no path for it; pass --vae-decoder tiny:PATH"):
        parity.reference_for_bundle(manifest)
    plain = SimpleNamespace(model={"path": "/m"}, adapter={"path": "/a"}, components={}, vae_decoder_tiny=None)
    with pytest.raises(SunEdgeError, match=r"this bundle has none \(vae_decoder_tiny\)"):
        parity.reference_for_bundle(plain, vae_decoder=f"tiny:{taesd_dir}")
    reference = SimpleNamespace(tiny_decoder=SimpleNamespace(source=str(taesd_dir)))
    assert parity._tiny_mismatch(manifest, reference) == (
        f"TAESD decoder sha256 {sha256_file(taesd_dir / WEIGHTS_FILE)[:12]}... differs from the bundle's {'e' * 12}...",)
    manifest.vae_decoder_tiny["sha256"] = sha256_file(taesd_dir / WEIGHTS_FILE)
    assert parity._tiny_mismatch(manifest, reference) == ()
