"""ONNX graph work for TensorRT: the Volta attention pass and the supported-operator check.

Volta (sm70, V100) has no fused attention kernels, so TensorRT runs attention as separate
MatMul and Softmax layers in the graph's types. The fp16 bundle already computes softmax in
fp32, but its logits ``Q @ K^T`` are an fp16 MatMul whose result is cast up. ``fp32_attention_logits``
casts the two inputs of every MatMul that feeds a Softmax to float32 (through Cast/Mul/Div/Add,
the scale and mask ops between them), so the logits are computed and kept in fp32; the
Softmax's own input Cast then becomes an Identity. ``unet.volta.onnx`` is that graph.

``SUPPORTED_OPS`` is the ONNX-TensorRT parser's operator list for TensorRT 10.x
(onnx-tensorrt ``docs/operators.md``, release/10.x), and ``SUPPORTED_DTYPES`` the tensor types
it accepts; ``unsupported`` walks a graph and names whatever falls outside them.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

SUPPORTED_OPS: frozenset[str] = frozenset("""
Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh AttentionLayerNormalization AveragePool
BatchNormalization Bernoulli BlackmanWindow Cast CastLike Ceil Celu CenterCropPad Clip Compress Concat
ConcatFromSequence Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout DynamicQuantizeLinear Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow Hardmax HardSigmoid HardSwish Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization
LpPool LRN LSTM MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero
Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter
ScatterElements ScatterND Selu SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert
SequenceLength Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split
SplitToSequence Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
SUPPORTED_DTYPES: frozenset[str] = frozenset({
    "FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "INT8", "UINT8", "BOOL", "FLOAT8E4M3FN", "INT4",
})  # TensorRT 10 has native int64; DOUBLE and strings are not accepted
WALK_THROUGH = frozenset({"Cast", "Identity", "Mul", "Div", "Add", "Where"})  # between the logits MatMul and its Softmax


def _dtype_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type)


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor, after ONNX type inference (inputs, initializers, values, outputs)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in (*g.input, *g.value_info, *g.output):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    return types


def logits_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMul nodes whose result reaches a Softmax through scale/mask/cast ops only."""
    producer = {o: n for n in model.graph.node for o in n.output}
    found: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        current = producer.get(node.input[0])
        while current is not None and current.op_type in WALK_THROUGH:
            current = producer.get(current.input[0])
        if current is not None and current.op_type == "MatMul" and all(current is not f for f in found):
            found.append(current)
    return found


def fp32_attention_logits(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Compute every Softmax-feeding MatMul in float32 (in place); returns the model and how many changed."""
    types = tensor_types(model)
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    changed, new_nodes = 0, {}
    for mm in logits_matmuls(model):
        if types.get(mm.output[0]) == TensorProto.FLOAT:
            continue  # already fp32 (fp32 bundles)
        before, out = [], mm.output[0]
        for k, name in enumerate(list(mm.input)):
            cast_name = f"{name}__fp32_{mm.name or changed}_{k}"
            before.append(helper.make_node("Cast", [name], [cast_name], to=TensorProto.FLOAT, name=f"{cast_name}_cast"))
            mm.input[k] = cast_name
        wide = f"{out}__fp32"
        mm.output[0] = wide
        users = consumers.get(out, [])
        if users and all(u.op_type == "Cast" and _cast_to(u) == TensorProto.FLOAT for u in users) \
                and out not in {o.name for o in graph.output}:
            for u in users:  # the Softmax's up-cast: now a no-op on fp32 logits
                u.op_type, u.input[0] = "Identity", wide
                del u.attribute[:]
            after = []
        else:
            after = [helper.make_node("Cast", [wide], [out], to=types.get(out, TensorProto.FLOAT16), name=f"{wide}_back")]
        new_nodes[id(mm)] = (before, after)
        changed += 1
    ordered = []
    for n in graph.node:
        before, after = new_nodes.get(id(n), ([], []))
        ordered += [*before, n, *after]
    del graph.node[:]
    graph.node.extend(ordered)
    return model, changed


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def write_volta_graph(source: Path, target: Path) -> int:
    """Write ``target`` (``unet.volta.onnx``) from ``source`` with fp32 attention logits; its weights beside it."""
    model = onnx.load(str(source))  # loads external data too
    model, changed = fp32_attention_logits(model)
    big = sum(len(t.raw_data) for t in model.graph.initializer) > 1_800_000_000
    if big:
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{Path(target).name}.data")
    else:
        onnx.save_model(model, str(target))
    return changed


def unsupported(path: Path) -> list[str]:
    """Operators and tensor dtypes in the graph at ``path`` that TensorRT 10's ONNX parser rejects."""
    model = onnx.load(str(path), load_external_data=False)
    problems = sorted({f"op {n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node
                       if n.domain not in ("", "ai.onnx") or n.op_type not in SUPPORTED_OPS})
    try:
        types = tensor_types(model)
    except Exception:  # inference needs weights for some graphs; fall back to declared types
        g = model.graph
        types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
        types.update({t.name: t.data_type for t in g.initializer})
    cast_targets = {_cast_to(n) for n in model.graph.node if n.op_type == "Cast"}
    dtypes = {_dtype_name(t) for t in (*types.values(), *(c for c in cast_targets if c is not None)) if t}
    problems += sorted(f"dtype {d}" for d in dtypes - SUPPORTED_DTYPES)
    return problems
