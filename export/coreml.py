"""The Core ML target: ML Program ``.mlpackage`` resources for Apple silicon, named as Apple's
ml-stable-diffusion names them::

    bundle/
      TextEncoder.mlpackage   input_ids int32 [1,77] -> last_hidden_state [1,77,D]
      Unet.mlpackage          sample, timestep, encoder_hidden_states, negative_encoder_hidden_states
                              -> noise_pred (the SUN adapter fused in)
      VAEDecoder.mlpackage    latent_sample (the sampler's latents) -> sample (image in [-1, 1])
      VAEEncoder.mlpackage    sample (image in [-1, 1]) -> latent_sample (scaled posterior mean)
      vocab.json, merges.txt, manifest.json

One recipe per component (ml-stable-diffusion's): wrap the torch module so its graph has the
runtime protocol's semantics (``modules.py``, shared with the ONNX target), trace it with
``torch.export`` (for the UNet in the chosen attention form, checked against the original form
in PyTorch first), convert it with coremltools (FP16 compute precision, fixed shapes, the chosen
minimum deployment target), set its metadata, palettize its weights if asked, save it, check
that the saved package declares the I/O the manifest will list. Parity against the PyTorch
reference runs on the complete bundle (``coreml_parity``: Core ML on macOS, the NumPy MIL
evaluator elsewhere) and its figures go into the manifest.

Precision ``fp16`` (the default) makes the text encoder and the UNet float16 programs, the
adapter's norm ratio kept in float32 (``coreml_convert.FP32_OPS``). Both VAE programs stay
float32, as in the ONNX target: coremltools lowers GroupNorm to ``square(x - mean)`` in the
program's precision, which overflows float16 once activations pass 256 (the tiny test model's
decoder does, and falls to 6 dB), and the VAE runs once per image, not once per step.
Each component records its precision in the manifest.

Palettization (``--quantize-nbits``) applies to the UNet and the text encoder, as in
ml-stable-diffusion; the VAE keeps its weights. The manifest records each package's size
before and after.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from sun_edge.bundle import Component, Manifest, TensorSpec, bundle_writer, describe_files, open_bundle, write_manifest
from sun_edge import __version__
from sun_edge.errors import SunEdgeError
from sun_edge.export import ExportOptions, ParityFn, Precision, adapter_entry, model_entry, modules, refuse_tiny_decoder
from sun_edge.export import coreml_convert as cc
from sun_edge.export.coreml_attention import AttentionForm, attention_form, check_attention_form
from sun_edge.runtimes.coreml import Backend
from sun_edge.runtimes.pytorch import TorchRuntime

TARGET = "coreml"
RESOURCES = MappingProxyType({"text_encoder": "TextEncoder", "unet": "Unet", "vae_decoder": "VAEDecoder",
                              "vae_encoder": "VAEEncoder"})  # manifest key -> Apple's resource name
PALETTIZED = ("text_encoder", "unet")  # the VAE keeps its weights (ml-stable-diffusion does the same)
FP32_COMPONENTS = ("vae_decoder", "vae_encoder")  # float32 in fp16 bundles too (module docstring)
STAGES = ("trace", "convert", "save", "check")
EXAMPLE_PROMPT = "a photo of a cat"
ATTENTION_PARITY_DB = 80.0  # split-einsum vs original attention in float32 PyTorch: only rounding may differ


@dataclass(frozen=True)
class CoreMLOptions(ExportOptions):
    """Core ML export options; ``sun_edge.export.export`` passes them through to this target."""

    precision: Precision = "fp16"
    attention: AttentionForm = "original"  # "split-einsum" for the Neural Engine
    deployment_target: str = "macOS13"
    quantize_nbits: int | None = None
    quantize_granularity: cc.Granularity = "per-tensor"

    @property
    def compression(self) -> cc.Compression | None:
        return None if self.quantize_nbits is None else cc.Compression(self.quantize_nbits, self.quantize_granularity)

    def compute_precision(self, component: str) -> str:
        """The compute precision of ``component``'s program: ``precision``, but float32 for the VAE."""
        return "fp32" if component in FP32_COMPONENTS else self.precision

    def component_precision(self, component: str) -> str:
        """The manifest's precision: ``fp16``, ``fp32``, or ``fp16-pal6`` for a palettized component
        (parity thresholds follow it)."""
        palettized = self.quantize_nbits is not None and component in PALETTIZED
        base = self.compute_precision(component)
        return f"{base}-pal{self.quantize_nbits}" if palettized else base

    def validate(self) -> None:
        super().validate()
        check_attention_form(self.attention)
        cc.check_compression(self.compression, self.deployment_target)
        if self.with_baseline:
            raise SunEdgeError("the coreml target exports the SUN UNet only; drop --with-baseline "
                               "(the CFG baseline UNet is exported by the onnx target)")
        if self.compression is not None and self.precision != "fp16":
            raise SunEdgeError("--quantize-nbits palettizes float16 weights: use --precision fp16")

    @classmethod
    def of(cls, options: ExportOptions) -> CoreMLOptions:
        """``options`` as Core ML options (Core ML defaults for what a plain ``ExportOptions`` lacks)."""
        if isinstance(options, CoreMLOptions):
            return options
        return cls(precision=options.precision, height=options.height, width=options.width,
                   with_baseline=options.with_baseline)


@dataclass(frozen=True)
class ModelPlan:
    """One component to convert: what to trace and the I/O its package must declare."""

    name: str  # manifest key
    build: Callable[[], nn.Module]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str  # shown by Xcode, with one line per input and output
    io_text: dict[str, str]
    palettize: bool = False
    unet: nn.Module | None = None  # the diffusers UNet whose attention form is switched while tracing

    @property
    def file(self) -> str:
        return f"{RESOURCES[self.name]}.mlpackage"


def plan(reference: TorchRuntime, options: CoreMLOptions) -> list[ModelPlan]:
    """The four components of a Core ML bundle for ``reference`` at ``options``' size."""
    if reference.sun_unet is None:
        raise SunEdgeError("exports fuse a SUN adapter into the UNet, and this model has none: pass --adapter PATH")
    f32 = "float32"
    c, f, d, n = reference.latent_channels, reference.vae_scale_factor, reference.text_dim, reference.text_tokens
    h, w = options.height // f, options.width // f
    latents, image, emb = (1, c, h, w), (1, 3, options.height, options.width), (1, n, d)
    pal = options.compression is not None
    return [
        ModelPlan("text_encoder", lambda: modules.TextEncoderGraph(reference.text_encoder),
                  (TensorSpec("input_ids", "int32", (1, n)),), (TensorSpec("last_hidden_state", f32, emb),),
                  "CLIP text encoder: token ids to embeddings",
                  {"input_ids": "CLIP token ids (77, padded with the end token)", "last_hidden_state": "text embeddings"},
                  palettize=pal),
        ModelPlan("unet", lambda: modules.SUNUNetGraph(reference.sun_unet, torch.float32),
                  (TensorSpec("sample", f32, latents), TensorSpec("timestep", f32, (1,)),
                   TensorSpec("encoder_hidden_states", f32, emb), TensorSpec("negative_encoder_hidden_states", f32, emb)),
                  (TensorSpec("noise_pred", f32, latents),),
                  "SpeedUpNet UNet: the noise prediction of one guided step in one call (SUN adapter fused in)",
                  {"sample": "latents scaled for this timestep", "timestep": "diffusion timestep (0..999)",
                   "encoder_hidden_states": "prompt embeddings", "negative_encoder_hidden_states": "negative prompt embeddings",
                   "noise_pred": "predicted noise (epsilon)"},
                  palettize=pal, unet=reference.sun_unet.unet),
        ModelPlan("vae_decoder", lambda: modules.VAEDecoderGraph(reference.vae, torch.float32),
                  (TensorSpec("latent_sample", f32, latents),), (TensorSpec("sample", f32, image),),
                  "VAE decoder: latents (1/scaling_factor applied inside) to an image in [-1, 1]",
                  {"latent_sample": "latents as the sampler returns them", "sample": "image in [-1, 1], channels first"}),
        ModelPlan("vae_encoder", lambda: modules.VAEEncoderGraph(reference.vae, torch.float32),
                  (TensorSpec("sample", f32, image),), (TensorSpec("latent_sample", f32, latents),),
                  "VAE encoder: an image in [-1, 1] to scaled latents (the posterior mean)",
                  {"sample": "image in [-1, 1], channels first", "latent_sample": "latents times scaling_factor"}),
    ]


def example_inputs(specs: tuple[TensorSpec, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Realistic tracing inputs: tokenized text (int64, as torch models take it), unit noise, t=999."""
    from sun_edge.tokenizer import CLIPTokenizer

    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        if spec.dtype.startswith("int"):
            out.append(torch.from_numpy(CLIPTokenizer.default().encode(EXAMPLE_PROMPT, max_length=spec.shape[-1])))
        elif spec.name == "timestep":
            out.append(torch.full(spec.shape, 999.0))
        else:
            out.append(torch.randn(spec.shape, generator=gen))
    return tuple(out)


def check_attention_parity(module: nn.Module, unet: nn.Module, form: AttentionForm,
                           args: tuple[torch.Tensor, ...]) -> float:
    """PSNR (dB) of ``module`` in ``form`` against the original attention on ``args``; raises below 80 dB."""
    from sun_edge.parity import psnr

    with torch.no_grad():
        want = module(*args).numpy()
        with attention_form(unet, form):
            got = module(*args).numpy()
    db = psnr(want, got)
    if not db >= ATTENTION_PARITY_DB:
        raise SunEdgeError(f"{form} attention differs from the original in PyTorch ({db:.1f} dB < {ATTENTION_PARITY_DB:g} dB); "
                           "not converting it")
    return db


def convert_component(graph: ModelPlan, options: CoreMLOptions, directory: Path,
                      stage: Callable[[str], None] = lambda _: None) -> tuple[Component, dict[str, int]]:
    """Wrap, trace, convert, set metadata, palettize, save and check one component in ``directory``.

    Returns its manifest entry and its package size before and after palettization (bytes).
    """
    from sun_edge.runtimes.coreml import spec_io

    stage("trace")
    module = graph.build().eval()
    args = example_inputs(graph.inputs)
    form = options.attention if graph.unet is not None else "original"
    if form != "original":
        check_attention_parity(module, graph.unet, form, args)
    with attention_form(graph.unet, form) if graph.unet is not None else nullcontext():
        program = cc.trace(module, args)
    stage("convert")
    model = cc.convert(program, graph.inputs, graph.outputs, precision=options.compute_precision(graph.name),
                       deployment_target=options.deployment_target)
    del program
    user = {"sun_edge.component": graph.name, "sun_edge.attention": form,
            "sun_edge.precision": options.component_precision(graph.name)}
    cc.set_metadata(model, description=graph.description, inputs={s.name: graph.io_text[s.name] for s in graph.inputs},
                    outputs={s.name: graph.io_text[s.name] for s in graph.outputs}, user=user)
    path = directory / graph.file
    before = None
    if graph.palettize and options.compression is not None:
        stage("palettize")
        staging = directory / f".unpalettized-{graph.file}"
        model.save(str(staging))  # saved as it would be without palettization, to measure it
        before = cc.package_bytes(staging)
        shutil.rmtree(staging)
        model = cc.palettize(model, options.compression)
    stage("save")
    model.save(str(path))
    del model
    after = cc.package_bytes(path)
    sizes = {"before": after if before is None else before, "after": after}
    stage("check")
    with cc.quiet_coremltools() as ct:
        inputs, outputs = spec_io(ct.models.MLModel(str(path), skip_model_load=True).get_spec())
    if (inputs, outputs) != (graph.inputs, graph.outputs):
        raise SunEdgeError(f"internal error: {graph.file} declares {inputs + outputs}, expected {graph.inputs + graph.outputs}")
    files, hashes = describe_files(directory, cc.package_files(directory, graph.file))
    return Component(graph.file, graph.inputs, graph.outputs, options.component_precision(graph.name), files, hashes), sizes


def build_manifest(reference: TorchRuntime, options: CoreMLOptions, components: dict[str, Component],
                   sizes: dict[str, dict[str, int]], *, model: dict[str, Any], adapter: dict[str, Any],
                   tokenizer: dict[str, str]) -> Manifest:
    """Everything a runtime needs besides the packages (DESIGN.md, "Contracts")."""
    from sun_edge.pipeline import Settings

    ct = cc.import_coremltools()
    sun, base = Settings(), Settings.baseline()
    f = reference.vae_scale_factor
    compression = options.compression
    extra: dict[str, Any] = {
        "deployment_target": options.deployment_target, "attention": options.attention,
        "compute_precision": {name: "float16 (reduce_l2_norm in float32)" if options.compute_precision(name) == "fp16"
                              else "float32" for name in components},
        "converter": f"coremltools {ct.__version__} from torch {torch.__version__} (torch.export)",
        "resources": {name: c.file for name, c in components.items()},
        "bytes": sizes, "compression": None,
    }
    if compression is not None:
        extra["compression"] = {"method": "palettization", "mode": "kmeans", "nbits": compression.nbits,
                                "granularity": compression.granularity, "weight_threshold": cc.WEIGHT_THRESHOLD,
                                "components": [c for c in PALETTIZED if c in components],
                                **({"group_size": compression.group_size}
                                   if compression.granularity == "per-grouped-channel" else {})}
    return Manifest(
        target=TARGET, precision=options.component_precision("unet"),
        image={"height": options.height, "width": options.width},
        latent={"channels": reference.latent_channels, "height": options.height // f, "width": options.width // f,
                "scaling_factor": reference.scaling_factor},
        text={"tokens": reference.text_tokens, "dim": reference.text_dim},
        components=components, model=model, adapter=adapter,
        scheduler={"name": sun.scheduler, "spacing": sun.spacing, "steps": sun.steps},
        baseline={"name": base.scheduler, "spacing": base.spacing, "steps": base.steps, "guidance": base.guidance},
        tokenizer=tokenizer, sun_edge_version=__version__, extra=extra)


def export_bundle(reference: TorchRuntime, out: Path | str, options: ExportOptions = CoreMLOptions(), *,
                  model: dict[str, Any] | None = None, adapter: dict[str, Any] | None = None, force: bool = False,
                  parity: ParityFn | None = None, progress: bool = True) -> Path:
    """Write a Core ML bundle of ``reference`` (adapter fused) to ``out``, atomically.

    ``options`` may be ``CoreMLOptions`` (attention form, deployment target, palettization) or a
    plain ``ExportOptions``. The bundle is built in a temporary sibling directory;
    ``parity(reference, dir)`` (e.g. ``coreml_parity``) runs on it once complete and its result
    goes into the manifest; then it is renamed to ``out``. A failure leaves no bundle behind.
    """
    from sun_edge.tokenizer import MERGES_FILE, VOCAB_FILE, write_tokenizer_files

    options = CoreMLOptions.of(options).sized(reference.native_size)
    options.validate()  # before anything is loaded or written
    refuse_tiny_decoder(reference, TARGET)
    plans = plan(reference, options)
    model = model if model is not None else model_entry(reference)
    adapter = adapter if adapter is not None else adapter_entry(reference)
    with bundle_writer(Path(out), force) as tmp:
        components: dict[str, Component] = {}
        sizes: dict[str, dict[str, int]] = {}
        for graph in plans:
            stages = STAGES[:2] + (("palettize",) if graph.palettize else ()) + STAGES[2:]
            with tqdm(total=len(stages), desc=RESOURCES[graph.name], unit="stage", file=sys.stderr,
                      disable=not progress, leave=True) as bar:
                def stage(name: str, bar: tqdm = bar) -> None:
                    bar.set_postfix_str(name)
                    bar.update(0 if name == stages[0] else 1)

                components[graph.name], sizes[graph.name] = convert_component(graph, options, tmp, stage)
                bar.update(1)
        write_tokenizer_files(tmp)
        manifest = build_manifest(reference, options, components, sizes, model=model, adapter=adapter,
                                  tokenizer={"vocab": VOCAB_FILE, "merges": MERGES_FILE})
        write_manifest(tmp, manifest)
        open_bundle(tmp)  # the bundle as a runtime will see it
        if parity is not None:
            write_manifest(tmp, replace(manifest, parity=dict(parity(reference, tmp))))
    return Path(out)


def coreml_parity(reference: Any, bundle_dir: Path, *, seeds: tuple[int, ...] = (0,), backend: Backend = "auto",
                  compute_units: str = "all") -> dict[str, Any]:
    """A ``ParityFn``: the bundle (Core ML on macOS, the NumPy MIL evaluator elsewhere) against ``reference``.

    Figures for the manifest's ``parity``; raises SunEdgeError if a component is below its threshold.
    """
    from sun_edge.parity import check_report, compare_runtimes
    from sun_edge.pipeline import Settings
    from sun_edge.runtimes.coreml import CoreMLRuntime

    bundle = open_bundle(bundle_dir)
    manifest = bundle.manifest
    candidate = CoreMLRuntime(bundle, compute_units, backend)
    report = compare_runtimes(reference, candidate, precision=manifest.precision, seeds=seeds,
                              settings=Settings.from_manifest(manifest), target=TARGET,
                              precisions={name: c.precision for name, c in manifest.components.items()},
                              tokenizer=candidate.tokenizer())
    check_report(report)
    return report.to_dict()

