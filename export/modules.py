"""The torch modules exporters trace: one per bundle component, float32 at the graph boundary.

Each wrapper gives its component the call signature and semantics of the runtime protocol
(DESIGN.md), so that a graph computes exactly what ``TorchRuntime`` computes; its arguments and
results are, in order, the inputs and outputs of the component's entry in
``sun_edge.components.COMPONENTS`` (a new component is an entry there, a wrapper here and one
line in each target's ``plan``: ``recipe.py``):

- ``TextEncoderGraph``: ``input_ids`` int64 [1,77] -> ``last_hidden_state`` [1,77,D];
- ``SUNUNetGraph``: ``sample``, ``timestep``, ``encoder_hidden_states``,
  ``negative_encoder_hidden_states`` -> ``noise_pred`` (the adapter fused in; an inpainting UNet's
  ``sample`` has 9 channels: latents, mask, masked-image latents);
- ``PlainUNetGraph``: the same UNet without the adapter (the CFG baseline's forward);
- ``VAEDecoderGraph``: sampler latents -> image in [-1, 1] (``1/scaling_factor`` and the clamp
  inside the graph);
- ``VAEEncoderGraph``: image in [-1, 1] -> scaled posterior mean and std (img2img samples from them);
- ``TinyDecoderGraph``: sampler latents -> image in [-1, 1] through TAESD (``sun_edge.taesd``);
- ``ControlNetGraph``: latents, timestep, both prompts, condition, scale -> the ControlNet's residuals,
  which a bundle exported with a ControlNet feeds to its UNet graphs' extra inputs (``*residuals``:
  ``down_block_res_0..N-1``, ``mid_block_res``; Apple's ``ControlledUnet``).

Half precision (``half_precision``) follows one rule, written where the computation is, so
that every exporter (ONNX, and through it TensorRT's strongly typed mode) sees explicit casts:
weights and activations are float16 except

- normalisation (every ``GroupNorm`` and ``LayerNorm``: statistics and affine) -> ``FP32Norm``;
- softmax of every attention (``fp32_softmax_attention`` replaces
  ``F.scaled_dot_product_attention`` while tracing: scores in fp16 from a pre-scaled query,
  softmax in fp32, probabilities back to fp16);
- the adapter's norm ratio ``||Zp|| / ||Zn||``, which ``sun_edge.adapter.attention_normalization``
  already computes in float32;
- the sinusoidal timestep embedding, which diffusers computes in float32 before casting.

Graph inputs and outputs stay float32: the wrappers cast at the boundary.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class TextEncoderGraph(nn.Module):
    """``input_ids`` [B,77] int64 -> ``last_hidden_state`` [B,77,D] float32."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0].float()  # [B, 77, D]


class SUNUNetGraph(nn.Module):
    """The fused SUN UNet with float32 I/O around a float32 or float16 body."""

    def __init__(self, sun_unet: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.sun_unet, self.dtype = sun_unet, dtype

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                negative_encoder_hidden_states: torch.Tensor, *residuals: torch.Tensor) -> torch.Tensor:
        d = self.dtype  # the timestep stays float32: diffusers casts its embedding after the sinusoids
        eps = self.sun_unet(sample.to(d), timestep, encoder_hidden_states.to(d), negative_encoder_hidden_states.to(d),
                            tuple(r.to(d) for r in residuals) if residuals else None)  # ControlledUnet: residuals
        return eps.float()  # [B, 4, h, w]


class PlainUNetGraph(nn.Module):
    """The UNet without the adapter (``SUNUNet.plain``): the CFG baseline, batch 1 or 2."""

    def __init__(self, sun_unet: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.sun_unet, self.dtype = sun_unet, dtype

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *residuals: torch.Tensor) -> torch.Tensor:
        d = self.dtype
        control = tuple(r.to(d) for r in residuals) if residuals else None
        return self.sun_unet.plain(sample.to(d), timestep, encoder_hidden_states.to(d), control).float()  # [B, 4, h, w]


class ControlNetGraph(nn.Module):
    """The ControlNet (``sun_edge.controlnet.control_residuals``): residuals (down..., mid) in float32."""

    def __init__(self, controlnet: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.controlnet, self.dtype = controlnet, dtype

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                negative_encoder_hidden_states: torch.Tensor, controlnet_cond: torch.Tensor,
                conditioning_scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from sun_edge.controlnet import control_residuals

        d = self.dtype
        out = control_residuals(self.controlnet, sample.to(d), timestep, encoder_hidden_states.to(d),
                                negative_encoder_hidden_states.to(d), controlnet_cond.to(d), conditioning_scale)
        return tuple(r.float() for r in out)  # [B, C_i, h_i, w_i] each


class VAEDecoderGraph(nn.Module):
    """Sampler latents [B,4,h,w] -> image [B,3,8h,8w] in [-1, 1], like ``TorchRuntime.decode``."""

    def __init__(self, vae: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.vae, self.dtype = vae, dtype
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        z = (latent_sample / self.scaling_factor).to(self.dtype)  # [B, 4, h, w]
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)  # [B, 3, 8h, 8w]


class VAEEncoderGraph(nn.Module):
    """Image [B,3,H,W] in [-1, 1] -> the scaled posterior's mean and std [B,4,H/8,W/8], like ``TorchRuntime.encode_dist``."""

    def __init__(self, vae: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.vae, self.dtype = vae, dtype
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(sample.to(self.dtype)).latent_dist  # diffusers clamps logvar to [-30, 20]
        return dist.mean.float() * self.scaling_factor, dist.std.float() * self.scaling_factor  # [B, 4, H/8, W/8] x2


class TinyDecoderGraph(nn.Module):
    """TAESD: sampler latents [B,4,h,w] (no 1/0.18215) -> image [B,3,8h,8w] in [-1, 1], like ``TorchRuntime.decode_tiny``."""

    def __init__(self, tiny_decoder: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.tiny_decoder, self.dtype = tiny_decoder, dtype

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.tiny_decoder(latents.to(self.dtype)).float()  # [B, 3, 8h, 8w]; the clamp is TinyDecoder's


class FP32Norm(nn.Module):
    """Runs a GroupNorm/LayerNorm in float32 inside a float16 network (explicit casts around it)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


def half_precision(module: nn.Module) -> nn.Module:
    """A float16 copy of ``module`` whose normalisation layers compute in float32 (``module`` is untouched)."""
    half = copy.deepcopy(module).half()
    targets = [(name, child) for name, child in half.named_modules() if isinstance(child, (nn.GroupNorm, nn.LayerNorm))]
    for name, norm in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = half.get_submodule(parent_name) if parent_name else half
        setattr(parent, attr, FP32Norm(norm))
    return half.eval().requires_grad_(False)


def attention_fp32_softmax(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                           scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (inference) with the softmax in float32: [B,H,N,d] -> [B,H,N,d]."""
    if dropout_p or enable_gqa:
        raise NotImplementedError("attention_fp32_softmax is for inference without dropout or GQA")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query * scale, key.transpose(-2, -1)).float()  # [B, H, N, T]
    if is_causal:
        keep = torch.ones(scores.shape[-2], scores.shape[-1], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask.float()
    probs = scores.softmax(dim=-1).to(value.dtype)  # [B, H, N, T]
    return torch.matmul(probs, value)  # [B, H, N, d]


@contextmanager
def fp32_softmax_attention(enabled: bool = True) -> Iterator[None]:
    """While tracing, route ``F.scaled_dot_product_attention`` (diffusers, transformers, the adapter)
    through :func:`attention_fp32_softmax`; restored on exit."""
    if not enabled:
        yield
        return
    original: Any = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = attention_fp32_softmax  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
