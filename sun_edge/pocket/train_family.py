"""Training the Pocket SD family, one function per stage, each a plain loop.

- :func:`train_vae`: the autoencoder, L1 reconstruction plus a small KL term, then
  :func:`calibrate_vae` sets ``scaling_factor`` to 1/std of its latents on a sample, the
  way SD's 0.18215 was chosen;
- :func:`train_base`: text encoder and UNet from scratch, epsilon prediction under SD1.5's
  DDPM schedule (scaled-linear betas 0.00085..0.012, 1000 steps, the schedule
  ``sun_edge.sampling`` samples with), captions dropped to ``""`` 10% of the time so that
  classifier-free guidance with the pipeline's default negative prompt ``""`` works; the VAE
  is frozen; an EMA of the trained weights is what is returned;
- :func:`finetune_toon`: continue from ``pocket-base`` on the toon style, shorter (the role
  of a civitai fine-tune of SD1.5); the text encoder is frozen unless asked otherwise.

Every loop uses AdamW, a fixed seed, a tqdm bar, ``device`` ``cpu`` or ``cuda`` and
``precision`` ``fp32`` or ``bf16`` (autocast; weights stay float32). Data is an
:class:`ImageCaptions` held in memory: loaded from a ``world.write_dataset`` folder or
rendered on the fly.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sun_edge.errors import SunEdgeError

Precision = Literal["fp32", "bf16"]
SYNC_EVERY = 50  # diffusion steps between reads of the loss from the device (and the finiteness check)


@dataclass(frozen=True)
class StageConfig:
    """How long and how one stage trains."""

    steps: int
    batch_size: int
    learning_rate: float
    seed: int = 0
    device: str = "cpu"
    precision: Precision = "fp32"
    warmup_steps: int = 100  # linear warm-up, then constant
    max_grad_norm: float = 1.0
    weight_decay: float = 0.01
    progress: bool = True
    max_seconds: float | None = None  # stop early when the loop has run this long (a time-boxed run)
    cuda_graph: bool = False  # diffusion stages on CUDA: replay one captured training step (see train_diffusion)

    def __post_init__(self) -> None:
        if self.cuda_graph and not self.device.startswith("cuda"):
            raise SunEdgeError(f"CUDA graphs need a CUDA device, not {self.device!r}; drop the CUDA-graph option")
        if self.steps < 1 or self.batch_size < 1:
            raise SunEdgeError(f"steps and batch size must be positive, got {self.steps} and {self.batch_size}")
        if self.precision not in ("fp32", "bf16"):
            raise SunEdgeError(f"unknown precision {self.precision!r}; choose fp32 or bf16")
        if self.learning_rate <= 0:
            raise SunEdgeError(f"learning rate must be positive, got {self.learning_rate}")


@dataclass(frozen=True)
class StageResult:
    """What a stage did: for ``log.jsonl``."""

    steps: int
    batch_size: int
    seconds: float  # wall clock of the loop (set-up and calibration excluded)
    seconds_per_step: float
    cpu_seconds: float  # process CPU time of the loop, all threads (telling on a shared machine)
    final_loss: float  # mean over the last tenth of the steps (at least 1, at most 100)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class ImageCaptions:
    """Images and captions in memory."""

    images: torch.Tensor  # uint8 [N, H, W, 3]
    captions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.captions)

    @classmethod
    def from_folder(cls, folder: Path, limit: int | None = None) -> ImageCaptions:
        """Every ``*.png`` with its ``.txt`` caption in ``folder`` (sorted by name; the first ``limit``)."""
        from PIL import Image

        pngs = sorted(Path(folder).glob("*.png"))[:limit]
        pairs = [(p, p.with_suffix(".txt")) for p in pngs if p.with_suffix(".txt").is_file()]
        if not pairs:
            raise SunEdgeError(f"no .png + .txt pairs in {folder}; write one with sun_edge.pocket.world.write_dataset")
        images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in pairs])  # [N, H, W, 3]
        captions = tuple(t.read_text(encoding="utf-8").strip() for _, t in pairs)
        return cls(torch.from_numpy(images), captions)

    @classmethod
    def render(cls, n: int, seed: int, style: str = "plain", resolution: int = 64) -> ImageCaptions:
        """Examples 0..n-1 of world ``seed`` rendered now (no files)."""
        from sun_edge.pocket.world import make_example

        examples = [make_example(i, seed, style, resolution=resolution) for i in range(n)]
        return cls(torch.from_numpy(np.stack([e.image for e in examples])), tuple(e.caption for e in examples))

    def pixels(self, index: torch.Tensor, device: str) -> torch.Tensor:
        """Images ``index`` as float [B, 3, H, W] in [-1, 1]."""
        x = self.images[index].to(device).permute(0, 3, 1, 2).float()  # [B, 3, H, W]
        return x / 127.5 - 1.0


def _autocast(config: StageConfig) -> Any:
    device_type = "cuda" if config.device.startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


def _warmup_steps(config: StageConfig) -> int:
    """Steps of the linear learning-rate warm-up: ``warmup_steps``, at most a tenth of the stage."""
    return max(1, min(config.warmup_steps, config.steps // 10))


def _optimizer(params: Sequence[nn.Parameter] | list[dict[str, Any]], config: StageConfig) -> tuple[Any, Any]:
    """AdamW (fused on CUDA) with linear warm-up; ``params`` may be groups with their own ``lr``."""
    cuda = config.device.startswith("cuda")
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=cuda,
                            capturable=config.cuda_graph)
    warm = _warmup_steps(config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    return opt, sched


def _bar(config: StageConfig, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(range(config.steps), desc=desc, unit="step", disable=not config.progress, file=sys.stderr)


class _Clock:
    """Wall and process CPU time since creation."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _out_of_time(config: StageConfig, clock: _Clock) -> bool:
    return config.max_seconds is not None and clock.read()[0] > config.max_seconds


def _result(losses: list[float], config: StageConfig, clock: tuple[float, float], **extra: Any) -> StageResult:
    """``steps`` is the number of steps run (fewer than planned when ``max_seconds`` cut the loop)."""
    tail = losses[-max(1, min(100, len(losses) // 10)):]
    seconds, cpu = clock
    steps = len(losses)
    if steps < config.steps:
        extra = {**extra, "planned_steps": config.steps, "stopped_by": f"max_seconds={config.max_seconds}"}
    return StageResult(steps, config.batch_size, round(seconds, 2), round(seconds / max(1, steps), 4),
                       round(cpu, 2), float(np.mean(tail)), extra)


def _check_finite(loss: torch.Tensor | float, stage: str, step: int) -> None:
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else loss  # a 0-d tensor or a value read back
    if not np.isfinite(value):
        raise SunEdgeError(f"{stage}: loss became {value} at step {step}; lower the learning rate or use fp32")


# --------------------------------------------------------------------------------------- VAE


def train_vae(vae: nn.Module, data: ImageCaptions, config: StageConfig, *, kl_weight: float = 1e-4,
              calibration_samples: int = 1024) -> StageResult:
    """Train ``vae`` in place: L1 reconstruction + ``kl_weight`` x the per-element KL; then calibrate it."""
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    vae.to(config.device).train().requires_grad_(True)
    opt, sched = _optimizer(list(vae.parameters()), config)
    losses: list[float] = []
    clock = _Clock()
    bar = _bar(config, "vae")
    for step in bar:
        index = torch.randint(len(data), (config.batch_size,), generator=gen)
        x = data.pixels(index, config.device)  # [B, 3, H, W]
        with _autocast(config):
            posterior = vae.encode(x).latent_dist
            z = posterior.sample()  # [B, 4, H/4, W/4]
            recon = vae.decode(z).sample.float()  # [B, 3, H, W]
        rec = F.l1_loss(recon, x)
        kl = posterior.kl().float().mean() / z[0].numel()  # per latent element
        loss = rec + kl_weight * kl
        _check_finite(loss, "vae", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), config.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(rec.item())
        bar.set_postfix(l1=f"{rec.item():.4f}", kl=f"{kl.item():.2f}", refresh=False)
        if _out_of_time(config, clock):
            break
    elapsed = clock.read()
    vae.eval().requires_grad_(False)
    stats = calibrate_vae(vae, data, samples=calibration_samples, device=config.device, seed=config.seed)
    return _result(losses, config, elapsed, loss="l1", kl_weight=kl_weight, **stats)


def finetune_vae_decoder(vae: nn.Module, data: ImageCaptions, config: StageConfig) -> StageResult:
    """Train ``vae``'s decoder in place on its frozen encoder's latents: the latent space, and so every UNet,
    adapter and ControlNet trained on it, stays as it is (Stable Diffusion's own VAE decoder fine-tunes
    are made so). L1 on pixels from posterior samples, as ``train_vae``; ``scaling_factor`` is kept."""
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    vae.to(config.device).eval().requires_grad_(False)
    decoder = [vae.post_quant_conv, vae.decoder]  # everything after the latent
    params = [p for m in decoder for p in m.parameters()]
    for module in decoder:
        module.train().requires_grad_(True)
    opt, sched = _optimizer(params, config)
    losses: list[float] = []
    clock = _Clock()
    bar = _bar(config, "decoder")
    for step in bar:
        index = torch.randint(len(data), (config.batch_size,), generator=gen)
        x = data.pixels(index, config.device)  # [B, 3, H, W]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()  # [B, 4, h, w]
        with _autocast(config):
            recon = vae.decode(z).sample.float()  # [B, 3, H, W]
        loss = F.l1_loss(recon, x)
        _check_finite(loss, "decoder", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(l1=f"{loss.item():.4f}", refresh=False)
        if _out_of_time(config, clock):
            break
    elapsed = clock.read()
    vae.eval().requires_grad_(False)
    return _result(losses, config, elapsed, loss="l1", trained="post_quant_conv + decoder (encoder frozen)",
                   examples=len(data), loss_first=float(np.mean(losses[: max(1, min(100, len(losses) // 10))])))


@torch.no_grad()
def calibrate_vae(vae: nn.Module, data: ImageCaptions, *, samples: int = 1024, device: str = "cpu",
                  seed: int = 0) -> dict[str, float]:
    """Set ``vae.config.scaling_factor`` to 1/std of posterior samples of ``samples`` images; return the figures."""
    gen = torch.Generator().manual_seed(seed + 1)
    index = torch.randperm(len(data), generator=gen)[:samples]
    latents, stds = [], []
    for chunk in index.split(128):
        dist = vae.encode(data.pixels(chunk, device)).latent_dist
        latents.append((dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(device)).float().cpu())
        stds.append(dist.std.float().mean().item())
    z = torch.cat(latents)  # [n, 4, h, w]
    std = z.std().item()
    recon = vae.decode(z[:64].to(device)).sample.float().cpu()  # [64, 3, H, W]
    l1 = (recon - data.pixels(index[:64], "cpu")).abs().mean().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return {"scaling_factor": 1.0 / std, "latent_std": std, "latent_mean": z.mean().item(),
            "posterior_std": float(np.mean(stds)), "eval_l1": l1, "calibration_samples": len(index)}


# ------------------------------------------------------------------------------ diffusion


def sd15_noise_scheduler() -> Any:
    """diffusers' DDPMScheduler as SD1.5 trains, checked against ``sun_edge.sampling``'s schedule."""
    from diffusers import DDPMScheduler

    from sun_edge.sampling import SD15

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)
    ours = SD15.alphas_cumprod()
    if len(ours) != 1000 or not np.allclose(scheduler.alphas_cumprod.double().numpy(), ours, rtol=1e-5, atol=1e-7):
        raise SunEdgeError("the training schedule does not match sun_edge.sampling.SD15; keep them identical")
    return scheduler


@torch.no_grad()
def encode_latents(vae: nn.Module, data: ImageCaptions, device: str, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, unscaled: two float32 [N, 4, h, w] on the CPU."""
    vae.to(device).eval()
    means, stds = [], []
    for chunk in torch.arange(len(data)).split(batch):
        dist = vae.encode(data.pixels(chunk, device)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def tokenize(captions: Sequence[str]) -> torch.Tensor:
    """Token ids [N, 77] int64 with the project's CLIP tokenizer."""
    from sun_edge.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer.default()
    return torch.from_numpy(np.concatenate([tokenizer.encode(c) for c in captions]))


class EMA:
    """Exponential moving average of modules' parameters (warm-up: decay (1+n)/(10+n) at first)."""

    def __init__(self, modules: dict[str, nn.Module], decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.shadow = {name: copy.deepcopy(m).eval().requires_grad_(False) for name, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module]) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, module in modules.items():  # one fused kernel per module on CUDA, not one per tensor
            torch._foreach_lerp_(list(self.shadow[name].parameters()), [p.detach() for p in module.parameters()], 1.0 - d)


class _GraphedStep:
    """One training step (forward, backward, clipping, AdamW) captured as a CUDA graph.

    A step of these small models is thousands of tiny kernels, so on a GPU the host's launches,
    not the arithmetic, set the pace; replaying a captured graph launches them all at once. The
    draws stay outside the graph and are copied into its static inputs. Captured after the
    learning-rate warm-up (the graph bakes the rate in), following PyTorch's whole-network
    capture recipe: a few eager steps on a side stream first, gradients ``None`` at capture.
    """

    def __init__(self, step: Any, inputs: tuple[torch.Tensor, ...], opt: Any) -> None:
        self.inputs = tuple(x.clone() for x in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # real steps: they train too
                opt.zero_grad(set_to_none=True)
                step(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = step(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, x in zip(self.inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        return self.loss.detach().clone()


def train_diffusion(unet: nn.Module, text_encoder: nn.Module, vae: nn.Module, data: ImageCaptions,
                    config: StageConfig, *, train_text_encoder: bool = True, caption_dropout: float = 0.1,
                    ema_decay: float | None = 0.999, text_encoder_lr: float | None = None,
                    stage: str = "diffusion") -> tuple[dict[str, nn.Module], StageResult]:
    """Epsilon-prediction training under SD1.5's DDPM schedule; returns the (EMA) modules and the result.

    x0 is a posterior sample times ``vae.config.scaling_factor`` (as SD1.5); t is uniform over
    0..999; captions become ``""`` with probability ``caption_dropout``. ``text_encoder_lr``
    (default: ``config.learning_rate``) lets the from-scratch text encoder learn faster than
    the UNet. Latents, token ids and the random draws live on ``config.device`` and the loss is
    read back every :data:`SYNC_EVERY` steps, so a GPU step is not held up by the host; with
    ``config.cuda_graph`` the step after the warm-up is a replayed CUDA graph
    (:class:`_GraphedStep`; if capture fails, training goes on eagerly and the result says so).
    """
    if not 0.0 <= caption_dropout < 1.0:
        raise SunEdgeError(f"caption dropout must be in [0, 1), got {caption_dropout}")
    scheduler = sd15_noise_scheduler()
    device = config.device
    torch.manual_seed(config.seed)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    mean, std = (x.to(device) for x in encode_latents(vae, data, device))  # [N, 4, h, w] each
    scale = float(vae.config.scaling_factor)
    ids, empty = tokenize(data.captions).to(device), tokenize([""]).to(device)  # [N, 77], [1, 77]
    alphas = scheduler.alphas_cumprod.to(device)  # [1000]
    trained = {"unet": unet} | ({"text_encoder": text_encoder} if train_text_encoder else {})
    unet.to(device).train().requires_grad_(True)
    text_encoder.to(device).train(train_text_encoder).requires_grad_(train_text_encoder)
    params = [p for m in trained.values() for p in m.parameters()]
    groups: list[dict[str, Any]] = [{"params": list(unet.parameters())}]
    if train_text_encoder:
        groups.append({"params": list(text_encoder.parameters()),
                       "lr": text_encoder_lr if text_encoder_lr is not None else config.learning_rate})
    opt, sched = _optimizer(groups, config)
    warm = _warmup_steps(config)
    ema = EMA(trained, ema_decay) if ema_decay else None
    shape = (config.batch_size, *mean.shape[1:])

    def draw() -> tuple[torch.Tensor, ...]:
        index = torch.randint(len(data), (config.batch_size,), generator=gen, device=device)
        x0 = (mean[index] + std[index] * torch.randn(shape, generator=gen, device=device)) * scale  # [B, 4, h, w]
        noise = torch.randn(shape, generator=gen, device=device)  # [B, 4, h, w]
        t = torch.randint(0, 1000, (config.batch_size,), generator=gen, device=device)  # [B]
        drop = torch.rand(config.batch_size, generator=gen, device=device) < caption_dropout  # [B]
        batch_ids = torch.where(drop[:, None], empty, ids[index])  # [B, 77]
        a = alphas[t].view(-1, 1, 1, 1)  # [B, 1, 1, 1]
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, batch_ids, noise

    def step(x_t: torch.Tensor, t: torch.Tensor, batch_ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        with _autocast(config):
            with torch.set_grad_enabled(train_text_encoder):
                emb = text_encoder(batch_ids, return_dict=False)[0]  # [B, 77, D]
            eps = unet(x_t, t, emb, return_dict=False)[0].float()  # [B, 4, h, w]
        loss = F.mse_loss(eps, noise)
        loss.backward()
        nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        opt.step()
        return loss.detach()

    graphed: _GraphedStep | None = None
    graph_note = "off"
    pending: list[torch.Tensor] = []  # losses not yet read back
    losses: list[float] = []
    clock = _Clock()
    bar = _bar(config, stage)
    for index in bar:
        inputs = draw()
        if config.cuda_graph and graph_note == "off" and index >= warm:  # capture once, or fail once
            try:
                graphed = _GraphedStep(step, inputs, opt)
                graph_note = f"captured at step {index}"
            except Exception as error:  # noqa: BLE001 - any capture failure: go on eagerly, say so
                torch.cuda.synchronize()
                opt.zero_grad(set_to_none=True)
                graph_note = f"capture failed at step {index}, trained eagerly: {str(error).splitlines()[0]}"
                print(f"{stage}: CUDA graph {graph_note}", file=sys.stderr)
        if graphed is not None:
            loss = graphed(*inputs)
        else:
            opt.zero_grad(set_to_none=True)
            loss = step(*inputs)
        if index < warm or graphed is None:
            sched.step()  # the graph bakes the learning rate in: it is captured after the warm-up only
        if ema is not None:
            ema.update(trained)
        pending.append(loss)
        out_of_time = _out_of_time(config, clock)
        if len(pending) == SYNC_EVERY or index == config.steps - 1 or out_of_time:
            chunk = torch.stack(pending).float().cpu().tolist()
            pending.clear()
            for offset, value in enumerate(chunk):
                _check_finite(value, stage, index - len(chunk) + 1 + offset)
            losses.extend(chunk)
            bar.set_postfix(loss=f"{np.mean(chunk):.4f}", refresh=False)
        if out_of_time:
            break
    elapsed = clock.read()
    out = {"unet": unet, "text_encoder": text_encoder} | (ema.shadow if ema is not None else {})
    for module in out.values():
        module.eval().requires_grad_(False)
    result = _result(losses, config, elapsed, caption_dropout=caption_dropout, ema_decay=ema_decay,
                     train_text_encoder=train_text_encoder, examples=len(data), scaling_factor=scale,
                     text_encoder_lr=text_encoder_lr if train_text_encoder else None, cuda_graph=graph_note,
                     loss_first=float(np.mean(losses[: max(1, min(100, len(losses) // 10))])))
    return out, result


def train_base(components: dict[str, nn.Module], data: ImageCaptions, config: StageConfig, *,
               caption_dropout: float = 0.1, ema_decay: float | None = 0.999,
               text_encoder_lr: float | None = None) -> tuple[dict[str, nn.Module], StageResult]:
    """``pocket-base``: train the fresh text encoder and UNet of ``components`` with its trained, frozen VAE."""
    vae = components["vae"].eval().requires_grad_(False)
    modules, result = train_diffusion(components["unet"], components["text_encoder"], vae, data, config,
                                      caption_dropout=caption_dropout, ema_decay=ema_decay,
                                      text_encoder_lr=text_encoder_lr, stage="base")
    return {**modules, "vae": vae}, result


def finetune_toon(base: dict[str, nn.Module], data: ImageCaptions, config: StageConfig, *,
                  train_text_encoder: bool = False, caption_dropout: float = 0.1,
                  ema_decay: float | None = 0.998) -> tuple[dict[str, nn.Module], StageResult]:
    """``pocket-toon``: continue ``pocket-base`` on toon images (UNet; text encoder if asked), VAE shared."""
    vae = base["vae"].eval().requires_grad_(False)
    modules, result = train_diffusion(base["unet"], base["text_encoder"], vae, data, config,
                                      train_text_encoder=train_text_encoder, caption_dropout=caption_dropout,
                                      ema_decay=ema_decay, stage="toon")
    return {**modules, "vae": vae}, result

