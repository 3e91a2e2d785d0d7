"""NumPy kernels for MIL operations: what ``sun_edge.runtimes.coreml_mil`` evaluates programs with.

Each kernel takes an ``Args`` (the operation's inputs by their MIL names, floating-point tensors
already widened to float32 by the evaluator) and returns an array, or a tuple for operations with
several outputs; the evaluator rounds every output to the dtype the program declares for it.
Semantics follow the MIL operation definitions of coremltools (``converters/mil/mil/ops/defs``,
iOS15 to iOS18). ``KERNELS`` maps each covered op type to its kernel. NumPy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from sun_edge.errors import SunEdgeError


class Args:
    """An operation's inputs by MIL name; absent optional inputs read as ``default``."""

    __slots__ = ("op", "values")

    def __init__(self, op: str, values: dict[str, Any]) -> None:
        self.op, self.values = op, values

    def __getitem__(self, name: str) -> Any:
        if self.values.get(name) is None:
            raise SunEdgeError(f"MIL op {self.op} lacks its required input {name!r}")
        return self.values[name]

    def get(self, name: str, default: Any = None) -> Any:
        value = self.values.get(name)
        return default if value is None else value

    def ints(self, name: str, default: Any = None) -> list[int] | None:
        value = self.get(name, default)
        return None if value is None else [int(v) for v in np.atleast_1d(value)]


Kernel = Callable[[Args], Any]


def _binary(fn: Callable[[Any, Any], Any]) -> Kernel:
    return lambda a: fn(a["x"], a["y"])


def _unary(fn: Callable[[Any], Any]) -> Kernel:
    return lambda a: fn(a["x"])


def _erf(x: np.ndarray) -> np.ndarray:
    """erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): NumPy has none, and torch is not imported here."""
    x = np.asarray(x, np.float64)
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (np.sign(x) * (1.0 - poly * np.exp(-x * x))).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for large |x|


def _gelu(a: Args) -> np.ndarray:
    x, mode = a["x"], str(a.get("mode", "EXACT"))
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(1.702 * x)
    raise SunEdgeError(f"MIL gelu mode {mode!r} is not one of EXACT, TANH_APPROXIMATION, SIGMOID_APPROXIMATION")


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _axes(a: Args, rank: int) -> tuple[int, ...] | None:
    axes = a.ints("axes")
    return None if axes is None else tuple(ax % rank for ax in axes)


def _reduce(fn: Callable[..., np.ndarray]) -> Kernel:
    def kernel(a: Args) -> np.ndarray:
        x = a["x"]
        return fn(x, axis=_axes(a, x.ndim), keepdims=bool(a.get("keep_dims", False)))
    return kernel


def _arg_reduce(fn: Callable[..., np.ndarray]) -> Kernel:
    def kernel(a: Args) -> np.ndarray:
        x, axis = a["x"], int(a.get("axis", -1))
        out = fn(x, axis=axis)
        return np.expand_dims(out, axis) if bool(a.get("keep_dims", False)) else out
    return kernel


REDUCTIONS: dict[str, Kernel] = {
    "reduce_mean": _reduce(np.mean), "reduce_sum": _reduce(np.sum), "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min), "reduce_prod": _reduce(np.prod),
    "reduce_l1_norm": _reduce(lambda x, **k: np.sum(np.abs(x), **k)),
    "reduce_l2_norm": _reduce(lambda x, **k: np.sqrt(np.sum(np.square(x, dtype=np.float64), **k))),
    "reduce_sum_square": _reduce(lambda x, **k: np.sum(np.square(x, dtype=np.float64), **k)),
    "reduce_log_sum": _reduce(lambda x, **k: np.log(np.sum(x, **k))),
    "reduce_log_sum_exp": _reduce(lambda x, **k: np.log(np.sum(np.exp(x), **k))),
    "reduce_argmax": _arg_reduce(np.argmax), "reduce_argmin": _arg_reduce(np.argmin),
}


def _layer_norm(a: Args) -> np.ndarray:
    x = a["x"]
    axes = _axes(a, x.ndim) or tuple(range(x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + float(a.get("epsilon", 1e-5)))
    return out * a.get("gamma", 1.0) + a.get("beta", 0.0)  # gamma, beta: shaped like the normalised axes


def _channel_param(value: Any, rank: int) -> Any:
    """A per-channel [C] parameter broadcast against [B, C, *spatial]."""
    return value if np.ndim(value) == 0 else np.reshape(value, (-1,) + (1,) * (rank - 2))


def _instance_norm(a: Args) -> np.ndarray:
    x = a["x"]
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + float(a.get("epsilon", 1e-5)))
    return out * _channel_param(a.get("gamma", 1.0), x.ndim) + _channel_param(a.get("beta", 0.0), x.ndim)


def _batch_norm(a: Args) -> np.ndarray:
    x = a["x"]
    mean, var = _channel_param(a["mean"], x.ndim), _channel_param(a["variance"], x.ndim)
    out = (x - mean) / np.sqrt(var + float(a.get("epsilon", 1e-5)))
    return out * _channel_param(a.get("gamma", 1.0), x.ndim) + _channel_param(a.get("beta", 0.0), x.ndim)


def _linear(a: Args) -> np.ndarray:
    out = np.matmul(a["x"], a["weight"].T)  # [..., Dout]
    bias = a.get("bias")
    return out if bias is None else out + bias


def _matmul(a: Args) -> np.ndarray:
    x, y = a["x"], a["y"]
    if bool(a.get("transpose_x", False)):
        x = np.swapaxes(x, -1, -2)
    if bool(a.get("transpose_y", False)):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _conv_padding(a: Args, spatial: tuple[int, ...], kernel: tuple[int, ...], strides: list[int],
                  dilations: list[int]) -> list[tuple[int, int]]:
    pad_type = str(a.get("pad_type", "valid"))
    if pad_type == "valid":
        return [(0, 0)] * len(spatial)
    if pad_type == "custom":
        pad = a.ints("pad", [0] * 2 * len(spatial))
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(spatial))]
    if pad_type in ("same", "same_lower"):
        out = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            out.append((small, large) if pad_type == "same" else (large, small))
        return out
    raise SunEdgeError(f"MIL conv pad_type {pad_type!r} is not one of valid, custom, same, same_lower")


def _conv(a: Args) -> np.ndarray:
    """N-d convolution ([B, C, *spatial], weight [O, C/groups, *kernel]) as one matmul per kernel offset."""
    x, weight = a["x"], a["weight"]
    n = x.ndim - 2
    kernel = tuple(weight.shape[2:])
    strides, dilations = a.ints("strides", [1] * n), a.ints("dilations", [1] * n)
    groups = int(a.get("groups", 1))
    padding = _conv_padding(a, x.shape[2:], kernel, strides, dilations)
    x = np.pad(x, [(0, 0), (0, 0)] + padding)
    out_size = [(x.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(n)]
    batch, cin = x.shape[:2]
    cout, cin_g = weight.shape[:2]
    cout_g = cout // groups
    out = np.zeros((batch, groups, cout_g, int(np.prod(out_size))), np.float32)
    w = weight.reshape(groups, cout_g, cin_g, -1)  # [G, O/G, C/G, prod(kernel)]
    xg = x.reshape(batch, groups, cin_g, *x.shape[2:])
    for offset, index in enumerate(np.ndindex(*kernel)):
        window = tuple(slice(i * d, i * d + (o - 1) * s + 1, s) for i, d, o, s in zip(index, dilations, out_size, strides))
        cols = xg[(slice(None), slice(None), slice(None)) + window].reshape(batch, groups, cin_g, -1)  # [B, G, C/G, P]
        out += np.matmul(w[None, :, :, :, offset], cols)
    out = out.reshape(batch, cout, *out_size)
    bias = a.get("bias")
    return out if bias is None else out + _channel_param(bias, out.ndim)


def _upsample_nearest(a: Args) -> np.ndarray:
    x = a["x"]
    for axis, name in ((-2, "scale_factor_height"), (-1, "scale_factor_width")):
        scale = float(a.get(name, 1))
        size = x.shape[axis]
        if scale.is_integer():
            x = np.repeat(x, int(scale), axis=axis)
        else:
            index = np.floor(np.arange(int(math.floor(size * scale))) / scale).astype(np.int64)
            x = np.take(x, np.minimum(index, size - 1), axis=axis)
    return x


def _pad(a: Args) -> np.ndarray:
    x, pad = a["x"], a.ints("pad")
    pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)]
    pairs = [(0, 0)] * (x.ndim - len(pairs)) + pairs  # pad lists the last dimensions
    mode = str(a.get("mode", "constant"))
    if mode == "constant":
        return np.pad(x, pairs, mode="constant", constant_values=float(a.get("constant_val", 0.0)))
    numpy_mode = {"reflect": "reflect", "replicate": "edge"}.get(mode)
    if numpy_mode is None:
        raise SunEdgeError(f"MIL pad mode {mode!r} is not one of constant, reflect, replicate")
    return np.pad(x, pairs, mode=numpy_mode)


def _reshape(a: Args) -> np.ndarray:
    x, shape = a["x"], a.ints("shape")
    shape = [x.shape[i] if s == 0 and len(shape) == x.ndim else s for i, s in enumerate(shape)]  # 0: keep that dim
    return np.reshape(x, shape)


def _slice_by_index(a: Args) -> np.ndarray:
    x = a["x"]
    rank = x.ndim
    begin, end = a.ints("begin"), a.ints("end")
    stride = a.ints("stride", [1] * rank)
    begin_mask = [bool(v) for v in np.atleast_1d(a.get("begin_mask", [False] * rank))]
    end_mask = [bool(v) for v in np.atleast_1d(a.get("end_mask", [False] * rank))]
    squeeze = [bool(v) for v in np.atleast_1d(a.get("squeeze_mask", [False] * rank))]
    index: list[Any] = []
    for i in range(rank):
        if squeeze[i]:
            index.append(begin[i])
            continue
        index.append(slice(None if begin_mask[i] else begin[i], None if end_mask[i] else end[i], stride[i]))
    return x[tuple(index)]


def _slice_by_size(a: Args) -> np.ndarray:
    x, begin, size = a["x"], a.ints("begin"), a.ints("size")
    return x[tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size))]


def _concat(a: Args) -> np.ndarray:
    values, axis = list(a["values"]), int(a["axis"])
    if not bool(a.get("interleave", False)):
        return np.concatenate(values, axis=axis)
    stacked = np.stack(values, axis=axis + 1 if axis >= 0 else axis)  # [..., n, k, ...] interleaved along axis
    shape = list(values[0].shape)
    shape[axis] *= len(values)
    return stacked.reshape(shape)


def _split(a: Args) -> tuple[np.ndarray, ...]:
    x, axis = a["x"], int(a["axis"])
    sizes = a.ints("split_sizes")
    if sizes is None:
        return tuple(np.split(x, int(a["num_splits"]), axis=axis))
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def _squeeze(a: Args) -> np.ndarray:
    x, axes = a["x"], a.ints("axes")
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(axes))


def _expand_dims(a: Args) -> np.ndarray:
    x, axes = a["x"], a.ints("axes")
    rank = x.ndim + len(axes)
    for axis in sorted(ax % rank for ax in axes):
        x = np.expand_dims(x, axis)
    return x


def _gather(a: Args) -> np.ndarray:
    if int(a.get("batch_dims", 0)) != 0:
        raise SunEdgeError("MIL gather with batch_dims != 0 is not covered by the NumPy evaluator")
    x, indices = a["x"], np.asarray(a["indices"]).astype(np.int64)
    axis = int(a.get("axis", 0))
    return np.take(x, np.where(indices < 0, indices + x.shape[axis], indices), axis=axis)


def _gather_along_axis(a: Args) -> np.ndarray:
    x, indices, axis = a["x"], np.asarray(a["indices"]).astype(np.int64), int(a.get("axis", 0))
    return np.take_along_axis(x, np.where(indices < 0, indices + x.shape[axis], indices), axis=axis)


def _band_part(a: Args) -> np.ndarray:
    x = a["x"]
    lower, upper = int(a.get("lower", -1)), int(a.get("upper", -1))
    rows, cols = np.indices(x.shape[-2:])
    keep = ((lower < 0) | (rows - cols <= lower)) & ((upper < 0) | (cols - rows <= upper))
    return np.where(keep, x, np.zeros((), x.dtype))


def _sdpa(a: Args) -> np.ndarray:
    """iOS18 ``scaled_dot_product_attention``: softmax(q k^T / sqrt(d) + mask) v (a boolean mask keeps True)."""
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if np.asarray(mask).dtype == np.bool_ else scores + mask
    return np.matmul(_softmax(scores, -1), v)


def _einsum(a: Args) -> np.ndarray:
    """Two-operand einsum as one batched matmul (BLAS: NumPy's einsum loops in C without it), else np.einsum."""
    equation, values = str(a["equation"]).replace(" ", ""), list(a["values"])
    inputs, _, output = equation.partition("->")
    terms = inputs.split(",")
    if len(values) != 2 or len(terms) != 2 or not output or any(len(set(t)) != len(t) for t in (*terms, output)):
        return np.einsum(equation, *values, optimize=True)
    (ta, tb), (x, y) = terms, values
    batch = [i for i in ta if i in tb and i in output]
    contract = [i for i in ta if i in tb and i not in output]
    free_a, free_b = [i for i in ta if i not in tb], [i for i in tb if i not in ta]
    if set(output) != set(batch + free_a + free_b):
        return np.einsum(equation, *values, optimize=True)
    size = {**dict(zip(ta, x.shape)), **dict(zip(tb, y.shape))}

    def arrange(v: np.ndarray, term: str, order: list[str], rows: list[str], cols: list[str]) -> np.ndarray:
        v = np.transpose(v, [term.index(i) for i in order])
        return v.reshape([int(np.prod([size[i] for i in batch]))] + [int(np.prod([size[i] for i in g])) for g in (rows, cols)])

    out = np.matmul(arrange(x, ta, batch + free_a + contract, free_a, contract),
                    arrange(y, tb, batch + contract + free_b, contract, free_b))  # [batch, free_a, free_b]
    order = batch + free_a + free_b
    out = out.reshape([size[i] for i in order])
    return np.transpose(out, [order.index(i) for i in output])


def _cast(a: Args) -> np.ndarray:
    return np.asarray(a["x"])  # the evaluator rounds to the declared output dtype


ELEMENTWISE: dict[str, Kernel] = {
    "add": _binary(np.add), "sub": _binary(np.subtract), "mul": _binary(np.multiply), "real_div": _binary(np.divide),
    "pow": _binary(np.power), "maximum": _binary(np.maximum), "minimum": _binary(np.minimum),
    "floor_div": _binary(np.floor_divide), "mod": _binary(np.mod), "equal": _binary(np.equal),
    "not_equal": _binary(np.not_equal), "less": _binary(np.less), "less_equal": _binary(np.less_equal),
    "greater": _binary(np.greater), "greater_equal": _binary(np.greater_equal),
    "logical_and": _binary(np.logical_and), "logical_or": _binary(np.logical_or), "logical_xor": _binary(np.logical_xor),
    "logical_not": _unary(np.logical_not), "abs": _unary(np.abs), "ceil": _unary(np.ceil), "floor": _unary(np.floor),
    "round": _unary(np.round), "sign": _unary(np.sign), "exp": _unary(np.exp), "exp2": _unary(np.exp2),
    "sqrt": _unary(np.sqrt), "square": _unary(np.square), "sin": _unary(np.sin), "cos": _unary(np.cos),
    "tan": _unary(np.tan), "tanh": _unary(np.tanh), "sinh": _unary(np.sinh), "cosh": _unary(np.cosh),
    "asin": _unary(np.arcsin), "acos": _unary(np.arccos), "atan": _unary(np.arctan), "atanh": _unary(np.arctanh),
    "erf": _unary(_erf),
    "rsqrt": lambda a: 1.0 / np.sqrt(a["x"] + float(a.get("epsilon", 1e-12))),
    "inverse": lambda a: 1.0 / (a["x"] + float(a.get("epsilon", 1e-4))),
    "log": lambda a: np.log(a["x"] + float(a.get("epsilon", 1e-45))),
    "clip": lambda a: np.clip(a["x"], a["alpha"], a["beta"]),
    "threshold": lambda a: np.maximum(a["x"], a["alpha"]),
    "select": lambda a: np.where(a["cond"], a["a"], a["b"]),
}

ACTIVATIONS: dict[str, Kernel] = {
    "relu": _unary(lambda x: np.maximum(x, 0)), "relu6": _unary(lambda x: np.clip(x, 0, 6)),
    "sigmoid": _unary(_sigmoid), "silu": _unary(lambda x: x * _sigmoid(x)), "gelu": _gelu,
    "softplus": _unary(lambda x: np.logaddexp(0, x)), "softsign": _unary(lambda x: x / (1 + np.abs(x))),
    "leaky_relu": lambda a: np.where(a["x"] >= 0, a["x"], a["x"] * float(a.get("alpha", 0.01))),
    "elu": lambda a: np.where(a["x"] > 0, a["x"], float(a.get("alpha", 1.0)) * np.expm1(np.minimum(a["x"], 0))),
    "sigmoid_hard": lambda a: np.clip(float(a.get("alpha", 0.2)) * a["x"] + float(a.get("beta", 0.5)), 0, 1),
    "linear_activation": lambda a: float(a.get("alpha", 1.0)) * a["x"] + float(a.get("beta", 0.0)),
    "softmax": lambda a: _softmax(a["x"], int(a.get("axis", -1))),
}

TENSOR_OPS: dict[str, Kernel] = {
    "cast": _cast, "identity": _unary(np.asarray), "reshape": _reshape,
    "transpose": lambda a: np.transpose(a["x"], a.ints("perm")),
    "slice_by_index": _slice_by_index, "slice_by_size": _slice_by_size, "concat": _concat, "split": _split,
    "squeeze": _squeeze, "expand_dims": _expand_dims, "gather": _gather, "gather_along_axis": _gather_along_axis,
    "tile": lambda a: np.tile(a["x"], a.ints("reps")), "stack": lambda a: np.stack(list(a["values"]), int(a["axis"])),
    "pad": _pad, "shape": lambda a: np.array(np.shape(a["x"]), np.int32),
    "fill": lambda a: np.full(a.ints("shape"), a.get("value", 0.0)),
    "fill_like": lambda a: np.full(np.shape(a["ref_tensor"]), a.get("value", 0.0)),
    "range_1d": lambda a: np.arange(a["start"], a["end"], a["step"]),
    "band_part": _band_part, "reverse": lambda a: np.flip(a["x"], axis=_axes(a, a["x"].ndim)),
    "flatten2d": lambda a: a["x"].reshape(int(np.prod(a["x"].shape[: int(a.get("axis", 1))])), -1),
}

LINEAR_OPS: dict[str, Kernel] = {
    "linear": _linear, "matmul": _matmul, "conv": _conv,
    "einsum": _einsum,
    "layer_norm": _layer_norm, "instance_norm": _instance_norm, "batch_norm": _batch_norm,
    "upsample_nearest_neighbor": _upsample_nearest, "scaled_dot_product_attention": _sdpa,
}

KERNELS: Mapping[str, Kernel] = MappingProxyType({**ELEMENTWISE, **ACTIVATIONS, **REDUCTIONS, **TENSOR_OPS, **LINEAR_OPS})
