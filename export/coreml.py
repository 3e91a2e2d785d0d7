"""The Core ML target: ML Program ``.mlpackage`` resources for Apple silicon, named as Apple's
ml-stable-diffusion names them::

    bundle/
      TextEncoder.mlpackage   input_ids int32 [1,77] -> last_hidden_state [1,77,D]
      Unet.mlpackage          sample, timestep, encoder_hidden_states, negative_encoder_hidden_states
                              -> noise_pred (the SUN adapter fused in)
      VAEDecoder.mlpackage    latent_sample (the sampler's latents) -> sample (image in [-1, 1])
      VAEEncoder.mlpackage    sample (image in [-1, 1]) -> latent_sample, latent_std (scaled posterior mean, std)
      vocab.json, merges.txt, manifest.json

Exported with a ControlNet (``--controlnet FILE``), the UNet package is ``ControlledUnet.mlpackage``
with the residual inputs ``down_block_res_0..11`` and ``mid_block_res`` after the embeddings, and the
ControlNet is ``controlnet/<Name>.mlpackage`` (``Name`` from its file name): ml-stable-diffusion's
resource layout. Its I/O keeps the component table's names (every target's bundle feeds the same
names), not Apple's ``additional_residual_N``: a SUN UNet takes the negative prompt as its own input, so
Apple's pipeline cannot drive it anyway. Core ML bundles run SUN only (no CFG baseline), so the
ControlNet program is batch 1, where the ONNX graph takes the CFG pair's 2 as well.

The shared recipe (``recipe.py``: plans from the component table, example inputs, the stage
loop, the common manifest fields) with this target's steps (ml-stable-diffusion's): wrap the
torch module so its graph has the runtime protocol's semantics (``modules.py``, shared with the
ONNX target), trace it with
``torch.export`` (for the UNet in the chosen attention form, checked against the original form
in PyTorch first), convert it with coremltools (FP16 compute precision, fixed shapes, the chosen
minimum deployment target), set its metadata, palettize its weights if asked, save it, check
that the saved package declares the I/O the manifest will list. Parity against the PyTorch
reference runs on the complete bundle (``coreml_parity``: Core ML on macOS, the NumPy MIL
evaluator elsewhere) and its figures go into the manifest.

Precision ``fp16`` (the default) makes the text encoder and the UNet float16 programs, the
adapter's norm ratio kept in float32 (``coreml_convert.FP32_OPS``). Both VAE programs stay
float32 (their table policy), as in the ONNX target: coremltools lowers GroupNorm to ``square(x - mean)`` in the
program's precision, which overflows float16 once activations pass 256 (the tiny test model's
decoder does, and falls to 6 dB), and the VAE runs once per image, not once per step.
Each component records its precision in the manifest.

Palettization (``--quantize-nbits``) applies to the UNet and the text encoder, as in
ml-stable-diffusion; the VAE keeps its weights. The manifest records each package's size
before and after.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from sun_edge.bundle import Component, Manifest, TensorSpec, bundle_writer, describe_files, open_bundle
from sun_edge.components import COMPONENTS, FREE
from sun_edge.errors import SunEdgeError
from sun_edge.export import ExportOptions, ParityFn, Precision, modules, recipe, refuse_tiny_decoder
from sun_edge.export import coreml_convert as cc
from sun_edge.export.coreml_attention import AttentionForm, attention_form, check_attention_form
from sun_edge.export.recipe import Plan, example_inputs
from sun_edge.runtimes.coreml import Backend
from sun_edge.runtimes.pytorch import TorchRuntime

TARGET = "coreml"


@dataclass(frozen=True)
class Package:
    """What a Core ML package says of its component: Apple's resource name and Xcode's texts."""

    resource: str  # ml-stable-diffusion's name: <resource>.mlpackage
    description: str  # shown by Xcode, with one line per input and output
    io_text: dict[str, str]


PACKAGES = MappingProxyType({
    "text_encoder": Package("TextEncoder", "CLIP text encoder: token ids to embeddings",
                            {"input_ids": "CLIP token ids (77, padded with the end token)",
                             "last_hidden_state": "text embeddings"}),
    "unet": Package("Unet", "SpeedUpNet UNet: the noise prediction of one guided step in one call (SUN adapter fused in)",
                    {"sample": "latents scaled for this timestep", "timestep": "diffusion timestep (0..999)",
                     "encoder_hidden_states": "prompt embeddings",
                     "negative_encoder_hidden_states": "negative prompt embeddings",
                     "noise_pred": "predicted noise (epsilon)"}),
    "vae_decoder": Package("VAEDecoder", "VAE decoder: latents (1/scaling_factor applied inside) to an image in [-1, 1]",
                           {"latent_sample": "latents as the sampler returns them",
                            "sample": "image in [-1, 1], channels first"}),
    "vae_encoder": Package("VAEEncoder", "VAE encoder: an image in [-1, 1] to the scaled posterior's mean and std",
                           {"sample": "image in [-1, 1], channels first",
                            "latent_sample": "posterior mean times scaling_factor",
                            "latent_std": "posterior standard deviation times scaling_factor"}),
    "controlnet": Package("controlnet", "ControlNet: the UNet's residuals for a condition image (SUN reads both "
                          "prompts, as [positive; negative])",
                          {"sample": "latents scaled for this timestep", "timestep": "diffusion timestep (0..999)",
                           "encoder_hidden_states": "prompt embeddings",
                           "negative_encoder_hidden_states": "negative prompt embeddings",
                           "controlnet_cond": "condition image in [0, 1], channels first",
                           "conditioning_scale": "ControlNet strength (multiplies every residual)"}),
})
RESOURCES = MappingProxyType({name: p.resource for name, p in PACKAGES.items()})  # manifest key -> Apple's name
CONTROLLED_UNET = "ControlledUnet"  # the UNet package of a bundle with a ControlNet (ml-stable-diffusion's name)
RESIDUAL_TEXT = {"down_block_res": "ControlNet residual added to down-block output {i}",
                 "mid_block_res": "ControlNet residual added to the mid-block output"}
PALETTIZED = ("text_encoder", "unet", "controlnet")  # the VAE keeps its weights (ml-stable-diffusion does the same)
INPUT_DTYPES = MappingProxyType({"text_encoder": {"input_ids": "int32"}})  # Core ML programs take int32 ids
STAGES = ("trace", "convert", "save", "check")
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
        """The compute precision of ``component``'s program: ``precision``, but float32 for the VAE (its policy)."""
        return COMPONENTS[component].precision(self.precision)

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
        if self.max_batch != 1:
            raise SunEdgeError("Core ML bundles are batch 1 (their programs have fixed shapes; enumerated batch "
                               "shapes would multiply the conversion); drop --max-batch")
        if self.compression is not None and self.precision != "fp16":
            raise SunEdgeError("--quantize-nbits palettizes float16 weights: use --precision fp16")

    @classmethod
    def of(cls, options: ExportOptions) -> CoreMLOptions:
        """``options`` as Core ML options (Core ML defaults for what a plain ``ExportOptions`` lacks)."""
        if isinstance(options, CoreMLOptions):
            return options
        return cls(precision=options.precision, height=options.height, width=options.width,
                   with_baseline=options.with_baseline, max_batch=options.max_batch)


def plan(reference: TorchRuntime, options: CoreMLOptions) -> list[Plan]:
    """The components of a Core ML bundle for ``reference`` at ``options``' size (one line each): four, and
    the ControlNet when ``reference`` has one."""
    recipe.require_adapter(reference)  # before any build is declared
    sun, control = reference.sun_unet, reference.controlnet_module
    builds: dict[str, Callable[[], nn.Module]] = {
        "text_encoder": lambda: modules.TextEncoderGraph(reference.text_encoder),
        "unet": lambda: modules.SUNUNetGraph(sun, torch.float32),
        "vae_decoder": lambda: modules.VAEDecoderGraph(reference.vae, torch.float32),
        "vae_encoder": lambda: modules.VAEEncoderGraph(reference.vae, torch.float32),
        **({"controlnet": lambda: modules.ControlNetGraph(control, torch.float32)} if control is not None else {}),
    }
    pal = options.compression is not None
    switched = {"unet": sun.unet, "controlnet": control}  # the modules whose attention form is switched
    extra = {name: {"description": PACKAGES[name].description, "io_text": PACKAGES[name].io_text,
                    "palettize": pal and name in PALETTIZED, "unet": switched.get(name)}
             for name in builds}
    names = resources(reference)
    plans = recipe.plan_components(reference, options, builds, file=lambda name: f"{names[name]}.mlpackage",
                                   precision=options.component_precision, input_dtypes=INPUT_DTYPES, extra=extra)
    return [batch_one(graph) if graph.name == "controlnet" else graph for graph in plans]


def resources(reference: TorchRuntime) -> dict[str, str]:
    """Each component's package name (without ``.mlpackage``) in a bundle of ``reference``: Apple's names, with
    ``ControlledUnet`` and ``controlnet/<Name>`` when it has a ControlNet."""
    names = dict(RESOURCES)
    if reference.controlnet_module is not None:
        names["unet"] = CONTROLLED_UNET
        names["controlnet"] = f"{RESOURCES['controlnet']}/{controlnet_name(str(reference.info.get('controlnet') or ''))}"
    return names


def controlnet_name(file_name: str) -> str:
    """A ControlNet's package name from its file or folder name: ``control_v11p_sd15_canny.safetensors`` ->
    ``ControlV11pSd15Canny`` (letters and digits only, as Apple's Swift pipeline names its ControlNets)."""
    stem = Path(file_name).name.removesuffix(".safetensors").removesuffix(".ckpt").removesuffix(".pth")
    words = [w for w in re.split(r"[^A-Za-z0-9]+", stem) if w]
    return "".join(w[:1].upper() + w[1:] for w in words) or "ControlNet"


def batch_one(graph: Plan) -> Plan:
    """``graph`` with its free batch dimensions fixed to 1: Core ML programs here have fixed shapes, and a
    Core ML bundle runs SUN only, one image per call."""
    def fixed(specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        return tuple(replace(s, shape=tuple(1 if d == FREE else d for d in s.shape)) for s in specs)
    return replace(graph, inputs=fixed(graph.inputs), outputs=fixed(graph.outputs))


def stages(graph: Plan) -> tuple[str, ...]:
    """The stages ``convert_component`` goes through for ``graph``."""
    return STAGES[:2] + (("palettize",) if graph.extra["palettize"] else ()) + STAGES[2:]


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


def convert_component(graph: Plan, options: CoreMLOptions, directory: Path,
                      stage: Callable[[str], None] = lambda _: None) -> tuple[Component, dict[str, int]]:
    """Wrap, trace, convert, set metadata, palettize, save and check one component in ``directory``.

    Returns its manifest entry and its package size before and after palettization (bytes).
    """
    from sun_edge.runtimes.coreml import spec_io

    stage("trace")
    module = graph.build().eval()
    args = example_inputs(graph.inputs)
    unet = graph.extra["unet"]
    form = options.attention if unet is not None else "original"
    if form != "original":
        check_attention_parity(module, unet, form, args)
    with attention_form(unet, form) if unet is not None else nullcontext():
        program = cc.trace(module, args)
    stage("convert")
    model = cc.convert(program, graph.inputs, graph.outputs, precision=options.compute_precision(graph.name),
                       deployment_target=options.deployment_target)
    del program
    user = {"sun_edge.component": graph.name, "sun_edge.attention": form,
            "sun_edge.precision": graph.precision}
    cc.set_metadata(model, description=graph.extra["description"],
                    inputs={s.name: io_text(graph, s.name) for s in graph.inputs},
                    outputs={s.name: io_text(graph, s.name) for s in graph.outputs}, user=user)
    path = directory / graph.file
    path.parent.mkdir(parents=True, exist_ok=True)  # controlnet/<Name>.mlpackage
    before = None
    if graph.extra["palettize"] and options.compression is not None:
        stage("palettize")
        staging = path.with_name(f".unpalettized-{path.name}")
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
    return Component(graph.file, graph.inputs, graph.outputs, graph.precision, files, hashes), sizes


def io_text(graph: Plan, name: str) -> str:
    """Xcode's text for one input or output of ``graph``: its package's, or a ControlNet residual's."""
    text = graph.extra["io_text"]
    if name in text:
        return text[name]
    head, _, index = name.rpartition("_")
    if head == "down_block_res" and index.isdigit():
        return RESIDUAL_TEXT[head].format(i=index)
    return RESIDUAL_TEXT[name]


def build_manifest(reference: TorchRuntime, options: CoreMLOptions, components: dict[str, Component],
                   sizes: dict[str, dict[str, int]], *, model: dict[str, Any], adapter: dict[str, Any],
                   tokenizer: dict[str, str]) -> Manifest:
    """Everything a runtime needs besides the packages (DESIGN.md, "Contracts")."""
    ct = cc.import_coremltools()
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
    return Manifest(target=TARGET, precision=options.component_precision("unet"), components=components, extra=extra,
                    **recipe.common_manifest_fields(reference, options, model=model, adapter=adapter, tokenizer=tokenizer))


def export_bundle(reference: TorchRuntime, out: Path | str, options: ExportOptions = CoreMLOptions(), *,
                  model: dict[str, Any] | None = None, adapter: dict[str, Any] | None = None, force: bool = False,
                  parity: ParityFn | None = None, progress: bool = True) -> Path:
    """Write a Core ML bundle of ``reference`` (adapter fused) to ``out``, atomically.

    ``options`` may be ``CoreMLOptions`` (attention form, deployment target, palettization) or a
    plain ``ExportOptions``. The bundle is built in a temporary sibling directory;
    ``parity(reference, dir)`` (e.g. ``coreml_parity``) runs on it once complete and its result
    goes into the manifest; then it is renamed to ``out``. A failure leaves no bundle behind.
    """
    options = CoreMLOptions.of(options).sized(reference.native_size)
    options.validate()  # before anything is loaded or written
    refuse_tiny_decoder(reference, TARGET)
    plans = plan(reference, options)
    model, adapter = recipe.manifest_entries(reference, model, adapter)
    with bundle_writer(Path(out), force) as tmp:
        results = recipe.run_stages(plans, lambda graph, stage: convert_component(graph, options, tmp, stage), progress,
                                    stages=stages, label=lambda graph: graph.file.removesuffix(".mlpackage"))
        components = {name: entry for name, (entry, _) in results.items()}
        sizes = {name: size for name, (_, size) in results.items()}
        manifest = build_manifest(reference, options, components, sizes, model=model, adapter=adapter,
                                  tokenizer=recipe.write_tokenizer(tmp))
        recipe.finish(tmp, manifest, reference, check=open_bundle, parity=parity)  # the bundle as a runtime sees it
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

