"""The TensorRT target: an fp16 ONNX bundle prepared for TensorRT, and engines built on the GPU box.

``export_bundle`` writes the ONNX bundle (``export/onnx.py``, fp16 by default) with target
``tensorrt`` and ``manifest.extra["tensorrt"]``: the optimisation profile of every component
(static shapes, batch 1, both 77-token text inputs fixed) and the engines built so far. When
TensorRT and a GPU are importable on the exporting machine, it builds the engines too.

``build_engines`` runs on the serving machine (engines are specific to the TensorRT version
and the GPU generation): per component it checks the version rules (shared with the runtime:
``sun_edge.runtimes.tensorrt_rules``), makes its ``BuildPlan`` (opt level, memory pool, static
profile, timing cache; ``unet.volta.onnx`` on sm < 75, attention logits in fp32), parses the
graph into a strongly typed network, applies the plan, serializes
``<component>.trt<version>.sm<cc>.plan`` and records it in the manifest, which is replaced
atomically after each engine.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sun_edge.bundle import Component, Manifest, open_bundle, write_manifest
from sun_edge.errors import SunEdgeError
from sun_edge.files import write_bytes
from sun_edge.export import ExportOptions, ParityFn, refuse_tiny_decoder
from sun_edge.runtimes import tensorrt_rules as rules
from sun_edge.runtimes.tensorrt_rules import DEFAULT_OPT_LEVEL, cuda_runtime, gpu, import_tensorrt

if TYPE_CHECKING:
    from sun_edge.runtimes.pytorch import TorchRuntime

TARGET = rules.TARGET
DEFAULT_WORKSPACE_GB = 4.0
VOLTA_SUFFIX = ".volta.onnx"  # unet.volta.onnx: attention logits in fp32, built on sm < 75


def export_bundle(reference: TorchRuntime, out: Path | str, options: ExportOptions = ExportOptions(precision="fp16"), *,
                  model: dict[str, Any] | None = None, adapter: dict[str, Any] | None = None, force: bool = False,
                  parity: ParityFn | None = None, progress: bool = True, build: bool | None = None) -> Path:
    """Write the ONNX bundle of ``reference`` for TensorRT to ``out``; build engines if ``build`` (default: if possible)."""
    from sun_edge.export import onnx as onnx_target

    refuse_tiny_decoder(reference, TARGET)
    path = onnx_target.export_bundle(reference, out, options, model=model, adapter=adapter, force=force,
                                     parity=parity, progress=progress)  # parity runs it with ONNX Runtime
    mark_tensorrt(path)  # one atomic manifest replace: until then it is a complete ONNX bundle
    if build if build is not None else tensorrt_available():
        build_engines(path)
    return path


def mark_tensorrt(directory: Path) -> Manifest:
    """Turn an ONNX bundle's manifest into a TensorRT one: target, and ``extra["tensorrt"]`` (atomically)."""
    manifest = open_bundle(directory).manifest
    extra = {**manifest.extra, TARGET: tensorrt_extra(manifest)}
    return replace_manifest(Path(directory), replace(manifest, target=TARGET, extra=extra))


def replace_manifest(directory: Path, manifest: Manifest) -> Manifest:
    """Write ``manifest.json`` atomically (``bundle.write_manifest``): readers never see half a manifest."""
    write_manifest(Path(directory), manifest)
    return manifest


def tensorrt_available() -> bool:
    """Whether TensorRT, cuda-python and a CUDA GPU are usable here (guarded imports)."""
    try:
        import tensorrt  # noqa: F401

        cudart = cuda_runtime()
        err, count = cudart.cudaGetDeviceCount()
        return int(err) == 0 and count > 0
    except Exception:  # any import or driver failure means: not here
        return False


def tensorrt_extra(manifest: Manifest) -> dict[str, Any]:
    """``manifest.extra["tensorrt"]`` for a fresh export: the profiles, and no engines yet."""
    return {
        "profile": {name: {k: {i: list(v) for i, v in p.items()}
                           for k, p in _by_kind(c, rules.free_batch_max(manifest, name)).items()}
                    for name, c in manifest.components.items()},
        "static_shapes": manifest.batch["max"] == 1, "batch": int(manifest.batch["max"]),
        "text_tokens": int(manifest.text["tokens"]),
        "engines": {},
    }


def _by_kind(component: Component, free_max: int) -> dict[str, dict[str, tuple[int, ...]]]:
    shapes = rules.profile_shapes(component, free_max)
    return {k: {name: s[k] for name, s in shapes.items()} for k in ("min", "opt", "max")}


def use_volta_graph(component: Component, compute: int) -> bool:
    """fp16 UNets built for GPUs without fused attention (sm < 75) use the fp32-logits graph."""
    return compute < 75 and component.precision == "fp16" and component.file.startswith("unet")


def volta_file(component: Component) -> str:
    """``unet.onnx`` -> ``unet.volta.onnx``."""
    return component.file.removesuffix(".onnx") + VOLTA_SUFFIX


@dataclass(frozen=True)
class BuildPlan:
    """What ``build-engines`` applies for one component (TensorRT's builder config, as data)."""

    component: str
    onnx_file: str
    engine_file: str
    opt_level: int
    strongly_typed: bool
    workspace_bytes: int
    timing_cache: Path | None
    profile: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)
    volta: bool = False


def build_plan(manifest: Manifest, component: str, trt_version: str, compute: int, *,
               opt_level: int = DEFAULT_OPT_LEVEL, workspace_gb: float = DEFAULT_WORKSPACE_GB,
               timing_cache: Path | str | None = None) -> BuildPlan:
    """The builder settings for ``component`` with TensorRT ``trt_version`` on an sm``compute`` GPU."""
    if not 0 <= opt_level <= 5:
        raise SunEdgeError(f"--opt-level {opt_level} is out of range; TensorRT's builder optimisation levels are 0-5")
    if workspace_gb <= 0:
        raise SunEdgeError(f"--workspace-gb {workspace_gb:g} must be positive, e.g. 4")
    if component not in manifest.components:
        raise SunEdgeError(f"the bundle has no {component} component; it has: {', '.join(manifest.components)}")
    rules.check_compatible(trt_version, compute)
    comp = manifest.components[component]
    volta = use_volta_graph(comp, compute)
    return BuildPlan(component, volta_file(comp) if volta else comp.file,
                     rules.engine_file(component, trt_version, compute), opt_level,
                     rules.parse_version(trt_version) >= (9,), int(workspace_gb * (1 << 30)),
                     Path(timing_cache) if timing_cache is not None else None, rules.profile_shapes(comp, rules.free_batch_max(manifest, component)), volta)


def build_engines(bundle_dir: Path | str, *, opt_level: int = DEFAULT_OPT_LEVEL,
                  timing_cache: Path | str | None = None, workspace_gb: float = DEFAULT_WORKSPACE_GB,
                  components: tuple[str, ...] | None = None, force: bool = False, progress: bool = True) -> Manifest:
    """Build (or reuse) one engine per component of a TensorRT bundle on this machine's GPU; returns the manifest."""
    directory = Path(bundle_dir)
    manifest = open_bundle(directory).manifest
    if manifest.target != TARGET:
        raise SunEdgeError(f"{directory} is a {manifest.target} bundle; build-engines needs one exported with --target tensorrt")
    trt = import_tensorrt()
    name, compute = gpu()
    plans = [build_plan(manifest, c, trt.__version__, compute, opt_level=opt_level, workspace_gb=workspace_gb,
                              timing_cache=timing_cache)  # every rule checked before any build starts
             for c in (components or tuple(manifest.components))]
    from sun_edge.weights import sha256_file

    for plan in plans:
        record = rules.engine_records(manifest).get(plan.component)
        if not force and rules.rebuild_reason(record, trt.__version__, compute, directory) is None:
            continue
        if progress:
            print(f"building {plan.engine_file} (opt level {plan.opt_level}) ...", file=sys.stderr, flush=True)
        if plan.volta:
            from sun_edge.export.tensorrt_graph import write_volta_graph

            write_volta_graph(directory / manifest.components[plan.component].file, directory / plan.onnx_file)
        start = time.perf_counter()
        _build_one(trt, directory, plan)
        seconds = time.perf_counter() - start
        engine = directory / plan.engine_file
        entry = {"file": plan.engine_file, "tensorrt": trt.__version__, "sm": compute, "gpu": name,
                 "size": engine.stat().st_size, "sha256": sha256_file(engine), "build_seconds": round(seconds, 1),
                 "opt_level": plan.opt_level, "source": plan.onnx_file}
        extra = dict(manifest.extra)
        section = dict(extra.get(TARGET) or tensorrt_extra(manifest))
        section["engines"] = {**section.get("engines", {}), plan.component: entry}
        extra[TARGET] = section
        manifest = replace_manifest(directory, replace(manifest, extra=extra))  # after each engine: progress survives
    return manifest


def _build_one(trt: Any, directory: Path, plan: BuildPlan) -> None:
    """Parse, configure and build one engine with TensorRT's Python API; write it to ``plan.engine_file``."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(directory / plan.onnx_file)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise SunEdgeError(f"TensorRT cannot parse {plan.onnx_file}: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    config.builder_optimization_level = plan.opt_level
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, shapes in plan.profile.items():
        profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    cache_path = plan.timing_cache
    blob = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SunEdgeError(f"TensorRT failed to build {plan.engine_file}; rerun with a larger --workspace-gb "
                           "or a lower --opt-level")
    write_bytes(directory / plan.engine_file, bytes(serialized))  # atomic: a killed build leaves no half engine
    if cache_path is not None:
        write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
