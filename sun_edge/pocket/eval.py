"""``sun-edge eval``: the paper's claims measured in miniature on the Pocket SD family.

The synthetic world knows every image's true attributes, so an attribute classifier trained on it
(``sun_edge.pocket.classifier``) stands in for CLIP score and Inception features:

- **adherence**: the share of a prompt's attributes (shape, colour, size, count, background) the
  classifier reads back from the generated image, averaged over prompts; ``all``: the share of
  images with every attribute right;
- **FD to the reference**: the Fréchet distance between the classifier's penultimate features of
  a method's images and of the reference images (below) of the same prompts and seeds: the
  paper's Table 2 and 4 metric (FID against the 25-step DPM-Solver++ set), with our own feature
  extractor; lower is better;
- **FD to the world**: the same distance to real world renders of the same scenes in the model's
  style (how far the samples are from the data, whatever the reference does);
- **PSNR**: paired, in dB on 8-bit pixels (peak 255), against the reference image of the same
  prompt and seed: 25 DPM-Solver++ steps with CFG 8 (``Settings.baseline()``).

Tables (the paper's numbering):

- **Table 2**: DDIM 4 steps and DPM-Solver++ 4 steps (both with CFG 8, trailing spacing) and SUN
  4 steps, against the 25-step reference, per model; the adapter is trained on pocket-base only,
  so on the other models it is plugged in untrained, as SUN is on SD1.5 fine-tunes.
- **Table 4**: SUN 4 steps with adapters trained at MSC probability p = 0, 0.1, 0.25.
- **Fig. 5**: negative prompts still steer: for the prompt ``a <shape>`` with and without the
  negative prompt ``<colour>``, the share of images the classifier reads as that colour, for CFG 25
  and SUN 4 (the other colours' images are the control).

An image that shows no shape at all (``shape_visible``: a flat background, or a shape drawn in nearly the
background's own colour) is read as no colour: the classifier has no "none" answer and reads such images as
green, so without this check a negative prompt that wipes the shape out would count as drawing green.

``vae_round_trip`` reads world renders after the model's VAE alone encodes and decodes them: what the autoencoder
loses before any UNet draws (the first Pocket decoder turned green shapes grey-brown; docs/pocket.md).

Everything is generated through ``Pipeline`` on any runtime, from fixed seeds, batch 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sun_edge.pipeline import Pipeline, Settings
from sun_edge.pocket.world import (ATTRIBUTES, COLOUR_PAIRS, COLOURS, RGB, SHAPES, SIZE_RADIUS, Scene,
                                   eval_prompts, render, stylize)

GUIDANCE = 8.0
BOOTSTRAP = 200  # resamples of the prompts (with replacement) for the spreads of FD and of Fig. 5's fall


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    settings: Settings


def methods(size: int) -> dict[str, Method]:
    """The samplers compared in Table 2, at ``size`` x ``size`` pixels; ``cfg25`` is the reference."""
    common = dict(height=size, width=size)
    return {
        "cfg25": Method("cfg25", "DPM-Solver++ 25 steps, CFG 8 (reference)", Settings.baseline(**common)),
        "ddim4": Method("ddim4", "DDIM 4 steps, CFG 8", Settings(mode="cfg", steps=4, scheduler="ddim",
                                                                 spacing="trailing", guidance=GUIDANCE, **common)),
        "dpmpp4": Method("dpmpp4", "DPM-Solver++ 4 steps, CFG 8", Settings(mode="cfg", steps=4, scheduler="dpmpp_2m",
                                                                         spacing="trailing", guidance=GUIDANCE, **common)),
        "sun4": Method("sun4", "SUN 4 steps (DDIM, no CFG)", Settings(**common)),
    }


def image_psnr(ref: np.ndarray, out: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (peak 255); inf when identical."""
    mse = float(np.mean((ref.astype(np.float64) - out.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def generate_images(pipe: Pipeline, prompts: Sequence[str], seeds: Sequence[int], settings: Settings,
                    negative: str | Sequence[str] = "", progress: Callable[[], None] | None = None) -> np.ndarray:
    """uint8 [len(prompts), H, W, 3]: prompt i with seed i (and negative i, or one negative for all)."""
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    images = []
    for prompt, seed, neg in zip(prompts, seeds, negatives, strict=True):
        images.append(np.asarray(pipe.generate(prompt, neg, seeds=[seed], settings=settings)[0].image.convert("RGB")))
        if progress is not None:
            progress()
    return np.stack(images)  # [N, H, W, 3]


@dataclass
class Scores:
    """One method on one model: adherence per attribute and overall, FD, paired PSNR."""

    adherence: dict[str, float]  # attribute -> share read back right; "mean", "all"
    fd: float  # to real world images of the same scenes
    psnr: float | None  # against the reference (None for the reference itself)
    psnr_per_image: list[float] = field(default_factory=list)
    fd_reference: float | None = None  # to the reference images (None for the reference itself)
    fd_reference_sd: float | None = None  # its spread: s.d. over bootstrap resamples of the prompts (paired)

    @property
    def psnr_se(self) -> float | None:
        """Standard error of the mean paired PSNR (over the prompts' seeds)."""
        finite = [v for v in self.psnr_per_image if math.isfinite(v)]
        return float(np.std(finite, ddof=1) / math.sqrt(len(finite))) if len(finite) > 1 else None

    def to_dict(self) -> dict[str, Any]:
        return {"adherence": self.adherence, "fd": self.fd, "fd_reference": self.fd_reference,
                "fd_reference_sd": self.fd_reference_sd, "psnr": self.psnr, "psnr_se": self.psnr_se,
                "psnr_per_image": self.psnr_per_image}


# An image shows a shape where enough pixels differ from its background: by more than half the RGB distance of
# the world's closest (colour, background) pair (orange on yellow), over at least half the smallest shape's
# nominal area (a small circle-like shape, 2.4 r^2). Every world render passes (plain: 80+ such pixels at 64x64,
# toon 173+); a flat background has none.
VISIBLE_DISTANCE = 0.5 * min(float(np.linalg.norm(np.subtract(RGB[c], RGB[b]))) for c, b in COLOUR_PAIRS)
VISIBLE_AREA = 0.5 * 2.4 * SIZE_RADIUS["small"] ** 2  # as a fraction of width^2


def shape_visible(images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> bool [B]: whether each image shows a shape at all (module docstring).

    The background is the median colour of the image's one-pixel border; a pixel belongs to a shape when it is
    more than ``VISIBLE_DISTANCE`` from it; an image shows a shape when over ``VISIBLE_AREA`` of it does."""
    x = np.asarray(images, np.float32)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)  # [B, 2H + 2W, 3]
    background = np.median(border, axis=1)[:, None, None]
    far = np.linalg.norm(x - background, axis=-1) > VISIBLE_DISTANCE
    return far.sum(axis=(1, 2)) >= VISIBLE_AREA * x.shape[2] ** 2


def colours_read(classifier: Any, images: np.ndarray) -> np.ndarray:
    """The classifier's colour index per image, -1 (no colour) where ``shape_visible`` finds no shape."""
    from sun_edge.pocket.classifier import predict

    return np.where(shape_visible(images), predict(classifier, images)["colour"], -1)


def adherence(pred: dict[str, np.ndarray], scenes: Sequence[Scene], visible: np.ndarray | None = None
              ) -> dict[str, float]:
    """Share of prompts whose attribute the classifier reads back, per attribute, their mean, and all-right.

    ``visible`` (``shape_visible`` of the images): where False, the colour is not read back."""
    from sun_edge.pocket.classifier import truth

    want = truth(list(scenes))
    right = {a: pred[a] == want[a] for a in ATTRIBUTES}  # [N] bool each
    if visible is not None:
        right["colour"] = right["colour"] & np.asarray(visible, bool)
    out = {a: float(r.mean()) for a, r in right.items()}
    out["mean"] = float(np.mean([out[a] for a in ATTRIBUTES]))
    out["all"] = float(np.logical_and.reduce([right[a] for a in ATTRIBUTES]).mean())
    return out


def real_images(scenes: Sequence[Scene], seed: int, style: str, size: int) -> np.ndarray:
    """World renders of ``scenes`` (their own layout draws) in ``style``: the FD's real side, uint8 [N,H,W,3]."""
    return np.stack([stylize(render(s, np.random.default_rng([seed, i, 0xFD]), size), style)
                     for i, s in enumerate(scenes)])


def vae_round_trip(vae: Any, classifier: Any, style: str, *, scenes: int = 256, seed: int = 7) -> dict[str, float]:
    """Share of ``scenes`` world renders in ``style`` (``table2_prompts(scenes, seed)``'s scenes, their own layout
    draws) whose shape, colour, count and background the classifier reads back after ``vae`` (a diffusers
    ``AutoencoderKL``) encodes them and decodes the posterior means: what the autoencoder alone loses."""
    import torch

    from sun_edge.pocket.classifier import predict, truth

    chosen = table2_prompts(scenes, seed=seed)[1]
    real = real_images(chosen, seed + 4, style, 64)  # uint8 [N, 64, 64, 3]
    param = next(vae.parameters())
    with torch.no_grad():
        x = torch.from_numpy(real).permute(0, 3, 1, 2).to(param) / 127.5 - 1  # [N, 3, 64, 64] in [-1, 1]
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
    decoded = ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    read, want = predict(classifier, decoded), truth(list(chosen))
    return {a: float((read[a] == want[a]).mean()) for a in ("shape", "colour", "count", "background")}


def score(classifier: Any, images: np.ndarray, scenes: Sequence[Scene], real_feats: np.ndarray,
          reference: np.ndarray | None = None, reference_feats: np.ndarray | None = None) -> Scores:
    """``images`` scored; ``reference`` (and its features) None when they are the reference."""
    from sun_edge.pocket.classifier import extract_features, frechet_distance, predict

    feats = extract_features(classifier, images)
    fd = frechet_distance(feats, real_feats)
    fd_ref = frechet_distance(feats, reference_feats) if reference_feats is not None else None
    fd_ref_sd = None
    if reference_feats is not None and len(feats) == len(reference_feats) and len(feats) >= 4:
        rng = np.random.default_rng(0)  # the same resamples for every method: their spreads compare
        picks = [rng.integers(0, len(feats), len(feats)) for _ in range(BOOTSTRAP)]
        fd_ref_sd = float(np.std([frechet_distance(feats[k], reference_feats[k]) for k in picks]))
    per_image = [image_psnr(r, o) for r, o in zip(reference, images)] if reference is not None else []
    return Scores(adherence(predict(classifier, images), scenes, shape_visible(images)), fd,
                  float(np.mean(per_image)) if per_image else None, per_image, fd_ref, fd_ref_sd)


@dataclass
class NegativeSteering:
    """Fig. 5 for one method: share of each colour without and with that colour as the negative prompt."""

    without: dict[str, float]  # colour -> share of images read as that colour, no negative prompt
    with_negative: dict[str, float]  # colour -> share read as that colour when it is the negative prompt
    # per image (prompt and seed), 1 where the image is read as the colour: colour -> [N] bools, for the spread
    hits_without: dict[str, list[bool]] = field(default_factory=dict)
    hits_with: dict[str, list[bool]] = field(default_factory=dict)

    def mean(self) -> tuple[float, float]:
        return float(np.mean(list(self.without.values()))), float(np.mean(list(self.with_negative.values())))

    def fall(self) -> float:
        """Relative fall of the mean share: 1 - with / without (0.75: the colour appears 75% less often)."""
        a, b = self.mean()
        return 1.0 - b / a if a > 0 else float("nan")

    def fall_sd(self) -> float | None:
        """Spread of :meth:`fall`: s.d. over bootstrap resamples of the images (prompt and seed, paired)."""
        if not self.hits_without:
            return None
        a = np.array([self.hits_without[c] for c in self.without], float)  # [colours, N]
        b = np.array([self.hits_with[c] for c in self.without], float)
        rng = np.random.default_rng(0)
        falls = []
        for _ in range(BOOTSTRAP):
            k = rng.integers(0, a.shape[1], a.shape[1])
            mean_a = a[:, k].mean()
            if mean_a > 0:
                falls.append(1.0 - b[:, k].mean() / mean_a)
        return float(np.std(falls)) if falls else None

    def to_dict(self) -> dict[str, Any]:
        return {"without": self.without, "with_negative": self.with_negative, "mean": self.mean(),
                "fall": self.fall(), "fall_sd": self.fall_sd(), "hits_without": self.hits_without,
                "hits_with": self.hits_with}


def negative_steering(pipe: Pipeline, classifier: Any, settings: Settings, *, seeds_per_shape: int,
                      colours: Sequence[str] = COLOURS, progress: Callable[[], None] | None = None,
                      first_seed: int = 1000) -> NegativeSteering:
    """``a <shape>`` for every shape, ``seeds_per_shape`` seeds from ``first_seed`` on (``sun-edge eval``: 1000);
    once with no negative, once per colour as it. An image with no visible shape is in no colour (``colours_read``)."""
    prompts = [f"a {shape}" for shape in SHAPES for _ in range(seeds_per_shape)]
    seeds = [first_seed + i for i in range(len(prompts))]
    base = colours_read(classifier, generate_images(pipe, prompts, seeds, settings, "", progress))
    without, with_neg, hits_without, hits_with = {}, {}, {}, {}
    for colour in colours:
        index = COLOURS.index(colour)
        without[colour] = float((base == index).mean())
        hits_without[colour] = [bool(v) for v in base == index]
        steered = colours_read(classifier, generate_images(pipe, prompts, seeds, settings, colour, progress))
        with_neg[colour] = float((steered == index).mean())
        hits_with[colour] = [bool(v) for v in steered == index]
    return NegativeSteering(without, with_neg, hits_without, hits_with)


def table2_prompts(n: int, seed: int = 2023) -> tuple[list[str], list[Scene], list[int]]:
    """``n`` fully specified prompts (``world.eval_prompts``), their scenes, and one seed each."""
    pairs = eval_prompts(n, seed)
    return [scene.caption(mention) for scene, mention in pairs], [scene for scene, _ in pairs], list(range(n))
