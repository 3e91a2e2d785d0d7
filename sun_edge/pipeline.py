"""``Pipeline``: prompt to image on any runtime, with the one NumPy sampler.

The pipeline owns everything that must be identical across runtimes: tokenization, initial
noise, the sampling loop, CFG's combination and the conversion to 8-bit pixels. A runtime only
evaluates its graphs (DESIGN.md, "Contracts"). NumPy only: no PyTorch here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from sun_edge import imaging, noise, sampling
from sun_edge import __version__
from sun_edge.components import Runtime
from sun_edge.settings import Mode, NoiseKind, Settings, check_finite, check_seeds, check_text
from sun_edge.errors import SunEdgeError
from sun_edge.tokenizer import CLIPTokenizer

__all__ = ["Generated", "Job", "Mode", "Pipeline", "Runtime", "Settings"]



@dataclass(frozen=True)
class Job:
    """One image to make: its prompt, negative prompt and seed."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0


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

    def eps_fn(self, pos: np.ndarray, neg: np.ndarray, settings: Settings) -> "_Meter":
        """The model as the sampler sees it (given both text embeddings), counting calls and their time."""
        if settings.mode == "sun":
            def eps(latents: np.ndarray, t: np.ndarray) -> np.ndarray:
                return self.runtime.unet(latents, t, pos, neg)
        else:
            if not self.runtime.has("unet_plain"):
                raise SunEdgeError(f"runtime {self.runtime.name} has no UNet without the adapter; CFG mode needs one")
            plain = self.runtime.unet_plain
            context, b = np.concatenate([neg, pos]), len(pos)  # [2B, 77, D]: every negative, then every positive

            def eps(latents: np.ndarray, t: np.ndarray) -> np.ndarray:
                both = plain(np.concatenate([latents, latents]), t, context)  # [2B, 4, h, w]
                return sampling.cfg_combine(both[:b], both[b:], settings.guidance)
        return _Meter(eps)

    def warm_up(self, settings: Settings) -> None:
        """One untimed UNet call in ``settings.mode``, so that one-time backend set-up does not skew timings."""
        emb = self.embed("")
        latents = self.initial_latents(0, settings)
        self.eps_fn(emb, emb, settings)(latents, np.array([999.0], np.float32))

    def generate(self, prompt: str, negative_prompt: str = "", *, seeds: Sequence[int] = (0,),
                 settings: Settings = Settings(), progress: Callable[[int, int], None] | None = None,
                 max_batch: int = 1) -> list[Generated]:
        """One image per seed, ``max_batch`` seeds per UNet call (see ``generate_batch``)."""
        return self.generate_batch([Job(prompt, negative_prompt, seed) for seed in seeds], settings=settings,
                                   progress=progress, max_batch=max_batch)

    def generate_batch(self, jobs: Sequence[Job], *, settings: Settings = Settings(),
                       progress: Callable[[int, int], None] | None = None, max_batch: int = 1) -> list[Generated]:
        """One image per job, each with its own prompt, negative prompt and seed, in job order.

        Up to ``max_batch`` jobs (and at most the runtime's ``max_batch``) share each UNet call: their
        latents, noise and text embeddings are stacked on the batch axis, and since nothing in a
        runtime mixes batch items (the adapter's norms are per sample), image k is the image job k
        gives alone. The VAE decodes one image at a time. ``progress(done, total)`` is called once
        before the first UNet step, then after each (a batched step counts once per image).
        """
        settings.validate()
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise SunEdgeError(f"max_batch must be a positive whole number, got {max_batch!r}")
        for job in jobs:
            check_text(job.prompt, "prompt")
            check_text(job.negative_prompt, "negative prompt")
        check_seeds([job.seed for job in jobs])
        limit = min(max_batch, self.runtime.max_batch)
        total, done = len(jobs) * settings.steps, 0
        texts = {text for job in jobs for text in (job.prompt, job.negative_prompt)}
        embedded = {text: self.embed(text) for text in sorted(texts)}  # [1, 77, D] each, once per distinct text
        if progress is not None:
            progress(0, total)  # text encoded: sampling starts
        results: list[Generated] = []
        for first in range(0, len(jobs), limit):
            group = list(jobs[first:first + limit])
            start = time.perf_counter()
            pos = np.concatenate([embedded[job.prompt] for job in group])  # [B, 77, D]
            neg = np.concatenate([embedded[job.negative_prompt] for job in group])  # [B, 77, D]
            meter = self.eps_fn(pos, neg, settings)

            def step_done(*_: Any, n: int = len(group)) -> None:
                nonlocal done
                done += n
                if progress is not None:
                    progress(done, total)

            x = np.concatenate([self.initial_latents(job.seed, settings) for job in group])  # [B, 4, h, w]
            latents = sampling.sample(meter, x, steps=settings.steps, scheduler=settings.scheduler,
                                      spacing=settings.spacing, progress=step_done)
            check_finite(latents, "the final latents", "the UNet")
            images = []
            for k in range(len(group)):
                pixels = self.runtime.decode(latents[k:k + 1].astype(np.float32))  # [1, 3, H, W]
                images.append(imaging.to_pil(check_finite(pixels, "the image", "the VAE decoder")[0]))
            seconds, b = time.perf_counter() - start, len(group)
            results += [Generated(image, job.seed, job.prompt, job.negative_prompt, settings, seconds / b, meter.calls,
                                  meter.seconds / b, self._fields(job.seed, settings), batch=b)
                        for job, image in zip(group, images)]
        return results

    def _fields(self, seed: int, settings: Settings) -> dict[str, Any]:
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
            "Lora": ", ".join(info["loras"]) if info.get("loras") else None,
            "VAE decoder": info.get("vae_decoder"),  # "tiny:<TAESD>" when not the model's VAE
            "SUN": "on" if sun else "off (CFG baseline)",
            "SUN adapter": info.get("adapter") if sun else None,
            "SUN adapter sha256": info.get("adapter_sha256") if sun else None,
            "Noise": settings.noise,
            "Runtime": self.runtime.name,
            "Version": f"sun-edge {__version__}",
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

