"""Runtimes: one module per backend, each implementing ``sun_edge.components.Runtime``.

A runtime evaluates the components of ``sun_edge.components.COMPONENTS`` (``encode_text``,
``unet``, ``unet_plain``, ``decode``/``decode_full``/``decode_tiny``, ``encode``), NumPy in and
out, and says which it has with ``has(name)``. Runtimes hold no sampler code:
``sun_edge.Pipeline`` drives them all.

``RUNTIMES`` is the registry: each entry names its module and class, the bundle targets it
runs, and the options it takes with their defaults. ``open_bundle_runtime`` picks the runtime a
bundle's target names (or the one asked for) and refuses options that do not apply, in one place.
This package imports only NumPy: each backend module imports its own heavy library.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any

import numpy as np

from sun_edge.errors import SunEdgeError


@dataclass(frozen=True)
class RuntimeEntry:
    """One runtime: where it lives, what bundles it runs, and its options (name -> default)."""

    name: str
    module: str
    cls: str
    targets: tuple[str, ...]  # bundle targets it runs; () for the PyTorch reference
    options: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""


RUNTIMES: Mapping[str, RuntimeEntry] = MappingProxyType({e.name: e for e in (
    RuntimeEntry("pytorch", "sun_edge.runtimes.pytorch", "TorchRuntime", (), summary="the PyTorch reference"),
    RuntimeEntry("onnxruntime", "sun_edge.runtimes.onnxruntime", "OnnxRuntime", ("onnx",),
                 {"provider": "cpu", "vae_decoder": "full"}, "ONNX Runtime (cpu, cuda, tensorrt, coreml providers)"),
    RuntimeEntry("coreml", "sun_edge.runtimes.coreml", "CoreMLPredictRuntime", ("coreml",), {"compute_units": "all"},
                 "Core ML on macOS"),
    RuntimeEntry("coreml-mil", "sun_edge.runtimes.coreml", "CoreMLEvaluatorRuntime", ("coreml",), {},
                 "the NumPy MIL evaluator: Core ML programs off macOS, slow, for checking"),
    RuntimeEntry("tensorrt", "sun_edge.runtimes.tensorrt", "TensorRTRuntime", ("tensorrt",), {"cuda_graphs": True},
                 "TensorRT engines (after sun-edge build-engines)"),
    RuntimeEntry("openvino", "sun_edge.runtimes.openvino", "OpenVinoRuntime", ("onnx", "openvino"),
                 {"ov_device": "CPU", "ov_precision": None, "ov_cache_dir": None, "vae_decoder": "full"},
                 "OpenVINO on Intel CPUs (bf16 on AMX/AVX512-BF16), GPUs and NPUs, reading ONNX and IR bundles"),
)})

# bundle target -> the runtime that runs it unless another is asked for
BUNDLE_RUNTIMES: Mapping[str, str] = MappingProxyType({"onnx": "onnxruntime", "coreml": "coreml", "tensorrt": "tensorrt",
                                                       "openvino": "openvino"})


def runtime_entry(name: str) -> RuntimeEntry:
    """The registry entry of runtime ``name``; unknown names list the valid ones."""
    if name not in RUNTIMES:
        raise SunEdgeError(f"unknown runtime {name!r}; valid runtimes: {', '.join(sorted(RUNTIMES))}")
    return RUNTIMES[name]


def runtime_module(name: str) -> ModuleType:
    """Import the module of runtime ``name``; unknown names list the valid ones."""
    return importlib.import_module(runtime_entry(name).module)


def open_bundle_runtime(bundle: Any, runtime: str | None = None, **options: Any) -> Any:
    """The runtime for an opened bundle: ``runtime`` if given, else the one its target names.

    ``options`` are runtime options (``provider`` for onnxruntime, ``compute_units`` for coreml,
    ``cuda_graphs`` for tensorrt, ``vae_decoder`` full|tiny for onnxruntime); one left at its
    default is ignored, one set for a runtime that does not take it is refused in one line.
    """
    target = bundle.manifest.target
    if target not in BUNDLE_RUNTIMES:
        raise SunEdgeError(f"bundle target {target!r} has no runtime; known targets: {', '.join(sorted(BUNDLE_RUNTIMES))}")
    entry = runtime_entry(runtime or BUNDLE_RUNTIMES[target])
    if target not in entry.targets:
        runs = [name for name, e in RUNTIMES.items() if target in e.targets]
        raise SunEdgeError(f"runtime {entry.name} does not run {target} bundles; {target} bundles run on: {', '.join(runs)}")
    defaults = {k: e.options[k] for e in RUNTIMES.values() for k in e.options}
    for key, value in options.items():
        if key not in defaults:
            raise SunEdgeError(f"unknown runtime option {key!r}; known: {', '.join(sorted(defaults))}")
        if key not in entry.options and value != defaults[key]:
            takes = [name for name, e in RUNTIMES.items() if key in e.options]
            raise SunEdgeError(f"option {key} applies to the {', '.join(takes)} runtime; this {target} bundle runs on "
                               f"{entry.name}")
    kwargs = {k: options.get(k, default) for k, default in entry.options.items()}
    return getattr(runtime_module(entry.name), entry.cls)(bundle, **kwargs)


def check_input(what: str, array: np.ndarray, shape: Sequence[int | None], dtype: np.dtype | type) -> np.ndarray:
    """Check one runtime input's type, dtype and shape (``None`` matches any size); raise one precise line."""
    if not isinstance(array, np.ndarray):
        raise SunEdgeError(f"{what}: expected a numpy array, got {type(array).__name__}")
    if array.dtype != np.dtype(dtype):
        raise SunEdgeError(f"{what}: expected dtype {np.dtype(dtype)}, got {array.dtype}")
    if array.ndim != len(shape) or any(w is not None and w != s for s, w in zip(array.shape, shape)):
        want = "[" + ",".join("?" if w is None else str(w) for w in shape) + "]"
        raise SunEdgeError(f"{what}: expected shape {want}, got [{','.join(map(str, array.shape))}]")
    return array
