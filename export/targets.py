"""The export targets registry: everything sun-edge knows about a target, in its entry.

A ``Target`` names the module that exports it, the runtime that runs its bundles (and the one
parity checks them with on this platform), its default precision, its own options (declared as
data: the CLI turns them into an argument group, a server or script passes them as keywords),
what it can carry (the CFG baseline UNet, TAESD), and its parity thresholds per precision.
``cli.py``, parity and the bundle dispatch read this table and never name a target.

Adding a target: a module with ``export_bundle`` (``sun_edge.export``'s docstring), a runtime
in ``sun_edge.runtimes.RUNTIMES`` that runs its bundles, and one entry here.

NumPy-free and torch-free: parity and the CLI import it to read thresholds and options.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any

from sun_edge.errors import SunEdgeError


@dataclass(frozen=True)
class Thresholds:
    """Minimum PSNR (dB) per parity row (the components of ``sun_edge.components`` and the whole image).

    fp32 graphs differ from PyTorch only in the order of float32 operations (the tiny model's
    ONNX fp32 export measures 127-140 dB), so fp32 floors only have to catch graph bugs; fp16
    floors allow for fp16's 11-bit mantissa accumulated through a network (its fp16 export
    measures 69-72 dB). Images are in [-1, 1]: 30 dB is an rms error of 4 8-bit levels, 35 dB
    2.3, 40 dB 1.3, 45 dB 0.7 (below one level).
    """

    text_encoder: float  # held tighter than the UNet: its error reaches every step; and CLIP's outlier
    #                      channels (|h| ~ 30 against ~1 elsewhere in SD1.5) make the peak, inflating PSNR
    unet: float  # the figures; unet_plain the same
    unet_plain: float
    vae_decoder: float  # one stage of the image: stricter than the image's own floor
    vae_encoder: float  # img2img only; scaled latents, peak ~4 against unit variance, like the UNet's eps
    vae_decoder_tiny: float  # TAESD on both sides (not TAESD against the full VAE): as the VAE decoder
    image: float  # the 4-step chain end to end: the 30 dB at fp16, 40 dB (1.3 levels) at fp32
    # ControlNet: its residuals (a UNet-sized encoder, measured as the UNet is), and a whole ControlNet image
    # (the 4-step chain with the ControlNet's residuals in every step). Defaults: the fp32 floors.
    controlnet: float = 40.0
    image_controlnet: float = 40.0
    # img2img (strength 0.5 from the reference's own image) and inpainting (its right half repainted by blending;
    # an inpainting UNet: with its mask and masked-image inputs): the chain with the VAE encoder in front, held
    # as the text-to-image image is. Defaults: the fp32 floors.
    image_img2img: float = 40.0
    image_inpaint: float = 40.0


ROWS: tuple[str, ...] = tuple(f.name for f in fields(Thresholds))

ONNX_FP32 = Thresholds(text_encoder=60.0, unet=40.0, unet_plain=40.0, vae_decoder=45.0, vae_encoder=45.0,
                       vae_decoder_tiny=45.0, image=40.0)
ONNX_FP16 = Thresholds(text_encoder=40.0, unet=35.0, unet_plain=35.0, vae_decoder=35.0, vae_encoder=35.0,
                       vae_decoder_tiny=35.0, image=30.0, controlnet=35.0, image_controlnet=30.0, image_img2img=30.0,
                       image_inpaint=30.0)

# Core ML: the ONNX floors (measured on Linux through the NumPy MIL evaluator, which rounds every op
# to the program's float16: the tiny model's fp16 bundle gives 59-69 dB and its float32 VAE 131 dB; the
# full-size random SD1.5 UNet 53.6 dB, text encoder 69.5 dB). Palettized components ("fp16-pal<n>":
# weights from a k-means table of 2**n entries) are held to floors set by the weight error, not the
# arithmetic: k-means on bell-shaped weights loses ~6 dB per bit (Lloyd-Max), so 6n - 6 dB for the UNet
# and 6n - 12 dB for the text encoder (12 layers compound it) and the image, about 10 dB under what was
# measured: tiny UNet 58/47/36 dB, text encoder 56/40/31, image 59/47/34 at 8/6/4 bits; full-size
# random SD1.5 at 6 bits UNet 39.5 dB, text encoder 34.7 dB.
COREML_FP32 = ONNX_FP32
COREML_FP16 = ONNX_FP16


def _palettized(nbits: int) -> Thresholds:
    return replace(COREML_FP16, text_encoder=6.0 * nbits - 12.0, unet=6.0 * nbits - 6.0, unet_plain=6.0 * nbits - 6.0,
                   controlnet=6.0 * nbits - 6.0,  # a UNet-sized encoder, palettized as the UNet is
                   image=6.0 * nbits - 12.0, image_controlnet=6.0 * nbits - 12.0, image_img2img=6.0 * nbits - 12.0,
                   image_inpaint=6.0 * nbits - 12.0)


COREML_FP16_PAL8 = _palettized(8)
COREML_FP16_PAL6 = _palettized(6)
COREML_FP16_PAL4 = _palettized(4)
COREML_FP16_PAL3 = _palettized(3)

# OpenVINO runs an ONNX bundle at an inference precision of its own (``--ov-precision``), below the
# bundle's. bf16 keeps 8 mantissa bits against fp16's 11 (18 dB less per rounding), with float32
# accumulation: the tiny model's fp32 bundle at bf16 measures text encoder 53.6, UNet 42.3, plain
# UNet 39.2, VAE decoder 46.5, encoder 48.1, image 43.1 dB; the full-size random SD1.5 UNet 39.1 dB.
# Floors 5-10 dB under that, and the image held to the 30 dB (4 8-bit levels) of every fp16 target.
# f16 (Intel GPUs, NPUs) has fp16's mantissa: the ONNX fp16 floors.
OPENVINO_BF16 = Thresholds(text_encoder=35.0, unet=30.0, unet_plain=30.0, vae_decoder=30.0, vae_encoder=30.0,
                           vae_decoder_tiny=30.0, image=30.0, controlnet=30.0, image_controlnet=30.0,
                           image_img2img=30.0, image_inpaint=30.0)
OPENVINO_F16 = ONNX_FP16
# An OpenVINO IR bundle with NNCF int8 weights (``export --target openvino --ov-weights int8``; INT8_ASYM,
# per output channel), run at f32: the weights' rounding (8 bits against fp16's 11) sets the floor, held to
# the 30 dB (4 8-bit levels) of every lowered-precision image; the VAE keeps fp32 weights (the fp16 floors).
# Measured on the tiny model against ONNX Runtime fp32, one step: UNet 36.8 dB at f32 (33.5 at bf16), text
# encoder 46.4 dB (45.8).
# At bf16 (this CPU's default) the OPENVINO_BF16 floors apply instead (RUNTIME_THRESHOLDS).
OPENVINO_INT8 = Thresholds(text_encoder=30.0, unet=30.0, unet_plain=30.0, vae_decoder=35.0, vae_encoder=35.0,
                           vae_decoder_tiny=30.0, image=30.0, controlnet=30.0, image_controlnet=30.0,
                           image_img2img=30.0, image_inpaint=30.0)


@dataclass(frozen=True)
class Option:
    """One target-specific export option: a keyword of the target's options class."""

    name: str  # keyword (the CLI flag is --name with dashes)
    help: str
    type: type = str
    choices: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class Target:
    """One export target (module docstring)."""

    name: str
    module: str  # implements export_bundle
    runtime: str  # the runtime that runs its bundles (sun_edge.runtimes.RUNTIMES)
    parity_runtime: str  # the runtime export parity checks its bundles with on this platform
    default_precision: str
    thresholds: Mapping[str, Thresholds]  # component precision -> floors
    options: tuple[Option, ...] = ()
    options_class: str = "sun_edge.export:ExportOptions"  # "module:Class" taking precision, height, width, ...
    tiny_decoder: bool = False  # can carry TAESD as vae_decoder_tiny
    summary: str = ""

    def threshold(self, row: str, precision: str) -> float:
        """The minimum PSNR (dB) of parity row ``row`` at ``precision``; unknown names list the valid ones."""
        if row not in ROWS:
            raise SunEdgeError(f"unknown parity component {row!r}; valid components: {', '.join(ROWS)}")
        if precision not in self.thresholds:
            raise SunEdgeError(f"no parity thresholds for {self.name} {precision}; defined: "
                               f"{', '.join(f'{t.name} {p}' for t in TARGETS.values() for p in t.thresholds)}")
        return float(getattr(self.thresholds[precision], row))


_COREML_ON_THIS_PLATFORM = "coreml" if sys.platform == "darwin" else "coreml-mil"

TARGETS: Mapping[str, Target] = MappingProxyType({t.name: t for t in (
    Target("onnx", "sun_edge.export.onnx", "onnxruntime", "onnxruntime", "fp32",
           MappingProxyType({"fp32": ONNX_FP32, "fp16": ONNX_FP16}), tiny_decoder=True,
           summary="ONNX graphs for ONNX Runtime (and everything that reads ONNX)"),
    Target("coreml", "sun_edge.export.coreml", "coreml", _COREML_ON_THIS_PLATFORM, "fp16",
           MappingProxyType({"fp32": COREML_FP32, "fp16": COREML_FP16, "fp16-pal8": COREML_FP16_PAL8,
                             "fp16-pal6": COREML_FP16_PAL6, "fp16-pal4": COREML_FP16_PAL4, "fp16-pal3": COREML_FP16_PAL3}),
           options=(Option("attention", "original (GPU; default) or split-einsum (Neural Engine)"),
                    Option("deployment_target", "minimum OS: macOS13 (default), macOS14, macOS15, iOS16, iOS17, iOS18"),
                    Option("quantize_nbits", "palettize UNet and text encoder weights to 8, 6, 4 or 3 bits (k-means)", int),
                    Option("quantize_granularity", "per-tensor (default) or per-grouped-channel (macOS15/iOS18)")),
           options_class="sun_edge.export.coreml:CoreMLOptions",
           summary=".mlpackage programs for Core ML on Apple silicon"),
    Target("openvino", "sun_edge.export.openvino", "openvino", "openvino", "fp16",
           MappingProxyType({"fp32": ONNX_FP32, "fp16": ONNX_FP16, "int8": OPENVINO_INT8}), tiny_decoder=True,
           options=(Option("ov_weights", "int8: NNCF int8 weights for the text encoder and UNets (the VAE keeps fp32; "
                                         "needs sun-edge[openvino-int8]); default: --precision's fp16 or fp32",
                           choices=("int8",)),),
           options_class="sun_edge.export.openvino:OpenVinoOptions",
           summary="OpenVINO IR (.xml/.bin, fp16-compressed weights) for the OpenVINO runtime"),
    Target("tensorrt", "sun_edge.export.tensorrt", "tensorrt", "tensorrt", "fp16",
           MappingProxyType({"fp32": ONNX_FP32, "fp16": ONNX_FP16}),
           summary="strongly typed ONNX graphs and engine build plans for TensorRT (engines: sun-edge build-engines)"),
)})


@dataclass(frozen=True)
class Packaging:
    """A target that packages a bundle for a serving system (a Triton model repository) rather than being one.

    No runtime runs it and parity has nothing new to check (the bundle inside was checked when it was
    exported), so it is not in ``TARGETS``. Its module provides ``export_from_bundle(bundle, out, options,
    *, force, progress)`` and ``export_model(model, out, options, *, adapter, loras, allow_pickle, force,
    parity, progress, vae_decoder)`` (which exports a bundle of one of ``bundle_targets`` into it).
    """

    name: str
    module: str
    options_class: str  # "module:Class": ExportOptions plus the packaging's own options
    bundle_targets: tuple[str, ...]  # the bundle targets it can package
    options: tuple[Option, ...] = ()
    summary: str = ""


PACKAGINGS: Mapping[str, Packaging] = MappingProxyType({p.name: p for p in (
    Packaging("triton", "sun_edge.export.triton", "sun_edge.export.triton:TritonOptions", ("onnx", "tensorrt"),
              options=(Option("bundle", "package this bundle (onnx or tensorrt; nothing is loaded) instead of exporting --model"),
                       Option("bundle_target", "the bundle exported into the repository from --model: onnx (default) or tensorrt",
                              choices=("onnx", "tensorrt")),
                       Option("instance_kind", "KIND_CPU or KIND_GPU model instances (default: gpu for TensorRT or with --gpus, else cpu)",
                              choices=("cpu", "gpu")),
                       Option("instances", "model instances per device (default 1: one per GPU)", int),
                       Option("gpus", "with --instance-kind gpu: GPU numbers, e.g. 0,1 (default: every GPU Triton sees)"),
                       Option("queue_delay_us", "dynamic batching: how long a request waits for others (default 20000)", int),
                       Option("max_steps", "most sampling steps a request may ask for (default 50)", int),
                       Option("model_name", "the Triton model's name (default sun_edge)")),
              summary="a Triton Inference Server model repository: a python-backend model running the bundle's pipeline"),
)})


def target(name: str) -> Target:
    """The registry entry of ``name``; unknown names list the valid ones."""
    if name not in TARGETS:
        raise SunEdgeError(f"unknown export target {name!r}; valid targets: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]


def threshold(component: str, precision: str, target_name: str = "onnx") -> float:
    """The minimum PSNR (dB) of ``component`` for ``target_name`` at ``precision``."""
    return target(target_name).threshold(component, precision)


# (runtime, the inference precision it reports in ``info["inference_precision"]``) -> floors: a runtime
# that computes a bundle below the bundle's own precision is held to these, whatever the target.
RUNTIME_THRESHOLDS: Mapping[tuple[str, str], Thresholds] = MappingProxyType({
    ("openvino", "bf16"): OPENVINO_BF16,
    ("openvino", "f16"): OPENVINO_F16,
})


def runtime_precision(runtime_name: str, info: Mapping[str, Any]) -> str | None:
    """The precision whose floors apply to every row of a runtime, when it lowers the bundle's (else None)."""
    lowered = info.get("inference_precision")
    return lowered if (runtime_name, lowered) in RUNTIME_THRESHOLDS else None


def parity_threshold(row: str, precision: str, target_name: str, runtime_name: str | None = None) -> float:
    """The floor of ``row``: the runtime's own at ``precision`` if it has one (``RUNTIME_THRESHOLDS``), else the target's."""
    if runtime_name is not None and (runtime_name, precision) in RUNTIME_THRESHOLDS:
        if row not in ROWS:
            raise SunEdgeError(f"unknown parity component {row!r}; valid components: {', '.join(ROWS)}")
        return float(getattr(RUNTIME_THRESHOLDS[runtime_name, precision], row))
    return target(target_name).threshold(row, precision)
