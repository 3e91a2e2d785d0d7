"""``Settings``: how to sample, and the one validation layer for everything a caller passes in.

The CLI, the library (``Pipeline.generate``) and a server call the same checks: ``Settings.validate``
for the sampling settings, ``check_text`` for prompts, ``check_seeds`` for seeds, ``check_finite``
for what a network returned. Each failure is one ``SunEdgeError`` line naming the setting and the
allowed range; nothing here needs a model, so a caller validates before loading one.
NumPy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sun_edge import sampling
from sun_edge.errors import SunEdgeError

if TYPE_CHECKING:
    from sun_edge.bundle import Manifest

Mode = Literal["sun", "cfg"]
NoiseKind = Literal["torch", "numpy"]
MODES: tuple[str, ...] = ("sun", "cfg")
NOISE_KINDS: tuple[str, ...] = ("torch", "numpy")
MAX_STEPS = 1000  # the training schedule's length: more steps than timesteps mean nothing
MAX_SIDE = 2048  # SD1.5 makes 512-768; 2048x2048 already needs a 256x256 latent and many GB per UNet call
MAX_GUIDANCE = 50.0
MAX_SEED = 2**64 - 1
MAX_CONTROL_SCALE = 2.0  # A1111's ControlNet weight slider goes to 2
MAX_MASK_BLUR = 64  # pixels; A1111's slider stops there


def _check_int(what: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SunEdgeError(f"{what} must be a whole number, got {value!r}")
    if not low <= int(value) <= high:
        raise SunEdgeError(f"{what} {value} is outside [{low}, {high}]")


def check_text(text: Any, what: str = "prompt") -> str:
    """A prompt as the tokenizer and a PNG's metadata need it: a ``str`` that encodes as UTF-8."""
    if not isinstance(text, str):
        raise SunEdgeError(f"the {what} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SunEdgeError(f"the {what} is not valid UTF-8 text (character {e.start}: {text[e.start]!r}); "
                           "check how your shell or client encodes it") from e
    return text


def check_seeds(seeds: Sequence[Any]) -> None:
    """Seeds are whole numbers in [0, 2**64 - 1], at least one."""
    if len(seeds) == 0:
        raise SunEdgeError("no seed given; pass at least one")
    for seed in seeds:
        _check_int("seed", seed, 0, MAX_SEED)


def check_output_file(path: Path | None, what: str = "output", suffix: str | None = None) -> None:
    """Before any work: ``path`` (named ``what`` in messages: a CLI passes its flag) can be written. Its
    folder exists and takes a new file (probed with a temporary file, so read-only and virtual file
    systems are caught too), and it is not a folder itself."""
    import tempfile

    if path is None:
        return
    if path.is_dir():
        raise SunEdgeError(f"{what} {path} is a folder; give a file path inside it")
    if suffix is not None and path.suffix.lower() != suffix:
        raise SunEdgeError(f"output {path} must end in {suffix} ({what})")
    folder = path.parent
    if not folder.resolve().is_dir():
        raise SunEdgeError(f"folder {folder} for {what} does not exist; create it first")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sun-edge-write-check-"):
            pass
    except OSError as e:
        raise SunEdgeError(f"cannot write in {folder} ({e.strerror or type(e).__name__}); choose another {what}") from e


def check_finite(array: np.ndarray, what: str, source: str) -> np.ndarray:
    """Raise one line unless every value of ``array`` is finite: never make an image from NaN or inf."""
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise SunEdgeError(f"{bad} non-finite value(s) (NaN or inf) in {what}, from {source}: the model, adapter or "
                           "settings overflow (fp16?) or carry NaN; no image was made")
    return array


@dataclass(frozen=True)
class Settings:
    """How to sample. SUN defaults: 4 DDIM steps on the trailing grid [999, 749, 499, 249]."""

    mode: Mode = "sun"
    steps: int = 4
    scheduler: str = "ddim"
    spacing: str = "trailing"
    guidance: float = 8.0  # CFG mode only; SUN's guidance is learnt
    height: int = 512
    width: int = 512
    noise: NoiseKind = "torch"
    strength: float = 1.0  # img2img/inpainting denoising strength in (0, 1]: the fraction of the grid that runs
    mask_blur: int = 0  # inpainting: pixels of Gaussian blur on the mask (A1111's mask_blur), 0..64
    invert_mask: bool = False  # inpainting: repaint the black part instead (A1111's inpainting_mask_invert)
    paste_back: bool = False  # inpainting: the original pixels outside the (blurred) mask over the result
    control_scale: float = 1.0  # ControlNet conditioning scale (A1111's weight), in [0, MAX_CONTROL_SCALE]

    @classmethod
    def baseline(cls, **overrides: Any) -> "Settings":
        """The reference SUN is measured against: 25 DPM-Solver++ steps with CFG at scale 8."""
        return replace(cls(mode="cfg", steps=25, scheduler="dpmpp_2m", spacing="linspace"), **overrides)

    @classmethod
    def for_mode(cls, mode: Mode = "sun", **overrides: Any) -> "Settings":
        """The defaults of ``mode`` (SUN's, or ``baseline()``'s for ``cfg``), then ``overrides`` (``None`` keeps a default)."""
        base = cls() if mode == "sun" else cls.baseline()
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_manifest(cls, manifest: Manifest, mode: Mode = "sun", **overrides: Any) -> "Settings":
        """A bundle's defaults for ``mode``: its image size and the scheduler it records for that mode (SUN's
        ``scheduler``, CFG's ``baseline``), then ``overrides``. A bundle's graphs have static shapes: another
        size is refused."""
        size = {"height": int(manifest.image["height"]), "width": int(manifest.image["width"])}
        recorded = (manifest.scheduler if mode == "sun" else manifest.baseline) or {}
        settings = cls.for_mode(mode, **size, steps=recorded.get("steps"), scheduler=recorded.get("name"),
                                spacing=recorded.get("spacing"))
        settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
        if (settings.height, settings.width) != (size["height"], size["width"]):
            raise SunEdgeError(f"this bundle makes {size['width']}x{size['height']} images (its graphs have static "
                               "shapes); ask for that size, or re-export it at the size you want")
        return settings

    def validate(self) -> None:
        """Raise one line naming the first setting that is wrong and the range it must be in."""
        if self.mode not in MODES:
            raise SunEdgeError(f"unknown mode {self.mode!r}; valid modes: {', '.join(MODES)}")
        _check_int("steps", self.steps, 1, MAX_STEPS)
        if self.scheduler not in sampling.SCHEDULERS:
            raise SunEdgeError(f"unknown scheduler {self.scheduler!r}; valid schedulers: {', '.join(sampling.SCHEDULERS)}")
        if self.spacing not in sampling.SPACINGS:
            raise SunEdgeError(f"unknown spacing {self.spacing!r}; valid spacings: {', '.join(sampling.SPACINGS)}")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) or not math.isfinite(self.guidance):
            raise SunEdgeError(f"guidance must be a finite number, got {self.guidance!r}")
        if not 0.0 <= self.guidance <= MAX_GUIDANCE:
            raise SunEdgeError(f"guidance {self.guidance:g} is outside [0, {MAX_GUIDANCE:g}]")
        for side, value in (("height", self.height), ("width", self.width)):
            _check_int(side, value, -(2**63), 2**63)  # a whole number first; then the size's own two rules
            if value < 8 or value % 8:
                raise SunEdgeError(f"{side} {value} is not a positive multiple of 8; use e.g. {max(8, value // 8 * 8)}")
            if value > MAX_SIDE:
                raise SunEdgeError(f"{side} {value} is outside [8, {MAX_SIDE}]")
        if self.noise not in NOISE_KINDS:
            raise SunEdgeError(f"unknown noise {self.noise!r}; valid: {', '.join(NOISE_KINDS)}")
        scale = self.control_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or not 0.0 <= scale <= MAX_CONTROL_SCALE:
            raise SunEdgeError(f"control scale must be a number in [0, {MAX_CONTROL_SCALE:g}] (the ControlNet's weight), "
                               f"got {scale!r}")
        if (isinstance(self.strength, bool) or not isinstance(self.strength, (int, float))
                or not math.isfinite(self.strength) or not 0.0 < self.strength <= 1.0):
            raise SunEdgeError(f"strength must be a number in (0, 1] (the fraction of the steps that run on the init "
                               f"image), got {self.strength!r}")
        _check_int("mask blur (pixels)", self.mask_blur, 0, MAX_MASK_BLUR)
        for name in ("invert_mask", "paste_back"):
            if not isinstance(getattr(self, name), bool):
                raise SunEdgeError(f"{name} must be true or false, got {getattr(self, name)!r}")
