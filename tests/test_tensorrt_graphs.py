"""The exported graphs against TensorRT: supported operators and dtypes, the Volta attention pass, the manifest."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from sun_edge.bundle import open_bundle
from sun_edge.export import tensorrt as trt_target
from sun_edge.export import tensorrt_graph as graphs
from sun_edge.runtimes import tensorrt_rules as rules


def psnr(ref: np.ndarray, out: np.ndarray) -> float:
    """DESIGN.md's PSNR: peak from the reference."""
    err = float(np.sqrt(np.mean((ref.astype(np.float64) - out) ** 2)))
    return float("inf") if err == 0 else 20 * np.log10(float(np.abs(ref).max()) / err)


@pytest.mark.parametrize("which", ["onnx_fp16_bundle", "onnx_fp32_bundle"])
def test_every_op_and_dtype_is_supported_by_tensorrt_10(which, request):
    bundle = open_bundle(request.getfixturevalue(which))
    for name, comp in bundle.manifest.components.items():
        assert graphs.unsupported(bundle.path / comp.file) == [], name


def test_the_check_names_what_tensorrt_rejects(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2])
    y = onnx.helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2])
    node = onnx.helper.make_node("StringNormalizer", ["x"], ["y"])
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y]))
    onnx.save(model, tmp_path / "m.onnx")
    assert graphs.unsupported(tmp_path / "m.onnx") == ["op StringNormalizer", "dtype DOUBLE"]


def test_the_operator_table_names_only_real_onnx_operators():
    """No made-up names: every row is a registered ONNX operator, but for the matrix's three legacy ones."""
    rows = graphs.SUPPORTED_OPS | graphs.NOT_SUPPORTED_OPS
    assert not graphs.SUPPORTED_OPS & graphs.NOT_SUPPORTED_OPS
    assert {op for op in rows if not onnx.defs.has(op)} == graphs.LEGACY_OPS
    assert graphs.LEGACY_OPS <= graphs.SUPPORTED_OPS
    assert "AttentionLayerNormalization" not in graphs.SUPPORTED_OPS
    assert all(types <= graphs.SUPPORTED_DTYPES for types in graphs.OP_TYPES.values())
    assert "STFT" not in graphs.SUPPORTED_OPS  # a 10.5 addition: past the V100 limit


def _one_node_model(path, op, elem_type):
    x = onnx.helper.make_tensor_value_info("x", elem_type, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", elem_type, None)
    graph = onnx.helper.make_graph([onnx.helper.make_node(op, ["x"], ["y"])], "g", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("op", ["Compress", "SplitToSequence", "DynamicQuantizeLinear"])
def test_operators_the_matrix_marks_unsupported_are_reported(op, tmp_path):
    assert op in graphs.NOT_SUPPORTED_OPS  # all three were in the old, hand-written list
    node = onnx.helper.make_node(op, ["x"], ["y"])
    x = onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], []))
    onnx.save(model, tmp_path / "m.onnx")
    assert f"op {op}" in graphs.unsupported(tmp_path / "m.onnx")


def test_an_operator_used_with_a_type_its_row_does_not_list_is_reported(tmp_path):
    assert "INT64" not in graphs.OP_TYPES["Softmax"] and "INT32" in graphs.OP_TYPES["Relu"]
    softmax = _one_node_model(tmp_path / "s.onnx", "Softmax", TensorProto.INT64)
    assert graphs.unsupported(softmax) == ["op Softmax with INT64"]
    assert graphs.unsupported(_one_node_model(tmp_path / "r.onnx", "Relu", TensorProto.INT32)) == []
    assert graphs.unsupported(_one_node_model(tmp_path / "h.onnx", "Sigmoid", TensorProto.FLOAT16)) == []


def test_volta_pass_puts_attention_logits_in_fp32(onnx_fp16_bundle, tmp_path):
    source = onnx_fp16_bundle / "unet.onnx"
    original = onnx.load(str(source))
    before = graphs.logits_matmuls(original)
    types = graphs.tensor_types(original)
    assert before and all(types[m.output[0]] == TensorProto.FLOAT16 for m in before)  # what the pass is for
    changed = graphs.write_volta_graph(source, tmp_path / "unet.volta.onnx")
    assert changed == len(before)
    volta = onnx.load(str(tmp_path / "unet.volta.onnx"))
    onnx.checker.check_model(volta, full_check=True)
    types = graphs.tensor_types(volta)
    after = graphs.logits_matmuls(volta)
    assert len(after) == len(before)
    assert all(types[t] == TensorProto.FLOAT for m in after for t in (*m.input, m.output[0]))
    assert graphs.unsupported(tmp_path / "unet.volta.onnx") == []

    rng = np.random.default_rng(0)
    comp = open_bundle(onnx_fp16_bundle).manifest.components["unet"]
    feeds = {s.name: (np.full(s.shape, 999.0) if s.name == "timestep" else rng.standard_normal(s.shape)).astype(np.float32)
             for s in comp.inputs}
    ref = ort.InferenceSession(str(source)).run(None, feeds)[0]
    out = ort.InferenceSession(str(tmp_path / "unet.volta.onnx")).run(None, feeds)[0]
    assert psnr(ref, out) >= 35


def test_volta_pass_leaves_fp32_graphs_alone(onnx_fp32_bundle):
    model = onnx.load(str(onnx_fp32_bundle / "unet.onnx"))
    count = len(model.graph.node)
    model, changed = graphs.fp32_attention_logits(model)
    assert changed == 0 and len(model.graph.node) == count


def test_mark_tensorrt_records_the_profile_and_no_engines(onnx_fp16_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(onnx_fp16_bundle, bundle)
    before = open_bundle(bundle).manifest
    trt_target.mark_tensorrt(bundle)
    manifest = open_bundle(bundle).manifest
    assert manifest.target == "tensorrt" and manifest.precision == "fp16"
    assert manifest.components == before.components and manifest.parity == before.parity
    section = manifest.extra["tensorrt"]
    assert section["engines"] == {} and section["batch"] == 1 and section["text_tokens"] == 77
    unet = section["profile"]["unet"]
    assert unet["min"] == unet["opt"] == unet["max"]
    assert unet["min"]["encoder_hidden_states"] == unet["min"]["negative_encoder_hidden_states"] == [1, 77, 32]
    assert manifest.extra["opset"] == 18  # the ONNX entries stay
    assert not [p.name for p in bundle.iterdir() if p.name.startswith(".")]  # the temporary manifest is gone
    assert json.loads((bundle / "manifest.json").read_text())["target"] == "tensorrt"


def test_tensorrt_target_is_registered_and_fp16_by_default():
    import inspect

    from sun_edge.export import TARGETS

    assert TARGETS["tensorrt"].module == "sun_edge.export.tensorrt"
    default = inspect.signature(trt_target.export_bundle).parameters["options"].default
    assert default.precision == "fp16" and rules.TARGET == "tensorrt"
