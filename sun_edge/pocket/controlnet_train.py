"""A silhouette ControlNet for pocket-base, trained with the standard ControlNet loss.

The condition is the world's own silhouette of a scene: :func:`silhouette` of the plain render
(``world.object_mask``: pixels farther than 48 RGB units from the background), drawn white on black
at the image size (64x64 RGB, pixels in [0, 1] as diffusers' ControlNet image processor hands them
over). :func:`build_controlnet` is ``ControlNetModel.from_unet(pocket-base's UNet)``, whose
conditioning embedding downsamples 4x (64 -> the 16x16 latent), as SD's does 8x (512 -> 64).

Training (:func:`train_controlnet`) is ControlNet's recipe: x0 a posterior sample of the image's
latent, t uniform over 0..999, the frozen base UNet predicts the noise with the ControlNet's 12
down-block and one mid-block residuals added, MSE to the noise; only the ControlNet learns. The
caption is dropped to ``""`` with probability 0.5 (the ControlNet paper's 50%, so the condition
alone must carry the layout). Every step's draws come from a generator seeded by (seed, step), and
a checkpoint (weights, AdamW state, losses) is written every ``checkpoint_every`` steps, so a run
that is stopped resumes exactly where its last checkpoint left it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sun_edge.errors import SunEdgeError

CONDITIONING_CHANNELS = (16, 32, 64)  # two stride-2 convolutions: image 64x64 -> latent 16x16
CAPTION_DROPOUT = 0.5
CHECKPOINT = "checkpoint.pt"


def silhouette(image: np.ndarray) -> np.ndarray:
    """bool [H, W]: the shapes of a plain world image (``world.object_mask``)."""
    from sun_edge.pocket.world import object_mask

    return object_mask(image)


def condition_image(mask: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: a silhouette drawn white (255) on black, the ControlNet's input image."""
    return np.repeat(np.where(mask, 255, 0).astype(np.uint8)[..., None], 3, axis=-1)


def condition_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] condition images -> float32 [B, 3, H, W] in [0, 1] (diffusers' ControlNet input)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def build_controlnet(unet: nn.Module) -> Any:
    """``ControlNetModel.from_unet``: the UNet's down and mid blocks copied, zero convolutions, a 4x embedding."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)


@dataclass(frozen=True)
class ControlConfig:
    steps: int
    batch_size: int = 16
    learning_rate: float = 5e-4
    seed: int = 0
    warmup_steps: int = 50
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    caption_dropout: float = CAPTION_DROPOUT
    checkpoint_every: int = 100
    max_seconds: float | None = None  # stop (after a checkpoint) when this run has trained this long
    log_every: int = 25
    timesteps: tuple[int, int] = (0, 1000)  # t uniform over [low, high): the recipe's is all of 0..999

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise SunEdgeError(f"steps, batch size and checkpoint interval must be positive, got "
                               f"{self.steps}, {self.batch_size}, {self.checkpoint_every}")
        if not self.learning_rate > 0:
            raise SunEdgeError(f"learning rate must be positive, got {self.learning_rate}")
        if not 0 <= self.timesteps[0] < self.timesteps[1] <= 1000:
            raise SunEdgeError(f"timesteps must be a range within [0, 1000), got {self.timesteps}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise SunEdgeError(f"caption dropout must be in [0, 1), got {self.caption_dropout}")


@dataclass(frozen=True, eq=False)
class ControlData:
    """Training pairs in memory: VAE posteriors, token ids and silhouette conditions of world renders."""

    mean: torch.Tensor  # float32 [N, 4, h, w], unscaled posterior mean
    std: torch.Tensor  # float32 [N, 4, h, w]
    ids: torch.Tensor  # int64 [N, 77]
    conditions: torch.Tensor  # float32 [N, 3, H, W] in [0, 1]
    scaling_factor: float

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def render(cls, n: int, world_seed: int, vae: nn.Module) -> ControlData:
        """Examples 0..n-1 of world ``world_seed`` (plain style, the captions the base trained on)."""
        from sun_edge.pocket.train_family import ImageCaptions, encode_latents, tokenize

        data = ImageCaptions.render(n, world_seed)
        conditions = condition_tensor(np.stack([condition_image(silhouette(im)) for im in data.images.numpy()]))
        mean, std = encode_latents(vae, data, "cpu")
        return cls(mean, std, tokenize(data.captions), conditions, float(vae.config.scaling_factor))


def draw(data: ControlData, config: ControlConfig, step: int, empty: torch.Tensor,
         alphas: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Step ``step``'s batch, from a generator seeded by (seed, step) alone: (x_t, t, ids, cond, noise)."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([config.seed, step]).generate_state(1)[0]))
    b = config.batch_size
    index = torch.randint(len(data), (b,), generator=gen)
    x0 = (data.mean[index] + data.std[index] * torch.randn(data.mean[index].shape, generator=gen)) * data.scaling_factor
    noise = torch.randn(x0.shape, generator=gen)  # [B, 4, h, w]
    t = torch.randint(*config.timesteps, (b,), generator=gen)  # [B]
    drop = torch.rand(b, generator=gen) < config.caption_dropout  # [B]
    ids = torch.where(drop[:, None], empty, data.ids[index])  # [B, 77]
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, ids, data.conditions[index], noise


def control_loss(controlnet: nn.Module, unet: nn.Module, text_encoder: nn.Module, x_t: torch.Tensor,
                 t: torch.Tensor, ids: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The ControlNet loss: MSE between the noise and the frozen UNet's prediction with the residuals added."""
    with torch.no_grad():
        emb = text_encoder(ids, return_dict=False)[0]  # [B, 77, D]
    down, mid = controlnet(x_t, t, emb, cond, return_dict=False)
    eps = unet(x_t, t, emb, down_block_additional_residuals=down, mid_block_additional_residual=mid,
               return_dict=False)[0]  # [B, 4, h, w]
    return F.mse_loss(eps.float(), noise)


def _save_checkpoint(path: Path, controlnet: nn.Module, opt: Any, sched: Any, step: int, losses: list[float],
                     seconds: float) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"controlnet": controlnet.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": step, "losses": losses, "seconds": seconds}, tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class ControlResult:
    steps: int  # steps done in total (all runs)
    start_step: int  # where this run started (0, or the checkpoint it resumed from)
    batch_size: int
    seconds: float  # training wall clock, all runs
    seconds_per_step: float  # all runs
    loss_first: float  # mean over the first tenth of all steps (at least 1, at most 100)
    final_loss: float  # mean over the last tenth
    losses: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["losses"]
        return out


def train_controlnet(controlnet: nn.Module, unet: nn.Module, text_encoder: nn.Module, data: ControlData,
                     config: ControlConfig, *, checkpoint_dir: Path | None = None,
                     log: Any = sys.stderr) -> ControlResult:
    """Train ``controlnet`` in place against the frozen ``unet`` and ``text_encoder``; resumes from a checkpoint."""
    from sun_edge.pocket.train_family import sd15_noise_scheduler, tokenize

    alphas = sd15_noise_scheduler().alphas_cumprod.float()  # [1000]
    empty = tokenize([""])  # [1, 77]
    for frozen in (unet, text_encoder):
        frozen.eval().requires_grad_(False)
    controlnet.train().requires_grad_(True)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    warm = max(1, min(config.warmup_steps, config.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    losses: list[float] = []
    start, before = 0, 0.0
    ckpt = checkpoint_dir / CHECKPOINT if checkpoint_dir is not None else None
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        controlnet.load_state_dict(state["controlnet"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, losses, before = int(state["step"]), [float(x) for x in state["losses"]], float(state["seconds"])
        print(f"controlnet: resumed from {ckpt} at step {start}", file=log, flush=True)
    clock = time.perf_counter()
    step = start
    while step < config.steps:
        loss = control_loss(controlnet, unet, text_encoder, *draw(data, config, step, empty, alphas))
        if not torch.isfinite(loss):
            raise SunEdgeError(f"controlnet: loss became {float(loss)} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(controlnet.parameters(), config.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        step += 1
        elapsed = time.perf_counter() - clock
        if step % config.log_every == 0 or step == config.steps:
            recent = losses[-config.log_every:]
            print(json.dumps({"step": step, "loss": round(float(np.mean(recent)), 5),
                              "seconds": round(before + elapsed, 1),
                              "seconds_per_step": round(elapsed / (step - start), 3)}), file=log, flush=True)
        out_of_time = config.max_seconds is not None and elapsed > config.max_seconds
        if ckpt is not None and (step % config.checkpoint_every == 0 or step == config.steps or out_of_time):
            _save_checkpoint(ckpt, controlnet, opt, sched, step, losses, before + elapsed)
        if out_of_time:
            break
    elapsed = time.perf_counter() - clock
    controlnet.eval().requires_grad_(False)
    k = max(1, min(100, len(losses) // 10))
    first, last = (float(np.mean(part)) if losses else float("nan") for part in (losses[:k], losses[-k:]))
    return ControlResult(step, start, config.batch_size, round(before + elapsed, 2),
                         round((before + elapsed) / max(1, step), 4), first, last, tuple(losses))


def save_controlnet(controlnet: nn.Module, folder: Path, info: dict[str, Any]) -> Path:
    """Write ``controlnet`` as a diffusers folder in fp16 (``config.json``, ``diffusion_pytorch_model.safetensors``)
    plus ``pocket.json`` (``info``: how it was made); built beside ``folder`` and renamed into place."""
    import copy
    import shutil

    folder = Path(folder)
    if folder.exists():
        raise SunEdgeError(f"{folder} already exists: remove it first or choose another folder")
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    half = copy.deepcopy(controlnet).to(torch.float16)
    half.save_pretrained(tmp, safe_serialization=True)
    (tmp / "pocket.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.rename(tmp, folder)
    return folder
