"""The OpenVINO target: a bundle of OpenVINO IR (``<name>.xml`` + ``<name>.bin``) for the OpenVINO runtime.

The ONNX target's graphs, converted: each component is traced to a float32 ONNX graph exactly as
``export/onnx.py`` does (same wrappers, same free batch dimension under ``--max-batch``), in a
scratch folder, read by OpenVINO's ONNX frontend (``openvino.convert_model``), its weights
compressed, and written with ``openvino.save_model``; the scratch ONNX files are deleted. The IR
keeps the ONNX graph's names, dtypes and shapes (a free batch stays free), so the manifest's I/O,
the runtime's checks and parity are those of every bundle.

Weights:

- ``--precision fp16`` (default): the text encoder's, UNets' and TAESD's weights are stored as
  float16 (``save_model(compress_to_fp16=True)``), half the size of an fp32 bundle; both VAE graphs
  keep float32 weights (their precision policy in ``sun_edge.components``). OpenVINO decompresses
  them at compile and computes at the runtime's inference precision (bf16 on CPUs with native bf16,
  f32, f16 on GPUs and NPUs); the manifest's precision is ``fp16`` for those components;
- ``--precision fp32``: the weights as traced;
- ``--ov-weights int8``: those components' weights compressed to 8 bits by NNCF
  (``nncf.compress_weights``, INT8_ASYM: per-output-channel scale and zero point, dequantized in the
  graph), a quarter of fp32; the VAE keeps float32. Needs the ``openvino-int8`` extra (nncf, which
  runs on OpenVINO models without PyTorch). The manifest's precision is ``int8`` for them.

The bundle's activations are never float16 in the graph: the inference precision is the runtime's
choice (``runtimes/openvino.py``), and export parity runs the bundle with the OpenVINO runtime at
its default precision on this machine, so the OpenVINO thresholds (``OPENVINO_BF16``) hold at bf16,
and the per-component floors (``fp16`` weights: the ONNX fp16 floors) at f32.

"""

from __future__ import annotations

import gc
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from sun_edge.bundle import Component, Manifest, bundle_writer, describe_files, open_bundle
from sun_edge.components import COMPONENTS
from sun_edge.errors import SunEdgeError
from sun_edge.export import ExportOptions, ParityFn, recipe
from sun_edge.export import onnx as onnx_target
from sun_edge.export.recipe import Plan
from sun_edge.runtimes.pytorch import TorchRuntime

TARGET = "openvino"
STAGES = ("trace", "clean", "save", "check", "convert", "write", "verify")
WEIGHTS: tuple[str, ...] = ("int8",)  # --ov-weights; fp16/fp32 weights are --precision's
SCRATCH = ".onnx-scratch"  # inside the temporary bundle folder; removed before the rename


@dataclass(frozen=True)
class OpenVinoOptions(ExportOptions):
    """OpenVINO IR export options: ``precision`` fp16 (default) or fp32 weights; ``ov_weights="int8"``: NNCF int8."""

    precision: Literal["fp32", "fp16"] = "fp16"
    ov_weights: Literal["int8"] | None = None  # None: the weights at ``precision``

    @property
    def weights(self) -> str:
        return self.ov_weights or self.precision

    def validate(self) -> None:
        super().validate()
        if self.ov_weights is not None and self.ov_weights not in WEIGHTS:
            raise SunEdgeError(f"unknown OpenVINO weights {self.ov_weights!r}; valid: {', '.join(WEIGHTS)} "
                               "(fp16 or fp32 weights: --precision)")
        if self.ov_weights == "int8":
            try:
                import nncf  # noqa: F401
            except ImportError:
                raise SunEdgeError("--ov-weights int8 needs NNCF: pip install 'sun-edge[openvino-int8]'") from None


def plan(reference: TorchRuntime, options: OpenVinoOptions) -> list[Plan]:
    """The ONNX target's float32 plans, with this target's files and each component's weight precision."""
    traced = onnx_target.plan(reference, replace(options, precision="fp32"))
    return [replace(p, file=f"{p.name}.xml", precision=_weights(p.name, options.weights)) for p in traced]


def _weights(component: str, weights: str) -> str:
    """A component's weight precision: the bundle's, where the component table lets it follow the bundle (fp32 else)."""
    follows = COMPONENTS[component].precision("fp16") == "fp16"
    return weights if follows else "fp32"


def _io(ports: Any) -> tuple[Any, ...]:
    from sun_edge.runtimes.openvino import _declared

    return _declared(ports)


def convert(graph: Plan, directory: Path, *, stage: Any, max_batch: int) -> Component:
    """Trace ``graph`` to ONNX in a scratch folder, convert it to IR, save it (weights compressed), check its I/O."""
    import openvino as ov

    scratch = directory / SCRATCH / graph.name
    scratch.mkdir(parents=True, exist_ok=True)
    onnx_file = onnx_target.convert(replace(graph, file=f"{graph.name}.onnx", precision="fp32"), scratch,
                                    stage=stage, max_batch=max_batch).file
    stage("convert")
    model = ov.convert_model(str(scratch / onnx_file))
    if graph.precision == "int8":
        import nncf

        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    stage("write")
    xml = directory / graph.file
    ov.save_model(model, str(xml), compress_to_fp16=graph.precision in ("fp16", "int8"))  # int8: its scales fp16
    del model
    shutil.rmtree(scratch)
    gc.collect()
    stage("verify")
    saved = ov.Core().read_model(str(xml))
    declared = (_io(saved.inputs), _io(saved.outputs))
    del saved
    if declared != (graph.inputs, graph.outputs):
        raise SunEdgeError(f"internal error: {graph.file} declares {declared}, the plan says {(graph.inputs, graph.outputs)}")
    sizes, hashes = describe_files(directory, [graph.file, xml.with_suffix(".bin").name])
    return Component(graph.file, graph.inputs, graph.outputs, graph.precision, sizes, hashes)


def build_manifest(reference: TorchRuntime, options: OpenVinoOptions, components: dict[str, Component], *,
                   model: dict[str, Any], adapter: dict[str, Any], tokenizer: dict[str, str]) -> Manifest:
    import openvino as ov
    import torch

    return Manifest(
        target=TARGET, precision=options.weights, components=components, parity={},
        **recipe.common_manifest_fields(reference, options, model=model, adapter=adapter, tokenizer=tokenizer),
        extra={"openvino": ov.__version__, "weights": options.weights,
               "converted_from": f"ONNX opset 18 (torch {torch.__version__} torch.onnx, dynamo)"},
    )


def verify(directory: Path) -> None:
    """The bundle as the runtime will see it: manifest valid, files present, every IR's I/O as listed."""
    import openvino as ov

    bundle = open_bundle(directory)
    core = ov.Core()
    for comp in bundle.manifest.components.values():
        saved = core.read_model(str(directory / comp.file))
        if (_io(saved.inputs), _io(saved.outputs)) != (comp.inputs, comp.outputs):
            raise SunEdgeError(f"internal error: {comp.file} does not declare the I/O the manifest lists")


def export_bundle(reference: TorchRuntime, out: Path | str, options: OpenVinoOptions = OpenVinoOptions(), *,
                  model: dict[str, Any] | None = None, adapter: dict[str, Any] | None = None, force: bool = False,
                  parity: ParityFn | None = None, progress: bool = True) -> Path:
    """Write an OpenVINO IR bundle of ``reference`` (adapter fused) to ``out``, atomically (as ``onnx.export_bundle``)."""
    if not isinstance(options, OpenVinoOptions):
        options = OpenVinoOptions(**{k: getattr(options, k) for k in ExportOptions.__dataclass_fields__})
    options = options.sized(reference.native_size)
    options.validate()
    out = Path(out)
    plans = plan(reference, options)
    model, adapter = recipe.manifest_entries(reference, model, adapter)
    with bundle_writer(out, force) as tmp:
        components = recipe.run_stages(
            plans, lambda graph, stage: convert(graph, tmp, stage=stage, max_batch=options.max_batch),
            progress, stages=STAGES)
        shutil.rmtree(tmp / SCRATCH, ignore_errors=True)
        tokenizer = recipe.write_tokenizer(tmp)
        manifest = build_manifest(reference, options, components, model=model, adapter=adapter, tokenizer=tokenizer)
        recipe.finish(tmp, manifest, reference, check=verify, parity=parity)
    return out
