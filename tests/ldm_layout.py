"""Diffusers -> original LDM (CompVis) key layout for SD1.x, written from the architecture.

This is the layout of single-file checkpoints as civitai distributes them. It is written
here independently of diffusers' own LDM -> diffusers conversion (which the loader uses),
so that the single-file tests check one implementation against another.

UNet (``model.diffusion_model.``): ``input_blocks.0.0`` is conv_in; down block ``b``'s
layer ``i`` is ``input_blocks.{1 + b*(L+1) + i}`` (``.0`` resnet, ``.1`` attention), its
downsampler ``input_blocks.{(b+1)*(L+1)}.0.op``; the mid block is ``middle_block.{0,1,2}``
(resnet, attention, resnet); up block ``b``'s layer ``i`` is ``output_blocks.{b*(L+1)+i}``
with the upsampler in the block's last layer at ``.1.conv`` (``.2.conv`` after an attention).
Text encoder: ``cond_stage_model.transformer.`` + transformers' names. VAE
(``first_stage_model.``): ``down.{i}.block.{j}``, ``up.{n-1-i}.block.{j}`` (decoder blocks
numbered from the bottom), ``mid.block_{1,2}``, ``mid.attn_1.{norm,q,k,v,proj_out}`` with
q/k/v/proj_out stored as 1x1 conv weights ``[C, C, 1, 1]``.
"""

from __future__ import annotations

from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_key_to_ldm(key: str, unet: Any) -> str:
    """The LDM name (without prefix) of a diffusers UNet parameter or module name."""
    per_block = unet.config.layers_per_block + 1
    up_has_attention = [t.startswith("CrossAttn") for t in unet.config.up_block_types]
    for module, ldm in _UNET_TOP.items():
        if key == module or key.startswith(module + "."):
            return ldm + key[len(module) :]
    parts = key.split(".")
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "resnets":
            return f"middle_block.{2 * index}." + _resnet(rest)
        return "middle_block.1." + ".".join(rest)
    block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":
        if kind == "downsamplers":  # rest: conv.<leaf>
            return f"input_blocks.{(block + 1) * per_block}.0.op." + ".".join(rest[1:])
        slot = 0 if kind == "resnets" else 1
        name = f"input_blocks.{1 + block * per_block + index}.{slot}."
        return name + (_resnet(rest) if kind == "resnets" else ".".join(rest))
    if parts[0] == "up_blocks":
        if kind == "upsamplers":
            slot = 2 if up_has_attention[block] else 1
            return f"output_blocks.{block * per_block + per_block - 1}.{slot}." + ".".join(rest)
        slot = 0 if kind == "resnets" else 1
        name = f"output_blocks.{block * per_block + index}.{slot}."
        return name + (_resnet(rest) if kind == "resnets" else ".".join(rest))
    raise KeyError(key)


def _resnet(rest: list[str]) -> str:
    return ".".join([_UNET_RESNET[rest[0]], *rest[1:]])


def vae_key_to_ldm(key: str, vae: Any) -> str:
    """The LDM name (without prefix) of a diffusers AutoencoderKL parameter."""
    num_up = len(vae.config.up_block_types)
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return key
    side, rest = parts[0], parts[1:]
    if rest[0] == "conv_norm_out":
        return ".".join([side, "norm_out", *rest[1:]])
    if rest[0] in ("conv_in", "conv_out"):
        return key
    if rest[0] == "mid_block":
        kind, index, inner = rest[1], int(rest[2]), rest[3:]
        if kind == "resnets":
            return ".".join([side, "mid", f"block_{index + 1}", *_vae_resnet(inner)])
        module, leaf = ".".join(inner[:-1]), inner[-1]
        return ".".join([side, "mid", "attn_1", _VAE_ATTN[module], leaf])
    if rest[0] in ("down_blocks", "up_blocks"):
        block, kind, index, inner = int(rest[1]), rest[2], rest[3], rest[4:]
        level = block if rest[0] == "down_blocks" else num_up - 1 - block
        name = "down" if rest[0] == "down_blocks" else "up"
        if kind == "resnets":
            return ".".join([side, name, str(level), "block", index, *_vae_resnet(inner)])
        sampler = "downsample" if kind == "downsamplers" else "upsample"
        return ".".join([side, name, str(level), sampler, *inner])
    raise KeyError(key)


def _vae_resnet(inner: list[str]) -> list[str]:
    return ["nin_shortcut" if inner[0] == "conv_shortcut" else inner[0], *inner[1:]]


def ldm_checkpoint(unet: Any, text_encoder: Any, vae: Any) -> dict[str, torch.Tensor]:
    """One state dict in the SD1.x single-file layout, as civitai checkpoints hold it.

    Includes the extras real checkpoints carry: the text encoder's ``position_ids`` and
    the scheduler's ``alphas_cumprod`` (which the loader must ignore).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        out[UNET_PREFIX + unet_key_to_ldm(key, unet)] = value.detach().clone()
    for key, value in text_encoder.state_dict().items():  # transformers 5 drops "text_model."
        out[TEXT_PREFIX + "text_model." + key.removeprefix("text_model.")] = value.detach().clone()
    positions = text_encoder.config.max_position_embeddings
    out[TEXT_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(positions)[None]  # [1, 77]
    for key, value in vae.state_dict().items():
        value = value.detach().clone()
        if ".mid_block.attentions." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # linear [C, C] -> 1x1 conv [C, C, 1, 1]
        out[VAE_PREFIX + vae_key_to_ldm(key, vae)] = value.contiguous()
    out["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)
    return out
