"""A SUN adapter initialised from the UNet's own cross-attention (the Pocket SD recipe's starting point).

``SUNAdapter.from_unet`` starts ``to_k_neg``/``to_v_neg`` at PyTorch's default Linear init with
alpha 1: the negative branch then subtracts a random vector of the positive branch's norm, and the
first shipped Pocket adapter (paper learning rate 1e-4, ~1400 steps) never left that
initialisation. Here every branch starts from the layer's own ``to_k``/``to_v`` (as IP-Adapter
initialises its image branch), so at step 0 the negative branch already attends the negative
prompt the way the layer attends a prompt, and ``out = Zp - a Zn' (+ a Zx')`` is classifier-free
guidance written in attention space (``Zx' = Zp``: ``(1 + a) Zp - a Zn'``, with ``'`` the norm
matching of eq. 7); training takes it from there.
"""

from __future__ import annotations

import torch
from torch import nn

from sun_edge.adapter import SUNAdapter


@torch.no_grad()
def adapter_from_cross_attention(unet: nn.Module, *, alpha: float = 1.0, extra_positive: bool = False) -> SUNAdapter:
    """A ``SUNAdapter`` for ``unet`` whose projections copy each layer's ``to_k``/``to_v``; alpha ``alpha``, beta 0."""
    adapter = SUNAdapter.from_unet(unet, extra_positive=extra_positive)
    modules = dict(unet.named_modules())
    for spec, layer in zip(adapter.specs, adapter.layers):
        attn = modules[spec.name]
        branches = [("to_k_neg", "to_v_neg")] + ([("to_k_extra_pos", "to_v_extra_pos")] if extra_positive else [])
        for k_name, v_name in branches:
            getattr(layer, k_name).weight.copy_(attn.to_k.weight.float())
            getattr(layer, v_name).weight.copy_(attn.to_v.weight.float())
            getattr(layer, f"{k_name}_alpha").fill_(alpha)
            getattr(layer, f"{k_name}_beta").zero_()
    return adapter
