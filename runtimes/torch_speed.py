"""Faster UNet calls for the PyTorch runtime on a GPU: CUDA graphs and ``torch.compile``.

Shapes are static in sampling (one latent size, batch 1 for SUN, batch 2 for the CFG baseline),
so a UNet step can be captured once and replayed. ``OPTIMIZATIONS``:

- ``none``: eager PyTorch, the reference.
- ``cuda-graph``: :class:`CudaGraphed` captures one CUDA graph per input signature (shapes and
  dtypes) after two warm-up calls on a side stream, then replays it with the inputs copied into
  the captured buffers. Removes the per-kernel launch cost that dominates small batches on fast GPUs.
- ``compile``: ``torch.compile`` (Inductor, default mode: fused kernels, no CUDA graphs).
- ``compile-cuda-graph``: ``torch.compile(mode="reduce-overhead")``: Inductor's kernels inside
  CUDA graphs.

Only the UNet calls are wrapped (they are 4 of 4 model calls per SUN image but the text
encoder and VAE run once); the first call of each shape pays the capture or compilation.
Importing this module imports no torch (the CLI lists ``OPTIMIZATIONS`` without it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, get_args

from sun_edge.errors import SunEdgeError

if TYPE_CHECKING:
    import torch

Optimize = Literal["none", "cuda-graph", "compile", "compile-cuda-graph"]
OPTIMIZATIONS: tuple[str, ...] = get_args(Optimize)
TensorFn = Callable[..., Any]


class CudaGraphed:
    """``fn(*tensors) -> tensor`` replayed from one captured CUDA graph per input signature.

    ``fn`` must be free of host synchronisation and of data-dependent shapes (the UNet is).
    The returned tensor is a copy, so a later replay never overwrites what a caller holds.
    """

    def __init__(self, fn: TensorFn, *, warmup: int = 2) -> None:
        self.fn, self.warmup = fn, warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}

    @staticmethod
    def signature(args: tuple[torch.Tensor, ...]) -> tuple:
        return tuple((tuple(a.shape), a.dtype, str(a.device)) for a in args)

    def capture(self, args: tuple[torch.Tensor, ...]) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]:
        import torch

        static_in = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream (cuBLAS workspaces, lazy inits)
            for _ in range(self.warmup):
                self.fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(*static_in)
        return graph, static_in, static_out

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = self.signature(args)
        if key not in self.graphs:
            self.graphs[key] = self.capture(args)
        graph, static_in, static_out = self.graphs[key]
        for buffer, value in zip(static_in, args):
            buffer.copy_(value)
        graph.replay()
        return static_out.clone()


def check_optimize(optimize: str, device: str) -> None:
    """One clear line for an unknown choice or one the device cannot do."""
    import torch

    if optimize not in OPTIMIZATIONS:
        raise SunEdgeError(f"unknown --optimize {optimize!r}; choose one of {', '.join(OPTIMIZATIONS)}")
    if "cuda-graph" in optimize and not str(device).startswith("cuda"):
        raise SunEdgeError(f"--optimize {optimize} needs a CUDA device (got --device {device}); use --device cuda, "
                           f"or --optimize none|compile")
    if "cuda-graph" in optimize and not torch.cuda.is_available():
        raise SunEdgeError(f"--optimize {optimize}: this PyTorch sees no CUDA GPU (torch {torch.__version__})")


def optimized(fn: TensorFn, optimize: Optimize, device: str) -> TensorFn:
    """``fn`` wrapped as ``optimize`` says (module docstring); ``none`` returns it unchanged."""
    import torch

    check_optimize(optimize, device)
    if optimize == "cuda-graph":
        return CudaGraphed(fn)
    if optimize == "compile":
        return torch.compile(fn, dynamic=False)
    if optimize == "compile-cuda-graph":
        return torch.compile(fn, mode="reduce-overhead", dynamic=False)
    return fn
