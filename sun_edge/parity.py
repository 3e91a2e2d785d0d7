"""Parity: does a runtime compute what the PyTorch reference computes, on the inputs that matter?

The metric is DESIGN.md's: PSNR in dB with the peak taken from the reference,
``20 log10(max|ref| / rms(ref - out))``. Each component is measured on what it meets when the
reference makes an image, never on random tensors alone:

- ``text_encoder``: the tokenized prompt and negative prompt;
- ``unet``: the (latents, t) the reference's UNet sees along its own SUN trajectory (4 DDIM steps,
  trailing: t = 999, 749, 499, 249), with the reference's text embeddings, fed identically to both;
- ``unet_plain``: the same steps as the CFG batch of 2 (``[x, x]``, t, ``[neg, pos]``);
- ``vae_decoder`` (and ``vae_decoder_tiny``, TAESD): the reference's final latents;
- ``vae_encoder``: the reference's decoded image (the posterior's mean, and its std where both have it);
- ``image_img2img``, ``image_inpaint``: the whole pipeline on each runtime from the reference's decoded
  image, img2img at strength 0.5 and inpainting its right half at 0.75 (an inpainting UNet with its
  mask and masked-image inputs), compared as ``image`` is;
- ``image``: the whole 4-step pipeline on each runtime from the same seed, compared as float images
  in [-1, 1] (before 8-bit quantization, so differences below one 8-bit level still count);
- with a ControlNet on both sides (``control_condition``: a ring and a box drawn as an edge map):
  ``controlnet``, every residual along the reference's own ControlNet trajectory (and once as the CFG
  pair, batch 2); ``unet`` again on those steps with the reference's residuals in its extra inputs;
  ``image_controlnet``, the whole 4-step ControlNet pipeline on each runtime.

A component's figure is its worst PSNR over all its inputs (steps, seeds) and its largest absolute
difference. Components the candidate lacks are skipped and listed. Thresholds come from each
target's registry entry (``sun_edge.export.targets``). Re-checking a bundle against the model it was
exported from is ``sun_edge.bundle_parity``. NumPy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from sun_edge import imaging, sampling
from sun_edge.errors import SunEdgeError
from sun_edge.components import COMPONENTS as GRAPHS
from sun_edge.components import Runtime
from sun_edge.export.targets import ROWS, parity_threshold, runtime_precision
from sun_edge.export.targets import target as export_target
from sun_edge.pipeline import Job, Pipeline, Settings, _with_condition
from sun_edge.tokenizer import CLIPTokenizer

DEFAULT_PROMPT = "a photo of an astronaut riding a horse on the moon, detailed, sharp focus"
DEFAULT_NEGATIVE = "blurry, lowres, watermark, text"
METRIC = "PSNR in dB, peak from the reference: 20*log10(max|ref| / rms(ref - out)); worst over inputs"
INPUTS_NOTE = ("text_encoder: the tokenized prompt and negative prompt; unet, unet_plain: the (latents, t) of the "
               "reference's own SUN trajectory with its text embeddings; vae_decoder(_tiny): its final latents; "
               "vae_encoder: its decoded image; image: the pipeline on each runtime, float images in [-1, 1] "
               "before 8-bit quantization, full VAE decoder; with a ControlNet: controlnet along the reference's "
               "ControlNet trajectory (and as the CFG pair), unet again with its residuals, image_controlnet; "
               "image_img2img, image_inpaint: the pipeline from the reference's decoded image (strength 0.5; the "
               "right half repainted at 0.75)")


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


COMPONENTS: tuple[str, ...] = ROWS  # parity rows: every component of the table, then the whole image
CONTROL_ROWS = ("controlnet", "image_controlnet")  # reported only where a side has a ControlNet
EDIT_ROWS = ("image_img2img", "image_inpaint")  # the SUN pipeline from an image: needs the VAE encoder
IMG2IMG_STRENGTH = 0.5  # parity's img2img: the tail [499, 249] of SUN's grid
INPAINT_STRENGTH = 0.75


def threshold(component: str, precision: str, target: str = "onnx") -> float:
    """The minimum PSNR (dB) of ``component`` for ``target`` at ``precision`` (the target's registry entry)."""
    return export_target(target).threshold(component, precision)


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


def has_component(runtime: Runtime, row: str) -> bool:
    """Whether a runtime computes parity row ``row`` (a component, ``image``: the SUN pipeline, ``image_controlnet``:
    the SUN pipeline with the ControlNet)."""
    if row == "image_controlnet":
        return runtime.has("unet") and runtime.has("controlnet")
    if row in EDIT_ROWS:
        return runtime.has("unet") and runtime.has("vae_encoder") and _samples_posterior(runtime)
    return runtime.has("unet" if row == "image" else row)


def takes_pairs(runtime: Runtime, component: str) -> bool:
    """Whether ``runtime``'s ``component`` takes a batch of 2 (the CFG pair): a runtime without a manifest (PyTorch)
    takes any batch; a bundle's graph, unless its manifest fixes the batch at 1 (Core ML's ControlNet: SUN only)."""
    manifest = getattr(runtime, "manifest", None)
    if manifest is None:
        return True
    return manifest.components[component].inputs[0].shape[0] != 1


def control_condition(height: int, width: int) -> np.ndarray:
    """The parity's ControlNet condition [1,3,H,W] in [0, 1]: white outlines (a ring and a box) on black, as an edge
    map looks; deterministic, so reference and candidate see the same."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = np.hypot(y - height * 0.4, x - width * 0.4)
    ring = np.abs(r - min(height, width) * 0.25) < max(1.0, min(height, width) / 64)
    top, left, bottom, right = int(height * 0.55), int(width * 0.5), int(height * 0.9), int(width * 0.9)
    box = np.zeros((height, width), bool)
    box[top:bottom, left:right] = True
    box[top + 2:bottom - 2, left + 2:right - 2] = False
    edges = (ring | box).astype(np.float32)  # [H, W]
    return np.repeat(edges[None, None], 3, axis=1)  # [1, 3, H, W]


@dataclass(frozen=True)
class Trajectory:
    """What the reference's UNet saw along one SUN sampling run, and where it ended."""

    steps: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]  # (latents [1,4,h,w], t [1], eps [1,4,h,w])
    final: np.ndarray  # x0 latents [1,4,h,w]


def sun_trajectory(pipe: Pipeline, pos: np.ndarray, neg: np.ndarray, seed: int, settings: Settings,
                   control: tuple[np.ndarray, np.ndarray] | None = None) -> Trajectory:
    """Run the pipeline's sampling loop on its runtime and record every (latents, t, eps) of the UNet
    (``control``: with the ControlNet, as ``Pipeline.eps_fn`` takes it)."""
    condition = text_condition(pipe, seed, settings)  # an inpainting UNet's mask and masked image (all repainted)
    eps_fn = pipe.eps_fn(pos, neg, settings, control, condition=condition)
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def record(latents: np.ndarray, t: np.ndarray) -> np.ndarray:
        eps = eps_fn(latents, t)  # the UNet's own sample is recorded: [1,9,h,w] for an inpainting UNet
        steps.append((_with_condition(latents, condition).copy(), np.array(t, copy=True), np.array(eps, copy=True)))
        return eps

    final = sampling.sample(record, pipe.initial_latents(seed, settings), steps=settings.steps,
                            scheduler=settings.scheduler, spacing=settings.spacing)
    return Trajectory(tuple(steps), final)


def pipeline_image(pipe: Pipeline, prompt: str, negative_prompt: str, seed: int, settings: Settings,
                   control: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``Pipeline.generate``'s computation up to the float image [1,3,H,W] in [-1, 1], full VAE decoder."""
    pos, neg = pipe.embed(prompt), pipe.embed(negative_prompt)
    eps_fn = pipe.eps_fn(pos, neg, settings, control, condition=text_condition(pipe, seed, settings))
    latents = sampling.sample(eps_fn, pipe.initial_latents(seed, settings),
                              steps=settings.steps, scheduler=settings.scheduler, spacing=settings.spacing)
    return pipe.runtime.decode_full(latents.astype(np.float32))


def text_condition(pipe: Pipeline, seed: int, settings: Settings) -> np.ndarray | None:
    """What ``Pipeline.generate`` feeds an inpainting UNet from text alone (mask 1, masked image grey) [1,5,h,w];
    None for an ordinary UNet."""
    return pipe.prepare_edit(Job("", "", seed), settings).condition if pipe.inpainting_unet else None


def _samples_posterior(runtime: Runtime) -> bool:
    """Whether a runtime's VAE encoder returns the posterior's std (a bundle exported before it has the mean alone)."""
    manifest = getattr(runtime, "manifest", None)  # bundle runtimes; the PyTorch reference always has it
    return manifest is None or len(manifest.components["vae_encoder"].outputs) > 1


def parity_mask(width: int, height: int) -> Image.Image:
    """The parity's inpainting mask: the right half white (repaint)."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 2:] = 255
    return Image.fromarray(mask, "L")


def edit_image(pipe: Pipeline, prompt: str, negative_prompt: str, seed: int, settings: Settings, init: Image.Image,
               row: str) -> np.ndarray:
    """``Pipeline.generate``'s img2img (``image_img2img``) or inpainting (``image_inpaint``) computation from ``init``,
    up to the float image [1,3,H,W] in [-1, 1], full VAE decoder."""
    inpaint = row == "image_inpaint"
    settings = replace(settings, strength=INPAINT_STRENGTH if inpaint else IMG2IMG_STRENGTH)
    job = Job(prompt, negative_prompt, seed, init_image=init,
              mask=parity_mask(init.width, init.height) if inpaint else None)
    prepared = pipe.prepare_edit(job, settings)
    pos, neg = pipe.embed(prompt), pipe.embed(negative_prompt)
    edit = sampling.Edit(prepared.init, settings.strength, prepared.mask.latent if prepared.mask is not None else None)
    latents = sampling.sample(pipe.eps_fn(pos, neg, settings, condition=prepared.condition),
                              pipe.initial_latents(seed, settings), steps=settings.steps, scheduler=settings.scheduler,
                              spacing=settings.spacing, edit=edit)
    return pipe.runtime.decode_full(latents.astype(np.float32))


def compare_runtimes(reference: Runtime, candidate: Runtime, *, precision: str, seeds: Sequence[int] = (0,),
                     prompt: str = DEFAULT_PROMPT, negative_prompt: str = DEFAULT_NEGATIVE,
                     components: Sequence[str] | None = None, settings: Settings = Settings(),
                     target: str = "onnx", precisions: Mapping[str, str] | None = None,
                     tokenizer: CLIPTokenizer | None = None, batch: int = 1) -> ParityReport:
    """Measure every component of ``candidate`` against ``reference`` on real inputs (module docstring).

    ``settings`` is the SUN sampling run whose trajectory feeds the UNet (default: 4 DDIM trailing
    steps at 512x512; its size must be one the candidate accepts). ``components`` limits the check.
    ``batch`` (a bundle's: its largest batch): above 1, the UNet is also measured on batches of
    that many images, item k from its own seed's trajectory, against each item's batch-1 reference,
    so a runtime that mixes batch items fails its ``unet`` row.
    ``precisions`` gives components whose precision differs from ``precision`` (a bundle records
    each component's: an fp16 ONNX bundle keeps its VAE graphs in fp32); thresholds follow it.
    A candidate that computes below the bundle's precision says so in ``info["inference_precision"]``
    (OpenVINO at bf16 or f16); every row is then held to that runtime's floors at that precision
    (``sun_edge.export.targets.RUNTIME_THRESHOLDS``).
    """
    # One component at a time, all seeds, then its candidate session is released (``release``, where the
    # runtime has one): a full-size fp16 bundle on a CPU holds one UNet's weights at a time, not two. The
    # whole-pipeline rows (edits, images) run four graphs in turn; a bundle runtime then holds only the one
    # running (``hold_one_graph``): a full-size batch-4 bundle's parity does not fit 24 GB otherwise.
    held_before, candidate.hold_one_graph = candidate.hold_one_graph, True
    try:
        return _compare(reference, candidate, precision=precision, seeds=seeds, prompt=prompt,
                        negative_prompt=negative_prompt, components=components, settings=settings, target=target,
                        precisions=precisions, tokenizer=tokenizer, batch=batch)
    finally:  # nothing stays loaded for parity's sake
        for component in GRAPHS:
            candidate.release(component)
        candidate.hold_one_graph = held_before


def _compare(reference: Runtime, candidate: Runtime, *, precision: str, seeds: Sequence[int], prompt: str,
             negative_prompt: str, components: Sequence[str] | None, settings: Settings, target: str,
             precisions: Mapping[str, str] | None, tokenizer: CLIPTokenizer | None, batch: int) -> ParityReport:
    """``compare_runtimes``'s measurements, in the order that holds one candidate graph at a time."""
    settings.validate()
    if settings.mode != "sun":
        raise SunEdgeError("parity runs the SUN trajectory: settings.mode must be 'sun'")
    wanted = tuple(components) if components is not None else tuple(
        c for c in COMPONENTS if c not in CONTROL_ROWS
        or has_component(reference, "controlnet") or has_component(candidate, "controlnet"))  # no ControlNet: no rows
    lowered = runtime_precision(candidate.name, candidate.info)  # OpenVINO at bf16/f16: its own floors, every row
    precisions = {c: lowered or (precisions or {}).get(c, precision) for c in wanted}
    limits = {c: parity_threshold(c, precisions[c], target, candidate.name) for c in wanted}  # validates names
    if not has_component(reference, "unet"):
        raise SunEdgeError(f"the reference runtime {reference.name} has no SUN adapter; parity needs one")
    skipped = {c: "candidate has none" if not has_component(candidate, c) else "reference has none"
               for c in wanted if not (has_component(candidate, c) and has_component(reference, c))}
    active = [c for c in wanted if c not in skipped]
    tokenizer = tokenizer or CLIPTokenizer.default()
    ref_pipe, cand_pipe = Pipeline(reference, tokenizer), Pipeline(candidate, tokenizer)
    found: dict[str, list[tuple[float, float, str]]] = {c: [] for c in active}

    def measure(component: str, ref: np.ndarray, out: np.ndarray, where: str) -> None:
        if component in found:
            found[component].append((psnr(ref, out), max_abs(ref, out), where))

    release = candidate.release
    ids = {"prompt": tokenizer.encode(prompt), "negative prompt": tokenizer.encode(negative_prompt)}  # [1, 77] each
    emb = {name: reference.encode_text(x) for name, x in ids.items()}  # [1, 77, D] each
    if "text_encoder" in found:
        for name, x in ids.items():
            measure("text_encoder", emb[name], candidate.encode_text(x), name)
        release("text_encoder")
    pos, neg = emb["prompt"], emb["negative prompt"]
    paths = {seed: sun_trajectory(ref_pipe, pos, neg, seed, settings) for seed in seeds}
    images = {seed: reference.decode_full(path.final) for seed, path in paths.items()}  # [1, 3, H, W] each
    timesteps = [int(t[0]) for _, t, _ in paths[seeds[-1]].steps] if paths else []
    steps = [(seed, i, x, t, eps) for seed, path in paths.items() for i, (x, t, eps) in enumerate(path.steps)]
    where = {(seed, i): f"seed {seed}, step {i + 1} (t={int(t[0])})" for seed, i, _, t, _ in steps}
    n = batch
    controlled = has_component(reference, "controlnet") and has_component(candidate, "controlnet")
    control = (control_condition(settings.height, settings.width), np.array([True])) if controlled else None
    scale = np.array([1.0], np.float32)
    control_steps = []  # (seed, step, latents, t, the reference's residuals) along its own ControlNet trajectory
    if controlled:
        for seed in seeds:
            path = sun_trajectory(ref_pipe, pos, neg, seed, settings, control)
            control_steps += [(seed, i, x, t, reference.controlnet(x, t, pos, neg, control[0], scale))
                              for i, (x, t, _) in enumerate(path.steps)]
    if "unet" in found:
        for seed, i, x, t, eps in steps:
            measure("unet", eps, candidate.unet(x, t, pos, neg), where[seed, i])
        if n > 1:  # batch n: item k follows seed seeds[0] + k, each compared with its own batch-1 reference
            group = [paths[seeds[0]]] + [sun_trajectory(ref_pipe, pos, neg, seeds[0] + k, settings) for k in range(1, n)]
            for i, (_, t, _) in enumerate(group[0].steps):
                xs = np.concatenate([path.steps[i][0] for path in group])  # [n, 4, h, w]
                out = candidate.unet(xs, t, np.repeat(pos, n, axis=0), np.repeat(neg, n, axis=0))
                for k, path in enumerate(group):
                    measure("unet", path.steps[i][2], out[k:k + 1], f"batch {n}, item {k}, step {i + 1} (t={int(t[0])})")
        if controlled:  # the UNet graph's residual inputs, fed the reference ControlNet's residuals
            for seed, i, x, t, res in control_steps:
                measure("unet", reference.unet(x, t, pos, neg, res), candidate.unet(x, t, pos, neg, res),
                        f"{where[seed, i]}, ControlNet residuals")
        release("unet")
    if "controlnet" in found:
        for seed, i, x, t, res in control_steps:
            out = candidate.controlnet(x, t, pos, neg, control[0], scale)
            for spec_i, (r, o) in enumerate(zip(res, out, strict=True)):
                measure("controlnet", r, o, f"{where[seed, i]}, residual {spec_i}")
        if takes_pairs(candidate, "controlnet"):  # the CFG pair: batch 2, each half its own text (read as [c; c])
            seed, i, x, t, _ = control_steps[0]
            x2, context, cond2 = np.concatenate([x, x]), np.concatenate([neg, pos]), np.concatenate([control[0]] * 2)
            for spec_i, (r, o) in enumerate(zip(reference.controlnet(x2, t, context, context, cond2, scale),
                                                candidate.controlnet(x2, t, context, context, cond2, scale), strict=True)):
                measure("controlnet", r, o, f"CFG pair, {where[seed, i]}, residual {spec_i}")
        release("controlnet")
    if "unet_plain" in found:
        for seed, i, x, t, _ in steps:
            x2, context = np.concatenate([x, x]), np.concatenate([neg, pos])  # [2, 4, h, w], [2, 77, D]
            measure("unet_plain", reference.unet_plain(x2, t, context), candidate.unet_plain(x2, t, context),
                    where[seed, i])
        release("unet_plain")
    if "vae_decoder" in found:
        for seed, path in paths.items():
            measure("vae_decoder", images[seed], candidate.decode_full(path.final), f"seed {seed}")
        release("vae_decoder")
    if "vae_decoder_tiny" in found:
        for seed, path in paths.items():
            measure("vae_decoder_tiny", reference.decode_tiny(path.final), candidate.decode_tiny(path.final),
                    f"seed {seed}")
        release("vae_decoder_tiny")
    if "vae_encoder" in found:
        for seed in paths:
            measure("vae_encoder", reference.encode(images[seed]), candidate.encode(images[seed]), f"seed {seed}")
            if EDIT_ROWS[0] in found:  # the posterior's std too (img2img samples mean + std * noise)
                measure("vae_encoder", reference.encode_dist(images[seed])[1], candidate.encode_dist(images[seed])[1],
                        f"seed {seed}, posterior std")
        release("vae_encoder")
    for row in EDIT_ROWS:
        if row in found:
            for seed in seeds:
                init = imaging.to_pil(images[seed][0])
                measure(row, edit_image(ref_pipe, prompt, negative_prompt, seed, settings, init, row),
                        edit_image(cand_pipe, prompt, negative_prompt, seed, settings, init, row), f"seed {seed}")
    if "image" in found:
        for seed in seeds:
            measure("image", images[seed], pipeline_image(cand_pipe, prompt, negative_prompt, seed, settings),
                    f"seed {seed}")
    if "image_controlnet" in found:
        for seed in seeds:
            measure("image_controlnet", pipeline_image(ref_pipe, prompt, negative_prompt, seed, settings, control),
                    pipeline_image(cand_pipe, prompt, negative_prompt, seed, settings, control), f"seed {seed}")
    rows = tuple(_row(c, found[c], limits[c], precisions[c]) for c in active)
    inputs = {"prompt": prompt, "negative_prompt": negative_prompt, "seeds": [int(s) for s in seeds],
              "steps": settings.steps, "scheduler": settings.scheduler, "spacing": settings.spacing,
              "timesteps": timesteps, "height": settings.height, "width": settings.width, "noise": settings.noise,
              "batches": sorted({1, n}),
              "note": INPUTS_NOTE}
    return ParityReport(rows, target, lowered or precision, reference.name, candidate.name, inputs, skipped)


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
