"""One micro-step of SUN training (Algorithm 1): the random draws, the teacher's targets, the loss.

Per micro-step, on each process:

1. a batch of (image, caption, negative prompt); captions and negatives through the frozen
   text encoder (one batch), images through the frozen VAE encoder: ``x0`` is a *sample*
   of the posterior times ``scaling_factor``, the latent distribution SD1.5 itself was
   trained on;
2. per example a grid point ``t`` (uniform over the student's 4 timesteps), noise, and the
   MSC coin (eq. 13); drawn from a generator seeded with (seed, micro-step, process), so a
   resumed run draws exactly what an uninterrupted one would (:func:`micro_generator`);
3. teacher targets (:func:`sun_edge.train.losses.distillation_targets`), one student forward,
   ``L = mean(L_cfg) + lambda * mean(L_msc)`` (eq. 14).

Only the adapter trains: :func:`check_frozen` asserts it at setup. The caller
(``sun_edge.train.loop``) runs the backward pass, accumulates and steps the optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sun_edge.errors import SunEdgeError
from sun_edge.train.config import TrainConfig
from sun_edge.train.losses import StudentGrid, cfg_distillation_loss, distillation_targets, step_loss


def micro_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """The CPU generator of one micro-step on one process: a pure function of its arguments."""
    state = np.random.SeedSequence([seed, micro_step, rank]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass(frozen=True, eq=False)
class Draw:
    """The random choices of one micro-step (drawn on the CPU in this order)."""

    t_index: torch.Tensor  # [B] int64 grid index, uniform
    posterior: torch.Tensor  # [B,4,h,w] standard normal: the VAE posterior sample
    noise: torch.Tensor  # [B,4,h,w] standard normal: eps of x_t
    replace: torch.Tensor  # [B] bool, i = 0 in eq. 12 with probability p

    @classmethod
    def sample(cls, gen: torch.Generator, shape: tuple[int, ...], grid_points: int, p: float) -> Draw:
        batch = shape[0]
        return cls(torch.randint(0, grid_points, (batch,), generator=gen), torch.randn(shape, generator=gen),
                   torch.randn(shape, generator=gen), torch.rand(batch, generator=gen) < p)


@dataclass(eq=False)
class Models:
    """The modules one micro-step uses."""

    student: nn.Module  # prepared SUNUNet (DDP-wrapped under several processes)
    sun_unet: nn.Module  # the same SUNUNet, unwrapped: the teacher (.plain) and the no-grad student
    text_encoder: nn.Module
    vae: nn.Module
    grid: StudentGrid


def micro_step(models: Models, batch: Mapping[str, Any], draw_gen: torch.Generator, config: TrainConfig,
               accelerator: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (eq. 14, a scalar with grad) and [loss, L_cfg, L_msc, replaced fraction] (detached)."""
    device = accelerator.device
    ids = torch.cat([batch["ids"], batch["neg_ids"]]).to(device)  # [2B, 77]
    pixels = batch["pixels"].to(device)  # [B, 3, R, R]
    vae = models.vae
    with torch.no_grad():
        with accelerator.autocast():
            c_pos, c_neg = models.text_encoder(ids, return_dict=False)[0].float().chunk(2)  # [B,77,D] each
        posterior = vae.encode(pixels).latent_dist
        shape = tuple(posterior.mean.shape)  # [B, 4, R/8, R/8]
        draw = Draw.sample(draw_gen, shape, len(models.grid.timesteps), config.msc_probability)
        x0 = (posterior.mean + posterior.std * draw.posterior.to(device)) * vae.config.scaling_factor

    def teacher(x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return models.sun_unet.plain(x, t, emb)

    with accelerator.autocast():
        targets = distillation_targets(teacher, models.sun_unet, x0.float(), draw.noise.to(device),
                                       draw.t_index.to(device), draw.replace.to(device), c_pos, c_neg,
                                       models.grid, config.teacher_substeps, config.guidance)
        eps = models.student(targets.x_in, targets.t.float(), c_pos, c_neg).float()  # [B,4,h,w], with grad
    l_cfg = cfg_distillation_loss(targets.eps_cfg, eps).mean()
    l_msc = step_loss(targets.eps_step, eps).mean()
    loss = l_cfg + config.msc_weight * l_msc
    stats = torch.stack([loss.detach(), l_cfg.detach(), l_msc.detach(), targets.replaced.float().mean()])
    return loss, stats


def check_frozen(frozen: Mapping[str, nn.Module], adapter: nn.Module, optimizer: Any) -> None:
    """Raise unless every frozen module's parameter has requires_grad False, every adapter
    parameter True, and the optimizer holds exactly the adapter's parameters."""
    for name, module in frozen.items():
        training = [n for n, p in module.named_parameters() if p.requires_grad and not _is_adapter(p, adapter)]
        if training:
            raise SunEdgeError(f"{name} must be frozen, but {len(training)} of its parameters require grad "
                               f"(first: {training[0]})")
    if not all(p.requires_grad for p in adapter.parameters()):
        raise SunEdgeError("every adapter parameter must require grad")
    held = [p for group in optimizer.param_groups for p in group["params"]]
    if len(held) != len({id(p) for p in held}) or {id(p) for p in held} != {id(p) for p in adapter.parameters()}:
        raise SunEdgeError("the optimizer must hold exactly the adapter's parameters")


def _is_adapter(param: torch.Tensor, adapter: nn.Module) -> bool:
    return any(param is p for p in adapter.parameters())
