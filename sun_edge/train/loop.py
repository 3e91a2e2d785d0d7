"""The SUN training loop (Algorithm 1) under Hugging Face Accelerate.

``train(config)`` runs on one CPU or GPU as it is, and on several GPUs or machines under
``accelerate launch -m sun_edge.train ...`` with no change: the student (``SUNUNet``, whose
only trainable parameters are the adapter's) is wrapped by ``accelerator.prepare``, so
gradients are averaged across processes; each process reads its own shard of the data.

One optimizer step, per process, ``gradient_accumulation_steps`` times:

1. a batch of (image, caption, negative prompt); captions and negatives through the frozen
   text encoder (one batch), images through the frozen VAE encoder: ``x0`` is a *sample*
   of the posterior times ``scaling_factor``, the latent distribution SD1.5 itself was
   trained on;
2. per example a grid point ``t`` (uniform over the student's 4 timesteps), noise, and the
   MSC coin (eq. 13); drawn from a generator seeded with (seed, micro-step, process), so a
   resumed run draws exactly what an uninterrupted one would;
3. teacher targets (:func:`sun_edge.train.losses.distillation_targets`), one student forward,
   ``L = mean(L_cfg) + lambda * mean(L_msc)`` (eq. 14), backward.

Only the adapter trains: the UNet, text encoder and VAE are frozen and :func:`check_frozen`
asserts it, and that the optimizer (AdamW, constant learning rate) holds exactly the
adapter's parameters. Under ``fp16``/``bf16`` mixed precision the frozen UNet and text
encoder are cast to that type (the adapter stays float32) and run under autocast; the VAE
stays float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from sun_edge.errors import SunEdgeError
from sun_edge.train.config import TrainConfig
from sun_edge.train.losses import StudentGrid, cfg_distillation_loss, distillation_targets, step_loss

if TYPE_CHECKING:
    from sun_edge.models import LoadedModel


@dataclass(frozen=True)
class StepLog:
    """One optimizer step's figures, averaged over micro-steps and processes."""

    step: int
    loss: float
    loss_cfg: float
    loss_msc: float
    msc_fraction: float  # share of examples whose input was replaced by the student's (eq. 12)
    examples: int  # examples in the step, all processes
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    """What a call to :func:`train` did."""

    output: Path
    checkpoint_dir: Path
    start_step: int  # 0, or the step of the checkpoint it resumed from
    steps: int  # optimizer steps done in total
    history: tuple[StepLog, ...]  # this call's steps
    skipped: Mapping[str, str]  # unreadable images: name -> reason (whole run, resumes included)
    skipped_count: int  # times an unreadable image was drawn
    examples_per_second: float  # this call's steps, all processes
    main_process: bool = True  # False in the other processes of a distributed run


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


def train(config: TrainConfig, model: LoadedModel | None = None) -> TrainResult:
    """Train a SUN adapter as ``config`` says and save it to ``config.output``.

    ``model`` skips loading ``config.model`` (its modules are used in place: frozen, the
    adapter's attention processors installed, cast under mixed precision). A run resumes from
    the newest checkpoint in ``config.checkpoints`` when there is one.
    """
    from accelerate import Accelerator

    from sun_edge.train.data import TrainDataset, open_records
    from sun_edge.train.negatives import load_pool
    from sun_edge.train.session import Session

    out_dir = Path(config.output).expanduser().resolve().parent
    if not out_dir.is_dir():
        raise SunEdgeError(f"output folder {out_dir} does not exist; create it first")
    if config.init_adapter is not None and not Path(config.init_adapter).is_file():
        raise SunEdgeError(f"--init-adapter {config.init_adapter} does not exist")
    records = open_records(config.data)
    dataset = TrainDataset(records, load_pool(config.negative_pool), resolution=config.resolution,
                           seed=config.seed, max_negative_phrases=config.max_negative_phrases)
    try:
        accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)
    except (ValueError, RuntimeError) as e:
        raise SunEdgeError(f"cannot set up mixed precision {config.mixed_precision!r}: {str(e).splitlines()[0]}") from e
    try:
        return Session(config, accelerator, dataset, model).run()
    finally:
        if accelerator.num_processes == 1:  # let a later train() in this process pick another precision
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
