"""Parity: does a runtime compute what the PyTorch reference computes, on the inputs that matter?

The metric is DESIGN.md's: PSNR in dB with the peak taken from the reference,
``20 log10(max|ref| / rms(ref - out))``. Each component is measured on what it meets when the
reference makes an image, never on random tensors alone:

- ``text_encoder``: the tokenized prompt and negative prompt;
- ``unet``: the (latents, t) the reference's UNet sees along its own SUN trajectory (4 DDIM steps,
  trailing: t = 999, 749, 499, 249), with the reference's text embeddings, fed identically to both;
- ``unet_plain``: the same steps as the CFG batch of 2 (``[x, x]``, t, ``[neg, pos]``);
- ``vae_decoder`` (and ``vae_decoder_tiny``, TAESD): the reference's final latents;
- ``vae_encoder``: the reference's decoded image;
- ``image``: the whole 4-step pipeline on each runtime from the same seed, compared as float images
  in [-1, 1] (before 8-bit quantization, so differences below one 8-bit level still count).

A component's figure is its worst PSNR over all its inputs (steps, seeds) and its largest absolute
difference. Components the candidate lacks are skipped and listed. NumPy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from sun_edge import sampling
from sun_edge.errors import SunEdgeError
from sun_edge.pipeline import Pipeline, Runtime, Settings
from sun_edge.tokenizer import CLIPTokenizer

DEFAULT_PROMPT = "a photo of an astronaut riding a horse on the moon, detailed, sharp focus"
DEFAULT_NEGATIVE = "blurry, lowres, watermark, text"
METRIC = "PSNR in dB, peak from the reference: 20*log10(max|ref| / rms(ref - out)); worst over inputs"
INPUTS_NOTE = ("text_encoder: the tokenized prompt and negative prompt; unet, unet_plain: the (latents, t) of the "
               "reference's own SUN trajectory with its text embeddings; vae_decoder(_tiny): its final latents; "
               "vae_encoder: its decoded image; image: the pipeline on each runtime, float images in [-1, 1] "
               "before 8-bit quantization, full VAE decoder")


def psnr(ref: np.ndarray, out: np.ndarray) -> float:
    """``20 log10(max|ref| / rms(ref - out))`` in dB; inf when identical, nan when ``out`` has NaNs."""
    ref64, out64 = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    if ref64.shape != out64.shape:
        raise SunEdgeError(f"cannot compare outputs of shapes {list(ref64.shape)} and {list(out64.shape)}")
    rms = math.sqrt(float(np.mean((ref64 - out64) ** 2)))
    if math.isnan(rms):
        return math.nan
    peak = float(np.max(np.abs(ref64)))
    if rms == 0.0:
        return math.inf
    return 20.0 * math.log10(peak / rms) if peak > 0 else -math.inf


def max_abs(ref: np.ndarray, out: np.ndarray) -> float:
    """The largest absolute elementwise difference."""
    return float(np.max(np.abs(np.asarray(ref, np.float64) - np.asarray(out, np.float64))))


@dataclass(frozen=True)
class Thresholds:
    """Minimum PSNR (dB) per component for one target and precision.

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


COMPONENTS: tuple[str, ...] = tuple(f.name for f in fields(Thresholds))

ONNX_FP32 = Thresholds(text_encoder=60.0, unet=40.0, unet_plain=40.0, vae_decoder=45.0, vae_encoder=45.0,
                       vae_decoder_tiny=45.0, image=40.0)
ONNX_FP16 = Thresholds(text_encoder=40.0, unet=35.0, unet_plain=35.0, vae_decoder=35.0, vae_encoder=35.0,
                       vae_decoder_tiny=35.0, image=30.0)

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
                   image=6.0 * nbits - 12.0)


COREML_FP16_PAL8 = _palettized(8)
COREML_FP16_PAL6 = _palettized(6)
COREML_FP16_PAL4 = _palettized(4)
COREML_FP16_PAL3 = _palettized(3)

THRESHOLDS = MappingProxyType({("onnx", "fp32"): ONNX_FP32, ("onnx", "fp16"): ONNX_FP16,
                               ("tensorrt", "fp32"): ONNX_FP32, ("tensorrt", "fp16"): ONNX_FP16,
                               ("coreml", "fp32"): COREML_FP32, ("coreml", "fp16"): COREML_FP16,
                               ("coreml", "fp16-pal8"): COREML_FP16_PAL8, ("coreml", "fp16-pal6"): COREML_FP16_PAL6,
                               ("coreml", "fp16-pal4"): COREML_FP16_PAL4, ("coreml", "fp16-pal3"): COREML_FP16_PAL3})


def threshold(component: str, precision: str, target: str = "onnx") -> float:
    """The minimum PSNR (dB) of ``component`` for ``target`` at ``precision``; unknown names list the valid ones."""
    if component not in COMPONENTS:
        raise SunEdgeError(f"unknown parity component {component!r}; valid components: {', '.join(COMPONENTS)}")
    if (target, precision) not in THRESHOLDS:
        valid = ", ".join(f"{t} {p}" for t, p in THRESHOLDS)
        raise SunEdgeError(f"no parity thresholds for {target} {precision}; defined: {valid}")
    return float(getattr(THRESHOLDS[target, precision], component))


@dataclass(frozen=True)
class ParityRow:
    """One component's figures: worst PSNR over its inputs, largest |difference|, and the verdict."""

    component: str
    psnr_db: float
    max_abs: float
    threshold_db: float
    passed: bool
    worst_input: str  # where the worst PSNR was measured, e.g. "seed 0, step 4 (t=249)"
    inputs: int  # how many inputs were compared
    precision: str  # the precision whose threshold applies


@dataclass(frozen=True)
class ParityReport:
    """What ``compare_runtimes`` measured, and on what."""

    rows: tuple[ParityRow, ...]
    target: str
    precision: str
    reference: str
    candidate: str
    inputs: dict[str, Any]  # prompt, negative prompt, seeds, steps, timesteps, size, ...
    skipped: dict[str, str]  # component -> why

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    def failures(self) -> tuple[ParityRow, ...]:
        return tuple(row for row in self.rows if not row.passed)

    def row(self, component: str) -> ParityRow:
        for row in self.rows:
            if row.component == component:
                return row
        raise SunEdgeError(f"no parity row for {component!r}; measured: {', '.join(r.component for r in self.rows)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe figures for the manifest's ``parity`` field (inf and nan PSNRs as the strings "inf", "nan")."""
        return {
            "passed": self.passed,
            "metric": METRIC,
            "target": self.target,
            "precision": self.precision,
            "reference": self.reference,
            "candidate": self.candidate,
            "inputs": dict(self.inputs),
            "components": {r.component: {"psnr_db": _json_float(r.psnr_db), "max_abs": _json_float(r.max_abs),
                                         "threshold_db": r.threshold_db, "precision": r.precision, "passed": r.passed,
                                         "worst_input": r.worst_input, "inputs": r.inputs} for r in self.rows},
            "skipped": dict(self.skipped),
        }

    def table(self) -> str:
        """A plain aligned text table, one component per line, then a verdict line."""
        head = ("component", "PSNR dB", "min dB", "max |diff|", "result", "worst input")
        lines = [(r.component, _fmt_db(r.psnr_db), f"{r.threshold_db:.1f} {r.precision}", f"{r.max_abs:.3g}",
                  "pass" if r.passed else "FAIL", r.worst_input) for r in self.rows]
        widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
        out = ["  ".join(c.ljust(w) if i in (0, 4, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(x, widths))).rstrip()
               for x in [head, *lines]]
        out += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        verdict = "PASS" if self.passed else f"FAIL ({', '.join(r.component for r in self.failures())})"
        out.append(f"{self.candidate} vs {self.reference}, {self.target} {self.precision} thresholds, "
                   f"seeds {', '.join(map(str, self.inputs['seeds']))}: {verdict}")
        return "\n".join(out)


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _fmt_db(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else str(x)


_METHODS = MappingProxyType({"text_encoder": "encode_text", "unet": "unet", "unet_plain": "unet_plain", "vae_decoder": "decode",
                             "vae_encoder": "encode", "vae_decoder_tiny": "decode_tiny", "image": "unet"})


def has_component(runtime: Any, component: str) -> bool:
    """Whether a runtime can compute ``component`` (a name of ``COMPONENTS``; the protocol's optional parts)."""
    if not callable(getattr(runtime, _METHODS[component], None)):
        return False
    graphs = getattr(getattr(runtime, "manifest", None), "components", None)  # a bundle runtime: the graphs it has
    if graphs is not None and ("unet" if component == "image" else component) not in graphs:
        return False
    if component in ("unet", "image"):  # TorchRuntime without an adapter keeps the method but has no SUN UNet
        return getattr(runtime, "sun_unet", True) is not None
    return component != "vae_decoder_tiny" or bool(getattr(runtime, "has_tiny_decoder", False))


def full_decoder(runtime: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The runtime's full VAE decoder (``decode_full`` when ``decode`` may be a tiny one)."""
    return getattr(runtime, "decode_full", None) or runtime.decode


@dataclass(frozen=True)
class Trajectory:
    """What the reference's UNet saw along one SUN sampling run, and where it ended."""

    steps: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]  # (latents [1,4,h,w], t [1], eps [1,4,h,w])
    final: np.ndarray  # x0 latents [1,4,h,w]


def sun_trajectory(pipe: Pipeline, pos: np.ndarray, neg: np.ndarray, seed: int, settings: Settings) -> Trajectory:
    """Run the pipeline's sampling loop on its runtime and record every (latents, t, eps) of the UNet."""
    eps_fn = pipe.eps_fn(pos, neg, settings)
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def record(latents: np.ndarray, t: np.ndarray) -> np.ndarray:
        eps = eps_fn(latents, t)
        steps.append((latents.copy(), np.array(t, copy=True), np.array(eps, copy=True)))
        return eps

    final = sampling.sample(record, pipe.initial_latents(seed, settings), steps=settings.steps,
                            scheduler=settings.scheduler, spacing=settings.spacing)
    return Trajectory(tuple(steps), final)


def pipeline_image(pipe: Pipeline, prompt: str, negative_prompt: str, seed: int, settings: Settings) -> np.ndarray:
    """``Pipeline.generate``'s computation up to the float image [1,3,H,W] in [-1, 1], full VAE decoder."""
    pos, neg = pipe.embed(prompt), pipe.embed(negative_prompt)
    latents = sampling.sample(pipe.eps_fn(pos, neg, settings), pipe.initial_latents(seed, settings),
                              steps=settings.steps, scheduler=settings.scheduler, spacing=settings.spacing)
    return full_decoder(pipe.runtime)(latents.astype(np.float32))


def compare_runtimes(reference: Runtime, candidate: Runtime, *, precision: str, seeds: Sequence[int] = (0,),
                     prompt: str = DEFAULT_PROMPT, negative_prompt: str = DEFAULT_NEGATIVE,
                     components: Sequence[str] | None = None, settings: Settings = Settings(),
                     target: str = "onnx", precisions: Mapping[str, str] | None = None,
                     tokenizer: CLIPTokenizer | None = None) -> ParityReport:
    """Measure every component of ``candidate`` against ``reference`` on real inputs (module docstring).

    ``settings`` is the SUN sampling run whose trajectory feeds the UNet (default: 4 DDIM trailing
    steps at 512x512; its size must be one the candidate accepts). ``components`` limits the check.
    ``precisions`` gives components whose precision differs from ``precision`` (a bundle records
    each component's: an fp16 ONNX bundle keeps its VAE graphs in fp32); thresholds follow it.
    """
    settings.validate()
    if settings.mode != "sun":
        raise SunEdgeError("parity runs the SUN trajectory: settings.mode must be 'sun'")
    wanted = tuple(components) if components is not None else COMPONENTS
    precisions = {c: (precisions or {}).get(c, precision) for c in wanted}
    limits = {c: threshold(c, precisions[c], target) for c in wanted}  # validates names, target, precision
    if not has_component(reference, "unet"):
        raise SunEdgeError(f"the reference runtime {getattr(reference, 'name', '?')} has no SUN adapter; parity needs one")
    skipped = {c: "candidate has none" if not has_component(candidate, c) else "reference has none"
               for c in wanted if not (has_component(candidate, c) and has_component(reference, c))}
    active = [c for c in wanted if c not in skipped]
    tokenizer = tokenizer or CLIPTokenizer.default()
    ref_pipe, cand_pipe = Pipeline(reference, tokenizer), Pipeline(candidate, tokenizer)
    found: dict[str, list[tuple[float, float, str]]] = {c: [] for c in active}

    def measure(component: str, ref: np.ndarray, out: np.ndarray, where: str) -> None:
        if component in found:
            found[component].append((psnr(ref, out), max_abs(ref, out), where))

    # One component at a time, all seeds, then its candidate session is released (``release``, where the
    # runtime has one): a full-size fp16 bundle on a CPU holds one UNet's weights at a time, not two.
    release = getattr(candidate, "release", lambda component: None)
    ids = {"prompt": tokenizer.encode(prompt), "negative prompt": tokenizer.encode(negative_prompt)}  # [1, 77] each
    emb = {name: reference.encode_text(x) for name, x in ids.items()}  # [1, 77, D] each
    if "text_encoder" in found:
        for name, x in ids.items():
            measure("text_encoder", emb[name], candidate.encode_text(x), name)
        release("text_encoder")
    pos, neg = emb["prompt"], emb["negative prompt"]
    paths = {seed: sun_trajectory(ref_pipe, pos, neg, seed, settings) for seed in seeds}
    images = {seed: full_decoder(reference)(path.final) for seed, path in paths.items()}  # [1, 3, H, W] each
    timesteps = [int(t[0]) for _, t, _ in paths[seeds[-1]].steps] if paths else []
    steps = [(seed, i, x, t, eps) for seed, path in paths.items() for i, (x, t, eps) in enumerate(path.steps)]
    where = {(seed, i): f"seed {seed}, step {i + 1} (t={int(t[0])})" for seed, i, _, t, _ in steps}
    if "unet" in found:
        for seed, i, x, t, eps in steps:
            measure("unet", eps, candidate.unet(x, t, pos, neg), where[seed, i])
        release("unet")
    if "unet_plain" in found:
        for seed, i, x, t, _ in steps:
            x2, context = np.concatenate([x, x]), np.concatenate([neg, pos])  # [2, 4, h, w], [2, 77, D]
            measure("unet_plain", reference.unet_plain(x2, t, context), candidate.unet_plain(x2, t, context),
                    where[seed, i])
        release("unet_plain")
    for seed, path in paths.items():
        if "vae_decoder" in found:
            measure("vae_decoder", images[seed], full_decoder(candidate)(path.final), f"seed {seed}")
        if "vae_decoder_tiny" in found:
            measure("vae_decoder_tiny", reference.decode_tiny(path.final), candidate.decode_tiny(path.final),
                    f"seed {seed}")
        if "vae_encoder" in found:
            measure("vae_encoder", reference.encode(images[seed]), candidate.encode(images[seed]), f"seed {seed}")
    if "image" in found:
        for seed in seeds:
            measure("image", images[seed], pipeline_image(cand_pipe, prompt, negative_prompt, seed, settings),
                    f"seed {seed}")
    rows = tuple(_row(c, found[c], limits[c], precisions[c]) for c in active)
    inputs = {"prompt": prompt, "negative_prompt": negative_prompt, "seeds": [int(s) for s in seeds],
              "steps": settings.steps, "scheduler": settings.scheduler, "spacing": settings.spacing,
              "timesteps": timesteps, "height": settings.height, "width": settings.width, "noise": settings.noise,
              "note": INPUTS_NOTE}
    return ParityReport(rows, target, precision, getattr(reference, "name", "reference"),
                        getattr(candidate, "name", "candidate"), inputs, skipped)


def _row(component: str, found: list[tuple[float, float, str]], limit: float, precision: str) -> ParityRow:
    if not found:
        raise SunEdgeError(f"parity measured nothing for {component}: pass at least one seed")
    worst = min(found, key=lambda f: -math.inf if math.isnan(f[0]) else f[0])
    largest = max(f[1] for f in found)
    return ParityRow(component, worst[0], largest, limit, bool(worst[0] >= limit), worst[2], len(found), precision)


def check_report(report: ParityReport) -> None:
    """Raise one line naming the first component below its threshold, if any."""
    for row in report.failures():
        raise SunEdgeError(f"parity check failed: {row.component} at {_fmt_db(row.psnr_db)} dB is below its "
                           f"{report.target} {row.precision} threshold of {row.threshold_db:g} dB "
                           f"(worst input: {row.worst_input})")


def open_bundle_runtime(bundle_dir: Path, provider: str = "cpu") -> Runtime:
    """Open a bundle directory with the runtime its target needs (ONNX Runtime, Core ML or its evaluator, TensorRT)."""
    from sun_edge.bundle import open_bundle
    from sun_edge.runtimes import open_bundle_runtime as open_runtime

    return open_runtime(open_bundle(bundle_dir), provider=provider)


def bundle_report(reference: Runtime, bundle_dir: Path, *, precision: str | None = None, seeds: Sequence[int] = (0,),
                  provider: str = "cpu") -> ParityReport:
    """Compare a bundle's graphs with ``reference`` at the bundle's size and scheduler, each component at its precision."""
    from sun_edge.bundle import open_bundle

    manifest = open_bundle(bundle_dir).manifest
    candidate = open_bundle_runtime(bundle_dir, provider)
    return compare_runtimes(reference, candidate, precision=precision or manifest.precision, seeds=seeds,
                            settings=bundle_settings(manifest), target=manifest.target,
                            precisions={name: c.precision for name, c in manifest.components.items()})


def export_parity(reference_runtime: Runtime, bundle_dir: Path, precision: str | None = None, *,
                  seeds: Sequence[int] = (0,), provider: str = "cpu") -> dict[str, Any]:
    """The exporter's hook (``sun_edge.export.ParityFn``), run on the complete bundle before it is moved into place.

    Opens the bundle directory with its runtime, compares it with ``reference_runtime`` on real
    inputs and returns the figures for the manifest's ``parity`` field; raises SunEdgeError if a
    component is below its threshold, so that a bad export never lands. ``precision`` defaults to
    the manifest's.
    """
    report = bundle_report(reference_runtime, bundle_dir, precision=precision, seeds=seeds, provider=provider)
    check_report(report)
    return report.to_dict()


@dataclass(frozen=True)
class BundleCheck:
    """``check_bundle``'s result: the report, and how the reference differs from what the bundle recorded."""

    report: ParityReport
    mismatches: tuple[str, ...]  # empty when the reference's sha256s equal the manifest's

    def to_dict(self) -> dict[str, Any]:
        return {**self.report.to_dict(), "reference_matches_bundle": not self.mismatches,
                "reference_mismatches": list(self.mismatches)}


def bundle_settings(manifest: Any) -> Settings:
    """The SUN sampling run a bundle was exported for: its image size and scheduler defaults."""
    scheduler = manifest.scheduler or {}
    return Settings(height=int(manifest.image["height"]), width=int(manifest.image["width"]),
                    steps=int(scheduler.get("steps", Settings.steps)), scheduler=str(scheduler.get("name", Settings.scheduler)),
                    spacing=str(scheduler.get("spacing", Settings.spacing)))


def reference_mismatches(manifest: Any, info: dict[str, Any],
                         loras: Sequence[tuple[Path, float]] | None = None) -> tuple[str, ...]:
    """Where the reference (its ``runtime.info``, the LoRA files given) differs from what the manifest recorded."""
    from sun_edge.weights import sha256_file

    out = []
    for what, recorded, actual in (("model", (manifest.model or {}).get("sha256"), info.get("model_sha256")),
                                   ("adapter", (manifest.adapter or {}).get("sha256"), info.get("adapter_sha256"))):
        if recorded and recorded != actual:
            out.append(f"{what} sha256 {actual[:12] + '...' if actual else 'unknown'} differs from the bundle's "
                       f"{recorded[:12]}...")
    if loras is not None:
        recorded_loras = sorted((x.get("sha256"), float(x.get("scale", 1.0))) for x in (manifest.model or {}).get("loras") or [])
        if sorted((sha256_file(Path(p)), float(scale)) for p, scale in loras) != recorded_loras:
            out.append("the LoRAs given (sha256, scale) differ from those merged at export")
    return tuple(out)


def reference_for_bundle(manifest: Any, *, model: str | None = None, adapter: str | None = None,
                         loras: Sequence[tuple[Path, float]] | None = None, allow_pickle: bool = False,
                         vae_decoder: str | None = None) -> Runtime:
    """The PyTorch reference a bundle was exported from: the manifest's model/adapter ``path``s unless overridden.

    A bundle with a TAESD graph gets its TAESD decoder too (``vae_decoder`` ``tiny:PATH``, default the
    path its manifest records), so that ``vae_decoder_tiny`` is checked against its own PyTorch module.
    """
    from sun_edge.runtimes.pytorch import TorchRuntime

    model = model or (manifest.model or {}).get("path")
    adapter = adapter or (manifest.adapter or {}).get("path")
    if not model:
        raise SunEdgeError("the bundle's manifest records no model path; pass --model NAME|PATH (the model it was exported from)")
    if not adapter:
        raise SunEdgeError("the bundle's manifest records no adapter path; pass --adapter PATH (the adapter it was exported from)")
    if loras is None:  # the LoRAs merged at export, where the manifest says where they are
        recorded = (manifest.model or {}).get("loras") or []
        unknown = [str(x.get("file", x)) for x in recorded if not x.get("path")]
        if unknown:
            raise SunEdgeError(f"the bundle was exported with LoRA(s) {', '.join(unknown)} and its manifest records no "
                               "path for them; pass each with --lora FILE[:SCALE]")
        loras = [(Path(x["path"]), float(x.get("scale", 1.0))) for x in recorded]
    if "vae_decoder_tiny" in getattr(manifest, "components", {}):
        recorded_tiny = (getattr(manifest, "vae_decoder_tiny", None) or {}).get("path")
        if not vae_decoder and not recorded_tiny:
            raise SunEdgeError("the bundle has a TAESD decoder and its manifest records no path for it; pass "
                               "--vae-decoder tiny:PATH (the TAESD weights it was exported from)")
        vae_decoder = vae_decoder or f"tiny:{recorded_tiny}"
    elif vae_decoder not in (None, "full"):
        raise SunEdgeError("--vae-decoder checks a bundle's TAESD decoder, and this bundle has none (vae_decoder_tiny)")
    return TorchRuntime.load(model, adapter, loras=tuple(loras), allow_pickle=allow_pickle, vae_decoder=vae_decoder)


def _tiny_mismatch(manifest: Any, reference: Any) -> tuple[str, ...]:
    """How the reference's TAESD weights differ from those the bundle recorded (sha256), if they do."""
    from sun_edge.taesd import weights_file
    from sun_edge.weights import sha256_file

    recorded = (getattr(manifest, "vae_decoder_tiny", None) or {}).get("sha256")
    tiny = getattr(reference, "tiny_decoder", None)
    if not recorded or tiny is None:
        return ()
    actual = sha256_file(weights_file(Path(tiny.source)))
    return () if actual == recorded else (f"TAESD decoder sha256 {actual[:12]}... differs from the bundle's {recorded[:12]}...",)


def check_bundle(bundle_dir: Path, *, seeds: Sequence[int] = (0,), model: str | None = None, adapter: str | None = None,
                 loras: Sequence[tuple[Path, float]] | None = None, allow_pickle: bool = False,
                 provider: str = "cpu", vae_decoder: str | None = None) -> BundleCheck:
    """``sun-edge parity``: re-run the export's parity check on a bundle, against its reference model."""
    from sun_edge.bundle import open_bundle

    manifest = open_bundle(bundle_dir).manifest
    reference = reference_for_bundle(manifest, model=model, adapter=adapter, loras=loras, allow_pickle=allow_pickle,
                                     vae_decoder=vae_decoder)
    mismatches = reference_mismatches(manifest, getattr(reference, "info", {}), loras) + _tiny_mismatch(manifest, reference)
    return BundleCheck(bundle_report(reference, bundle_dir, seeds=seeds, provider=provider), mismatches)
