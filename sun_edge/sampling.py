"""NumPy samplers for SD1.5-family models: DPM-Solver++(2M), DDIM and Euler.

Every runtime (PyTorch, ONNX Runtime, Core ML, TensorRT) is driven by this one module,
so it imports nothing but NumPy. The model is only a callable,
``eps_fn(latents, timestep) -> eps``:

- ``latents``: float32 [B, 4, h, w], exactly what a diffusers pipeline hands the UNet
  (``scheduler.scale_model_input(latents, t)``);
- ``timestep``: float32 [1]; integral for ``ddim`` and ``dpmpp_2m``, possibly
  fractional for ``euler`` with ``linspace`` spacing (as EulerDiscreteScheduler);
- returns eps, the predicted noise, with the shape of ``latents``.

Results equal diffusers' DPMSolverMultistepScheduler, DDIMScheduler and
EulerDiscreteScheduler configured as SD1.5 (scaled_linear betas 0.00085..0.012, 1000
train steps, steps_offset 1; DDIM with set_alpha_to_one=False, clip_sample=False) to
float32 rounding. The update arithmetic runs in float64; the result is float32.

Known diffusers quirks that are reproduced on purpose: DDIM steps to
``t - 1000 // steps`` (not to the next timestep of the list), and Euler with
``leading`` spacing scales the initial noise by ``sqrt(sigma_max**2 + 1)``.
One that is not: for 62 step counts (61, 103, 121, ...) diffusers' ``trailing`` grid
has an extra final timestep -1; here the grid always has exactly ``steps`` entries.

Image editing (``Edit``): img2img starts from an image's latents noised to the first kept
timestep and runs the tail of the grid, as diffusers' img2img pipelines do (``get_timesteps``:
``int(steps * strength)`` timesteps kept, here at least one); full strength starts from the
noise alone (diffusers' inpainting pipeline's ``is_strength_max``), so it is text-to-image.
Inpainting by latent blending replaces the kept region after each step by the image's latents
noised to the next timestep (clean after the last), as StableDiffusionInpaintPipeline does for
4-channel UNets. Noising is each scheduler's own ``add_noise``: ``sqrt(a) x0 + sqrt(1 - a) n``
for DDIM and DPM-Solver++, ``x0 + sigma n`` for Euler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, get_args

import numpy as np

from sun_edge.errors import SunEdgeError

SchedulerName = Literal["dpmpp_2m", "ddim", "euler"]
Spacing = Literal["trailing", "leading", "linspace"]
Grid = Literal["points", "intervals"]
EpsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
Progress = Callable[[int, int], None]

SPACINGS: tuple[Spacing, ...] = get_args(Spacing)


@dataclass(frozen=True)
class Edit:
    """Where a sampling run starts from an image (img2img) and what it keeps (inpainting by blending).

    ``init``: the image's latents x0 [B,4,h,w] as the sampler's output is (VAE-scaled).
    ``strength`` in (0, 1]: the fraction of the grid that runs (``kept_steps``).
    ``mask``: None (img2img), or [B or 1, 1, h, w] in [0, 1] on the latent grid, 1 = repaint; after
    each step the region outside it is replaced by ``init`` noised to the next timestep.
    """

    init: np.ndarray
    strength: float = 1.0
    mask: np.ndarray | None = None


def kept_steps(steps: int, strength: float) -> int:
    """How many timesteps of a ``steps`` grid run at ``strength``: ``int(steps * strength)`` as diffusers'
    ``get_timesteps``, at most ``steps`` and at least one."""
    if not (isinstance(strength, (int, float)) and not isinstance(strength, bool) and 0.0 < strength <= 1.0):
        raise SunEdgeError(f"strength must be a number in (0, 1], got {strength!r}")
    return max(1, min(int(steps * strength), steps))


def _start(edit: Edit | None, steps: int) -> int:
    """The grid index the run starts at (0: the whole grid, from noise alone)."""
    return 0 if edit is None else steps - kept_steps(steps, edit.strength)


def _blend(x: np.ndarray, edit: Edit | None, reference: Callable[[], np.ndarray]) -> np.ndarray:
    """Inpainting by blending: ``mask * x + (1 - mask) * reference()`` (the init latents at this noise level)."""
    if edit is None or edit.mask is None:
        return x
    m = edit.mask.astype(np.float64)
    return m * x + (1.0 - m) * reference()


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete variance-preserving schedule with scaled-linear betas (SD1.5's defaults)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    steps_offset: int = 1

    def alphas_cumprod(self) -> np.ndarray:
        """alpha_bar_t = prod(1 - beta_s, s <= t), beta = linspace(sqrt(b0), sqrt(b1))**2.

        Built the way diffusers builds it, so the table is the same float32 table:
        ``torch.linspace`` in float32 (x86 builds evaluate ``start + step * i`` with one
        rounding, i.e. a fused multiply-add, counting down from ``end`` past halfway),
        squared and subtracted from 1 in float32, then a cumulative product accumulated
        in float64 and rounded to float32. Returned as float64 [T].
        """
        n = self.num_train_timesteps
        start = np.float32(math.sqrt(self.beta_start))
        end = np.float32(math.sqrt(self.beta_end))
        step = np.float32((end - start) / np.float32(n - 1))
        i = np.arange(n, dtype=np.float64)
        from_start = np.float64(start) + np.float64(step) * i  # exact in float64
        from_end = np.float64(end) - np.float64(step) * (n - 1 - i)
        root_betas = np.where(i < n // 2, from_start, from_end).astype(np.float32)  # [T]
        alphas = np.float32(1.0) - root_betas * root_betas  # [T] float32
        return np.cumprod(alphas.astype(np.float64)).astype(np.float32).astype(np.float64)

    def sigmas(self) -> np.ndarray:
        """Noise-to-signal ratio sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), float64 [T]."""
        a = self.alphas_cumprod()
        return np.sqrt((1.0 - a) / a)

    def timesteps(self, steps: int, spacing: Spacing, *, grid: Grid = "points") -> np.ndarray:
        """The descending timesteps of a sampling run (Lin et al. 2023, table 2), float64 [steps].

        ``grid="points"`` puts ``steps`` timesteps on [0, T-1] (DDIMScheduler,
        EulerDiscreteScheduler); ``grid="intervals"`` puts ``steps + 1`` and drops the one
        nearest 0 (DPMSolverMultistepScheduler). ``trailing`` is the same in both.
        ``linspace`` points are not rounded (Euler runs at fractional times; DDIM rounds).
        """
        check_spacing(spacing)
        t_max = self.num_train_timesteps
        n = steps + 1 if grid == "intervals" else steps  # grid points before dropping
        max_steps = t_max - 1 if grid == "intervals" else t_max
        if not 1 <= steps <= max_steps:
            raise SunEdgeError(f"steps must be between 1 and {max_steps}, got {steps}")
        if spacing == "linspace":
            ts = np.linspace(0, t_max - 1, n)[::-1]
            if grid == "intervals":
                ts = np.round(ts)
        elif spacing == "leading":
            ts = (np.arange(n) * (t_max // n)).astype(np.float64)[::-1] + self.steps_offset
        else:  # trailing; np.arange can overshoot by one entry, which diffusers keeps as t=-1
            ts = np.round(np.arange(t_max, 0, -t_max / steps))[:steps] - 1.0
        ts = ts[:steps].copy()
        if np.any(np.diff(ts) >= 0) or ts[-1] < 0 or ts[0] > t_max - 1:
            raise SunEdgeError(f"{steps} steps with {spacing} spacing leave the 0..{t_max - 1} grid; use fewer steps")
        return ts


SD15 = NoiseSchedule()


def check_spacing(spacing: str) -> None:
    """Raise SunEdgeError naming the valid spacings unless ``spacing`` is one of them."""
    if spacing not in SPACINGS:
        raise SunEdgeError(f"unknown spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")


def cfg_combine(eps_neg: np.ndarray, eps_pos: np.ndarray, guidance: float) -> np.ndarray:
    """Classifier-free guidance (Ho & Salimans 2022): eps_neg + w * (eps_pos - eps_neg)."""
    return eps_neg + guidance * (eps_pos - eps_neg)


def _predict(eps_fn: EpsFn, model_input: np.ndarray, t: float) -> np.ndarray:
    """Call the model on float32 inputs and return its eps as float64 after a shape check."""
    x = model_input.astype(np.float32)  # [B,4,h,w]
    eps = np.asarray(eps_fn(x, np.array([t], dtype=np.float32)))
    if eps.shape != x.shape:
        raise SunEdgeError(f"eps_fn returned shape {eps.shape} for latents of shape {x.shape}; they must match")
    return eps.astype(np.float64)


def _report(progress: Progress | None, done: int, total: int) -> None:
    """Tell the progress hook that ``done`` of ``total`` steps have finished."""
    if progress is not None:
        progress(done, total)


def sample_ddim(
    eps_fn: EpsFn, noise: np.ndarray, schedule: NoiseSchedule, steps: int, spacing: Spacing,
    progress: Progress | None = None, edit: Edit | None = None,
) -> np.ndarray:
    """DDIM, deterministic (Song et al. 2020, eq. 12 with eta = 0), as diffusers' DDIMScheduler.

    x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t);  x <- sqrt(a_prev) x0 + sqrt(1 - a_prev) eps,
    with a_prev = alpha_bar[t - T // steps], or alpha_bar[0] once that is below 0.
    """
    a = schedule.alphas_cumprod()
    ts = np.round(schedule.timesteps(steps, spacing)).astype(np.int64)
    jump = schedule.num_train_timesteps // steps
    start = _start(edit, steps)
    ts = ts[start:]

    def noised(k: int) -> np.ndarray:  # DDIMScheduler.add_noise of the init latents at ts[k]
        return math.sqrt(a[ts[k]]) * edit.init + math.sqrt(1.0 - a[ts[k]]) * noise

    x = noised(0) if start else noise  # init_noise_sigma = 1
    for i, t in enumerate(ts):
        eps = _predict(eps_fn, x, float(t))
        a_t = a[t]
        a_prev = a[t - jump] if t - jump >= 0 else a[0]
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
        x = _blend(x, edit, lambda: noised(i + 1) if i + 1 < len(ts) else edit.init)
        _report(progress, i + 1, len(ts))
    return x


def sample_dpmpp_2m(
    eps_fn: EpsFn, noise: np.ndarray, schedule: NoiseSchedule, steps: int, spacing: Spacing,
    progress: Progress | None = None, edit: Edit | None = None,
) -> np.ndarray:
    """DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler defaults.

    Data prediction, midpoint second-order multistep update, first order on the first
    and on the last step (lower_order_final), final sigma zero (the last step returns x0).
    VP form: alpha = 1 / sqrt(1 + sigma^2), s = sigma * alpha, lambda = log(alpha / s) = -log(sigma);
    x <- (s_t / s_s) x - alpha_t (exp(-h) - 1) D, D = x0 or (1 + 1/2r) x0 - (1/2r) x0_prev.
    """
    ts = np.round(schedule.timesteps(steps, spacing, grid="intervals")).astype(np.int64)
    sigmas = np.append(schedule.sigmas()[ts], 0.0)  # [steps + 1]
    start = _start(edit, steps)

    def noised(k: int) -> np.ndarray:  # DPMSolverMultistepScheduler.add_noise at sigmas[k]: alpha x0 + s n
        alpha = 1.0 / math.sqrt(1.0 + sigmas[k] ** 2)
        return alpha * edit.init + sigmas[k] * alpha * noise

    x = noised(start) if start else noise  # init_noise_sigma = 1
    old_denoised: np.ndarray | None = None
    h_last = 0.0
    for i, t in enumerate(ts):
        if i < start:  # the head of the grid that img2img skips
            continue
        eps = _predict(eps_fn, x, float(t))
        alpha_s = 1.0 / math.sqrt(1.0 + sigmas[i] ** 2)
        s_s = sigmas[i] * alpha_s
        denoised = (x - s_s * eps) / alpha_s
        if sigmas[i + 1] == 0.0:  # lambda_t = inf: the first-order update returns x0
            x = denoised
        else:
            alpha_t = 1.0 / math.sqrt(1.0 + sigmas[i + 1] ** 2)
            s_t = sigmas[i + 1] * alpha_t
            h = math.log(sigmas[i]) - math.log(sigmas[i + 1])  # lambda_t - lambda_s
            if old_denoised is None or i == len(ts) - 1:
                d = denoised
            else:
                r = h_last / h
                d = (1.0 + 1.0 / (2.0 * r)) * denoised - (1.0 / (2.0 * r)) * old_denoised
            x = (s_t / s_s) * x - alpha_t * math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        x = _blend(x, edit, lambda: noised(i + 1) if i + 1 < len(ts) else edit.init)
        _report(progress, i + 1 - start, len(ts) - start)
    return x


def sample_euler(
    eps_fn: EpsFn, noise: np.ndarray, schedule: NoiseSchedule, steps: int, spacing: Spacing,
    progress: Progress | None = None, edit: Edit | None = None,
) -> np.ndarray:
    """Euler method on the probability-flow ODE (Karras et al. 2022, alg. 2 without churn).

    As diffusers' EulerDiscreteScheduler: sigmas linearly interpolated at float32 timesteps,
    final sigma 0, model input x / sqrt(sigma^2 + 1), x <- x + (x - x0) / sigma * dsigma.
    """
    ts = schedule.timesteps(steps, spacing).astype(np.float32).astype(np.float64)
    table = schedule.sigmas()
    sigmas = np.append(np.interp(ts, np.arange(len(table)), table), 0.0)  # [steps + 1]
    init_sigma = math.sqrt(sigmas[0] ** 2 + 1.0) if spacing == "leading" else sigmas[0]
    start = _start(edit, steps)

    def noised(k: int) -> np.ndarray:  # EulerDiscreteScheduler.add_noise at sigmas[k]: x0 + sigma n
        return edit.init + sigmas[k] * noise

    x = noised(start) if start else noise * init_sigma
    for i, t in enumerate(ts):
        if i < start:  # the head of the grid that img2img skips
            continue
        eps = _predict(eps_fn, x / math.sqrt(sigmas[i] ** 2 + 1.0), float(t))
        denoised = x - sigmas[i] * eps
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        x = _blend(x, edit, lambda: noised(i + 1))  # sigmas[-1] = 0: the clean init after the last step
        _report(progress, i + 1 - start, len(ts) - start)
    return x


Sampler = Callable[[EpsFn, np.ndarray, NoiseSchedule, int, Spacing, Progress | None, Edit | None], np.ndarray]

SCHEDULERS: Mapping[str, Sampler] = MappingProxyType(
    {"dpmpp_2m": sample_dpmpp_2m, "ddim": sample_ddim, "euler": sample_euler}
)


def scheduler_names() -> tuple[str, ...]:
    """The registered scheduler names, in registry order."""
    return tuple(SCHEDULERS)


def get_scheduler(name: str) -> Sampler:
    """Look a sampler loop up in the registry; unknown names raise SunEdgeError listing the valid ones."""
    if name not in SCHEDULERS:
        raise SunEdgeError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


def sample(
    eps_fn: EpsFn,
    latents: np.ndarray,
    *,
    steps: int,
    scheduler: SchedulerName,
    spacing: Spacing,
    progress: Progress | None = None,
    schedule: NoiseSchedule = SD15,
    edit: Edit | None = None,
) -> np.ndarray:
    """Run a whole sampling loop from unit-variance noise ``latents`` [B,4,h,w] to x0 latents.

    ``edit``: img2img (and inpainting) from an image's latents: only the tail of the grid runs
    (``kept_steps(steps, edit.strength)`` UNet calls), from ``edit.init`` noised with ``latents``.
    ``progress(done, total)`` is called after every step (done = 1..total), e.g.
    ``lambda done, total: bar.update(1)`` for a tqdm bar. Returns float32 [B,4,h,w].
    """
    loop = get_scheduler(scheduler)
    check_spacing(spacing)
    noise = np.asarray(latents)
    if noise.ndim != 4 or not np.issubdtype(noise.dtype, np.floating):
        raise SunEdgeError(f"latents must be a float array [B,4,h,w], got {noise.dtype} {noise.shape}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise SunEdgeError(f"steps must be an int, got {steps!r}")
    if edit is not None:
        edit = _check_edit(edit, noise.shape, int(steps))
    x = loop(eps_fn, noise.astype(np.float64), schedule, int(steps), spacing, progress, edit)
    return x.astype(np.float32)


def _check_edit(edit: Edit, shape: tuple[int, ...], steps: int) -> Edit:
    """``edit`` with float64 arrays, its shapes checked against the latents' (one line each)."""
    kept_steps(steps, edit.strength)
    init = np.asarray(edit.init, dtype=np.float64)
    if init.shape != tuple(shape):
        raise SunEdgeError(f"the init latents have shape {list(init.shape)}; the noise has {list(shape)}")
    mask = None
    if edit.mask is not None:
        mask = np.asarray(edit.mask, dtype=np.float64)
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, shape[0]) or mask.shape[2:] != tuple(shape[2:]):
            raise SunEdgeError(f"the latent mask has shape {list(mask.shape)}; it must be [{shape[0]} or 1, 1, "
                               f"{shape[2]}, {shape[3]}]")
    return Edit(init, float(edit.strength), mask)


def kept_timesteps(steps: int, scheduler: str, spacing: Spacing, strength: float = 1.0,
                   schedule: NoiseSchedule = SD15) -> np.ndarray:
    """The timesteps a run at ``strength`` calls the UNet at: the tail of the scheduler's grid (float64)."""
    get_scheduler(scheduler)
    grid: Grid = "intervals" if scheduler == "dpmpp_2m" else "points"
    ts = schedule.timesteps(steps, spacing, grid=grid)
    if scheduler != "euler":
        ts = np.round(ts)
    return ts[steps - kept_steps(steps, strength):]
