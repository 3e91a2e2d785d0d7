"""``sun-edge export --target onnx``: the bundle it writes, its graphs, fp16 islands, and safe writing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from no_torch import run_without_torch
from sun_edge.bundle import describe_files, open_bundle
from sun_edge.errors import SunEdgeError
from sun_edge.export import TARGETS, ExportOptions, export
from sun_edge.export import onnx as onnx_target
from sun_edge.export import onnx_graph
from cli_helpers import error_line, run

UNET_INPUTS = ["sample", "timestep", "encoder_hidden_states", "negative_encoder_hidden_states"]
COMPONENTS = {"text_encoder", "unet", "unet_plain", "vae_decoder", "vae_encoder"}
FP32_ISLANDS = ("Softmax", "InstanceNormalization", "LayerNormalization", "ReduceL2")


def no_partials(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_bundle_files_and_manifest(onnx_fp32_bundle, tiny_reference, tiny_home):
    from sun_edge import __version__
    from sun_edge.weights import sha256_file

    files = {p.name for p in onnx_fp32_bundle.iterdir()}
    assert files == {f"{c}.onnx" for c in COMPONENTS} | {"manifest.json", "vocab.json", "merges.txt"}
    assert no_partials(onnx_fp32_bundle.parent) == []
    m = open_bundle(onnx_fp32_bundle).manifest
    assert (m.target, m.precision, m.format_version) == ("onnx", "fp32", 1)
    assert m.image == {"height": 64, "width": 64}
    assert m.latent == {"channels": 4, "height": 8, "width": 8, "scaling_factor": 0.18215, "unet_in_channels": 4}
    assert m.text == {"tokens": 77, "dim": 32}
    assert m.model == {"name": "tiny-random", "sha256": tiny_reference.info["model_sha256"], "path": "tiny-random", "loras": []}
    adapter_file = tiny_home / "models" / "tiny-random" / "sun-adapter.safetensors"
    assert m.adapter == {"name": "sun-adapter.safetensors", "path": str(adapter_file), "sha256": sha256_file(adapter_file),
                         "parameters": tiny_reference.adapter.num_parameters(), "extra_positive": False}
    assert m.scheduler == {"name": "ddim", "spacing": "trailing", "steps": 4}
    assert m.baseline == {"name": "dpmpp_2m", "spacing": "linspace", "steps": 25, "guidance": 8.0}
    assert m.tokenizer == {"vocab": "vocab.json", "merges": "merges.txt"}
    assert m.sun_edge_version == __version__
    # every export checks itself against the PyTorch reference on a real trajectory before it lands
    assert m.parity["passed"] is True
    assert set(m.parity["components"]) >= {"text_encoder", "unet", "unet_plain", "vae_decoder", "vae_encoder", "image"}
    unet = m.parity["components"]["unet"]
    assert float(unet["psnr_db"]) >= unet["threshold_db"] == 40
    assert m.extra["opset"] >= 17
    for name, comp in m.components.items():
        assert comp.file == f"{name}.onnx" and comp.precision == "fp32"
        assert (comp.files, comp.sha256) == describe_files(onnx_fp32_bundle, [comp.file])


@pytest.mark.parametrize("which", ["fp32", "fp16"])
def test_graphs_pass_the_checker_with_the_manifest_io(which, onnx_fp32_bundle, onnx_fp16_bundle):
    bundle = open_bundle(onnx_fp32_bundle if which == "fp32" else onnx_fp16_bundle)
    m = bundle.manifest
    for name, comp in m.components.items():
        path = bundle.path / comp.file
        onnx.checker.check_model(str(path), full_check=True)
        assert onnx_graph.opset(path) >= 17
        assert onnx_graph.graph_io(path) == (comp.inputs, comp.outputs)
        for spec in comp.inputs + comp.outputs:
            assert spec.dtype in ("float32", "int64"), (name, spec)  # fp16 graphs keep float32 I/O
            free = [d for d in spec.shape if d <= 0]
            assert free == ([-1] if name == "unet_plain" and spec.name != "timestep" else []), (name, spec)
    unet = m.components["unet"]
    assert [s.name for s in unet.inputs] == UNET_INPUTS and [s.name for s in unet.outputs] == ["noise_pred"]
    assert [s.shape for s in unet.inputs] == [(1, 4, 8, 8), (1,), (1, 77, 32), (1, 77, 32)]
    assert m.components["text_encoder"].inputs[0].shape == (1, 77) and m.components["text_encoder"].inputs[0].dtype == "int64"
    assert [s.name for s in m.components["vae_decoder"].inputs] == ["latent_sample"]
    assert m.components["vae_decoder"].outputs[0].shape == (1, 3, 64, 64)
    assert m.components["vae_encoder"].outputs[0].shape == (1, 4, 8, 8)


def _typed(path: Path) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The graph after ONNX type inference, and every value's element type."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return model, types


def test_fp16_graphs_keep_the_fragile_ops_in_fp32(onnx_fp16_bundle):
    m = open_bundle(onnx_fp16_bundle).manifest
    assert m.precision == "fp16"
    assert {n: c.precision for n, c in m.components.items()} == {
        "text_encoder": "fp16", "unet": "fp16", "unet_plain": "fp16", "vae_decoder": "fp32", "vae_encoder": "fp32"}

    model, types = _typed(onnx_fp16_bundle / "unet_plain.onnx")
    for n in model.graph.node:
        if n.op_type in FP32_ISLANDS:
            assert types[n.input[0]] == TensorProto.FLOAT, (n.op_type, n.name)
    model, types = _typed(onnx_fp16_bundle / "unet.onnx")
    weights = [t for t in model.graph.initializer if len(t.dims)]
    fp16_bytes = sum(np.prod(t.dims) for t in weights if t.data_type == TensorProto.FLOAT16)
    all_bytes = sum(np.prod(t.dims) for t in weights)
    assert fp16_bytes > 0.95 * all_bytes  # the weights are half precision
    nodes = model.graph.node
    islands = [n for n in nodes if n.op_type in FP32_ISLANDS]
    assert {n.op_type for n in islands} == set(FP32_ISLANDS)
    for n in islands:
        assert types[n.input[0]] == TensorProto.FLOAT, (n.op_type, n.name)
    producer = {out: n for n in nodes for out in n.output}
    ratios = [n for n in nodes if n.op_type == "Div" and all(i in producer and producer[i].op_type == "ReduceL2" for i in n.input)]
    assert len(ratios) == 16  # the adapter's ||Zp|| / ||Zn||, one per cross-attention layer
    assert all(types[n.output[0]] == TensorProto.FLOAT for n in ratios)
    assert any(n.op_type == "Cast" and types[n.output[0]] == TensorProto.FLOAT16 for n in nodes)
    assert {types[n.input[0]] for n in nodes if n.op_type in ("Conv", "MatMul")} == {TensorProto.FLOAT16}

    model, types = _typed(onnx_fp16_bundle / "text_encoder.onnx")
    for n in model.graph.node:
        if n.op_type in ("Softmax", "LayerNormalization"):
            assert types[n.input[0]] == TensorProto.FLOAT, n.name
    decoder = onnx.load(str(onnx_fp16_bundle / "vae_decoder.onnx"))
    assert {t.data_type for t in decoder.graph.initializer} <= {TensorProto.FLOAT, TensorProto.INT64}


def test_one_cleaning_iteration_gives_onnxscripts_two_iteration_graph(tiny_reference):
    """clean() runs onnxscript's optimizer once plus Identity elimination (half the time); on the tiny VAE decoder,
    whose first iteration leaves Identity nodes, that must equal the default two iterations: the same nodes, no
    Identity left, bitwise the same output. An onnxscript upgrade whose second iteration does more fails here."""
    from collections import Counter

    import onnx_ir as ir
    import onnxruntime as ort
    import onnxscript.optimizer

    decoder = next(p for p in onnx_target.plan(tiny_reference, ExportOptions(height=64, width=64))
                   if p.name == "vae_decoder")
    traced = ir.serde.serialize_model(onnx_target.trace(decoder))
    ours, default = ir.serde.deserialize_model(traced), ir.serde.deserialize_model(traced)
    onnx_graph.clean(ours)
    onnxscript.optimizer.optimize(default)  # two iterations
    ops = [Counter(n.op_type for n in m.graph) for m in (ours, default)]
    assert ops[0] == ops[1] and "Identity" not in ops[0]
    once = ir.serde.deserialize_model(traced)
    onnxscript.optimizer.optimize(once, num_iterations=1)
    assert Counter(n.op_type for n in once.graph)["Identity"] > 0  # what the elimination pass is there for
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    outputs = [ort.InferenceSession(ir.serde.serialize_model(m).SerializeToString()).run(None, {"latent_sample": x})[0]
               for m in (ours, default)]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_big_graphs_keep_their_weights_in_one_data_file(onnx_fp32_bundle, tmp_path):
    import onnx_ir as ir
    import onnxruntime as ort

    model = ir.load(str(onnx_fp32_bundle / "vae_decoder.onnx"))
    files = onnx_graph.save(model, tmp_path / "vae_decoder.onnx", external_data_bytes=0)
    assert files == ["vae_decoder.onnx", "vae_decoder.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    comp = open_bundle(onnx_fp32_bundle).manifest.components["vae_decoder"]
    onnx_graph.check_graph(tmp_path / "vae_decoder.onnx", comp.inputs, comp.outputs)
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    outputs = [ort.InferenceSession(str(d / "vae_decoder.onnx")).run(None, {"latent_sample": x})[0]
               for d in (onnx_fp32_bundle, tmp_path)]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_unknown_target_lists_the_valid_ones(home_env, tmp_path, capsys):
    code, _, err = run(capsys, "export", "--target", "tflite", "-o", str(tmp_path / "b"))
    assert code == 2
    assert error_line(err) == f"error: unknown export target 'tflite'; valid targets: {', '.join(sorted(TARGETS))}"
    assert "onnx" in TARGETS
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["--height", "100"], "error: height 100 is not a positive multiple of 8"),
    (["--model", "no-such-model"], "error: unknown model 'no-such-model'"),
])
def test_bad_export_input_is_one_line_and_writes_nothing(home_env, tmp_path, capsys, args, message):
    code, _, err = run(capsys, "export", "--target", "onnx", *args, "-o", str(tmp_path / "b"))
    assert code == 2 and error_line(err).startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_export_needs_an_adapter(home_env, tmp_path, capsys):
    model = tmp_path / "no-adapter"
    shutil.copytree(home_env / "models" / "tiny-random", model, ignore=shutil.ignore_patterns("*adapter*"))
    code, _, err = run(capsys, "export", "--target", "onnx", "--model", str(model), "-o", str(tmp_path / "b"))
    assert code == 2 and "has no SUN adapter beside it: pass --adapter PATH" in error_line(err)
    assert not (tmp_path / "b").exists() and no_partials(tmp_path) == []


def test_existing_output_needs_force_and_is_checked_before_loading(home_env, tmp_path, capsys, monkeypatch):
    from sun_edge.runtimes.pytorch import TorchRuntime

    out = tmp_path / "b"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the destination was checked")

    monkeypatch.setattr(TorchRuntime, "load", no_loading)
    code, _, err = run(capsys, "export", "--target", "onnx", "-o", str(out))
    assert code == 2
    assert error_line(err).startswith(f"error: {out} already exists and is a folder that is not a sun-edge bundle")
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    code, _, err = run(capsys, "export", "--target", "onnx", "--force", "-o", str(out))  # --force cannot delete it
    assert code == 2 and "--force replaces only a sun-edge bundle" in error_line(err)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    (out / "mine.txt").unlink()
    (out / "manifest.json").write_text(json.dumps({"format": "sun-edge-bundle", "format_version": 1}))  # a bundle
    code, _, err = run(capsys, "export", "--target", "onnx", "-o", str(out))
    assert code == 2
    assert error_line(err) == f"error: {out} already exists; pass --force to replace it, or choose another -o"


def _text_encoder_only(monkeypatch) -> None:
    """Export only the text encoder (fast) where a test is about writing, not about the graphs."""
    real = onnx_target.plan
    monkeypatch.setattr(onnx_target, "plan", lambda reference, options: real(reference, options)[:1])


def test_force_replaces_an_existing_bundle(home_env, tmp_path, capsys, monkeypatch):
    _text_encoder_only(monkeypatch)
    out = tmp_path / "b"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "manifest.json").write_text(json.dumps({"format": "sun-edge-bundle", "format_version": 1}))  # an old bundle
    code, stdout, err = run(capsys, "export", "--target", "onnx", "--height", "64", "--width", "64", "--force", "-o", str(out))
    assert code == 0, err
    assert f"wrote {out}" in stdout and "text_encoder" in err  # a progress bar per component, on stderr
    assert not (out / "old.txt").exists()
    assert set(open_bundle(out).manifest.components) == {"text_encoder"}
    assert no_partials(tmp_path) == []


def test_an_export_failing_midway_leaves_no_bundle(home_env, tmp_path, monkeypatch):
    calls = []
    real = onnx_target.convert

    def fail_after_the_first(graph, directory, **kwargs):
        calls.append(graph.name)
        if len(calls) > 1:
            assert (directory / "text_encoder.onnx").is_file()  # the first component was written
            raise RuntimeError("disk full")
        return real(graph, directory, **kwargs)

    monkeypatch.setattr(onnx_target, "convert", fail_after_the_first)
    options = ExportOptions(height=64, width=64)
    with pytest.raises(RuntimeError, match="disk full"):
        export("onnx", "tiny-random", tmp_path / "b", options=options, progress=False)
    assert calls == ["text_encoder", "unet"]
    assert list(tmp_path.iterdir()) == []  # no bundle, no temporary directory

    old = tmp_path / "old"  # with --force, a failed export leaves the old bundle as it was
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": "sun-edge-bundle", "format_version": 1}))
    calls.clear()
    with pytest.raises(RuntimeError, match="disk full"):
        export("onnx", "tiny-random", old, options=options, force=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert json.loads((old / "manifest.json").read_text()) == {"format": "sun-edge-bundle", "format_version": 1}


def test_the_parity_hook_sees_the_complete_bundle_and_is_recorded(home_env, tmp_path, monkeypatch):
    _text_encoder_only(monkeypatch)
    seen = {}

    def parity(reference, bundle_dir: Path) -> dict:
        seen["complete"] = open_bundle(bundle_dir).manifest.parity == {}
        seen["dir"], seen["reference"] = bundle_dir, reference.name
        return {"text_encoder": {"psnr_db": 99.0}}

    out = export("onnx", "tiny-random", tmp_path / "b", options=ExportOptions(), parity=parity, progress=False)
    assert seen["complete"] and seen["reference"] == "pytorch" and seen["dir"] != out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"] == {"text_encoder": {"psnr_db": 99.0}}
    assert manifest["image"] == {"height": 64, "width": 64}  # no size given: the model's own (8 x 8 latents x 8)


def test_unset_sides_take_the_models_own_size():
    assert ExportOptions().sized(512) == ExportOptions(height=512, width=512)
    assert ExportOptions(height=64).sized(512) == ExportOptions(height=64, width=512)
    ExportOptions().validate()  # unset sides are valid until sized
    with pytest.raises(SunEdgeError, match="height 60 is not a positive multiple of 8"):
        ExportOptions(height=60).validate()


def test_bad_export_options_raise_before_anything_runs(tmp_path):
    with pytest.raises(SunEdgeError, match="unknown precision 'bf16'; valid precisions: fp16, fp32"):
        export("onnx", "tiny-random", tmp_path / "b", options=ExportOptions(precision="bf16"))  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_importing_the_export_package_stays_light():
    run_without_torch("""
        import sys
        import sun_edge.export
        assert "onnx" in sun_edge.export.TARGETS
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("onnx", "onnxscript", "onnxruntime", "torch"))
        assert not heavy, heavy
    """)
