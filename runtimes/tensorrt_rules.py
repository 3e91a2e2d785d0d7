"""TensorRT facts the runtime and the engine builder share, testable without TensorRT.

Importing this module imports neither ``tensorrt`` nor CUDA, so every decision is testable
on any machine (the three helpers at the end import them when called):

- version rules: which TensorRT runs on which GPU (``RULES``, checked up front, one line each);
- engine naming: ``unet.trt10.4.0.sm70.plan`` (the TensorRT version and compute capability);
- the optimisation profile of each component, from the manifest (static shapes, batch 1);
- engine records and the rebuild decision: is the engine recorded in the manifest usable here;
- the I/O binding plan: every engine tensor's name, shape, dtype and byte size;
- ``import_tensorrt``, ``cuda_runtime``, ``gpu``: the guarded imports and the GPU's compute capability.

The builder's own settings (build plan, Volta graph choice) are in ``sun_edge.export.tensorrt``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sun_edge.bundle import Component, Manifest
from sun_edge.errors import SunEdgeError

TARGET = "tensorrt"
DEFAULT_OPT_LEVEL = 3  # TensorRT's builder default; engine records without one were built at it
PLAIN_MAX_BATCH = 2  # the CFG baseline UNet runs batch 1 or 2: its profile spans both
Version = tuple[int, ...]


def parse_version(text: str) -> Version:
    """``"10.4.0.26"`` -> ``(10, 4, 0, 26)``; anything after the numeric part is ignored."""
    import re

    parts = []
    for piece in str(text).split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() < len(piece):  # "0b6": a pre-release tag ends the numeric part
            break
    if not parts:
        raise SunEdgeError(f"cannot read TensorRT version {text!r}; expected e.g. 10.4.0")
    return tuple(parts)


def short_version(text: str) -> str:
    """The version as engines are named: major.minor.patch (``10.4.0``)."""
    return ".".join(str(p) for p in (parse_version(text) + (0, 0))[:3])


def sm(major: int, minor: int) -> int:
    """A compute capability as one number: (7, 0) -> 70, (8, 6) -> 86."""
    return int(major) * 10 + int(minor)


@dataclass(frozen=True)
class Rule:
    """One compatibility rule: GPUs with ``min_sm <= sm < max_sm`` need ``min_trt <= TensorRT < max_trt``."""

    min_sm: int
    max_sm: int
    min_trt: Version
    max_trt: Version
    message: str  # the one-line error, formatted with {sm} and {trt}

    def applies(self, compute: int) -> bool:
        return self.min_sm <= compute < self.max_sm

    def allows(self, version: Version) -> bool:
        return self.min_trt <= version < self.max_trt


NO_LIMIT: Version = (10_000,)
RULES: tuple[Rule, ...] = (
    Rule(0, 10_000, (10,), NO_LIMIT,
         "TensorRT {trt} is too old: sun-edge builds strongly typed networks and needs TensorRT 10.0 or newer "
         "(pip install 'tensorrt>=10.0')"),
    Rule(0, 70, (0,), (0,),
         "compute capability sm{sm} is not supported by TensorRT 10 or newer: sun-edge engines need Volta (sm70) or newer"),
    Rule(70, 75, (0,), (10, 5),
         "V100/Volta (sm{sm}) needs TensorRT 10.4 or older (Volta support was removed in 10.5), found {trt}: "
         "pip install 'tensorrt>=10.0,<10.5'"),
    Rule(0, 75, (0,), (11,),
         "TensorRT {trt} needs Turing (sm75) or newer, this GPU is sm{sm}: install TensorRT 10.4 or older for Volta"),
)


def violations(trt_version: str, compute: int, rules: tuple[Rule, ...] = RULES) -> list[str]:
    """Every rule broken by TensorRT ``trt_version`` on a GPU of compute capability ``compute`` (one line each)."""
    version = parse_version(trt_version)
    return [r.message.format(sm=compute, trt=trt_version) for r in rules
            if r.applies(compute) and not r.allows(version)]


def check_compatible(trt_version: str, compute: int, rules: tuple[Rule, ...] = RULES) -> None:
    """Raise the first broken rule as a one-line ``SunEdgeError``."""
    broken = violations(trt_version, compute, rules)
    if broken:
        raise SunEdgeError(broken[0])


def engine_file(component: str, trt_version: str, compute: int) -> str:
    """``unet.trt10.4.0.sm70.plan``: an engine runs only with the TensorRT and GPU generation it was built for."""
    return f"{component}.trt{short_version(trt_version)}.sm{compute}.plan"


def free_batch_max(manifest: Any, component: str) -> int:
    """The largest size of a component's free batch dimension: the bundle's batch range (the CFG baseline
    UNet and the ControlNet, which runs on its input, take the pair, 2x; a batch-1 bundle's span 1..2)."""
    return (2 if component in ("unet_plain", "controlnet") else 1) * int(manifest.batch["max"])


def profile_shapes(component: Component, free_max: int = PLAIN_MAX_BATCH) -> dict[str, dict[str, tuple[int, ...]]]:
    """min/opt/max per input: static shapes (min = opt = max); a free batch dimension spans 1..``free_max``,
    optimised for ``free_max`` (a server fills its batches)."""
    shapes = {}
    for spec in component.inputs:
        lo = tuple(1 if d < 0 else d for d in spec.shape)
        hi = tuple(free_max if d < 0 else d for d in spec.shape)
        shapes[spec.name] = {"min": lo, "opt": hi, "max": hi}
    return shapes


@dataclass(frozen=True)
class EngineRecord:
    """One built engine, as recorded in ``manifest.extra["tensorrt"]["engines"][component]``."""

    file: str
    tensorrt: str
    sm: int
    gpu: str
    size: int
    sha256: str
    build_seconds: float
    opt_level: int
    source: str  # the ONNX graph it was built from

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineRecord:
        return cls(str(d["file"]), str(d["tensorrt"]), int(d["sm"]), str(d.get("gpu", "")), int(d["size"]),
                   str(d.get("sha256", "")), float(d.get("build_seconds", 0.0)), int(d.get("opt_level", DEFAULT_OPT_LEVEL)),
                   str(d.get("source", "")))


def engine_records(manifest: Manifest) -> dict[str, EngineRecord]:
    """The engines the manifest records, by component."""
    engines = manifest.extra.get(TARGET, {}).get("engines", {})
    return {name: EngineRecord.from_dict(d) for name, d in engines.items()}


def rebuild_reason(record: EngineRecord | None, trt_version: str, compute: int, bundle: Path | None = None) -> str | None:
    """Why the recorded engine cannot run here (``None``: it can): missing, other TensorRT, other GPU, file gone."""
    if record is None:
        return "no engine is built"
    if short_version(record.tensorrt) != short_version(trt_version):
        return f"its engine was built with TensorRT {record.tensorrt}, this machine has {trt_version}"
    if record.sm != compute:
        return f"its engine was built for sm{record.sm} ({record.gpu}), this GPU is sm{compute}"
    if bundle is not None:
        path = Path(bundle) / record.file
        if not path.is_file() or path.stat().st_size != record.size:
            return f"its engine {record.file} is missing or changed"
    return None


@dataclass(frozen=True)
class Binding:
    """One engine I/O tensor: what the runtime allocates and binds."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    is_input: bool


def binding_plan(component: Component, free_max: int = PLAIN_MAX_BATCH) -> tuple[Binding, ...]:
    """Inputs then outputs at their largest profile shape, with the bytes each device buffer needs."""
    shapes = profile_shapes(component, free_max)
    out = []
    for spec in component.inputs:
        shape = shapes[spec.name]["max"]
        out.append(Binding(spec.name, shape, spec.dtype, int(np.prod(shape)) * np.dtype(spec.dtype).itemsize, True))
    for spec in component.outputs:
        shape = tuple(free_max if d < 0 else d for d in spec.shape)
        out.append(Binding(spec.name, shape, spec.dtype, int(np.prod(shape)) * np.dtype(spec.dtype).itemsize, False))
    return tuple(out)


def import_tensorrt() -> Any:
    """``import tensorrt`` with the install hint as a one-line error."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise SunEdgeError("TensorRT is not installed: pip install 'sun-edge[tensorrt]' "
                           "(V100: 'tensorrt>=10.0,<10.5')") from e
    return trt


def cuda_runtime() -> Any:
    """cuda-python's runtime API module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as e:
            raise SunEdgeError("TensorRT engines need cuda-python: pip install 'sun-edge[tensorrt]'") from e
    return runtime


def gpu(device: int = 0) -> tuple[str, int]:
    """The GPU's name and compute capability (``("Tesla V100-SXM2-16GB", 70)``)."""
    cudart = cuda_runtime()
    err, props = cudart.cudaGetDeviceProperties(device)
    if int(err) != 0:
        raise SunEdgeError(f"no usable CUDA GPU {device} (cudaGetDeviceProperties: {err}); check the driver")
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return name, sm(props.major, props.minor)
