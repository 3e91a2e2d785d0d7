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

import numpy as np

from sun_edge.errors import SunEdgeError

RUNTIMES: dict[str, str] = {
    "pytorch": "sun_edge.runtimes.pytorch",
    "onnxruntime": "sun_edge.runtimes.onnxruntime",
    "coreml": "sun_edge.runtimes.coreml",
    "tensorrt": "sun_edge.runtimes.tensorrt",
}


def runtime_module(name: str) -> ModuleType:
    """Import the module of runtime ``name``; unknown names list the valid ones."""
    if name not in RUNTIMES:
        raise SunEdgeError(f"unknown runtime {name!r}; valid runtimes: {', '.join(sorted(RUNTIMES))}")
    return importlib.import_module(RUNTIMES[name])


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
