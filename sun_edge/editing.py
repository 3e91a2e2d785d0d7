"""Image editing inputs: the init image and the inpainting mask, prepared as the sampler needs them.

img2img and inpainting (``Job.init_image``, ``Job.mask``, ``Settings.strength`` and the mask
settings) share one preparation, the same on every runtime:

- the init image is resized to cover the model's size and center-cropped (A1111's "crop and
  resize"), then mapped to [-1, 1] [1,3,H,W] for the VAE encoder;
- the mask (white = repaint; any mode, read as greyscale; the init image's size) is inverted if asked, blurred by
  ``mask_blur`` pixels (Gaussian, as A1111's ``mask_blur``), resized and cropped like the image:
  ``pixels`` [1,1,H,W] in [0, 1] is what ``paste_back`` composites with; ``latent`` [1,1,h,w] is its
  area average on the latent grid rounded to 0/1 (A1111 rounds its latent mask), what the sampler
  blends with and what an inpainting UNet's mask channel takes;
- the masked image (an inpainting UNet's third input) is the init image with the repainted pixels
  set to 0 (grey in [-1, 1]), as diffusers' inpainting pipeline makes it.

The latents are the VAE posterior sampled with the job's seed: ``mean + std * noise``, the noise
being items 1 and 2 of the seed's noise for three latents (item 0 is the sampler's own noise, so
full strength is text-to-image). NumPy and Pillow only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from sun_edge.errors import SunEdgeError

HASH_CHARS = 10


def open_image(path: Path | str, what: str = "image") -> Image.Image:
    """A PIL image from ``path``, loaded; one line if it is missing or not an image (``what`` names it: a flag)."""
    path = Path(path)
    if not path.is_file():
        raise SunEdgeError(f"{what} {path} does not exist or is not a file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise SunEdgeError(f"{what} {path} is not an image Pillow can read ({type(e).__name__}); "
                           "give a PNG, JPEG or WebP file") from e


def image_hash(image: Image.Image) -> str:
    """The first 10 hex digits of the sha256 of the image's RGB pixels (the PNG's "Init image hash")."""
    return hashlib.sha256(_rgb(image).tobytes()).hexdigest()[:HASH_CHARS]


def _rgb(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise SunEdgeError(f"the init image must be a PIL image, got {type(image).__name__}")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        flat = Image.new("RGB", image.size, "white")  # transparent pixels as white, not as whatever colour they hold
        flat.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return flat
    return image.convert("RGB")


def fit(image: Image.Image, width: int, height: int, resample: int = Image.LANCZOS) -> Image.Image:
    """Resize ``image`` to cover ``width`` x ``height`` keeping its aspect, then crop the center (A1111 "crop and resize")."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    resized = image.resize((w, h), resample)
    left, top = (w - width) // 2, (h - height) // 2
    return resized.crop((left, top, left + width, top + height))


def prepare_image(image: Image.Image, width: int, height: int) -> np.ndarray:
    """The init image as the VAE encoder takes it: [1,3,H,W] float32 in [-1, 1]."""
    pixels = np.asarray(fit(_rgb(image), width, height), dtype=np.float32)  # [H, W, 3] in 0..255
    return (pixels.transpose(2, 0, 1)[None] / 127.5 - 1.0).astype(np.float32)


@dataclass(frozen=True)
class Mask:
    """A prepared inpainting mask: 1 = repaint."""

    pixels: np.ndarray  # [1,1,H,W] float32 in [0, 1], blurred: paste_back's alpha
    latent: np.ndarray  # [1,1,h,w] float32 0/1 on the latent grid: the sampler's blend, an inpainting UNet's input

    def masked_image(self, image: np.ndarray) -> np.ndarray:
        """``image`` [1,3,H,W] in [-1, 1] with the repainted pixels (mask >= 0.5) set to 0: an inpainting UNet's input."""
        return (image * (self.pixels < 0.5)).astype(np.float32)


def prepare_mask(mask: Image.Image, image_size: tuple[int, int], width: int, height: int, vae_scale_factor: int, *,
                 blur: int = 0, invert: bool = False) -> Mask:
    """The mask as the sampler and paste-back need it (module docstring); one line if it is not the image's size."""
    if not isinstance(mask, Image.Image):
        raise SunEdgeError(f"the mask must be a PIL image, got {type(mask).__name__}")
    if mask.size != tuple(image_size):
        raise SunEdgeError(f"the mask is {mask.width}x{mask.height} and the init image {image_size[0]}x{image_size[1]}; "
                           "they must be the same size (white = repaint)")
    grey = mask.convert("L")
    if invert:
        grey = ImageOps.invert(grey)
    if blur:
        grey = grey.filter(ImageFilter.GaussianBlur(blur))
    fitted = fit(grey, width, height, Image.BILINEAR)
    pixels = np.asarray(fitted, dtype=np.float32)[None, None] / 255.0  # [1, 1, H, W]
    grid = fitted.resize((width // vae_scale_factor, height // vae_scale_factor), Image.BOX)
    latent = (np.asarray(grid, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)[None, None]  # [1, 1, h, w]
    return Mask(pixels.astype(np.float32), latent)


def sample_posterior(mean: np.ndarray, std: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """A draw of the VAE's scaled posterior: ``mean + std * noise`` (diffusers' ``latent_dist.sample``)."""
    return (mean.astype(np.float64) + std.astype(np.float64) * noise).astype(np.float32)


def paste_back(generated: Image.Image, original: np.ndarray, mask: Mask) -> Image.Image:
    """The original pixels outside the (blurred) mask over the generated image: ``a * gen + (1 - a) * orig``.

    ``original`` is the prepared init image [1,3,H,W] in [-1, 1] (resized and cropped as the model saw it)."""
    alpha = mask.pixels[0, 0][..., None].astype(np.float64)  # [H, W, 1]
    gen = np.asarray(generated.convert("RGB"), dtype=np.float64)  # [H, W, 3]
    orig = np.rint((original[0].transpose(1, 2, 0).astype(np.float64) + 1.0) * 127.5)  # back to the 8-bit pixels
    out = alpha * gen + (1.0 - alpha) * orig
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")
