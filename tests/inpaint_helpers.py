"""A tiny random 9-channel inpainting UNet (sd-1.5-inpainting's layout: latents 4 + mask 1 + masked-image latents 4)
with tiny-random's text encoder and VAE, written as a diffusers folder (with a SUN adapter) and a single LDM file;
the inpainting tests' init picture, mask and 8-bit PSNR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ldm_layout import ldm_checkpoint

SIZE = 64


def make_inpaint_model(root: Path, tiny: dict[str, Any]) -> dict[str, Any]:
    """``folder`` (diffusers, adapter beside), ``single`` (LDM .safetensors), ``unet``, ``adapter`` under ``root``."""
    import torch
    from diffusers import UNet2DConditionModel

    from sun_edge.adapter import BUNDLED_ADAPTER_FILE, SUNAdapter, save_adapter
    from sun_edge.tiny import TINY_UNET_CONFIG, write_diffusers_folder
    from sun_edge.weights import write_safetensors_atomic

    torch.manual_seed(19)
    unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "in_channels": 9}).eval()
    generator = torch.Generator().manual_seed(20)
    with torch.no_grad():  # as tiny-random's weights: scaled so that activations stay in a sane range
        for name, param in unet.named_parameters():
            if param.ndim >= 2 and "embed" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5)
    folder = Path(root) / "tiny-inpaint"
    write_diffusers_folder({**tiny, "unet": unet}, folder)
    adapter = SUNAdapter.from_unet(unet, extra_positive=False).randomize_(21)
    save_adapter(adapter, folder / BUNDLED_ADAPTER_FILE)
    single = Path(root) / "tiny-inpaint.safetensors"
    write_safetensors_atomic(ldm_checkpoint(unet, tiny["text_encoder"], tiny["vae"]), single)
    return {"folder": folder, "single": single, "unet": unet, "adapter": folder / BUNDLED_ADAPTER_FILE}


def init_picture(size: int = SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), (40, 60, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse([4, 4, size // 2, size // 2], fill=(220, 40, 30))
    draw.rectangle([size // 2 + 4, size // 2 + 4, size - 4, size - 4], fill=(240, 220, 40))
    return image


def right_half(size: int = SIZE) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle([size // 2, 0, size, size], fill=255)
    return mask


def psnr8(a: np.ndarray, b: np.ndarray) -> float:
    err = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(255.0**2 / err))
