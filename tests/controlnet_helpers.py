"""Tiny random ControlNets for the tests: made from the tiny UNet with ``ControlNetModel.from_unet``, saved as a
diffusers folder, one diffusers-layout ``.safetensors`` file and one file in the original ControlNet/LDM layout.

``from_unet`` zero-initialises the zero convolutions (the residual outputs), so a fresh ControlNet changes
nothing; they are re-drawn here so that its residuals matter. The LDM layout is written from the architecture
(``ldm_layout.unet_key_to_ldm`` for the UNet-shaped encoder, the ControlNet's own parts by hand), independently
of diffusers' LDM -> diffusers conversion that the loader uses.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ldm_layout import unet_key_to_ldm

SEED = 1913


def tiny_controlnet(unet: Any, seed: int = SEED, scale: float = 0.5) -> Any:
    """A ControlNet of ``unet`` with every weight random (the zero convolutions included)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(copy.deepcopy(unet))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                fan_in = param[0].numel() if param.ndim >= 2 else 1
                param.copy_(torch.randn(param.shape, generator=gen) * (scale / fan_in**0.5))
    return net.eval()


def ldm_key(key: str, unet: Any) -> str:
    """The original ControlNet name of a diffusers ControlNetModel parameter (``control_model.`` prefixed)."""
    parts = key.split(".")
    if parts[0] == "controlnet_cond_embedding":
        if parts[1] == "conv_in":
            inner = "input_hint_block.0"
        elif parts[1] == "conv_out":
            inner = "input_hint_block.14"
        else:
            inner = f"input_hint_block.{2 * (int(parts[2]) + 1)}"
        return f"control_model.{inner}.{parts[-1]}"
    if parts[0] == "controlnet_down_blocks":
        return f"control_model.zero_convs.{parts[1]}.0.{parts[2]}"
    if parts[0] == "controlnet_mid_block":
        return f"control_model.middle_block_out.0.{parts[1]}"
    return "control_model." + unet_key_to_ldm(key, unet)


def save_layouts(net: Any, unet: Any, folder: Path) -> dict[str, Path]:
    """``net`` as a diffusers folder, a diffusers-layout file and an LDM-layout file under ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(folder / "diffusers", safe_serialization=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / "controlnet-diffusers.safetensors"))
    save_file({ldm_key(k, unet): v for k, v in state.items()}, str(folder / "control_tiny_ldm.safetensors"))
    return {"folder": folder / "diffusers", "diffusers": folder / "controlnet-diffusers.safetensors",
            "ldm": folder / "control_tiny_ldm.safetensors"}


def condition_image(height: int, width: int) -> Any:
    """The parity's ControlNet condition (``sun_edge.parity.control_condition``) as an RGB PIL image."""
    import numpy as np
    from PIL import Image

    from sun_edge.parity import control_condition

    return Image.fromarray((control_condition(height, width)[0].transpose(1, 2, 0) * 255).astype(np.uint8))
