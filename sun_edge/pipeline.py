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

__all__ = ["Generated", "Mode", "Pipeline", "Runtime", "Settings"]



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
            context = np.concatenate([neg, pos])  # [2, 77, D]

            def eps(latents: np.ndarray, t: np.ndarray) -> np.ndarray:
                both = plain(np.concatenate([latents, latents]), t, context)  # [2, 4, h, w]
                return sampling.cfg_combine(both[:1], both[1:], settings.guidance)
        return _Meter(eps)

    def warm_up(self, settings: Settings) -> None:
        """One untimed UNet call in ``settings.mode``, so that one-time backend set-up does not skew timings."""
        emb = self.embed("")
        latents = self.initial_latents(0, settings)
        self.eps_fn(emb, emb, settings)(latents, np.array([999.0], np.float32))

    def generate(self, prompt: str, negative_prompt: str = "", *, seeds: Sequence[int] = (0,),
                 settings: Settings = Settings(), progress: Callable[[int, int], None] | None = None) -> list[Generated]:
        """One image per seed. ``progress(done, total)`` is called once before the first UNet step, then after each."""
        settings.validate()
        check_text(prompt, "prompt")
        check_text(negative_prompt, "negative prompt")
        check_seeds(seeds)
        total, done = len(seeds) * settings.steps, 0
        results = []
        pos, neg = self.embed(prompt), self.embed(negative_prompt)  # once for all seeds
        if progress is not None:
            progress(0, total)  # text encoded: sampling starts
        for seed in seeds:
            start = time.perf_counter()
            meter = self.eps_fn(pos, neg, settings)

            def step_done(*_: Any) -> None:
                nonlocal done
                done += 1
                if progress is not None:
                    progress(done, total)

            latents = sampling.sample(meter, self.initial_latents(seed, settings), steps=settings.steps,
                                      scheduler=settings.scheduler, spacing=settings.spacing, progress=step_done)
            check_finite(latents, "the final latents", "the UNet")
            pixels = check_finite(self.runtime.decode(latents.astype(np.float32)), "the image", "the VAE decoder")
            image = imaging.to_pil(pixels[0])
            seconds = time.perf_counter() - start
            results.append(Generated(image, seed, prompt, negative_prompt, settings, seconds, meter.calls,
                                     meter.seconds, self._fields(seed, settings)))
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

