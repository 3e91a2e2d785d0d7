"""Runtimes: one module per backend, each exposing the runtime protocol from DESIGN.md.

A runtime has ``encode_text(ids) -> emb``, ``unet(latents, t, pos, neg) -> eps``,
``decode(latents) -> image`` (and ``encode(image)`` for img2img), NumPy in and out, plus
``unet_plain(latents, t, emb) -> eps`` where the graph without the adapter is available (the CFG
baseline). Runtimes hold no sampler code: ``sun_edge.Pipeline`` drives them all.

This package imports only NumPy: each backend module imports its own heavy library.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from sun_edge.errors import SunEdgeError

RUNTIMES: dict[str, str] = {
    "pytorch": "sun_edge.runtimes.pytorch",
    "onnxruntime": "sun_edge.runtimes.onnxruntime",
    "coreml": "sun_edge.runtimes.coreml",
    "tensorrt": "sun_edge.runtimes.tensorrt",
}


# bundle target (manifest.json) -> the runtime that runs it
BUNDLE_RUNTIMES: dict[str, str] = {"onnx": "onnxruntime", "coreml": "coreml", "tensorrt": "tensorrt"}


def runtime_module(name: str) -> ModuleType:
    """Import the module of runtime ``name``; unknown names list the valid ones."""
    if name not in RUNTIMES:
        raise SunEdgeError(f"unknown runtime {name!r}; valid runtimes: {', '.join(sorted(RUNTIMES))}")
    return importlib.import_module(RUNTIMES[name])


def open_bundle_runtime(bundle: Any, *, provider: str = "cpu", compute_units: str = "all", cuda_graphs: bool = True,
                        vae_decoder: str = "full") -> Any:
    """The runtime for an opened bundle, chosen by its manifest's target; options that do not apply are refused.

    ``provider`` is ONNX Runtime's execution provider, ``compute_units`` Core ML's, ``cuda_graphs`` TensorRT's;
    ``vae_decoder`` ``tiny`` decodes with the TAESD graph of an ONNX bundle exported with one.
    """
    target = bundle.manifest.target
    if target not in BUNDLE_RUNTIMES:
        raise SunEdgeError(f"bundle target {target!r} has no runtime; known targets: {', '.join(sorted(BUNDLE_RUNTIMES))}")
    if provider != "cpu" and target != "onnx":
        raise SunEdgeError(f"--provider applies to onnx bundles; this is a {target} bundle"
                           + ("; use --compute-units" if target == "coreml" else ""))
    if compute_units != "all" and target != "coreml":
        raise SunEdgeError(f"--compute-units applies to coreml bundles; this is a {target} bundle")
    if vae_decoder != "full" and target != "onnx":
        raise SunEdgeError(f"--vae-decoder {vae_decoder} applies to onnx bundles (exported with --vae-decoder tiny:PATH); "
                           f"this is a {target} bundle, which decodes with the model's VAE")
    module = runtime_module(BUNDLE_RUNTIMES[target])
    if target == "onnx":
        return module.OnnxRuntime(bundle, provider, vae_decoder)
    if target == "coreml":
        return module.CoreMLRuntime(bundle, compute_units)
    return module.TensorRTRuntime(bundle, cuda_graphs=cuda_graphs)


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
