"""CUDA graphs and torch.compile for the PyTorch runtime's UNet calls (runtimes/torch_speed.py).

The choice and device checks run everywhere; the replay and compile results are compared with
eager PyTorch (the reference) on a GPU, so those tests are skipped on CPU-only machines: they
were run on the lent H100/H200 (docs/measurements.md).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sun_edge.adapter import SUNAdapter
from sun_edge.cli import main
from sun_edge.errors import SunEdgeError
from sun_edge.parity import psnr
from sun_edge.runtimes.pytorch import TorchRuntime
from sun_edge.runtimes.torch_speed import OPTIMIZATIONS, CudaGraphed, check_optimize

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the lent device)")


def runtime(tiny, optimize: str, device: str = "cpu") -> TorchRuntime:
    parts = copy.deepcopy(tiny)
    adapter = SUNAdapter.from_unet(parts["unet"]).randomize_(5)
    return TorchRuntime(parts["unet"], parts["text_encoder"], parts["vae"], adapter, device=device, optimize=optimize)


def inputs(seed: int, batch: int = 1) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)  # [B, 4, 8, 8]
    pos, neg = (rng.standard_normal((batch, 77, 32)).astype(np.float32) for _ in range(2))  # [B, 77, 32]
    return x, pos, neg


def test_unknown_choice_lists_the_valid_ones():
    with pytest.raises(SunEdgeError, match="choose one of none, cuda-graph, compile, compile-cuda-graph"):
        check_optimize("tensorrt", "cuda")


@pytest.mark.parametrize("choice", ["cuda-graph", "compile-cuda-graph"])
def test_cuda_graphs_need_a_cuda_device(choice):
    with pytest.raises(SunEdgeError, match="needs a CUDA device"):
        check_optimize(choice, "cpu")


def test_cli_refuses_cuda_graphs_on_cpu_in_one_line(home_env, tmp_path, capsys):
    code = main(["generate", "--prompt", "a cat", "--optimize", "cuda-graph", "--height", "64", "--width", "64",
                 "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code != 0
    assert err.strip().count("\n") == 0 and "needs a CUDA device" in err
    assert not (tmp_path / "x.png").exists()


def test_cli_refuses_optimize_with_a_bundle(onnx_fp32_bundle, tmp_path, capsys):
    code = main(["generate", "--bundle", str(onnx_fp32_bundle), "--prompt", "a cat", "--optimize", "compile",
                 "-o", str(tmp_path / "x.png")])
    assert code != 0
    assert "--optimize applies to --model" in capsys.readouterr().err


def test_none_is_the_eager_module(tiny):
    rt = runtime(tiny, "none")
    x, pos, neg = inputs(0)
    want = rt.sun_unet(*(torch.from_numpy(a) for a in (x,)), torch.tensor([999.0]), torch.from_numpy(pos),
                       torch.from_numpy(neg)).numpy()
    np.testing.assert_array_equal(rt.unet(x, 999, pos, neg), want)
    assert "optimize" not in rt.info


@needs_cuda
@pytest.mark.parametrize("choice", [c for c in OPTIMIZATIONS if c != "none"])
def test_optimized_calls_equal_eager_on_cuda(tiny, choice):
    """CUDA graphs replay eager's kernels (equal to float32 rounding); Inductor generates its own kernels and
    lets convolutions use TF32 as cuDNN does, so compiled outputs are held to a PSNR floor instead (on the H100
    they differ by up to 2e-3 on values of about 0.7: ~63 dB)."""
    eager, fast = runtime(tiny, "none", "cuda"), runtime(tiny, choice, "cuda")
    assert fast.info["optimize"] == choice

    def check(got: np.ndarray, want: np.ndarray) -> None:
        if choice == "cuda-graph":
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        else:
            assert psnr(want, got) >= 50.0

    for seed, t in [(0, 999.0), (1, 749.0), (2, 249.0)]:  # new inputs every call: a stale buffer would show
        x, pos, neg = inputs(seed)
        check(fast.unet(x, t, pos, neg), eager.unet(x, t, pos, neg))
        x2, ctx, _ = inputs(seed + 10, batch=2)
        check(fast.unet_plain(x2, t, ctx), eager.unet_plain(x2, t, ctx))


@needs_cuda
def test_one_graph_per_signature_and_outputs_are_not_overwritten():
    calls = []

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(a.shape)
        return a * 2 + b

    graphed = CudaGraphed(fn, warmup=1)
    a, b = torch.ones(3, device="cuda"), torch.zeros(3, device="cuda")
    first = graphed(a, b)
    second = graphed(a * 5, b + 1)
    assert len(graphed.graphs) == 1 and len(calls) == 2  # one warm-up and the capture, then replays only
    torch.testing.assert_close(first, torch.full((3,), 2.0, device="cuda"))  # not overwritten by the replay
    torch.testing.assert_close(second, torch.full((3,), 11.0, device="cuda"))
    graphed(torch.ones(4, device="cuda"), torch.zeros(4, device="cuda"))
    assert len(graphed.graphs) == 2
