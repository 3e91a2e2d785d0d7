"""The ControlNet condition image: read it, and turn it into the ``controlnet_cond`` the graphs take.

A condition (an edge map, a depth map, a pose skeleton, a silhouette) is fitted to the image size
as A1111's default "Crop and Resize" does: scaled to cover the size, centre-cropped, resampled with
Lanczos; then RGB in [0, 1] (diffusers' ControlNet image processor does not normalise to [-1, 1]).
NumPy and Pillow only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sun_edge.editing import open_image
from sun_edge.errors import SunEdgeError


def read_control_image(path: Path | str) -> Image.Image:
    """The image at ``path`` (fully read); anything that is not an image gets one line."""
    return open_image(path, "control image")


def check_control_image(image: Any) -> Image.Image:
    """``image`` as a PIL image, or one line saying what it is instead."""
    if not isinstance(image, Image.Image):
        raise SunEdgeError(f"the control image must be a PIL image, got {type(image).__name__}; read files with "
                           "sun_edge.control_image.read_control_image")
    if image.width < 1 or image.height < 1:
        raise SunEdgeError(f"the control image is empty ({image.width}x{image.height})")
    return image


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover ``width`` x ``height``, centre-crop, Lanczos (A1111's "Crop and Resize"); RGB."""
    rgb = check_control_image(image).convert("RGB")
    scale = max(width / rgb.width, height / rgb.height)
    w, h = max(width, round(rgb.width * scale)), max(height, round(rgb.height * scale))
    resized = rgb.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - width) // 2, (h - height) // 2
    return resized.crop((left, top, left + width, top + height))


def control_condition(image: Image.Image, width: int, height: int) -> np.ndarray:
    """The ``controlnet_cond`` of ``image`` at the model size: float32 [1,3,H,W] in [0, 1]."""
    pixels = np.asarray(fit(image, width, height), dtype=np.float32) / 255.0  # [H, W, 3]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])  # [1, 3, H, W]


def image_hash(image: Image.Image) -> str:
    """sha256 of the image's RGB pixels and size, first 10 hex digits (as the PNG parameters record it)."""
    rgb = check_control_image(image).convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode() + rgb.tobytes())
    return digest.hexdigest()[:10]
