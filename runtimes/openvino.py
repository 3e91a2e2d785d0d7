"""The OpenVINO runtime: the runtime protocol over an ONNX or OpenVINO IR bundle on Intel CPUs, GPUs and NPUs.

    from sun_edge import Pipeline
    from sun_edge.runtimes.openvino import OpenVinoRuntime

    runtime = OpenVinoRuntime.open("toonyou-onnx", ov_device="CPU", ov_cache_dir="~/.cache/ov")
    images = Pipeline(runtime, runtime.tokenizer()).generate("a cat", "blurry")

OpenVINO reads an ONNX bundle's ``.onnx`` files as they are (no conversion step, no PyTorch), and
the ``.xml``/``.bin`` IR of a bundle exported with ``--target openvino`` (``sun_edge.export.openvino``:
fp16-compressed or int8 weights, decompressed to the inference precision at compile). Each
component is compiled on first use for ``ov_device`` (``CPU``, ``GPU``, ``NPU``, ``AUTO``, or an
indexed ``GPU.1``) at one inference precision, ``ov_precision``:

- ``f32``: OpenVINO computes in float32; outputs equal ONNX Runtime's to float32 rounding;
- ``bf16``: convolutions and matrix products in bfloat16 (float32 accumulation), on CPUs that
  compute it natively (AMX or AVX512-BF16);
- ``f16``: float16, the native precision of Intel GPUs and NPUs (and of CPUs with AMX-FP16).

``None`` (the default) chooses per device (``default_precision``): on a CPU, bf16 where OpenVINO
reports native BF16 (``OPTIMIZATION_CAPABILITIES``: AMX or AVX512-BF16), else f32; f16 on GPU and
NPU; ``AUTO`` is left to OpenVINO. The chosen precision applies to every component, the VAE
included (OpenVINO's CPU plugin keeps its normalisations, softmax and reductions in float32 at
bf16 on its own: marking them changed no output on the test bundles). After compiling, the
precision OpenVINO actually runs is read back: a precision it does not honour (f16 on a CPU
without AMX-FP16 silently runs bf16) is refused in one line, never run under the wrong name.
``info["inference_precision"]`` names it, and parity picks that precision's thresholds
(``sun_edge.export.targets.RUNTIME_THRESHOLDS``).

``ov_cache_dir`` turns on OpenVINO's compiled-model cache: a second start imports the compiled
blob instead of reading and compiling the graph. Each component caches under a folder named
by its files' sha256 (from the manifest), since OpenVINO's own cache key does not cover an
ONNX graph's external weights file.

Shapes are the bundle's: static batch 1, and a free batch where the manifest declares one
(``unet_plain``: the CFG pair, 1..2N; every graph of a batch-range bundle: 1..N). A free batch is
compiled once, with its batch dimension bounded to that range (``ov.Dimension(1, max)``), and
serves every batch size: one compiled model per component, where compiling one static model per
batch size held a copy of the UNet's weights for each (20.9 GB at full size). The graph read for
compiling is dropped once compiled. Declared I/O is checked against the manifest at compile time
and every input on every call, as for ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import openvino as ov

from sun_edge.bundle import Bundle, TensorSpec, open_bundle
from sun_edge.errors import SunEdgeError, first_line
from sun_edge.runtimes import check_input
from sun_edge.runtimes.base import Decoder, GraphRuntime, return_freed_memory

Precision = Literal["f32", "bf16", "f16"]
PRECISIONS: tuple[str, ...] = ("f32", "bf16", "f16")
DEVICES: tuple[str, ...] = ("CPU", "GPU", "NPU", "AUTO")
_DEVICE = re.compile(r"^(CPU|GPU|NPU|AUTO)(\.\d+)?$")
_OV_PRECISION = MappingProxyType({"f32": "f32", "bf16": "bf16", "f16": "f16"})  # element type names of the hint
_DTYPES = MappingProxyType({"f32": "float32", "f16": "float16", "f64": "float64", "i64": "int64", "i32": "int32",
                            "boolean": "bool"})


def check_device(device: str) -> str:
    """An OpenVINO device name (CPU, GPU, NPU, AUTO, or an indexed GPU.1), upper-cased; one line otherwise."""
    name = str(device).upper()
    if not _DEVICE.match(name):
        raise SunEdgeError(f"unknown OpenVINO device {device!r}; valid devices: {', '.join(DEVICES)} (or GPU.N)")
    return name


def default_precision(core: ov.Core, device: str) -> tuple[str | None, str]:
    """The precision ``ov_precision=None`` runs on ``device``, and why (recorded in ``info``)."""
    if device == "CPU":
        caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" in caps:
            return "bf16", "the CPU computes bf16 natively (AMX or AVX512-BF16)"
        return "f32", "the CPU has no native bf16 (no AMX, no AVX512-BF16): bf16 would be emulated, slower than f32"
    if device.startswith(("GPU", "NPU")):
        return "f16", "Intel GPUs and NPUs compute f16 natively"
    return None, "AUTO: the device OpenVINO picks, at its own default precision"


def _message(error: BaseException) -> str:
    """OpenVINO's own words from an exception: its messages open with "Exception from <source file>:" lines."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith("Exception from ")]
    return said[0] if said else first_line(error)


def _declared(ports: Any) -> tuple[TensorSpec, ...]:
    """A compiled model's inputs or outputs as manifest specs (free dimensions -1)."""
    out = []
    for port in ports:
        etype = port.get_element_type().get_type_name()
        shape = tuple(d.get_length() if d.is_static else -1 for d in port.get_partial_shape())
        out.append(TensorSpec(port.get_any_name(), _DTYPES.get(etype, etype), shape))
    return tuple(out)


class OpenVinoRuntime(GraphRuntime):
    """Runtime protocol (``encode_text``, ``unet``, ``unet_plain``, ``decode``, ``encode``) over an ONNX bundle.

    ``ov_device``: CPU (default), GPU, NPU, AUTO; ``ov_precision``: f32, bf16, f16 or None (the
    device's default, module docstring); ``ov_cache_dir``: a folder for compiled models (None: no
    cache); ``vae_decoder``: what ``decode`` runs, ``full`` or ``tiny`` (TAESD, if exported).
    """

    name = "openvino"
    TARGETS = ("onnx", "openvino")

    def __init__(self, bundle: Bundle, ov_device: str = "CPU", ov_precision: Precision | None = None,
                 ov_cache_dir: Path | str | None = None, vae_decoder: Decoder = "full") -> None:
        self._open_bundle(bundle)
        self.device = check_device(ov_device)
        if ov_precision is not None and ov_precision not in PRECISIONS:
            raise SunEdgeError(f"unknown OpenVINO precision {ov_precision!r}; valid precisions: {', '.join(PRECISIONS)}")
        self._core = ov.Core()
        available = self._core.available_devices
        family = self.device.split(".")[0]
        if family != "AUTO" and not any(d == self.device or d.split(".")[0] == self.device for d in available):
            raise SunEdgeError(f"OpenVINO {ov.__version__} has no {self.device} device here; available: "
                               f"{', '.join(available) or 'none'}")
        if ov_precision is None:
            self.precision, self.precision_reason = default_precision(self._core, self.device)
        else:
            self.precision, self.precision_reason = ov_precision, "asked for"
        self.cache_dir = Path(ov_cache_dir).expanduser() if ov_cache_dir is not None else None
        self._models: dict[str, ov.CompiledModel] = {}  # component -> its one compiled model
        self.info = self.manifest_info(ov_device=self.device, inference_precision=self.precision or "auto",
                                       precision_reason=self.precision_reason, openvino=ov.__version__)
        self.use_decoder(vae_decoder)

    @classmethod
    def open(cls, path: Path | str, ov_device: str = "CPU", ov_precision: Precision | None = None,
             ov_cache_dir: Path | str | None = None, vae_decoder: Decoder = "full") -> OpenVinoRuntime:
        """Open and check a bundle directory (components are compiled on first use)."""
        return cls(open_bundle(path), ov_device, ov_precision, ov_cache_dir, vae_decoder)

    def _config(self, component: str) -> dict[str, Any]:
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if self.precision is not None:
            config["INFERENCE_PRECISION_HINT"] = _OV_PRECISION[self.precision]
        if self.cache_dir is not None:
            comp = self.manifest.components[component]
            key = hashlib.sha256("".join(f"{f}:{h};" for f, h in sorted(comp.sha256.items())).encode()).hexdigest()
            folder = self.cache_dir / f"{component}-{key[:16]}"
            folder.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(folder)
        return config

    def free_batch_max(self, component: str) -> int:
        """The largest batch a free batch dimension of ``component`` takes: the bundle's range (the CFG pair: 2x)."""
        pair = component in ("unet_plain", "controlnet")
        return (2 if pair else 1) * int(self.manifest.batch["max"])

    def compiled_models(self) -> dict[str, ov.CompiledModel]:
        """The compiled models held now, by component (one each at most)."""
        return dict(self._models)

    def compiled(self, component: str) -> ov.CompiledModel:
        """The component's compiled model, made (or imported from the cache) on first use; I/O checked.

        A free batch dimension is compiled once, bounded to 1..``free_batch_max`` (module docstring):
        one model serves every batch size.
        """
        if component in self._models:
            return self._models[component]
        path = self.bundle.file(component)
        self.make_room(component, self._models)
        try:
            graph = self._core.read_model(str(path))
            declared = (_declared(graph.inputs), _declared(graph.outputs))
            free = {port.get_any_name(): port.get_partial_shape() for port in graph.inputs
                    if not port.get_partial_shape().is_static}
            if free:
                top = self.free_batch_max(component)
                graph.reshape({name: ov.PartialShape([d if d.is_static else ov.Dimension(1, top) for d in shape])
                               for name, shape in free.items()})
            model = self._core.compile_model(graph, self.device, self._config(component))
            del graph  # the read graph (and the weights it holds) is not needed once compiled
        except Exception as e:  # OpenVINO raises RuntimeError with a multi-line trace
            raise SunEdgeError(f"cannot compile {path} with OpenVINO ({self.device}): {_message(e)}") from e
        self.check_declared(component, *declared)
        self._check_precision(component, model)
        self._models[component] = model
        return model

    def _check_precision(self, component: str, model: ov.CompiledModel) -> None:
        """Refuse a precision the device did not honour (f16 on a CPU without AMX-FP16 runs bf16)."""
        if self.precision is None:
            return
        try:
            ran = model.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        except Exception:  # devices that do not report it (NPU): trust the hint
            return
        if ran != _OV_PRECISION[self.precision]:
            raise SunEdgeError(f"OpenVINO {self.device} runs {component} at {ran}, not the {self.precision} asked for "
                               f"(this device has no native {self.precision}); choose precision {ran} or f32")

    def release(self, component: str) -> None:
        """Drop the component's compiled model (and its weights); the next call compiles or imports it again."""
        if self._models.pop(component, None) is not None:
            return_freed_memory()

    def run(self, component: str, *arrays: np.ndarray) -> np.ndarray:
        """Check ``arrays`` against the component's inputs (in manifest order), run it, return its first output."""
        return self.run_outputs(component, *arrays)[0]

    def run_outputs(self, component: str, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """As ``run``, returning every output in manifest order."""
        comp = self._component(component)
        feeds = []
        for spec, array in zip(comp.inputs, arrays, strict=True):
            shape = [None if d < 0 else d for d in spec.shape]
            feeds.append(check_input(f"{component} input {spec.name}", array, shape, np.dtype(spec.dtype)))
        free = any(d < 0 for spec in comp.inputs for d in spec.shape)  # the component table's free batch
        if free and feeds[0].shape[0] > self.free_batch_max(component):
            raise SunEdgeError(f"{component}: batch {feeds[0].shape[0]} is above the bundle's range (at most "
                               f"{self.free_batch_max(component)}); re-export with a larger --max-batch")
        model = self.compiled(component)
        try:
            result = model(feeds)
        except Exception as e:
            raise SunEdgeError(f"OpenVINO failed running {comp.file}: {_message(e)}") from e
        return tuple(np.array(result[out], dtype=np.float32, copy=True) for out in model.outputs[:len(comp.outputs)])
