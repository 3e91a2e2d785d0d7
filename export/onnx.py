"""The ONNX target: a bundle of opset-18 ONNX graphs for ONNX Runtime (and TensorRT's ONNX parser).

The shared recipe (``recipe.py``: plans from the component table, example inputs, the stage
loop, the common manifest fields) with this target's steps: wrap the torch module so its graph
has the runtime protocol's semantics (``modules.py``), trace it at static shapes with
``torch.onnx.export(dynamo=True)``, clean it with the onnxscript optimizer (``onnx_graph.py``
says why that tool), set metadata, save it (one ``<file>.data`` beside graphs over 2 GB), check
it (``onnx.checker`` and its I/O against what the manifest will say). Components (their I/O as
``sun_edge.components`` declares it, ``<name>.onnx``): ``text_encoder``, ``unet`` (the SUN UNet,
adapter fused), ``unet_plain`` (``with_baseline``: the UNet without the adapter, batch 1 or 2,
for CFG), ``vae_decoder``, ``vae_encoder``, and ``vae_decoder_tiny`` when the reference has a
TAESD decoder (``--vae-decoder tiny:PATH``).

Precision ``fp16``: the text encoder and the UNets are float16 with float32 islands written as
explicit casts (``modules.py``: softmax, GroupNorm/LayerNorm, the adapter's norm ratio, the
timestep sinusoids; every fp16 graph is traced with the float32-softmax attention); graph inputs
and outputs stay float32. Both VAE graphs stay float32 (their table policy): SD1.5's VAE decoder
overflows float16 at full resolution, and each component records its own precision.
TAESD's decoder is float16 in an fp16 bundle: it has no attention and no normalisation, its
input is soft-clamped to |x| < 3 and its activations stay small, and the export's parity check
(its own ``vae_decoder_tiny`` threshold) holds it to that.

Why not optimum's ONNX export configs: since optimum 2.0 they live in ``optimum-onnx``, whose
only release (0.1.0) requires ``transformers<4.58`` and ``optimum~=2.1`` while sun-edge runs on
transformers 5; installing it would downgrade the reference stack. And they would not save
work here: their text encoder and VAE configs export the bare diffusers modules, while a bundle's
decoder carries ``1/scaling_factor`` and the clamp, its encoder the scaled posterior mean, and
fp16 graphs need the float32 islands, so each would still need the wrappers above.
"""

from __future__ import annotations

import gc
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sun_edge import __version__
from sun_edge.bundle import Component, Manifest, bundle_writer, describe_files, open_bundle
from sun_edge.errors import SunEdgeError, first_line
from sun_edge.export import ExportOptions, ParityFn, modules, recipe
from sun_edge.export import onnx_graph as graphs
from sun_edge.export.recipe import Plan, example_inputs
from sun_edge.runtimes.pytorch import TorchRuntime

TARGET = "onnx"
STAGES = ("trace", "clean", "save", "check")


def plan(reference: TorchRuntime, options: ExportOptions) -> list[Plan]:
    """The components of a bundle for ``reference`` at ``options``' size and precision (one line each)."""
    recipe.require_adapter(reference)  # before any build is declared
    half = options.precision == "fp16"
    dtype = torch.float16 if half else torch.float32

    def fp(module: nn.Module) -> nn.Module:
        return modules.half_precision(module) if half else module

    sun, tiny, control = reference.sun_unet, reference.tiny_decoder, reference.controlnet_module
    builds: dict[str, Callable[[], nn.Module]] = {
        "text_encoder": lambda: modules.TextEncoderGraph(fp(reference.text_encoder)),
        "unet": lambda: modules.SUNUNetGraph(fp(sun), dtype),
        **({"unet_plain": lambda: modules.PlainUNetGraph(fp(sun), dtype)} if options.with_baseline else {}),
        "vae_decoder": lambda: modules.VAEDecoderGraph(reference.vae, torch.float32),
        "vae_encoder": lambda: modules.VAEEncoderGraph(reference.vae, torch.float32),
        **({"vae_decoder_tiny": lambda: modules.TinyDecoderGraph(fp(tiny), dtype)} if tiny is not None else {}),
        **({"controlnet": lambda: modules.ControlNetGraph(fp(control), dtype)} if control is not None else {}),
    }
    return recipe.plan_components(reference, options, builds, file=lambda name: f"{name}.onnx")


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's internal chatter (torchvision op registration, pytree deprecations)."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")  # one Dim shared by inputs
            yield
    finally:
        logger.setLevel(level)


def trace(graph: Plan, opset: int = graphs.OPSET, max_batch: int = 1) -> Any:
    """``torch.onnx.export`` (dynamo) of one component: an ``onnx_ir.Model``, not yet cleaned.

    A free batch dimension spans 1..``max_batch`` images (the CFG baseline UNet: 1..2x that, the pair)."""
    module = graph.build().eval()
    args = example_inputs(graph.inputs)
    dynamic = None
    if any(graphs.DYNAMIC in s.shape for s in graph.inputs):
        pair = graph.name in ("unet_plain", "controlnet")  # the CFG pair: 2 per image
        batch = torch.export.Dim("batch", min=1, max=(2 if pair else 1) * max_batch)
        dims = [{0: batch} if s.shape[0] == graphs.DYNAMIC else None for s in graph.inputs]
        dynamic = _as_signature(module, dims)
    with _quiet_exporter(), modules.fp32_softmax_attention(graph.precision == "fp16"), torch.no_grad():
        try:
            program = torch.onnx.export(module, args, input_names=[s.name for s in graph.inputs],
                                        output_names=[s.name for s in graph.outputs], opset_version=opset,
                                        dynamo=True, optimize=False, verbose=False, dynamic_shapes=dynamic)
        except Exception as e:  # the exporter raises many types; keep the first line and the cause
            first = first_line(e)
            raise SunEdgeError(f"torch.onnx could not export {graph.name}: {first}") from e
    model = program.model
    model.graph.name = graph.name
    model.producer_name, model.producer_version = "sun-edge", __version__
    model.metadata_props.update({"sun_edge.component": graph.name, "sun_edge.precision": graph.precision})
    return model


def _as_signature(module: nn.Module, per_input: list[Any]) -> tuple[Any, ...]:
    """Per-input dynamic shapes in the structure of ``module.forward``'s arguments: the UNet graphs take the
    ControlNet residuals as ``*residuals``, which torch.export sees as one tuple argument."""
    import inspect

    params = inspect.signature(module.forward).parameters.values()
    fixed = sum(p.kind is not inspect.Parameter.VAR_POSITIONAL for p in params)
    rest = per_input[fixed:]  # a graph without a ControlNet passes no residuals: no tuple argument at all
    return (*per_input[:fixed], tuple(rest)) if rest else tuple(per_input)


def convert(graph: Plan, directory: Path, *, external_data_bytes: int = graphs.EXTERNAL_DATA_BYTES,
            stage: Callable[[str], None] = lambda _: None, max_batch: int = 1) -> Component:
    """Trace, clean, save and check one component in ``directory``; its manifest entry."""
    stage("trace")
    model = trace(graph, max_batch=max_batch)
    stage("clean")
    graphs.clean(model)
    stage("save")
    files = graphs.save(model, directory / graph.file, external_data_bytes)
    del model
    gc.collect()  # the exported program and its copies of the weights sit in reference cycles: free them now
    stage("check")
    graphs.check_graph(directory / graph.file, graph.inputs, graph.outputs)
    sizes, hashes = describe_files(directory, files)
    return Component(graph.file, graph.inputs, graph.outputs, graph.precision, sizes, hashes)


def build_manifest(reference: TorchRuntime, options: ExportOptions, components: dict[str, Component], *,
                   model: dict[str, Any], adapter: dict[str, Any], tokenizer: dict[str, str],
                   parity: dict[str, Any] | None = None) -> Manifest:
    """Everything a runtime needs besides the graphs (DESIGN.md, "Contracts")."""
    return Manifest(
        target=TARGET, precision=options.precision, components=components, parity=dict(parity or {}),
        **recipe.common_manifest_fields(reference, options, model=model, adapter=adapter, tokenizer=tokenizer),
        extra={"opset": graphs.OPSET, "exporter": f"torch {torch.__version__} torch.onnx (dynamo)",
               "cleaner": f"onnxscript {_package_version('onnxscript')}"},
    )


def verify(directory: Path) -> None:
    """The bundle as a runtime will see it: manifest valid, files present, every graph's I/O as listed."""
    bundle = open_bundle(directory)
    for name, comp in bundle.manifest.components.items():
        inputs, outputs = graphs.graph_io(directory / comp.file)
        if (inputs, outputs) != (comp.inputs, comp.outputs):
            raise SunEdgeError(f"internal error: {comp.file} declares {graphs.describe(inputs + outputs)}, "
                               f"the manifest says {graphs.describe(comp.inputs + comp.outputs)}")


def export_bundle(reference: TorchRuntime, out: Path | str, options: ExportOptions = ExportOptions(), *,
                  model: dict[str, Any] | None = None, adapter: dict[str, Any] | None = None, force: bool = False,
                  parity: ParityFn | None = None, progress: bool = True,
                  external_data_bytes: int = graphs.EXTERNAL_DATA_BYTES) -> Path:
    """Write an ONNX bundle of ``reference`` (adapter fused) to ``out``, atomically.

    ``model``/``adapter`` are the manifest's entries (default: from ``reference.info``). The
    bundle is built in a temporary sibling directory; ``parity(reference, dir)`` runs on it
    once complete and its result goes into the manifest; then it is renamed to ``out``
    (replacing an existing one only with ``force``). A failure leaves no bundle behind.
    """
    options = options.sized(reference.native_size)
    options.validate()
    out = Path(out)
    plans = plan(reference, options)  # raises before anything is written if there is no adapter
    model, adapter = recipe.manifest_entries(reference, model, adapter)
    with bundle_writer(out, force) as tmp:
        components = recipe.run_stages(
            plans, lambda graph, stage: convert(graph, tmp, external_data_bytes=external_data_bytes, stage=stage,
                                                max_batch=options.max_batch),
            progress, stages=STAGES)
        tokenizer = recipe.write_tokenizer(tmp)
        manifest = build_manifest(reference, options, components, model=model, adapter=adapter, tokenizer=tokenizer)
        recipe.finish(tmp, manifest, reference, check=verify, parity=parity)
    return out


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
