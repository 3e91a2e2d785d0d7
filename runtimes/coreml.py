"""The Core ML runtime: the runtime protocol over a Core ML bundle's ``.mlpackage`` resources.

    from sun_edge import Pipeline
    from sun_edge.runtimes.coreml import CoreMLRuntime

    runtime = CoreMLRuntime.open("toonyou-coreml", compute_units="cpu-and-ne")
    images = Pipeline(runtime, runtime.tokenizer()).generate("a cat", "blurry")

On macOS each component is a ``coremltools.models.MLModel`` on the chosen compute units
(``COMPUTE_UNITS``). Elsewhere Core ML cannot predict, so the runtime evaluates the same ML
Programs with the NumPy MIL evaluator (``sun_edge.runtimes.coreml_mil``), which rounds to the
programs' float16 but is slow: for checking only, and it says so (its ``name`` and a warning).
Models are loaded per component on first use, their declared inputs and outputs checked against
the manifest; every input is checked against the manifest on every call. No PyTorch here, and
coremltools is imported only when a model is loaded.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any, Literal

import numpy as np

from sun_edge.bundle import Bundle, TensorSpec, open_bundle
from sun_edge.errors import SunEdgeError
from sun_edge.runtimes import check_input
from sun_edge.runtimes.base import GraphRuntime

COMPUTE_UNITS = MappingProxyType({"all": "ALL", "cpu-and-gpu": "CPU_AND_GPU", "cpu-and-ne": "CPU_AND_NE",
                                  "cpu-only": "CPU_ONLY"})  # name -> coremltools.ComputeUnit member
MIL_NAME = "coreml-mil (NumPy evaluator, for checking only)"
Backend = Literal["auto", "coreml", "mil"]


def import_coremltools() -> ModuleType:
    """``import coremltools`` with its import-time notes (untested torch version, no native
    predictor off macOS) kept out of the user's terminal; one line if it is not installed."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import coremltools
    except ImportError as e:
        raise SunEdgeError("Core ML bundles need coremltools: pip install 'sun-edge[coreml]'") from e
    finally:
        logger.setLevel(level)
    return coremltools


class CoreMLRuntime(GraphRuntime):
    """Runtime protocol (``encode_text``, ``unet``, ``decode``, ``encode``) over a Core ML bundle.

    ``backend``: ``coreml`` predicts with Core ML (macOS only), ``mil`` evaluates with NumPy,
    ``auto`` picks Core ML on macOS and the evaluator elsewhere. The runtime registry opens
    ``coreml`` (Core ML, refused off macOS) and ``coreml-mil`` (the evaluator, asked for by name).
    """

    TARGETS = ("coreml",)

    def __init__(self, bundle: Bundle, compute_units: str = "all", backend: Backend = "auto") -> None:
        if compute_units not in COMPUTE_UNITS:
            raise SunEdgeError(f"unknown compute units {compute_units!r}; valid: {', '.join(COMPUTE_UNITS)}")
        if backend not in ("auto", "coreml", "mil"):
            raise SunEdgeError(f"unknown Core ML backend {backend!r}; valid: auto, coreml, mil")
        if backend == "coreml" and sys.platform != "darwin":
            raise SunEdgeError("Core ML prediction needs macOS; elsewhere a Core ML bundle can only be checked, with "
                               "the NumPy MIL evaluator (runtime coreml-mil, slow)")
        self.backend = "coreml" if backend == "coreml" or (backend == "auto" and sys.platform == "darwin") else "mil"
        self.name = "coreml" if self.backend == "coreml" else MIL_NAME
        self._open_bundle(bundle)
        self.require_components()
        self.compute_units = compute_units
        if self.backend == "mil":
            warnings.warn("Core ML cannot predict on this platform: running the bundle with the NumPy MIL evaluator, "
                          "which is slow and for checking only", stacklevel=2)
        self._models: dict[str, Any] = {}
        self.info = self.manifest_info(backend=self.backend,
                                       compute_units=self.compute_units if self.backend == "coreml" else None)

    @classmethod
    def open(cls, path: Path | str, compute_units: str = "all", backend: Backend = "auto") -> CoreMLRuntime:
        """Open and check a bundle directory (models are loaded on first use)."""
        return cls(open_bundle(path), compute_units, backend)

    def model(self, component: str) -> Any:
        """The component's loaded model (Core ML or evaluator), made on first use; its I/O must match the manifest."""
        if component in self._models:
            return self._models[component]
        path = self.bundle.file(component)
        self.make_room(component, self._models)
        if self.backend == "coreml":
            model, declared = self._load_coreml(path)
        else:
            from sun_edge.runtimes.coreml_mil import MILEvaluator

            model = MILEvaluator.load(path)
            declared = (model.inputs, model.outputs)
        self.check_declared(component, *declared)
        self._models[component] = model
        return model

    def release(self, component: str) -> None:
        """Drop the component's loaded model; the next call loads it again."""
        self._models.pop(component, None)

    def _load_coreml(self, path: Path) -> tuple[Any, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]:
        ct = import_coremltools()
        units = getattr(ct.ComputeUnit, COMPUTE_UNITS[self.compute_units])
        try:
            model = ct.models.MLModel(str(path), compute_units=units)
        except Exception as e:  # coremltools raises plain Exceptions
            raise SunEdgeError(f"Core ML cannot load {path.name} ({self.compute_units}): {e}") from e
        return model, spec_io(model.get_spec())

    def run(self, component: str, *arrays: np.ndarray) -> np.ndarray:
        """Check ``arrays`` against the component's inputs (in manifest order), run it, return its first output."""
        return self.run_outputs(component, *arrays)[0]

    def run_outputs(self, component: str, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """As ``run``, returning every output in manifest order."""
        comp = self._component(component)
        feeds = {spec.name: check_input(f"{component} input {spec.name}", array, spec.shape, np.dtype(spec.dtype))
                 for spec, array in zip(comp.inputs, arrays, strict=True)}
        model = self.model(component)
        names = [o.name for o in comp.outputs]
        if self.backend == "mil":
            result = model(feeds)
            return tuple(result[out].astype(np.float32, copy=False) for out in names)
        try:
            result = model.predict(feeds)
        except Exception as e:
            raise SunEdgeError(f"Core ML failed running {comp.file}: {e}") from e
        return tuple(np.asarray(result[out], dtype=np.float32) for out in names)

    def require_baseline(self) -> None:
        """CFG mode needs a UNet without the adapter, which Core ML bundles do not hold: one clear line."""
        raise SunEdgeError(f"bundle {self.bundle.path} holds the SUN UNet only", fix="coreml_cfg")

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [1,77] int64 -> last hidden state [1,77,D] float32 (the graph takes int32 ids)."""
        check_input("input_ids", ids, (1, self.text_tokens), np.int64)
        return self.run("text_encoder", ids.astype(np.int32))


class CoreMLPredictRuntime(CoreMLRuntime):
    """A Core ML bundle predicted by Core ML itself (macOS only; refused elsewhere in one line): ``coreml``."""

    def __init__(self, bundle: Bundle, compute_units: str = "all") -> None:
        super().__init__(bundle, compute_units, backend="coreml")


class CoreMLEvaluatorRuntime(CoreMLRuntime):
    """A Core ML bundle through the NumPy MIL evaluator, on any platform: slow, for checking (``coreml-mil``)."""

    def __init__(self, bundle: Bundle) -> None:
        super().__init__(bundle, backend="mil")


def spec_io(spec: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The inputs and outputs a Core ML model spec declares, as manifest specs (multi-array features only)."""
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    names = {ArrayFeatureType.FLOAT32: "float32", ArrayFeatureType.FLOAT16: "float16", ArrayFeatureType.INT32: "int32",
             ArrayFeatureType.DOUBLE: "float64"}

    def specs(features: Any) -> tuple[TensorSpec, ...]:
        out = []
        for f in features:
            array = f.type.multiArrayType
            out.append(TensorSpec(f.name, names.get(array.dataType, str(array.dataType)), tuple(int(d) for d in array.shape)))
        return tuple(out)
    return specs(spec.description.input), specs(spec.description.output)
