"""The two attention forms of a Core ML UNet: ``original`` (GPU) and ``split-einsum`` (Neural Engine).

``split-einsum`` follows Apple's ml-stable-diffusion (``ATTENTION_IMPLEMENTATION_IN_EFFECT =
SPLIT_EINSUM``): activations are laid out as ``(B, C, 1, S)``, channels first, which is how the
Neural Engine tiles tensors, and attention is computed one head at a time with two ``einsum``s
that coremltools lowers to plain batched matmuls the Neural Engine runs, instead of one
``[B, H, N, T]`` score tensor that it cannot hold::

    q_h = q[:, h*d:(h+1)*d]                  # [B, d, 1, N]   query of head h
    k_h = k[:, h*d:(h+1)*d].transpose(1, 3)  # [B, T, 1, d]
    v_h = v[:, h*d:(h+1)*d]                  # [B, d, 1, T]
    w_h = softmax(einsum("bchq,bkhc->bkhq", q_h * scale, k_h), dim=1)   # [B, T, 1, N]
    z_h = einsum("bkhq,bchk->bchq", w_h, v_h)                           # [B, d, 1, N]
    z   = cat(z_h over heads, dim=1)         # [B, C, 1, N]

It computes the same numbers as ``F.scaled_dot_product_attention`` (to float rounding). It is
installed for the UNet's self-attention (``SplitEinsumAttnProcessor``, replacing diffusers'
processor) and for the SUN cross-attention (``SplitEinsumSUNAttnProcessor``: the adapter's
processor with this kernel) by ``attention_form``, which restores the original processors on
exit, so the reference model is left as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from sun_edge.adapter import SUNAttnProcessor
from sun_edge.errors import SunEdgeError

AttentionForm = Literal["original", "split-einsum"]
ATTENTION_FORMS: tuple[str, ...] = ("original", "split-einsum")


def split_einsum_attend(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Multi-head attention per head in the ``(B, C, 1, S)`` layout: [B,N,C], [B,T,C], [B,T,C] -> [B,N,C].

    Heads are cut with one ``split`` per tensor and the scale is folded into the query, so that
    a layer converts to 3 splits, 2 einsums and a softmax per head, and a concat.
    """
    d = query.shape[-1] // attn.heads
    q = (query * attn.scale).transpose(1, 2).unsqueeze(2)  # [B, C, 1, N]
    k = key.transpose(1, 2).unsqueeze(2).transpose(1, 3)  # [B, T, 1, C]
    v = value.transpose(1, 2).unsqueeze(2)  # [B, C, 1, T]
    out = []
    for q_h, k_h, v_h in zip(q.split(d, dim=1), k.split(d, dim=3), v.split(d, dim=1)):  # [B,d,1,N], [B,T,1,d], [B,d,1,T]
        weights = torch.einsum("bchq,bkhc->bkhq", q_h, k_h).softmax(dim=1)  # [B, T, 1, N]
        out.append(torch.einsum("bkhq,bchk->bchq", weights, v_h))  # [B, d, 1, N]
    return torch.cat(out, dim=1).squeeze(2).transpose(1, 2)  # [B, N, C]


class SplitEinsumAttnProcessor:
    """diffusers attention processor (self- or plain cross-attention) with the split-einsum kernel.

    Covers what SD1.x/2.x UNets use: 3-D or 4-D hidden states, optional ``group_norm``, residual
    connection and output rescaling; masks, spatial norms and q/k norms are refused.
    """

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if attention_mask is not None or attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None:
            raise SunEdgeError("split-einsum attention supports SD1.x/SD2.x attention layers (no masks, spatial or q/k norms)")
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)  # [B, N, C]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states  # [B, T, D]
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        z = split_einsum_attend(attn, attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context))  # [B, N, C]
        hidden_states = attn.to_out[1](attn.to_out[0](z))  # [B, N, C_out]
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class SplitEinsumSUNAttnProcessor(SUNAttnProcessor):
    """The SUN cross-attention (``sun_edge.adapter.SUNAttnProcessor``) with the split-einsum kernel."""

    attend = staticmethod(split_einsum_attend)
    fused = False  # the Neural Engine form runs its own per-head layout


def split_einsum_processors(unet: nn.Module) -> dict[str, Any]:
    """Processors keyed like ``unet.attn_processors``: SUN layers keep their adapter weights."""
    return {name: SplitEinsumSUNAttnProcessor(p.layer, p.num_tokens) if isinstance(p, SUNAttnProcessor)
            else SplitEinsumAttnProcessor() for name, p in unet.attn_processors.items()}


def check_attention_form(form: str) -> None:
    """Raise one line listing the valid forms if ``form`` is not one."""
    if form not in ATTENTION_FORMS:
        raise SunEdgeError(f"unknown attention form {form!r}; valid forms: {', '.join(ATTENTION_FORMS)}")


@contextmanager
def attention_form(unet: nn.Module, form: AttentionForm) -> Iterator[nn.Module]:
    """Install ``form``'s processors on a diffusers UNet for the duration; the originals come back on exit."""
    check_attention_form(form)
    if form == "original":
        yield unet
        return
    original = dict(unet.attn_processors)
    unet.set_attn_processor(split_einsum_processors(unet))
    try:
        yield unet
    finally:
        unet.set_attn_processor(dict(original))
