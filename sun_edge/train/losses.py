"""SUN distillation targets and losses (paper section 3.3, Algorithm 1), one function per equation.

Notation (SD1.5's discrete VP schedule, ``sun_edge.sampling.NoiseSchedule``)::

    alpha_t = sqrt(alphas_cumprod[t]),  sigma_t = sqrt(1 - alphas_cumprod[t]),
    x_t     = alpha_t x0 + sigma_t eps                        (forward noising)

The student's grid is SD1.5's trailing grid for ``steps`` steps (4: 999, 749, 499, 249) and
one student step goes from t to ``s = t - 1000 // steps`` (Delta = 0.25 of the time range),
exactly as ``sun_edge.sampling.sample_ddim`` steps. Below the last grid point s = -1, and
-1 takes ``alphas_cumprod[0]`` (diffusers' DDIMScheduler with ``set_alpha_to_one=False``,
our sampler's final-alpha convention), so a student trained on these targets is the student
that ``sample(..., scheduler="ddim", spacing="trailing")`` runs.

The teacher's N sub-steps from t to s stop at the integer timesteps
``t - round(k * Delta / N)``, k = 0..N (halves rounded up), so every sub-step uses the
schedule's own table; with ``1000 % (steps * N) == 0`` (N = 5, 10, ...) the trajectory is
exactly a ``steps * N``-step trailing DDIM run (tested against diffusers' DDIMScheduler).

MSC (eqs. 12-13) replaces, with probability p, the student's input at t by its own one-step
output from the previous grid point, and keeps the teacher's target: the trajectory both
follow starts from the forward-noised ``x_{t+Delta}`` and the teacher's N sub-steps define
``x_t`` and ``x_tilde_s`` on it (see :func:`distillation_targets`). The first grid point has
no previous one and is never replaced.

Losses are returned unreduced (per element, [B, 4, h, w]); the training loop takes means.
Every target is computed without gradients; only the student's forward on ``x_in`` is
differentiated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sun_edge.sampling import SD15, NoiseSchedule

# teacher(x [B,4,h,w], t [B] float32, emb [B,77,D]) -> eps [B,4,h,w]: the UNet without the adapter
TeacherFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# student(x [B,4,h,w], t [B] float32, c_pos [B,77,D], c_neg [B,77,D]) -> eps [B,4,h,w]: the UNet with it
StudentFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class StudentGrid:
    """The student's timesteps, its step size Delta, and the schedule's alpha/sigma lookups."""

    timesteps: tuple[int, ...]  # descending, e.g. (999, 749, 499, 249)
    jump: int  # Delta in training timesteps: 1000 // steps
    alphas_cumprod: np.ndarray  # float64 [T]

    @classmethod
    def trailing(cls, steps: int = 4, schedule: NoiseSchedule = SD15) -> StudentGrid:
        """The grid that ``sample(..., steps=steps, scheduler="ddim", spacing="trailing")`` visits."""
        ts = tuple(int(t) for t in np.round(schedule.timesteps(steps, "trailing")))
        return cls(ts, schedule.num_train_timesteps // steps, schedule.alphas_cumprod())

    def t(self, index: torch.Tensor) -> torch.Tensor:
        """Grid index [B] (0 = the first, noisiest point) -> timestep [B] int64."""
        return torch.tensor(self.timesteps, dtype=torch.int64, device=index.device)[index]

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t [B] float64 for integer timesteps [B]; t = -1 uses alphas_cumprod[0]."""
        table = torch.from_numpy(self.alphas_cumprod).to(t.device)  # [T] float64
        a = table[t.clamp(min=0)]  # [B]
        return a.sqrt(), (1.0 - a).sqrt()

    def substeps(self, t: torch.Tensor, n: int) -> list[torch.Tensor]:
        """Eq. 9's times t' from t down to s = t - Delta in n sub-steps: n + 1 tensors [B] int64."""
        return [t - (2 * k * self.jump + n) // (2 * n) for k in range(n + 1)]


def _b(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample float64 coefficient [B] as [B,1,1,1] in ``like``'s dtype."""
    return coef.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def cfg_eps(teacher: TeacherFn, x: torch.Tensor, t: torch.Tensor, c_pos: torch.Tensor, c_neg: torch.Tensor,
            guidance: float) -> torch.Tensor:
    """Eq. 2: ``eps_hat = w eps_p + (1 - w) eps_n``; the two teacher passes run as one batch of 2B."""
    eps = teacher(torch.cat([x, x]), torch.cat([t, t]).float(), torch.cat([c_pos, c_neg])).float()  # [2B,4,h,w]
    eps_p, eps_n = eps.chunk(2)  # [B,4,h,w] each
    return guidance * eps_p + (1.0 - guidance) * eps_n


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
              alpha_s: torch.Tensor, sigma_s: torch.Tensor) -> torch.Tensor:
    """Eq. 9 (deterministic DDIM): ``x_s = alpha_s (x_t - sigma_t eps) / alpha_t + sigma_s eps``.

    Coefficients are float64 [B]; ``x_t``, ``eps`` [B,4,h,w].
    """
    x0 = (x_t - _b(sigma_t, x_t) * eps) / _b(alpha_t, x_t)  # [B,4,h,w]
    return _b(alpha_s, x_t) * x0 + _b(sigma_s, x_t) * eps


def eps_step(x_tilde_s: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
             alpha_s: torch.Tensor, sigma_s: torch.Tensor) -> torch.Tensor:
    """Eq. 10: the eps with which one DDIM step maps ``x_t`` to ``x_tilde_s``.

    ``eps_step = (x_tilde_s - alpha_s x_t / alpha_t) / (sigma_s - alpha_s sigma_t / alpha_t)``,
    the inverse of :func:`ddim_step` in ``eps``. The denominator is never zero on a
    decreasing-noise step (it equals ``-(sigma_t alpha_s - sigma_s alpha_t) / alpha_t < 0``).
    """
    ratio = alpha_s / alpha_t  # [B] float64
    return (x_tilde_s - _b(ratio, x_t) * x_t) / _b(sigma_s - ratio * sigma_t, x_t)


@torch.no_grad()
def teacher_trajectory(teacher: TeacherFn, x_t: torch.Tensor, t: torch.Tensor, c_pos: torch.Tensor,
                       c_neg: torch.Tensor, grid: StudentGrid, substeps: int,
                       guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9 iterated: the CFG teacher's N DDIM sub-steps from ``x_t`` at t to ``x_tilde_s`` at t - Delta.

    Returns ``(x_tilde_s, eps_hat_t)``, the latter the teacher's eq. 2 eps at ``(x_t, t)`` (the
    first sub-step's), which is also eq. 8's target when the student sees ``x_t``.
    """
    times = grid.substeps(t, substeps)  # n + 1 tensors [B]
    x, first = x_t, None
    for t_cur, t_next in zip(times[:-1], times[1:]):
        eps = cfg_eps(teacher, x, t_cur, c_pos, c_neg, guidance)  # [B,4,h,w]
        first = eps if first is None else first
        x = ddim_step(x, eps, *grid.alpha_sigma(t_cur), *grid.alpha_sigma(t_next))
    assert first is not None
    return x, first


def msc_input(x_t: torch.Tensor, x_hat_t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """Eq. 12's argument ``i x_t + (1 - i) x_hat_t`` with i [B] in {0, 1} (eq. 13: P(i = 0) = p)."""
    return torch.where(_b(i.double(), x_t).bool(), x_t, x_hat_t)


def cfg_distillation_loss(eps_hat: torch.Tensor, eps_student: torch.Tensor) -> torch.Tensor:
    """Eq. 8, unreduced: ``|| eps_hat - eps_student(x, c_p, c_n, t) ||^2`` per element [B,4,h,w]."""
    return (eps_hat - eps_student).square()


def step_loss(eps_step_target: torch.Tensor, eps_student: torch.Tensor) -> torch.Tensor:
    """Eq. 11, unreduced: ``|| eps_step - eps_student(x, c_p, c_n, t) ||^2``; on eq. 12's input it is L_msc."""
    return (eps_step_target - eps_student).square()


@dataclass(frozen=True, eq=False)
class Targets:
    """Everything one training micro-step needs from the teachers, per sample."""

    t: torch.Tensor  # [B] int64, the student's timestep
    x_t: torch.Tensor  # [B,4,h,w] forward-noised; where replaced, the teacher's point from x_{t+Delta}
    x_in: torch.Tensor  # [B,4,h,w] the student's input: x_t, or x_hat_t where replaced (eq. 12)
    x_tilde_s: torch.Tensor  # [B,4,h,w] the teacher's state at s = t - Delta (eq. 9)
    eps_cfg: torch.Tensor  # [B,4,h,w] eq. 2 at (x_in, t): eq. 8's target
    eps_step: torch.Tensor  # [B,4,h,w] eq. 10 from x_in to x_tilde_s: eq. 11's target
    replaced: torch.Tensor  # [B] bool, i = 0 in eq. 12


@torch.no_grad()
def distillation_targets(teacher: TeacherFn, student: StudentFn, x0: torch.Tensor, noise: torch.Tensor,
                         t_index: torch.Tensor, replace: torch.Tensor, c_pos: torch.Tensor, c_neg: torch.Tensor,
                         grid: StudentGrid, substeps: int, guidance: float) -> Targets:
    """Algorithm 1, lines 3-6, without the student's differentiated forward.

    Normally ``x_t = alpha_t x0 + sigma_t noise`` at the grid point ``t_index`` and the target
    ``x_tilde_s`` is the teacher's N sub-steps from it (eqs. 9-11).

    Where ``replace`` is set (i = 0, eq. 13) and t is not the first grid point (nothing runs
    before t = 999, so those are never replaced), the sample lives on a teacher trajectory one
    grid point earlier: ``x_{t+Delta} = alpha_{t+Delta} x0 + sigma_{t+Delta} noise``, the
    teacher's N sub-steps take it to ``x_t`` and N more to ``x_tilde_s``, the "original
    trajectory". The student's input is its own one-step output from the same start,
    ``x_hat_t`` (one DDIM step with its eps, no gradient), and its target stays the teacher's
    ``x_tilde_s`` (eq. 12): ``x_hat_t - x_t`` is exactly the student-teacher discrepancy MSC
    corrects, and vanishes for a student that steps as the teacher does. ``eps_step`` (eq. 10)
    and eq. 8's CFG target are computed at the input the student actually sees.
    """
    t = grid.t(t_index)  # [B] int64
    alpha_t, sigma_t = grid.alpha_sigma(t)
    alpha_s, sigma_s = grid.alpha_sigma(t - grid.jump)
    x_t = _b(alpha_t, x0) * x0 + _b(sigma_t, x0) * noise  # [B,4,h,w] forward noising
    replaced = replace.bool() & (t_index > 0)  # [B]
    k = replaced.nonzero().squeeze(1)  # [R] indices of replaced samples
    x_prev = t_prev = None
    if len(k):
        t_prev = t[k] + grid.jump  # the previous grid point
        alpha_p, sigma_p = grid.alpha_sigma(t_prev)
        x_prev = _b(alpha_p, x0) * x0[k] + _b(sigma_p, x0) * noise[k]  # [R,4,h,w]
        x_t = x_t.clone()
        x_t[k], _ = teacher_trajectory(teacher, x_prev, t_prev, c_pos[k], c_neg[k], grid, substeps, guidance)
    x_tilde_s, eps_cfg = teacher_trajectory(teacher, x_t, t, c_pos, c_neg, grid, substeps, guidance)

    x_hat_t = x_t.clone()
    if x_prev is not None and t_prev is not None:
        eps_prev = student(x_prev, t_prev.float(), c_pos[k], c_neg[k]).float()  # [R,4,h,w]
        x_hat_t[k] = ddim_step(x_prev, eps_prev, *grid.alpha_sigma(t_prev), alpha_t[k], sigma_t[k])
        eps_cfg = eps_cfg.clone()
        eps_cfg[k] = cfg_eps(teacher, x_hat_t[k], t[k], c_pos[k], c_neg[k], guidance)
    x_in = msc_input(x_t, x_hat_t, ~replaced)
    target = eps_step(x_tilde_s, x_in, alpha_t, sigma_t, alpha_s, sigma_s)
    return Targets(t, x_t, x_in, x_tilde_s, eps_cfg, target, replaced)
