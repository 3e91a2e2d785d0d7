"""The NumPy MIL evaluator op by op: small torch modules converted with coremltools against PyTorch,
and single MIL ops against coremltools' own value inference."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("coremltools")

from sun_edge.bundle import TensorSpec  # noqa: E402
from sun_edge.errors import SunEdgeError  # noqa: E402
from sun_edge.export import coreml_convert as cc  # noqa: E402
from sun_edge.export.coreml_attention import split_einsum_attend  # noqa: E402
from sun_edge.parity import psnr  # noqa: E402
from sun_edge.runtimes.coreml_mil import MILEvaluator, load_program  # noqa: E402
from sun_edge.runtimes.coreml_mil_ops import KERNELS  # noqa: E402

FP16_DB = 50.0  # one small module in float16 against float32 PyTorch: a few roundings, ~60-70 dB
FP32_DB = 100.0


def converted(module: nn.Module, *args: torch.Tensor, precision: str = "fp16", target: str = "macOS13",
              compression: cc.Compression | None = None, tmp_path=None) -> MILEvaluator:
    """``module`` through the exporter's trace/convert (and palettize), saved and loaded back for the evaluator."""
    inputs = tuple(TensorSpec(f"x{i}", "int32" if a.dtype == torch.int64 else "float32", tuple(a.shape)) for i, a in enumerate(args))
    with torch.no_grad():
        out = module(*args)
    model = cc.convert(cc.trace(module, args), inputs, (TensorSpec("y", "float32", tuple(out.shape)),),
                       precision=precision, deployment_target=target)
    if compression is not None:
        model = cc.palettize(model, compression)
    path = tmp_path / "m.mlpackage"
    model.save(str(path))
    return MILEvaluator.load(path)


def check(module: nn.Module, *args: torch.Tensor, db: float = FP16_DB, tmp_path=None, **kwargs) -> MILEvaluator:
    module = module.eval()
    evaluator = converted(module, *args, tmp_path=tmp_path, **kwargs)
    with torch.no_grad():
        want = module(*args).numpy()
    got = evaluator({f"x{i}": a.numpy().astype(np.int32 if a.dtype == torch.int64 else np.float32)
                     for i, a in enumerate(args)})["y"]
    assert got.dtype == np.float32 and got.shape == want.shape
    assert psnr(want, got) > db, (psnr(want, got), evaluator.op_types())
    return evaluator


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(padding=1, stride=2), dict(padding=2, dilation=2),
                                    dict(padding=1, groups=4), dict(padding=0, kernel_size=1)])
def test_conv(tmp_path, kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, **{"kernel_size": 3, **kwargs})
    ev = check(conv, randn(1, 8, 9, 10), tmp_path=tmp_path)
    assert "conv" in ev.op_types()


def test_conv_fp32_is_exact_to_float32_rounding(tmp_path):
    torch.manual_seed(0)
    check(nn.Conv2d(4, 6, 3, padding=1, stride=2), randn(1, 4, 8, 8), precision="fp32", db=FP32_DB, tmp_path=tmp_path)


def test_group_norm_silu_and_upsample(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU(), nn.Upsample(scale_factor=2.0, mode="nearest"))
    ev = check(module, randn(1, 16, 6, 5) * 3 + 1, tmp_path=tmp_path)
    assert {"reduce_mean", "silu", "upsample_nearest_neighbor"} <= set(ev.op_types())


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_layer_norm(tmp_path, approximate):
    torch.manual_seed(0)
    module = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 64), nn.GELU(approximate=approximate), nn.Linear(64, 16))
    ev = check(module, randn(2, 7, 32), tmp_path=tmp_path)
    assert {"layer_norm", "linear", "gelu"} <= set(ev.op_types())


class Attention(nn.Module):
    """Multi-head attention as diffusers and the SUN adapter compute it, in either kernel."""

    def __init__(self, heads: int = 4, dim: int = 32, split_einsum: bool = False, scale: float | None = None) -> None:
        super().__init__()
        self.heads, self.split_einsum = heads, split_einsum
        self.scale = (dim // heads) ** -0.5 if scale is None else scale
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(context), self.v(context)
        if self.split_einsum:
            return split_einsum_attend(SimpleNamespace(heads=self.heads, scale=self.scale), q, k, v)
        b, d = x.shape[0], q.shape[-1] // self.heads
        q, k, v = (t.view(b, -1, self.heads, d).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(b, -1, self.heads * d)


@pytest.mark.parametrize("split_einsum", [False, True])
def test_attention_both_forms(tmp_path, split_einsum):
    torch.manual_seed(0)
    x, context = randn(1, 16, 32), randn(1, 9, 32, seed=1)
    ev = check(Attention(split_einsum=split_einsum), x, context, tmp_path=tmp_path)
    assert ("einsum" in ev.op_types()) == split_einsum and "softmax" in ev.op_types()
    with torch.no_grad():  # the two forms agree in PyTorch before any conversion
        torch.manual_seed(0)
        a = Attention()(x, context)
        torch.manual_seed(0)
        b = Attention(split_einsum=True)(x, context)
    assert psnr(a.numpy(), b.numpy()) > 100


def test_fused_sdpa_of_ios18(tmp_path):
    """At iOS18 coremltools emits the fused ``scaled_dot_product_attention`` op (default scale only)."""
    torch.manual_seed(0)
    module = Attention(scale=8 ** -0.5)  # = the default scale, but passed: give it none so it fuses
    module.forward = lambda x, c: F.scaled_dot_product_attention(  # type: ignore[method-assign]
        module.q(x)[:, None], module.k(c)[:, None], module.v(c)[:, None])[:, 0]
    ev = check(module, randn(1, 16, 32), randn(1, 9, 32, seed=1), target="iOS18", tmp_path=tmp_path)
    assert "scaled_dot_product_attention" in ev.op_types()


def test_text_embedding_gather_and_fp16_rounding(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Embedding(100, 16), nn.LayerNorm(16))
    ev = check(module, torch.tensor([[3, 99, 0, 42]]), tmp_path=tmp_path)
    assert "gather" in ev.op_types() and ev.inputs[0].dtype == "int32"


def test_fp16_program_rounds_every_op():
    """1 + 1e-4 is 1 in float16: the evaluator keeps what the program declares between ops."""
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(2,))])
    def prog(x):
        half = mb.add(x=mb.cast(x=x, dtype="fp16"), y=np.float16(1e-4))
        return mb.cast(x=half, dtype="fp32", name="y")

    got = MILEvaluator(prog)({"x": np.array([1.0, 2048.0], np.float32)})["y"]
    np.testing.assert_array_equal(got, [1.0, 2048.0])


@pytest.mark.parametrize("compression", [cc.Compression(8), cc.Compression(6), cc.Compression(4)])
def test_palettized_linear(tmp_path, compression):
    """The decompressed weights are the table's entries, and the evaluator computes with exactly those."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)  # 12288 weights: above the palettization threshold
    x = randn(3, 128)
    ev = converted(linear, x, compression=compression, tmp_path=tmp_path)
    program = load_program(tmp_path / "m.mlpackage")
    lut_ops = [op for op in program.functions["main"].operations if op.op_type == "constexpr_lut_to_dense"]
    assert len(lut_ops) == 1 and lut_ops[0].lut.val.shape == (2**compression.nbits,)
    weight = lut_ops[0].materialized_val_inference()
    assert len(np.unique(weight.astype(np.float32))) <= 2**compression.nbits  # (NumPy 2.4's float16 unique is wrong)
    want = x.numpy() @ weight.astype(np.float32).T + linear.bias.detach().numpy()
    got = ev({"x0": x.numpy()})["y"]
    assert psnr(want, got) > FP16_DB
    with torch.no_grad():  # and against the uncompressed layer: the weight error, at least ~6 dB per bit
        exact = linear(x).numpy()
    assert psnr(exact, got) > 6.0 * compression.nbits - 12


@pytest.mark.parametrize("compression", [cc.Compression(3), cc.Compression(4, "per-grouped-channel", 16)])
def test_palettization_of_ios18(tmp_path, compression):
    if compression.granularity == "per-grouped-channel":
        pytest.importorskip("sklearn", reason="coremltools clusters groups of channels with scikit-learn")
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    x = randn(3, 128)
    ev = converted(linear, x, compression=compression, target="macOS15", tmp_path=tmp_path)
    with torch.no_grad():
        assert psnr(linear(x).numpy(), ev({"x0": x.numpy()})["y"]) > 6.0 * compression.nbits - 12


# Ops the SD graphs may contain that the converted modules above do not reach, each against
# coremltools' own value inference on the same constant input (PyTorch where it has none).
def _cases():
    from coremltools.converters.mil import Builder as mb

    x = np.linspace(-3, 3, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5).astype(np.float32)
    return [
        ("slice masks", x, lambda v: mb.slice_by_index(x=v, begin=[1, 0, 1, 0], end=[2, 3, 4, 5], stride=[1, 2, 1, 2],
                                                       end_mask=[False, True, False, True], squeeze_mask=[True, False, False, False])),
        ("slice_by_size", x, lambda v: mb.slice_by_size(x=v, begin=[0, 1, 0, 2], size=[-1, 2, 3, -1])),
        ("split sizes", x, lambda v: mb.split(x=v, split_sizes=[1, 3], axis=2)[1]),
        ("pad reflect", x, lambda v: mb.pad(x=v, pad=[1, 1, 2, 2], mode="reflect")),
        ("pad replicate", x, lambda v: mb.pad(x=v, pad=[0, 1, 2, 0], mode="replicate")),
        ("pad constant", x, lambda v: mb.pad(x=v, pad=[1, 0, 0, 1], mode="constant", constant_val=0.5)),
        ("gather negative", x, lambda v: mb.gather(x=v, indices=np.array([-1, 0], np.int32), axis=2)),
        ("gather_along_axis", x, lambda v: mb.gather_along_axis(x=v, indices=np.zeros((2, 3, 1, 5), np.int32), axis=2)),
        ("squeeze expand", x, lambda v: mb.squeeze(x=mb.expand_dims(x=v, axes=[0, -1]), axes=[0])),
        ("reshape 0 and -1", x, lambda v: mb.reshape(x=v, shape=[0, -1, 2, 5])),
        ("tile", x, lambda v: mb.tile(x=v, reps=[1, 2, 1, 1])),
        ("band_part", x, lambda v: mb.band_part(x=v, lower=1, upper=0)),
        ("reduce_l2_norm", x, lambda v: mb.reduce_l2_norm(x=v, axes=[1, 2], keep_dims=True)),
        ("reduce_sum_square", x, lambda v: mb.reduce_sum_square(x=v, axes=[-1])),
        ("reduce_max", x, lambda v: mb.reduce_max(x=v, axes=[3], keep_dims=False)),
        ("reduce_argmax", x, lambda v: mb.reduce_argmax(x=v, axis=1, keep_dims=True)),
        ("instance_norm", x, lambda v: mb.instance_norm(x=v, gamma=np.arange(3, dtype=np.float32), beta=np.ones(3, np.float32)),
         lambda t: F.instance_norm(t, weight=torch.arange(3.0), bias=torch.ones(3), eps=1e-5)),
        ("batch_norm", x, lambda v: mb.batch_norm(x=v, mean=np.ones(3, np.float32), variance=np.full(3, 2.0, np.float32)),
         lambda t: F.batch_norm(t, torch.ones(3), torch.full((3,), 2.0), eps=1e-5)),
        ("rsqrt", np.abs(x) + 0.1, lambda v: mb.rsqrt(x=v)),
        ("clip", x, lambda v: mb.clip(x=v, alpha=-1.0, beta=0.5)),
        ("softmax", x, lambda v: mb.softmax(x=v, axis=1)),
        ("sigmoid", x, lambda v: mb.sigmoid(x=v)),
        ("erf", x, lambda v: mb.erf(x=v)),
        ("pow", np.abs(x), lambda v: mb.pow(x=v, y=1.5)),
        ("matmul transpose", x, lambda v: mb.matmul(x=v, y=v, transpose_y=True)),
        ("upsample fractional", x, lambda v: mb.upsample_nearest_neighbor(x=v, scale_factor_height=1.5, scale_factor_width=2.0),
         lambda t: F.interpolate(t, size=(6, 10), mode="nearest")),
        ("conv same", x, lambda v: mb.conv(x=v, weight=np.ones((2, 3, 3, 2), np.float32), pad_type="same", strides=[2, 1]),
         lambda t: F.conv2d(F.pad(t, (0, 1, 0, 1)), torch.ones(2, 3, 3, 2), stride=(2, 1))),  # TF SAME (coremltools'
        # aggregated_pad): total (ceil(d/s)-1)*s + k - d, the odd one at the end
    ]


@pytest.mark.parametrize("case", range(27))
def test_single_ops_against_coremltools_value_inference(case):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    name, x, build, *oracle = _cases()[case]
    expected = []

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS17)
    def prog(v):
        expected.append(build(x).val)  # the same op on a constant: coremltools folds it
        return build(v)

    want = oracle[0](torch.from_numpy(x)).numpy() if oracle else expected[0]  # torch where coremltools has none
    assert want is not None, f"no oracle for {name}"
    got = MILEvaluator(prog, what=name)({"v": x})
    got = next(iter(got.values()))
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=name)


def test_case_count_matches():
    assert len(_cases()) == 27


def test_concat_interleave_as_documented():
    """MIL's own example (coremltools' value inference ignores ``interleave``, so it cannot be the oracle)."""
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 2))])
    def prog(v):
        return mb.concat(values=[v, mb.add(x=v, y=6.0)], axis=0, interleave=True)

    got = next(iter(MILEvaluator(prog)({"v": np.array([[1, 2], [3, 4], [5, 6]], np.float32)}).values()))
    np.testing.assert_array_equal(got, [[1, 2], [7, 8], [3, 4], [9, 10], [5, 6], [11, 12]])


def test_unsupported_op_is_one_line():
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2, 8, 8))])
    def prog(x):
        return mb.avg_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid")

    with pytest.raises(SunEdgeError, match=r"^pool: the NumPy MIL evaluator has no kernel for op type\(s\) avg_pool; "):
        MILEvaluator(prog, what="pool")
    assert "avg_pool" not in KERNELS


def test_bad_feeds_are_one_line(tmp_path):
    ev = converted(nn.Linear(4, 2).eval(), randn(1, 4), tmp_path=tmp_path)
    with pytest.raises(SunEdgeError, match=r"^m.mlpackage: input x0 must be float32 \[1, 4\], got float64 \[1, 4\]$"):
        ev({"x0": np.zeros((1, 4))})
    with pytest.raises(SunEdgeError, match=r"input 'x0' missing"):
        ev({})
    with pytest.raises(SunEdgeError, match="is not an .mlpackage"):
        load_program(tmp_path)
    assert math.isfinite(float(ev({"x0": np.ones((1, 4), np.float32)})["y"].sum()))
