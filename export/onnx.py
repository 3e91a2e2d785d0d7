"""The ONNX target: a bundle of opset-18 ONNX graphs for ONNX Runtime (and TensorRT's ONNX parser).

One recipe per component (Apple ml-stable-diffusion's): wrap the torch module so its graph has
the runtime protocol's semantics (``modules.py``), trace it at static shapes with
``torch.onnx.export(dynamo=True)``, clean it with the onnxscript optimizer (``onnx_graph.py``
says why that tool), set metadata, save it (one ``<file>.data`` beside graphs over 2 GB), check
it (``onnx.checker`` and its I/O against what the manifest will say). Components:

- ``text_encoder``: ``input_ids`` int64 [1,77] -> ``last_hidden_state`` [1,77,D];
- ``unet``: the SUN UNet, adapter fused: ``sample`` [1,4,h,w], ``timestep`` [1],
  ``encoder_hidden_states`` and ``negative_encoder_hidden_states`` [1,77,D] -> ``noise_pred``;
- ``unet_plain`` (``with_baseline``): the UNet without the adapter, batch 1 or 2 (CFG);
- ``vae_decoder``: ``latent_sample`` (the sampler's latents) -> ``sample`` in [-1, 1];
- ``vae_encoder``: ``sample`` (image in [-1, 1]) -> ``latent_sample`` (scaled posterior mean);
- ``vae_decoder_tiny`` (when the reference has a TAESD decoder, ``--vae-decoder tiny:PATH``):
  ``latents`` (the sampler's, as they are) -> ``image`` in [-1, 1].

Precision ``fp16``: the text encoder and the UNets are float16 with float32 islands written as
explicit casts (``modules.py``: softmax, GroupNorm/LayerNorm, the adapter's norm ratio, the
timestep sinusoids); graph inputs and outputs stay float32. Both VAE graphs stay float32: SD1.5's
VAE decoder overflows float16 at full resolution, and each component records its own precision.
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
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from sun_edge.bundle import Component, Manifest, TensorSpec, bundle_writer, describe_files, open_bundle, write_manifest
from sun_edge import __version__
from sun_edge.errors import SunEdgeError, first_line
from sun_edge.export import ExportOptions, ParityFn, adapter_entry, model_entry, tiny_decoder_entry
from sun_edge.export import modules
from sun_edge.export import onnx_graph as graphs
from sun_edge.runtimes.pytorch import TorchRuntime

TARGET = "onnx"
STAGES = ("trace", "clean", "save", "check")
EXAMPLE_PROMPT = "a photo of a cat"


@dataclass(frozen=True)
class GraphPlan:
    """One component to export: what to trace and the I/O its graph must declare."""

    name: str
    build: Callable[[], nn.Module]  # made when the component is exported (fp16 copies live only that long)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str
    half: bool = False  # trace with the fp32-softmax attention

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


def plan(reference: TorchRuntime, options: ExportOptions) -> list[GraphPlan]:
    """The components of a bundle for ``reference`` at ``options``' size and precision."""
    if reference.sun_unet is None:
        raise SunEdgeError("exports fuse a SUN adapter into the UNet, and this model has none: pass --adapter PATH")
    f32, half = "float32", options.precision == "fp16"
    dtype = torch.float16 if half else torch.float32
    c, f, d, n = reference.latent_channels, reference.vae_scale_factor, reference.text_dim, reference.text_tokens
    h, w, H, W = options.height // f, options.width // f, options.height, options.width
    latents, image, emb = (1, c, h, w), (1, 3, H, W), (1, n, d)
    unet_precision = options.precision

    def fp(module: nn.Module) -> nn.Module:
        return modules.half_precision(module) if half else module

    plans = [
        GraphPlan("text_encoder", lambda: modules.TextEncoderGraph(fp(reference.text_encoder)),
                  (TensorSpec("input_ids", "int64", (1, n)),), (TensorSpec("last_hidden_state", f32, emb),),
                  unet_precision, half),
        GraphPlan("unet", lambda: modules.SUNUNetGraph(fp(reference.sun_unet), dtype),
                  (TensorSpec("sample", f32, latents), TensorSpec("timestep", f32, (1,)),
                   TensorSpec("encoder_hidden_states", f32, emb), TensorSpec("negative_encoder_hidden_states", f32, emb)),
                  (TensorSpec("noise_pred", f32, latents),), unet_precision, half),
    ]
    if options.with_baseline:
        batch = (graphs.DYNAMIC, *latents[1:])
        plans.append(GraphPlan("unet_plain", lambda: modules.PlainUNetGraph(fp(reference.sun_unet), dtype),
                               (TensorSpec("sample", f32, batch), TensorSpec("timestep", f32, (1,)),
                                TensorSpec("encoder_hidden_states", f32, (graphs.DYNAMIC, n, d))),
                               (TensorSpec("noise_pred", f32, batch),), unet_precision, half))
    plans += [
        GraphPlan("vae_decoder", lambda: modules.VAEDecoderGraph(reference.vae, torch.float32),
                  (TensorSpec("latent_sample", f32, latents),), (TensorSpec("sample", f32, image),), "fp32"),
        GraphPlan("vae_encoder", lambda: modules.VAEEncoderGraph(reference.vae, torch.float32),
                  (TensorSpec("sample", f32, image),), (TensorSpec("latent_sample", f32, latents),), "fp32"),
    ]
    if reference.tiny_decoder is not None:
        tiny = reference.tiny_decoder
        plans.append(GraphPlan("vae_decoder_tiny", lambda: modules.TinyDecoderGraph(fp(tiny), dtype),
                               (TensorSpec("latents", f32, latents),), (TensorSpec("image", f32, image),),
                               options.precision))
    return plans


def example_inputs(specs: tuple[TensorSpec, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Realistic tracing inputs: tokenized text, unit noise, t=999; free batch dimensions get 2."""
    from sun_edge.tokenizer import CLIPTokenizer

    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in specs:
        shape = tuple(2 if s == graphs.DYNAMIC else s for s in spec.shape)
        if spec.dtype == "int64":
            ids = torch.from_numpy(CLIPTokenizer.default().encode(EXAMPLE_PROMPT, max_length=shape[-1]))
            tensors.append(ids.expand(*shape).contiguous())
        elif spec.name == "timestep":
            tensors.append(torch.full(shape, 999.0))
        else:
            tensors.append(torch.randn(shape, generator=gen))
    return tuple(tensors)


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


def trace(graph: GraphPlan, opset: int = graphs.OPSET) -> Any:
    """``torch.onnx.export`` (dynamo) of one component: an ``onnx_ir.Model``, not yet cleaned."""
    module = graph.build().eval()
    args = example_inputs(graph.inputs)
    dynamic = None
    if any(graphs.DYNAMIC in s.shape for s in graph.inputs):
        batch = torch.export.Dim("batch", min=1, max=2)
        dynamic = {s.name: ({0: batch} if s.shape[0] == graphs.DYNAMIC else None) for s in graph.inputs}
    with _quiet_exporter(), modules.fp32_softmax_attention(graph.half), torch.no_grad():
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


def convert(graph: GraphPlan, directory: Path, *, external_data_bytes: int = graphs.EXTERNAL_DATA_BYTES,
            stage: Callable[[str], None] = lambda _: None) -> Component:
    """Trace, clean, save and check one component in ``directory``; its manifest entry."""
    stage("trace")
    model = trace(graph)
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
    from sun_edge.pipeline import Settings

    sun, base = Settings(), Settings.baseline()
    f = reference.vae_scale_factor
    return Manifest(
        target=TARGET, precision=options.precision,
        image={"height": options.height, "width": options.width},
        latent={"channels": reference.latent_channels, "height": options.height // f, "width": options.width // f,
                "scaling_factor": reference.scaling_factor},
        text={"tokens": reference.text_tokens, "dim": reference.text_dim},
        components=components, model=model, adapter=adapter,
        scheduler={"name": sun.scheduler, "spacing": sun.spacing, "steps": sun.steps},
        baseline={"name": base.scheduler, "spacing": base.spacing, "steps": base.steps, "guidance": base.guidance},
        tokenizer=tokenizer, sun_edge_version=__version__, parity=dict(parity or {}),
        vae_decoder_tiny=tiny_decoder_entry(reference),
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
    from sun_edge.tokenizer import MERGES_FILE, VOCAB_FILE, write_tokenizer_files

    options = options.sized(reference.native_size)
    options.validate()
    out = Path(out)
    plans = plan(reference, options)  # raises before anything is written if there is no adapter
    model = model if model is not None else model_entry(reference)
    adapter = adapter if adapter is not None else adapter_entry(reference)
    with bundle_writer(out, force) as tmp:
        components: dict[str, Component] = {}
        for graph in plans:
            with tqdm(total=len(STAGES), desc=graph.name, unit="stage", file=sys.stderr, disable=not progress,
                      leave=True) as bar:
                def stage(name: str, bar: tqdm = bar) -> None:
                    bar.set_postfix_str(name)
                    bar.update(0 if name == STAGES[0] else 1)

                components[graph.name] = convert(graph, tmp, external_data_bytes=external_data_bytes, stage=stage)
                bar.update(1)
        write_tokenizer_files(tmp)
        tokenizer = {"vocab": VOCAB_FILE, "merges": MERGES_FILE}
        manifest = build_manifest(reference, options, components, model=model, adapter=adapter, tokenizer=tokenizer)
        write_manifest(tmp, manifest)
        verify(tmp)
        if parity is not None:
            write_manifest(tmp, replace(manifest, parity=dict(parity(reference, tmp))))
    return out



def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
