"""build-engines and the TensorRT runtime's control flow, against fake tensorrt/cudart modules (tests/trt_fakes.py).

What needs the real library and a GPU is at the end, skipped here with its reason.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import trt_fakes
from sun_edge.bundle import open_bundle
from sun_edge.errors import SunEdgeError
from sun_edge.export import tensorrt as trt_target

HAVE_TENSORRT = trt_target.tensorrt_available()  # the real library and a GPU (the fakes are installed per test)


@pytest.fixture()
def trt_bundle(onnx_fp16_bundle, tmp_path) -> Path:
    """A copy of the tiny fp16 ONNX bundle, turned into a TensorRT bundle (no engines yet)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(onnx_fp16_bundle, bundle)
    trt_target.mark_tensorrt(bundle)
    return bundle


def test_build_engines_applies_the_plan_and_records_engines(trt_bundle, monkeypatch, tmp_path):
    trt, _ = trt_fakes.install(monkeypatch, "10.8.0.43", 8, 6)
    cache = tmp_path / "timing.cache"
    manifest = trt_target.build_engines(trt_bundle, opt_level=4, timing_cache=cache, workspace_gb=1, progress=False)
    engines = manifest.extra["tensorrt"]["engines"]
    assert set(engines) == set(manifest.components)
    unet = engines["unet"]
    assert unet["file"] == "unet.trt10.8.0.sm86.plan" and unet["sm"] == 86 and unet["gpu"] == "Fake RTX"
    assert unet["size"] == (trt_bundle / unet["file"]).stat().st_size and len(unet["sha256"]) == 64
    assert unet["source"] == "unet.onnx" and unet["opt_level"] == 4 and unet["build_seconds"] >= 0
    network, config = trt.configs[1]
    assert network.flags == 1 << 0  # STRONGLY_TYPED
    assert config.builder_optimization_level == 4 and config.pools == {"workspace": 1 << 30}
    shapes = config.profiles[0].shapes
    assert shapes["sample"] == ((1, 4, 8, 8),) * 3 and shapes["negative_encoder_hidden_states"] == ((1, 77, 32),) * 3
    assert cache.read_bytes() == b"timing-cache"
    assert open_bundle(trt_bundle).manifest == manifest  # written, atomically, with no leftovers
    assert not [p.name for p in trt_bundle.iterdir() if p.name.startswith(".")]
    trt_target.build_engines(trt_bundle, timing_cache=cache, progress=False)  # all current: nothing rebuilt
    assert trt.calls["build_serialized_network"] == len(engines)


def test_volta_builds_from_the_fp32_logits_graph(trt_bundle, monkeypatch):
    trt_fakes.install(monkeypatch, "10.4.0", 7, 0)
    engines = trt_target.build_engines(trt_bundle, progress=False).extra["tensorrt"]["engines"]
    assert engines["unet"]["file"] == "unet.trt10.4.0.sm70.plan" and engines["unet"]["source"] == "unet.volta.onnx"
    assert engines["unet_plain"]["source"] == "unet_plain.volta.onnx" and (trt_bundle / "unet.volta.onnx").is_file()
    assert engines["vae_decoder"]["source"] == "vae_decoder.onnx"


def test_version_rules_are_checked_before_any_build(trt_bundle, monkeypatch):
    trt, _ = trt_fakes.install(monkeypatch, "10.5.0", 7, 0)
    with pytest.raises(SunEdgeError, match=r"Volta support was removed in 10.5"):
        trt_target.build_engines(trt_bundle, progress=False)
    assert trt.calls["build_serialized_network"] == 0


def test_runtime_without_engines_says_how_to_build_them(trt_bundle, monkeypatch):
    from sun_edge.runtimes.tensorrt import TensorRTRuntime

    trt_fakes.install(monkeypatch)
    with pytest.raises(SunEdgeError, match=rf"no engine is built; run sun-edge build-engines --bundle {trt_bundle}$"):
        TensorRTRuntime.open(trt_bundle)


def test_runtime_on_another_gpu_or_tensorrt_asks_for_a_rebuild(trt_bundle, monkeypatch):
    from sun_edge.runtimes.tensorrt import TensorRTRuntime

    trt_fakes.install(monkeypatch, "10.8.0", 8, 6)
    trt_target.build_engines(trt_bundle, progress=False)
    trt_fakes.install(monkeypatch, "10.8.0", 8, 9)
    with pytest.raises(SunEdgeError, match=r"built for sm86 \(Fake RTX\), this GPU is sm89; run sun-edge build-engines"):
        TensorRTRuntime.open(trt_bundle)
    trt_fakes.install(monkeypatch, "10.9.0", 8, 6)
    with pytest.raises(SunEdgeError, match=r"built with TensorRT 10.8.0, this machine has 10.9.0; run sun-edge build-engines"):
        TensorRTRuntime.open(trt_bundle)


def test_runtime_refuses_other_bundles(onnx_fp16_bundle, monkeypatch):
    from sun_edge.runtimes.tensorrt import TensorRTRuntime

    trt_fakes.install(monkeypatch)
    with pytest.raises(SunEdgeError, match="is a onnx bundle; the tensorrt runtime runs tensorrt bundles"):
        TensorRTRuntime.open(onnx_fp16_bundle)


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_runtime_binds_once_and_replays_the_unet_graph(trt_bundle, monkeypatch, cuda_graphs):
    from sun_edge.runtimes import RUNTIMES
    from sun_edge.runtimes.tensorrt import TensorRTRuntime

    assert RUNTIMES["tensorrt"].module == "sun_edge.runtimes.tensorrt"
    trt, cudart = trt_fakes.install(monkeypatch)
    trt_target.build_engines(trt_bundle, progress=False)
    runtime = TensorRTRuntime.open(trt_bundle, cuda_graphs=cuda_graphs)
    assert trt.calls["deserialize_cuda_engine"] == 0  # lazy
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    emb = rng.standard_normal((1, 77, 32)).astype(np.float32)
    for step in range(4):
        eps = runtime.unet(latents + step, 999 - 250 * step, emb, emb)
        np.testing.assert_array_equal(eps, 2 * (latents + step))  # fake engine: 2 * sample, through the device
    assert trt.calls["deserialize_cuda_engine"] == 1 and trt.calls["create_execution_context"] == 1
    assert trt.calls["set_tensor_address"] == 5 and cudart.calls["cudaMalloc"] == 5  # 4 inputs + 1 output, once
    assert cudart.calls["cudaMemcpyAsync"] == 4 * 5 and cudart.calls["cudaStreamSynchronize"] == 4
    if cuda_graphs:  # warm-up, capture once, then replay
        assert trt.calls["execute_async_v3"] == 2 and cudart.calls["cudaStreamBeginCapture"] == 1
        assert cudart.calls["cudaGraphInstantiate"] == 1 and cudart.calls["cudaGraphLaunch"] == 3
    else:
        assert trt.calls["execute_async_v3"] == 4 and cudart.calls["cudaGraphLaunch"] == 0
    image = runtime.decode(latents)
    assert image.shape == (1, 3, 64, 64) and trt.calls["deserialize_cuda_engine"] == 2
    runtime.close()
    assert cudart.calls["cudaFree"] == 5 + 2 and cudart.calls["cudaStreamDestroy"] == 1


def test_runtime_checks_inputs_and_runs_the_baseline_batch(trt_bundle, monkeypatch):
    from sun_edge.runtimes.tensorrt import TensorRTRuntime

    trt, _ = trt_fakes.install(monkeypatch)
    trt_target.build_engines(trt_bundle, progress=False)
    runtime = TensorRTRuntime.open(trt_bundle)
    assert runtime.info["tensorrt"] == "10.4.0" and runtime.info["sm"] == 86 and runtime.latent_channels == 4
    with pytest.raises(SunEdgeError, match=r"unet input sample: expected shape \[1,4,8,8\], got \[1,4,8,9\]"):
        runtime.unet(np.zeros((1, 4, 8, 9), np.float32), 999, np.zeros((1, 77, 32), np.float32),
                     np.zeros((1, 77, 32), np.float32))
    for batch in (2, 2, 1):
        eps = runtime.unet_plain(np.ones((batch, 4, 8, 8), np.float32), 999, np.zeros((batch, 77, 32), np.float32))
        assert eps.shape == (batch, 4, 8, 8)
    assert trt.calls["set_input_shape"] == 3 + 2  # every input on the first call, then those whose batch changed
    ids = runtime.tokenizer().encode("a cat", max_length=77)
    assert runtime.encode_text(ids).shape == (1, 77, 32)


@pytest.fixture()
def trt_batch_bundle(onnx_fp16_bundle, tmp_path) -> Path:
    """The tiny fp16 bundle declared with a batch range 1..3 (free batch dimensions, as ``export --max-batch 3``
    records them; the fake TensorRT reads only the graphs' tensor names), as a TensorRT bundle."""
    from dataclasses import replace

    from sun_edge.components import COMPONENTS, FREE, Geometry

    bundle = tmp_path / "batch"
    shutil.copytree(onnx_fp16_bundle, bundle)
    m = open_bundle(bundle).manifest
    geometry = replace(Geometry.from_manifest(m), batch=FREE)
    components = {}
    for name, comp in m.components.items():
        ins, outs = COMPONENTS[name].io(geometry)
        components[name] = replace(comp, inputs=tuple(replace(s, shape=w.shape) for s, w in zip(comp.inputs, ins)),
                                   outputs=tuple(replace(s, shape=w.shape) for s, w in zip(comp.outputs, outs)))
    trt_target.replace_manifest(bundle, replace(m, components=components, batch={"min": 1, "max": 3}))
    trt_target.mark_tensorrt(bundle)
    return bundle


def test_one_cuda_graph_per_batch_size(trt_batch_bundle, monkeypatch):
    """Each batch size runs eagerly once, is captured on its second call and replayed after; a call never replays
    a graph captured at other shapes (the fake graph computes at its capture's shapes: a wrong one shows)."""
    from sun_edge.runtimes.tensorrt import TensorRTRuntime

    trt, cudart = trt_fakes.install(monkeypatch)
    trt_target.build_engines(trt_batch_bundle, progress=False)
    runtime = TensorRTRuntime.open(trt_batch_bundle)
    assert runtime.max_batch == 3
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1, 77, 32)).astype(np.float32)
    batches = [1, 1, 2, 1, 2, 2, 3, 1, 3, 3]
    for batch in batches:  # fresh inputs each call: a stale or mis-shaped replay leaves a wrong output
        latents = rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)
        eps = runtime.unet(latents, 999, np.repeat(emb, batch, 0), np.repeat(emb, batch, 0))
        np.testing.assert_array_equal(eps, 2 * latents)
    shapes = {b: ((b, 4, 8, 8), (1,), (b, 77, 32), (b, 77, 32)) for b in (1, 2, 3)}
    assert runtime.graph_shapes("unet") == [shapes[1], shapes[2], shapes[3]]  # captured in the order first reused
    assert len(cudart.graphs) == 3 and [g.instantiated for g in cudart.graphs] == [1, 1, 1]
    assert [g.shapes[0]["sample"] for g in cudart.graphs] == [(1, 4, 8, 8), (2, 4, 8, 8), (3, 4, 8, 8)]
    launched = [cudart.graphs.index(e.graph) + 1 for e in cudart.launched]  # the batch each launch's graph was for
    assert launched == [1, 1, 2, 2, 1, 3, 3]  # every call after the first at its batch size, at that batch size
    assert trt.calls["execute_async_v3"] == 3 + 3  # one eager call per batch size, one per capture
    plain = [2, 2, 4, 4]  # the CFG pair of 1, then of 2
    for batch in plain:
        x = rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)
        np.testing.assert_array_equal(runtime.unet_plain(x, 999, np.repeat(emb, batch, 0)), 2 * x)
    assert [s[0] for s in runtime.graph_shapes("unet_plain")] == [(2, 4, 8, 8), (4, 4, 8, 8)]
    runtime.close()
    assert cudart.calls["cudaGraphExecDestroy"] == cudart.calls["cudaGraphDestroy"] == 5
    assert all(g.destroyed for g in cudart.graphs)


def test_without_cuda_graphs_every_batch_runs_eagerly(trt_batch_bundle, monkeypatch):
    from sun_edge.runtimes.tensorrt import TensorRTRuntime

    trt, cudart = trt_fakes.install(monkeypatch)
    trt_target.build_engines(trt_batch_bundle, progress=False)
    runtime = TensorRTRuntime.open(trt_batch_bundle, cuda_graphs=False)
    emb = np.zeros((1, 77, 32), np.float32)
    for batch in (1, 2, 2, 1):
        latents = np.full((batch, 4, 8, 8), batch, np.float32)
        np.testing.assert_array_equal(runtime.unet(latents, 999, np.repeat(emb, batch, 0), np.repeat(emb, batch, 0)),
                                      2 * latents)
    assert trt.calls["execute_async_v3"] == 4 and cudart.graphs == [] and runtime.graph_shapes("unet") == []


@pytest.mark.skipif(not HAVE_TENSORRT, reason="needs TensorRT and an NVIDIA GPU")
def test_real_engines_match_onnxruntime(trt_bundle):  # pragma: no cover - runs on the GPU box
    import onnxruntime as ort

    from sun_edge.runtimes.tensorrt import TensorRTRuntime

    trt_target.build_engines(trt_bundle, opt_level=0, progress=False)
    runtime = TensorRTRuntime.open(trt_bundle)
    rng = np.random.default_rng(0)
    latents, emb = rng.standard_normal((1, 4, 8, 8)).astype(np.float32), rng.standard_normal((1, 77, 32)).astype(np.float32)
    session = ort.InferenceSession(str(trt_bundle / "unet.onnx"))
    feeds = {"sample": latents, "timestep": np.array([999], np.float32), "encoder_hidden_states": emb,
             "negative_encoder_hidden_states": emb}
    ref = session.run(None, feeds)[0]
    for _ in range(3):  # warm-up, capture, replay
        out = runtime.unet(latents, 999, emb, emb)
        assert 20 * np.log10(np.abs(ref).max() / np.sqrt(np.mean((ref - out) ** 2))) >= 30


def test_cli_build_engines_and_its_errors(trt_bundle, onnx_fp16_bundle, monkeypatch, capsys):
    from sun_edge.cli import main

    assert main(["build-engines", "--bundle", str(onnx_fp16_bundle)]) == 2
    assert "is a onnx bundle; build-engines needs one exported with --target tensorrt" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)  # not installed
    assert main(["build-engines", "--bundle", str(trt_bundle)]) == 2
    assert "error: TensorRT is not installed: pip install 'sun-edge[tensorrt]'" in capsys.readouterr().err
    trt_fakes.install(monkeypatch, "10.4.0", 7, 0)
    assert main(["build-engines", "--bundle", str(trt_bundle), "--opt-level", "2", "--workspace-gb", "0.5"]) == 0
    assert "unet: unet.trt10.4.0.sm70.plan (Fake RTX, sm70, TensorRT 10.4.0)" in capsys.readouterr().out


def test_the_tensorrt_modules_import_without_torch():
    from no_torch import run_without_torch

    run_without_torch("import sun_edge.runtimes.tensorrt, sun_edge.runtimes.tensorrt_rules, sun_edge.export.tensorrt")
