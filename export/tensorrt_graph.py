"""ONNX graph work for TensorRT: the Volta attention pass and the supported-operator check.

Volta (sm70, V100) has no fused attention kernels, so TensorRT runs attention as separate
MatMul and Softmax layers in the graph's types. The fp16 bundle already computes softmax in
fp32, but its logits ``Q @ K^T`` are an fp16 MatMul whose result is cast up. ``fp32_attention_logits``
casts the two inputs of every MatMul that feeds a Softmax to float32 (through Cast/Mul/Div/Add,
the scale and mask ops between them), so the logits are computed and kept in fp32; the
Softmax's own input Cast then becomes an Identity. ``unet.volta.onnx`` is that graph.

``OP_TYPES`` is the ONNX-TensorRT parser's operator support matrix, transcribed as data: every
operator the matrix marks ``Y`` with the element types its "Supported Types" column lists for it.
``SUPPORTED_OPS`` is its key set, ``NOT_SUPPORTED_OPS`` the operators the matrix marks ``N``, and
``SUPPORTED_DTYPES`` the tensor types the page's header accepts. ``unsupported`` walks a graph and names
every operator outside the matrix, every operator used with a type its row does not list, and every
tensor type outside the header's list.

Source: https://github.com/onnx/onnx-tensorrt ``docs/operators.md`` at commit
554c9f1b7fc048e39e3afe0c2af757902eb7b23e, whose header reads "TensorRT 10.8 supports operators in the
inclusive range of opset 9 to opset 22". V100 needs TensorRT 10.4 or older, but no 10.0-10.4 revision
of that page could be read in full, so the 10.8 page is the base and is cut back to 10.4 with the
repository's ``docs/Changelog.md`` (10.5-10.8 entries). The 10.0 page's header (seen only in part) gives
opset 9 to 20 and the same type list as ``SUPPORTED_DTYPES`` plus DOUBLE.

- ``STFT`` is left out: "Added support for real-valued STFT operations" is a 10.5 entry.
- ``FP4`` (``FLOAT4E2M1``) is left out of every row: "Added support for FLOAT4E2M1 types" is a 10.8 entry.
- 10.4 itself added ``BlackmanWindow``, ``HammingWindow`` and ``HannWindow`` (their rows list no
  types: they are accepted with any type); 10.1 added ``DeformConv``. Both stay.
- The other 10.5-10.8 entries change restrictions, not the matrix: dynamic ``axes`` for
  ``Squeeze``/``Unsqueeze`` (10.7) and ``CumSum`` (10.8), integer exponents for ``Pow`` (10.8). Under
  10.4 those ``axes`` must be build-time constants (an initializer or a ``Constant`` node), as the
  exporter writes them.

Restrictions in the matrix that touch the SD graphs are listed in ``RESTRICTIONS``; they are notes,
not checked here. The page's header also lists DOUBLE, "cast down to FLOAT, clamping values"; this
check keeps DOUBLE out on purpose: a DOUBLE tensor in an exported graph is an export bug.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

# The "Supported Types" column's names, as ONNX element types.
_TYPE_NAMES = {"FP32": "FLOAT", "FP16": "FLOAT16", "BF16": "BFLOAT16", "FP8": "FLOAT8E4M3FN", "INT4": "INT4",
               "INT8": "INT8", "INT32": "INT32", "INT64": "INT64", "UINT8": "UINT8", "BOOL": "BOOL"}

# Rows marked Y, in the page's order: "Operator  types" ("-": the row lists no types). FP4 and STFT are
# removed as the module docstring says; the page's "INF64" in the ConstantOfShape row is read as INT64.
_MATRIX = """
Abs FP32 FP16 BF16 INT32 INT64
Acos FP32 FP16 BF16
Acosh FP32 FP16 BF16
Add FP32 FP16 BF16 INT32 INT64
And BOOL
ArgMax FP32 FP16 BF16 INT32 INT64
ArgMin FP32 FP16 BF16 INT32 INT64
Asin FP32 FP16 BF16
Asinh FP32 FP16 BF16
Atan FP32 FP16 BF16
Atanh FP32 FP16 BF16
AveragePool FP32 FP16 BF16
BatchNormalization FP32 FP16 BF16
BlackmanWindow -
Cast FP32 FP16 BF16 INT32 INT64 UINT8 BOOL
CastLike FP32 FP16 BF16 INT32 INT64 UINT8 BOOL
Ceil FP32 FP16 BF16
Celu FP32 FP16 BF16
Clip FP32 FP16 BF16
Concat FP32 FP16 BF16 INT32 INT64 BOOL
Constant FP32 FP16 BF16 FP8 INT4 INT32 INT64 BOOL
ConstantOfShape FP32 FP16 BF16 FP8 INT4 INT32 INT64 BOOL
Conv FP32 FP16 BF16
ConvTranspose FP32 FP16 BF16
Cos FP32 FP16 BF16
Cosh FP32 FP16 BF16
CumSum FP32 FP16 BF16
DeformConv FP32 FP16
DepthToSpace FP32 FP16 BF16 INT32 INT64
DequantizeLinear INT8 FP8 INT4
Div FP32 FP16 BF16 INT32 INT64
Dropout FP32 FP16 BF16
Einsum FP32 FP16 BF16
Elu FP32 FP16 BF16
Equal FP32 FP16 BF16 INT32 INT64
Erf FP32 FP16 BF16
Exp FP32 FP16 BF16
Expand FP32 FP16 BF16 INT32 INT64 BOOL
EyeLike FP32 FP16 BF16 INT32 INT64 BOOL
Flatten FP32 FP16 BF16 INT32 INT64 BOOL
Floor FP32 FP16 BF16
Gather FP32 FP16 BF16 INT32 INT64 BOOL
GatherElements FP32 FP16 BF16 INT32 INT64 BOOL
GatherND FP32 FP16 BF16 INT32 INT64 BOOL
Gelu FP32 FP16 BF16 INT8 INT32 INT64
Gemm FP32 FP16 BF16
GlobalAveragePool FP32 FP16 BF16
GlobalLpPool FP32 FP16 BF16
GlobalMaxPool FP32 FP16 BF16
Greater FP32 FP16 BF16 INT32 INT64
GreaterOrEqual FP32 FP16 BF16 INT32 INT64
GridSample FP32 FP16
GroupNormalization FP32 FP16 BF16
GRU FP32 FP16 BF16
HammingWindow -
HannWindow -
HardSigmoid FP32 FP16 BF16
HardSwish FP32 FP16 BF16
Hardmax FP32 FP16 BF16
Identity FP32 FP16 BF16 INT32 INT64 BOOL
If FP32 FP16 BF16 INT32 INT64 BOOL
ImageScaler FP32 FP16 BF16
InstanceNormalization FP32 FP16 BF16
IsInf FP32 FP16 BF16
IsNaN FP32 FP16 BF16 INT32 INT64
LayerNormalization FP32 FP16 BF16
LeakyRelu FP32 FP16 BF16
Less FP32 FP16 BF16 INT32 INT64
LessOrEqual FP32 FP16 BF16 INT32 INT64
Log FP32 FP16 BF16
LogSoftmax FP32 FP16 BF16
Loop FP32 FP16 BF16 INT32 INT64 BOOL
LRN FP32 FP16 BF16
LSTM FP32 FP16 BF16
LpNormalization FP32 FP16 BF16
LpPool FP32 FP16 BF16
MatMul FP32 FP16 BF16
Max FP32 FP16 BF16 INT32 INT64
MaxPool FP32 FP16 BF16
Mean FP32 FP16 BF16 FP8 INT32 INT64
MeanVarianceNormalization FP32 FP16 BF16
Min FP32 FP16 BF16 INT32 INT64
Mish FP32 FP16
Mod FP32 FP16 BF16 INT32 INT64
Mul FP32 FP16 BF16 INT32 INT64
Neg FP32 FP16 BF16 INT32 INT64
NonMaxSuppression FP32 FP16
NonZero FP32 FP16
Not BOOL
OneHot FP32 FP16 BF16 INT32 INT64 BOOL
Or BOOL
Pad FP32 FP16 BF16 INT32 INT64
ParametricSoftplus FP32 FP16 BF16
Pow FP32 FP16 BF16
PRelu FP32 FP16 BF16
QuantizeLinear FP32 FP16 BF16
RandomNormal FP32 FP16 BF16
RandomNormalLike FP32 FP16 BF16
RandomUniform FP32 FP16 BF16
RandomUniformLike FP32 FP16 BF16
Range FP32 FP16 BF16 INT32 INT64
Reciprocal FP32 FP16 BF16
ReduceL1 FP32 FP16 BF16 INT32 INT64
ReduceL2 FP32 FP16 BF16 INT32 INT64
ReduceLogSum FP32 FP16 BF16 INT32 INT64
ReduceLogSumExp FP32 FP16 BF16 INT32 INT64
ReduceMax FP32 FP16 BF16 INT32 INT64
ReduceMean FP32 FP16 BF16 INT32 INT64
ReduceMin FP32 FP16 BF16 INT32 INT64
ReduceProd FP32 FP16 BF16 INT32 INT64
ReduceSum FP32 FP16 BF16 INT32 INT64
ReduceSumSquare FP32 FP16 BF16 INT32 INT64
Relu FP32 FP16 BF16 INT32 INT64
Reshape FP32 FP16 BF16 INT32 INT64 BOOL
Resize FP32 FP16 BF16
ReverseSequence FP32 FP16 BF16 INT32 INT64 BOOL
RNN FP32 FP16 BF16
RoiAlign FP32 FP16
Round FP32 FP16 BF16
ScaledTanh FP32 FP16 BF16
Scan FP32 FP16 BF16
Scatter FP32 FP16 BF16 INT32 INT64
ScatterElements FP32 FP16 BF16 INT32 INT64
ScatterND FP32 FP16 BF16 INT32 INT64
Selu FP32 FP16 BF16
Shape FP32 FP16 BF16 INT32 INT64 BOOL
Shrink FP32 FP16 BF16 INT32 INT64
Sigmoid FP32 FP16 BF16
Sign FP32 FP16 BF16 INT32 INT64
Sin FP32 FP16 BF16
Sinh FP32 FP16 BF16
Size FP32 FP16 BF16 INT32 INT64 BOOL
Slice FP32 FP16 BF16 INT32 INT64 BOOL
Softmax FP32 FP16 BF16
Softplus FP32 FP16 BF16
Softsign FP32 FP16 BF16
SpaceToDepth FP32 FP16 BF16 INT32 INT64
Split FP32 FP16 BF16 INT32 INT64 BOOL
Sqrt FP32 FP16 BF16
Squeeze FP32 FP16 BF16 INT32 INT64 BOOL
Sub FP32 FP16 BF16 INT32 INT64
Sum FP32 FP16 BF16 INT32 INT64
Tan FP32 FP16 BF16
Tanh FP32 FP16 BF16
ThresholdedRelu FP32 FP16 BF16
Tile FP32 FP16 BF16 INT32 INT64 BOOL
TopK FP32 FP16 BF16 INT32 INT64
Transpose FP32 FP16 BF16 INT32 INT64 BOOL
Trilu FP32 FP16 BF16 INT32 INT64 BOOL
Unsqueeze FP32 FP16 BF16 INT32 INT64 BOOL
Upsample FP32 FP16 BF16
Where FP32 FP16 BF16 INT32 INT64 BOOL
Xor BOOL
"""


def _read_matrix(text: str) -> dict[str, frozenset[str]]:
    rows = {}
    for line in text.strip().splitlines():
        op, *names = line.split()
        rows[op] = frozenset() if names == ["-"] else frozenset(_TYPE_NAMES[n] for n in names)
    return rows


OP_TYPES: dict[str, frozenset[str]] = _read_matrix(_MATRIX)  # empty set: the row lists no types (any is accepted)
SUPPORTED_OPS: frozenset[str] = frozenset(OP_TYPES)
NOT_SUPPORTED_OPS: frozenset[str] = frozenset("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress
ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool
MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv
QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength
SequenceMap SoftmaxCrossEntropyLoss SplitToSequence STFT StringConcat StringNormalizer StringSplit TfIdfVectorizer
Unique
""".split())  # the rows marked N, and STFT (added in 10.5)
LEGACY_OPS: frozenset[str] = frozenset({"ImageScaler", "ParametricSoftplus", "ScaledTanh"})
# ^ in the matrix, but experimental ONNX operators that onnx no longer registers (never in an opset-18 graph)
RESTRICTIONS: dict[str, str] = {  # the matrix's notes for the operators SD graphs use or could use
    "AveragePool": "2D or 3D pooling only; dilations empty or all ones",
    "MaxPool": "2D or 3D pooling only; no Indices output; dilations empty or all ones",
    "LayerNormalization": "only the first output Y",
    "Resize": "coordinate modes half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, asymmetric, align_corners; "
              "modes nearest, linear; nearest modes floor, ceil, round_prefer_floor, round_prefer_ceil; "
              "aspect ratio policy stretch; tensor scales need axes = iota(rank); no antialiasing",
    "Squeeze": "axes must be resolvable to a constant (10.4: a build-time constant)",
    "Unsqueeze": "axes must be resolvable to a constant (10.4: a build-time constant)",
    "ReduceMean": "axes must be an initializer", "ReduceSum": "axes must be an initializer",
    "ReduceMax": "axes must be an initializer", "ReduceMin": "axes must be an initializer",
    "CumSum": "axis must be a build-time constant",
    "Dropout": "is_training must be an initializer and evaluate to False",
    "Constant": "sparse_value, value_string and value_strings unsupported",
    "Einsum": "10.4: no ellipsis, diagonal or broadcasting (support for them is a 10.12 entry)",
    "Loop": "scan output length cannot be dynamic; loop-carried shapes fixed across iterations",
    "If": "both branches' outputs the same rank, with different names",
    "TopK": "sorted must be 1; K below 3840",
    "ScatterND": "reduction other than none unsupported",
    "GridSample": "4D input only",
    "DequantizeLinear": "x_zero_point must be zero", "QuantizeLinear": "y_zero_point must be 0",
}
SUPPORTED_DTYPES: frozenset[str] = frozenset({
    "FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "INT8", "UINT8", "BOOL", "FLOAT8E4M3FN", "INT4",
})  # the header's list without FP4 (10.8) and DOUBLE (accepted only by casting it down; see the docstring)
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


def _typed_inputs(node: onnx.NodeProto) -> list[str]:
    """The tensors whose element type the matrix's "Supported Types" column is about, for ``node``."""
    op = node.op_type
    if op in ("Constant", "ConstantOfShape", "RandomNormal", "RandomUniform"):
        return list(node.output[:1])  # no data input: the type is the output's
    if op == "Where":
        return list(node.input[1:3])  # input 0 is the BOOL condition
    if op in ("Cast", "CastLike"):
        return [*node.input[:1], *node.output[:1]]  # both ends of the cast
    return list(node.input[:1] or node.output[:1])


def unsupported(path: Path) -> list[str]:
    """Operators, operator/type pairs and dtypes in the graph at ``path`` that TensorRT 10.4's ONNX parser rejects."""
    model = onnx.load(str(path), load_external_data=False)
    problems = sorted({f"op {n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node
                       if n.domain not in ("", "ai.onnx") or n.op_type not in SUPPORTED_OPS})
    try:
        types = tensor_types(model)
    except Exception:  # inference needs weights for some graphs; fall back to declared types
        g = model.graph
        types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
        types.update({t.name: t.data_type for t in g.initializer})
    for n in model.graph.node:
        for t in n.attribute:  # Constant's value is an attribute, not an initializer
            if t.name == "value" and t.type == onnx.AttributeProto.TENSOR and n.output:
                types.setdefault(n.output[0], t.t.data_type)
    wrong_type = set()
    for n in model.graph.node:
        allowed = OP_TYPES.get(n.op_type) if n.domain in ("", "ai.onnx") else None
        if not allowed:  # not in the matrix (reported above), or a row without types
            continue
        for name in _typed_inputs(n):
            if name and types.get(name) and _dtype_name(types[name]) not in allowed:
                wrong_type.add(f"op {n.op_type} with {_dtype_name(types[name])}")
    problems += sorted(wrong_type)
    cast_targets = {_cast_to(n) for n in model.graph.node if n.op_type == "Cast"}
    dtypes = {_dtype_name(t) for t in (*types.values(), *(c for c in cast_targets if c is not None)) if t}
    problems += sorted(f"dtype {d}" for d in dtypes - SUPPORTED_DTYPES)
    return problems
