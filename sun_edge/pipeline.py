"""``Pipeline``: prompt to image on any runtime, with the one NumPy sampler.

The pipeline owns everything that must be identical across runtimes: tokenization, initial
noise, the sampling loop, CFG's combination and the conversion to 8-bit pixels. A runtime only
evaluates its graphs (DESIGN.md, "Contracts"). NumPy only: no PyTorch here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sun_edge import control_image, editing, imaging, noise, sampling
from sun_edge import __version__
from sun_edge.components import Runtime
from sun_edge.settings import Mode, NoiseKind, Settings, check_finite, check_seeds, check_text
from sun_edge.errors import SunEdgeError
from sun_edge.tokenizer import CLIPTokenizer

__all__ = ["Generated", "Job", "Mode", "Pipeline", "Prepared", "Runtime", "Settings"]



@dataclass(frozen=True)
class Job:
    """One image to make: its prompt, negative prompt and seed; for img2img an init image (any size: resized
    and center-cropped to the model's), for inpainting also a mask of the init image's size (white = repaint)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    control_image: Image.Image | None = None  # ControlNet condition (any size: fitted to the image size)


@dataclass
class Generated:
    """One image and how it was made."""

    image: Image.Image
    seed: int
    prompt: str
    negative_prompt: str
    settings: Settings
    seconds: float  # sampling and decoding (text encoding is done once per call, not counted)
    unet_calls: int
    unet_seconds: float  # time inside the UNet calls (the CFG combination included)
    fields: dict[str, Any] = field(default_factory=dict)
    batch: int = 1  # images that shared its UNet calls (seconds and unet_seconds are its share)

    @property
    def parameters(self) -> str:
        """The AUTOMATIC1111-style ``parameters`` text for the PNG."""
        return imaging.a1111_parameters(self.prompt, self.negative_prompt, self.fields)


@dataclass
class Pipeline:
    """Drives any runtime from prompt to images."""

    runtime: Runtime
    tokenizer: CLIPTokenizer = field(default_factory=CLIPTokenizer.default)

    def embed(self, text: str) -> np.ndarray:
        """Prompt -> text embedding [1,77,D]."""
        return self.runtime.encode_text(self.tokenizer.encode(text))

    def initial_latents(self, seed: int, settings: Settings) -> np.ndarray:
        shape = (1, self.runtime.latent_channels, settings.height // self.runtime.vae_scale_factor,
                 settings.width // self.runtime.vae_scale_factor)
        return noise.initial_noise(seed, shape, kind=settings.noise)

    def eps_fn(self, pos: np.ndarray, neg: np.ndarray, settings: Settings,
               control: tuple[np.ndarray, np.ndarray] | None = None, *,
               condition: np.ndarray | None = None) -> "_Meter":
        """The model as the sampler sees it (given both text embeddings), counting calls and their time.

        ``condition`` [B,5,h,w]: an inpainting UNet's mask and masked-image latents, appended to its sample.

        ``control``: (condition [B,3,H,W] in [0, 1], which items have one [B] bool): the ControlNet runs once per
        step (SUN: on the batch, reading ``[pos; neg]``; CFG: on the 2B pair) and its residuals, times
        ``settings.control_scale`` and zero for items without a condition, feed the UNet."""
        if control is not None:
            return self._controlled_eps(pos, neg, settings, *control, condition=condition)
        if settings.mode == "sun":
            def eps(latents: np.ndarray, t: np.ndarray) -> np.ndarray:
                return self.runtime.unet(_with_condition(latents, condition), t, pos, neg)
        else:
            if not self.runtime.has("unet_plain"):
                raise SunEdgeError(f"runtime {self.runtime.name} has no UNet without the adapter; CFG mode needs one")
            plain = self.runtime.unet_plain
            context, b = np.concatenate([neg, pos]), len(pos)  # [2B, 77, D]: every negative, then every positive

            def eps(latents: np.ndarray, t: np.ndarray) -> np.ndarray:
                both = plain(_with_condition(np.concatenate([latents, latents]), condition), t, context)  # [2B, 4, h, w]
                return sampling.cfg_combine(both[:b], both[b:], settings.guidance)
        return _Meter(eps)

    def _controlled_eps(self, pos: np.ndarray, neg: np.ndarray, settings: Settings, cond: np.ndarray,
                        present: np.ndarray, condition: np.ndarray | None = None) -> "_Meter":
        """``eps_fn`` with a ControlNet (its docstring)."""
        if not self.runtime.has("controlnet"):
            raise SunEdgeError(f"runtime {self.runtime.name} has no ControlNet; load one with --controlnet FILE (a bundle: "
                               "export it with --controlnet FILE)")
        scale = np.array([settings.control_scale], np.float32)  # [1]

        def residuals(latents: np.ndarray, t: np.ndarray, p: np.ndarray, n: np.ndarray, c: np.ndarray,
                      keep: np.ndarray) -> tuple[np.ndarray, ...]:
            out = self.runtime.controlnet(latents, t, p, n, c, scale)
            mask = keep.astype(np.float32).reshape(-1, 1, 1, 1)  # [B, 1, 1, 1]: 0 for items without a condition
            return tuple(check_finite(r, "the ControlNet residuals", "the ControlNet") * mask for r in out)

        if settings.mode == "sun":
            def eps(latents: np.ndarray, t: np.ndarray) -> np.ndarray:
                return self.runtime.unet(_with_condition(latents, condition), t, pos, neg, residuals(latents, t, pos, neg, cond, present))
        else:
            if not self.runtime.has("unet_plain"):
                raise SunEdgeError(f"runtime {self.runtime.name} has no UNet without the adapter; CFG mode needs one")
            context, b = np.concatenate([neg, pos]), len(pos)  # [2B, 77, D]
            cond2, keep2 = np.concatenate([cond, cond]), np.concatenate([present, present])

            def eps(latents: np.ndarray, t: np.ndarray) -> np.ndarray:
                x2 = np.concatenate([latents, latents])  # [2B, 4, h, w]; the ControlNet reads [c; c] = c per item
                both = self.runtime.unet_plain(_with_condition(x2, condition), t, context, residuals(x2, t, context, context, cond2, keep2))
                return sampling.cfg_combine(both[:b], both[b:], settings.guidance)
        return _Meter(eps)

    def control_input(self, jobs: Sequence[Job], settings: Settings) -> tuple[np.ndarray, np.ndarray] | None:
        """The ControlNet input of a group of jobs: conditions [B,3,H,W] (zeros where a job has none) and which
        jobs have one [B]; None when none has."""
        if all(job.control_image is None for job in jobs):
            return None
        blank = np.zeros((1, 3, settings.height, settings.width), np.float32)
        cond = np.concatenate([control_image.control_condition(job.control_image, settings.width, settings.height)
                               if job.control_image is not None else blank for job in jobs])
        return cond, np.array([job.control_image is not None for job in jobs])

    def warm_up(self, settings: Settings) -> None:
        """One untimed UNet call in ``settings.mode``, so that one-time backend set-up does not skew timings."""
        emb = self.embed("")
        latents = self.initial_latents(0, settings)
        condition = None
        if self.inpainting_unet:
            condition = np.zeros((1, latents.shape[1] + 1, *latents.shape[2:]), np.float32)  # [1, 5, h, w]
        self.eps_fn(emb, emb, settings, condition=condition)(latents, np.array([999.0], np.float32))

    @property
    def inpainting_unet(self) -> bool:
        """Whether the runtime's UNet is an inpainting UNet (sd-1.5-inpainting: latents, mask, masked-image latents)."""
        channels = getattr(self.runtime, "unet_in_channels", self.runtime.latent_channels)  # duck-typed runtimes: 4
        if channels == self.runtime.latent_channels:
            return False
        if channels != 2 * self.runtime.latent_channels + 1:
            raise SunEdgeError(f"runtime {self.runtime.name}'s UNet takes {channels} input channels; sun-edge runs "
                               f"UNets of {self.runtime.latent_channels} (text-to-image) or "
                               f"{2 * self.runtime.latent_channels + 1} (inpainting)")
        return True

    def prepare_edit(self, job: Job, settings: Settings) -> Prepared:
        """What img2img and inpainting feed the sampler for ``job`` (``sun_edge.editing``): the init image's
        latents sampled from the VAE posterior with the job's seed, the mask, an inpainting UNet's condition."""
        if job.mask is not None and job.init_image is None:
            raise SunEdgeError("a mask needs an init image to inpaint (give both)")
        inpainting = self.inpainting_unet
        if job.init_image is None and not inpainting:
            return Prepared()
        if not self.runtime.has("vae_encoder"):
            raise SunEdgeError(f"runtime {self.runtime.name} has no VAE encoder, which img2img and inpainting need; "
                               "re-export the bundle (sun-edge exports put the VAE encoder in every bundle)")
        h, w, f = settings.height, settings.width, self.runtime.vae_scale_factor
        draws = noise.initial_noise(job.seed, (3, self.runtime.latent_channels, h // f, w // f), kind=settings.noise)
        image = mask = init = condition = None
        if job.init_image is not None:
            image = editing.prepare_image(job.init_image, w, h)  # [1, 3, H, W]
            init = editing.sample_posterior(*self.runtime.encode_dist(image), draws[1:2])  # [1, 4, h, w]
            check_finite(init, "the init image's latents", "the VAE encoder")
        if job.mask is not None:
            mask = editing.prepare_mask(job.mask, job.init_image.size, w, h, f, blur=settings.mask_blur,
                                        invert=settings.invert_mask)
        if inpainting:  # sd-1.5-inpainting: mask (all repainted without one), masked image (grey without an image)
            full = editing.Mask(np.ones((1, 1, h, w), np.float32), np.ones((1, 1, h // f, w // f), np.float32))
            which = mask or full
            masked = which.masked_image(image if image is not None else np.zeros((1, 3, h, w), np.float32))
            masked_latents = editing.sample_posterior(*self.runtime.encode_dist(masked), draws[2:3])
            condition = np.concatenate([which.latent, masked_latents], axis=1)  # [1, 5, h, w]
        return Prepared(image, init, mask, condition)

    def generate(self, prompt: str, negative_prompt: str = "", *, seeds: Sequence[int] = (0,),
                 settings: Settings = Settings(), progress: Callable[[int, int], None] | None = None,
                 max_batch: int = 1, init_image: Image.Image | None = None, mask: Image.Image | None = None,
                 control_image: Image.Image | None = None) -> list[Generated]:
        """One image per seed, ``max_batch`` seeds per UNet call (see ``generate_batch``); ``init_image`` (img2img,
        ``settings.strength``) and ``mask`` (inpainting, white = repaint) apply to every seed; ``control_image``: the
        ControlNet condition of every seed."""
        jobs = [Job(prompt, negative_prompt, seed, init_image=init_image, mask=mask, control_image=control_image)
                for seed in seeds]
        return self.generate_batch(jobs, settings=settings, progress=progress, max_batch=max_batch)

    def generate_batch(self, jobs: Sequence[Job], *, settings: Settings = Settings(),
                       progress: Callable[[int, int], None] | None = None, max_batch: int = 1) -> list[Generated]:
        """One image per job, each with its own prompt, negative prompt and seed, in job order.

        Up to ``max_batch`` jobs (and at most the runtime's ``max_batch``) share each UNet call: their
        latents, noise and text embeddings are stacked on the batch axis, and since nothing in a
        runtime mixes batch items (the adapter's norms are per sample), image k is the image job k
        gives alone. The VAE decodes one image at a time. ``progress(done, total)`` is called once
        before the first UNet step, then after each (a batched step counts once per image).

        A job with an ``init_image`` is img2img: ``sampling.kept_steps(steps, settings.strength)`` steps
        from its latents; with a ``mask`` it is inpainting (the region outside the mask blended back after
        each step, and ``settings.paste_back`` pastes the original pixels there). Batches hold jobs of one
        kind (text, img2img, inpainting); ``settings.strength`` is ignored for jobs without an init image.
        """
        settings.validate()
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise SunEdgeError(f"max_batch must be a positive whole number, got {max_batch!r}")
        for job in jobs:
            check_text(job.prompt, "prompt")
            check_text(job.negative_prompt, "negative prompt")
            if job.control_image is not None:
                control_image.check_control_image(job.control_image)
        if any(job.control_image is not None for job in jobs) and not self.runtime.has("controlnet"):
            raise SunEdgeError(f"a control image was given and runtime {self.runtime.name} has no ControlNet; load one "
                               "with --controlnet FILE (a bundle: export it with --controlnet FILE)")
        check_seeds([job.seed for job in jobs])
        limit = min(max_batch, self.runtime.max_batch)
        kept = sampling.kept_steps(settings.steps, settings.strength)
        total, done = sum(kept if job.init_image is not None else settings.steps for job in jobs), 0
        texts = {text for job in jobs for text in (job.prompt, job.negative_prompt)}
        embedded = {text: self.embed(text) for text in sorted(texts)}  # [1, 77, D] each, once per distinct text
        if progress is not None:
            progress(0, total)  # text encoded: sampling starts
        results: list[Generated] = []
        for group in _groups(jobs, limit):
            start = time.perf_counter()
            prepared = [self.prepare_edit(job, settings) for job in group]
            pos = np.concatenate([embedded[job.prompt] for job in group])  # [B, 77, D]
            neg = np.concatenate([embedded[job.negative_prompt] for job in group])  # [B, 77, D]
            meter = self.eps_fn(pos, neg, settings, self.control_input(group, settings), condition=_condition(prepared))

            def step_done(*_: Any, n: int = len(group)) -> None:
                nonlocal done
                done += n
                if progress is not None:
                    progress(done, total)

            x = np.concatenate([self.initial_latents(job.seed, settings) for job in group])  # [B, 4, h, w]
            latents = sampling.sample(meter, x, steps=settings.steps, scheduler=settings.scheduler,
                                      spacing=settings.spacing, progress=step_done, edit=_edit(prepared, settings))
            check_finite(latents, "the final latents", "the UNet")
            images = []
            for k, p in enumerate(prepared):
                pixels = self.runtime.decode(latents[k:k + 1].astype(np.float32))  # [1, 3, H, W]
                image = imaging.to_pil(check_finite(pixels, "the image", "the VAE decoder")[0])
                if settings.paste_back and p.mask is not None:
                    image = editing.paste_back(image, p.image, p.mask)
                images.append(image)
            seconds, b = time.perf_counter() - start, len(group)
            results += [Generated(image, job.seed, job.prompt, job.negative_prompt, settings, seconds / b, meter.calls,
                                  meter.seconds / b, {**self._fields(job.seed, settings, job),
                                                      **self._control_fields(job, settings)}, batch=b)
                        for job, image in zip(group, images)]
        return results

    def _control_fields(self, job: Job, settings: Settings) -> dict[str, Any]:
        return _control_fields_of(self.runtime.info, job, settings)

    def _fields(self, seed: int, settings: Settings, job: Job | None = None) -> dict[str, Any]:
        info = self.runtime.info
        model_hash = info.get("model_sha256")
        sun = settings.mode == "sun"
        return {
            "Steps": settings.steps,
            "Sampler": imaging.SAMPLER_LABELS.get(settings.scheduler, settings.scheduler),
            "Schedule type": settings.spacing,
            "CFG scale": settings.guidance if not sun else 1,
            "Seed": seed,
            "Size": f"{settings.width}x{settings.height}",
            "Model hash": model_hash[:10] if model_hash else None,
            "Model": info.get("model"),
            **(_edit_fields(job, settings) if job is not None else {}),
            "Lora": ", ".join(info["loras"]) if info.get("loras") else None,
            "VAE decoder": info.get("vae_decoder"),  # "tiny:<TAESD>" when not the model's VAE
            "SUN": "on" if sun else "off (CFG baseline)",
            "SUN adapter": info.get("adapter") if sun else None,
            "SUN adapter sha256": info.get("adapter_sha256") if sun else None,
            "Noise": settings.noise,
            "Runtime": self.runtime.name,
            "Version": f"sun-edge {__version__}",
        }


def _control_fields_of(info: dict[str, Any], job: Job, settings: Settings) -> dict[str, Any]:
    """A1111's ``ControlNet 0`` entry (module, model [hash], weight) and the condition's pixel hash."""
    if job.control_image is None:
        return {}
    digest = info.get("controlnet_sha256")
    model = Path(str(info.get("controlnet") or "controlnet")).stem + (f" [{digest[:8]}]" if digest else "")
    return {"ControlNet 0": f"Module: none, Model: {model}, Weight: {settings.control_scale:g}, "
                            "Resize Mode: Crop and Resize, Guidance Start: 0, Guidance End: 1",
            "ControlNet image hash": control_image.image_hash(job.control_image)}


@dataclass(frozen=True)
class Prepared:
    """One job's editing inputs (``Pipeline.prepare_edit``); all None for text-to-image on an ordinary UNet."""

    image: np.ndarray | None = None  # the init image as the model saw it [1,3,H,W] in [-1, 1]
    init: np.ndarray | None = None  # its latents, a posterior sample [1,4,h,w]
    mask: editing.Mask | None = None
    condition: np.ndarray | None = None  # an inpainting UNet's mask and masked-image latents [1,5,h,w]


def _groups(jobs: Sequence[Job], limit: int) -> list[list[Job]]:
    """Consecutive jobs in batches of up to ``limit``, a new batch where the kind (text, img2img, inpainting) changes."""
    groups: list[list[Job]] = []
    for job in jobs:
        kind = (job.init_image is not None, job.mask is not None)
        last = groups[-1] if groups else None
        if last is None or len(last) >= limit or (last[0].init_image is not None, last[0].mask is not None) != kind:
            groups.append([job])
        else:
            last.append(job)
    return groups


def _edit(prepared: Sequence[Prepared], settings: Settings) -> sampling.Edit | None:
    """The sampler's ``Edit`` for one batch of jobs of one kind (None: text-to-image)."""
    if prepared[0].init is None:
        return None
    init = np.concatenate([p.init for p in prepared])  # [B, 4, h, w]
    masks = [p.mask.latent for p in prepared if p.mask is not None]
    return sampling.Edit(init, settings.strength, np.concatenate(masks) if masks else None)  # mask [B, 1, h, w]


def _condition(prepared: Sequence[Prepared]) -> np.ndarray | None:
    """An inpainting UNet's extra input channels for one batch [B,5,h,w] (None: an ordinary UNet)."""
    found = [p.condition for p in prepared if p.condition is not None]
    return np.concatenate(found) if found else None


def _with_condition(latents: np.ndarray, condition: np.ndarray | None) -> np.ndarray:
    """The UNet's sample: ``latents`` [n,4,h,w] and, for an inpainting UNet, ``condition`` [B,5,h,w] (repeated for
    the CFG pair, n = 2B) -> [n,9,h,w]."""
    if condition is None:
        return latents
    return np.concatenate([latents, np.tile(condition, (len(latents) // len(condition), 1, 1, 1))], axis=1)


def _edit_fields(job: Job, settings: Settings) -> dict[str, Any]:
    """A1111's img2img fields: denoising strength, the init image's hash, the mask's blur and mode."""
    if job.init_image is None:
        return {}
    return {
        "Denoising strength": settings.strength,
        "Init image hash": editing.image_hash(job.init_image),
        "Mask blur": settings.mask_blur if job.mask is not None else None,
        "Mask mode": "Inpaint not masked" if job.mask is not None and settings.invert_mask else None,
        "Paste back": "on" if job.mask is not None and settings.paste_back else None,
    }


class _Meter:
    """Wraps an eps function, counting calls and the seconds spent in them."""

    def __init__(self, fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        self.fn, self.calls, self.seconds = fn, 0, 0.0

    def __call__(self, latents: np.ndarray, t: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        try:
            return self.fn(latents, t)
        finally:
            self.calls += 1
            self.seconds += time.perf_counter() - start

