"""Core ML conversion mechanics: trace with ``torch.export``, convert with coremltools, palettize.

coremltools 9.0 converts ``torch.export`` programs (its TorchScript path fails on torch 2.13):
``torch.export.export(module, args).run_decompositions({})`` then ``ct.convert``. Two things
are done to the exported graph first: ``aten.alias`` nodes (transformers' CLIP slices its
position-id buffer through one) are dropped, since coremltools has no converter for them.

FP16 compute precision converts every op to float16 except ``FP32_OPS``: the adapter's norm
ratio ``||Zp|| / ||Zn||`` is a sum of squares over all of a sample's tokens and channels, which
overflows float16 at 512x512 (``sun_edge.adapter.attention_normalization`` computes it in float32
for the same reason); graph inputs and outputs stay float32.

Palettization (``Compression``) goes through ``coremltools.optimize.coreml.palettize_weights``
with k-means. Which deployment targets can run which compression is one table,
``COMPRESSION_RULES``, read from coremltools 9.0 (``optimize/coreml/_quantization_passes.py``
and the iOS16 ``constexpr_lut_to_dense`` op definition).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from sun_edge.bundle import TensorSpec
from sun_edge.errors import SunEdgeError, first_line
from sun_edge.runtimes.coreml import import_coremltools

# deployment target -> the iOS version whose ML Program opset it targets (macOS13 = iOS16, ...)
DEPLOYMENT_TARGETS = MappingProxyType({"macOS13": 16, "macOS14": 17, "macOS15": 18, "iOS16": 16, "iOS17": 17, "iOS18": 18})
FP32_OPS = ("reduce_l2_norm",)  # kept in float32 in FP16 programs (the adapter's norm ratio)
WEIGHT_THRESHOLD = 10_000  # palettize weights with more elements: all of SD1.5's but norms and biases. Per-tensor
# tables of such fp16 weights are clustered by the exact 1-D k-means coremltools bundles (kmeans1d); smaller
# tensors, and per-grouped-channel groups, would need scikit-learn
Granularity = Literal["per-tensor", "per-grouped-channel"]
GRANULARITIES: tuple[str, ...] = ("per-tensor", "per-grouped-channel")
NBITS: tuple[int, ...] = (8, 6, 4, 3)  # 2 and 1 bits run on iOS16 too, but ruin SD weights


@dataclass(frozen=True)
class Compression:
    """Weight palettization: a k-means look-up table of ``2**nbits`` entries per tensor (or per group of channels)."""

    nbits: int
    granularity: Granularity = "per-tensor"
    group_size: int = 32  # output channels sharing one table (per-grouped-channel only)

    @property
    def label(self) -> str:
        return f"{self.nbits}-bit {self.granularity} palettization"

    def validate(self) -> None:
        if self.nbits not in NBITS:
            raise SunEdgeError(f"cannot palettize to {self.nbits} bits; valid: {', '.join(map(str, NBITS))}")
        if self.granularity not in GRANULARITIES:
            raise SunEdgeError(f"unknown palettization granularity {self.granularity!r}; valid: {', '.join(GRANULARITIES)}")
        if self.group_size < 1:
            raise SunEdgeError(f"palettization group size must be at least 1, got {self.group_size}")


# (what, does the compression use it, the iOS version of the first opset that runs it)
COMPRESSION_RULES: tuple[tuple[str, Callable[[Compression], bool], int], ...] = (
    ("palettization (constexpr_lut_to_dense)", lambda c: True, 16),  # below iOS16 coremltools skips it
    ("3-bit palettization", lambda c: c.nbits == 3, 18),  # iOS16's op takes tables of 2, 4, 16, 64 or 256 entries
    ("per-grouped-channel palettization", lambda c: c.granularity == "per-grouped-channel", 18),
)


def check_deployment_target(name: str) -> None:
    if name not in DEPLOYMENT_TARGETS:
        raise SunEdgeError(f"unknown deployment target {name!r}; valid: {', '.join(DEPLOYMENT_TARGETS)}")


def _target_name(level: int, like: str) -> str:
    """The deployment target of ``like``'s family (macOS or iOS) at iOS ``level``."""
    return f"macOS{level - 3}" if like.startswith("macOS") else f"iOS{level}"


def check_compression(compression: Compression | None, target: str) -> None:
    """Raise one line naming the minimum deployment target if ``target`` cannot run ``compression``."""
    check_deployment_target(target)
    if compression is None:
        return
    compression.validate()
    level = DEPLOYMENT_TARGETS[target]
    for what, uses, minimum in COMPRESSION_RULES:
        if uses(compression) and level < minimum:
            need = _target_name(minimum, target)
            raise SunEdgeError(f"{what} needs deployment target macOS{minimum - 3}/iOS{minimum} or newer; "
                               f"--deployment-target is {target}: pass --deployment-target {need}")


@contextmanager
def quiet_coremltools() -> Iterator[Any]:
    """coremltools with its per-pass progress bars, notes and deprecation warnings silenced while
    converting (sun-edge shows one bar per component; its errors still raise)."""
    ct = import_coremltools()
    import coremltools.converters.mil.frontend.torch.ops as torch_ops
    import coremltools.converters.mil.mil.passes.pass_pipeline as pass_pipeline
    import coremltools.optimize.coreml._post_training_quantization as ptq
    import coremltools.optimize.coreml._quantization_passes as quantization_passes
    from tqdm import tqdm

    silent = functools.partial(tqdm, disable=True)
    patched = [(torch_ops, "_tqdm"), (pass_pipeline, "tqdm"), (ptq, "tqdm"), (quantization_passes, "tqdm")]
    saved = [(module, attr, getattr(module, attr)) for module, attr in patched]
    for module, attr in patched:
        setattr(module, attr, silent)
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)  # e.g. "Saving value type of int64 into a builtin type of int32"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", ResourceWarning)  # its temporary weight folders, left to the GC
            yield ct
    finally:
        logger.setLevel(level)
        for module, attr, value in saved:
            setattr(module, attr, value)


def trace(module: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """``torch.export`` at static shapes, decomposed to core ATen, ``aten.alias`` nodes removed."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.export's own pytree deprecations
            program = torch.export.export(module.eval(), args).run_decompositions({})
    except Exception as e:  # torch.export raises many types; keep the first line
        raise SunEdgeError(f"torch.export could not trace {type(module).__name__}: {first_line(e)}") from e
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    program.graph_module.recompile()
    return program


def convert(program: torch.export.ExportedProgram, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *,
            precision: str, deployment_target: str) -> Any:
    """``ct.convert`` to an ML Program with fixed shapes, named float32 (or int32) I/O; an ``MLModel``."""
    with quiet_coremltools() as ct:
        fp32_ops = frozenset(FP32_OPS)
        compute_precision = (ct.transform.FP16ComputePrecision(op_selector=lambda op: op.op_type not in fp32_ops)
                             if precision == "fp16" else ct.precision.FLOAT32)
        try:
            return ct.convert(program, convert_to="mlprogram", compute_precision=compute_precision,
                              minimum_deployment_target=getattr(ct.target, deployment_target),
                              inputs=[ct.TensorType(name=s.name, shape=s.shape, dtype=np.dtype(s.dtype).type) for s in inputs],
                              outputs=[ct.TensorType(name=s.name, dtype=np.dtype(s.dtype).type) for s in outputs])
        except Exception as e:  # coremltools raises plain Exceptions
            raise SunEdgeError(f"coremltools {ct.__version__} could not convert the graph: {first_line(e)}") from e


def palettize(model: Any, compression: Compression) -> Any:
    """``palettize_weights`` with k-means over every weight above ``WEIGHT_THRESHOLD`` elements; a new ``MLModel``."""
    with quiet_coremltools():
        from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

        config = OpPalettizerConfig(mode="kmeans", nbits=compression.nbits, granularity=compression.granularity.replace("-", "_"),
                                    group_size=compression.group_size, weight_threshold=WEIGHT_THRESHOLD)
        try:
            return palettize_weights(model, OptimizationConfig(global_config=config))
        except ModuleNotFoundError as e:  # per-grouped-channel tables are clustered by scikit-learn
            raise SunEdgeError(f"{compression.label} needs scikit-learn for its k-means: pip install scikit-learn") from e
        except ValueError as e:
            raise SunEdgeError(f"coremltools could not apply {compression.label}: {first_line(e)}") from e


def set_metadata(model: Any, *, description: str, inputs: dict[str, str], outputs: dict[str, str],
                 user: dict[str, str]) -> None:
    """What Xcode shows: a description, one line per input and output, and sun-edge's own keys."""
    from sun_edge import __version__

    model.short_description = description
    model.author = "sun-edge"
    model.version = __version__
    for name, text in inputs.items():
        model.input_description[name] = text
    for name, text in outputs.items():
        model.output_description[name] = text
    model.user_defined_metadata.update(user)


def package_files(directory: Path, package: str) -> list[str]:
    """Every file of an ``.mlpackage`` (a directory), relative to ``directory``, in a stable order."""
    root = Path(directory) / package
    return sorted(str(p.relative_to(directory)) for p in root.rglob("*") if p.is_file())


def package_bytes(path: Path) -> int:
    """The size of an ``.mlpackage`` on disk: all its files."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


