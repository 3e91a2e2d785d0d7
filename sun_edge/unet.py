"""``SUNUNet``: a UNet with the SUN adapter fused in, one forward per sampling step.

The module is what every exporter traces: its ``forward`` takes the positive and negative
text embeddings as separate inputs and returns the noise prediction that classifier-free
guidance would need two UNet passes for. There is no Python branching on tensor values, so
``torch.export`` traces it at static shapes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sun_edge.adapter import SUNAdapter
from sun_edge.errors import SunEdgeError


class SUNUNet(nn.Module):
    """``forward(sample, timestep, encoder_hidden_states, negative_encoder_hidden_states) -> noise_pred``.

    Installs the adapter's processors on ``unet``'s cross-attention layers (self-attention keeps
    its own). The adapter is checked against the UNet's config first: a mismatch is one error
    listing the layers that differ.
    """

    def __init__(self, unet: nn.Module, adapter: SUNAdapter) -> None:
        super().__init__()
        adapter.check_fits(unet.config)
        for name, module in unet.named_modules():
            if name.endswith("attn2") and getattr(module, "norm_cross", False):
                raise SunEdgeError(f"{name} normalises its text input (norm_cross); SUN supports SD1.x/SD2.x UNets")
        self.unet = unet
        self.adapter = adapter
        processors: dict[str, Any] = dict(unet.attn_processors)
        processors.update(adapter.processors())
        unet.set_attn_processor(processors)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                negative_encoder_hidden_states: torch.Tensor,
                residuals: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        # sample [B,4,h,w]; timestep [1] or [B]; embeddings [B,77,D] each; residuals: ControlNet's (down..., mid)
        context = torch.cat([encoder_hidden_states, negative_encoder_hidden_states], dim=1)  # [B, 154, D]
        return self.unet(sample, timestep, context, return_dict=False, **_control(residuals))[0]  # [B, 4, h, w]

    def plain(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
              residuals: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """The same UNet without the adapter (the CFG baseline's forward): [B,4,h,w] -> [B,4,h,w]."""
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **_control(residuals))[0]


def _control(residuals: tuple[torch.Tensor, ...] | None) -> dict[str, Any]:
    """ControlNet residuals (12 down, then the mid one, for SD1.5) as diffusers' UNet keywords."""
    if residuals is None:
        return {}
    return {"down_block_additional_residuals": tuple(residuals[:-1]), "mid_block_additional_residual": residuals[-1]}
