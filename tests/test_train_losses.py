"""The distillation targets against hand computations written here (SpeedUpNet eqs. 2, 8-13).

Nothing here uses sun_edge's schedule code for the expected values: the alphas come from
SD1.5's beta formula, sub-step times are written out, DDIM steps are done by hand in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sun_edge.train.losses import (
    StudentGrid,
    cfg_distillation_loss,
    cfg_eps,
    ddim_step,
    distillation_targets,
    eps_step,
    msc_input,
    step_loss,
    teacher_trajectory,
)

W = 3.0  # guidance for the hand tests
GRID = (999, 749, 499, 249)


def hand_alphas_cumprod() -> np.ndarray:
    """SD1.5: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2, alpha_bar = cumprod(1 - beta)."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


AC = hand_alphas_cumprod()


def a_s(t: int) -> tuple[float, float]:
    """alpha_t, sigma_t; t = -1 (below the last grid point) takes alpha_bar[0] (set_alpha_to_one=False)."""
    a = AC[max(t, 0)]
    return math.sqrt(a), math.sqrt(1.0 - a)


def fake_unet(x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """A deterministic per-sample 'UNet': depends on x, t and the embedding."""
    scale = (1.0 + t.to(x.dtype) / 1000.0).view(-1, 1, 1, 1)
    return torch.tanh(x * scale) + emb.to(x.dtype).mean(dim=(1, 2)).view(-1, 1, 1, 1)


def fake_student(x: torch.Tensor, t: torch.Tensor, c_pos: torch.Tensor, c_neg: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.sin(x) + (t.to(x.dtype) / 2000.0).view(-1, 1, 1, 1) + (c_pos - c_neg).to(x.dtype).mean(dim=(1, 2)).view(-1, 1, 1, 1)


def hand_cfg(x: torch.Tensor, t: int, cp: torch.Tensor, cn: torch.Tensor, w: float = W) -> torch.Tensor:
    """Eq. 2 on one sample [1,4,h,w] in float64."""
    tt = torch.tensor([float(t)], dtype=torch.float64)
    return w * fake_unet(x, tt, cp) + (1 - w) * fake_unet(x, tt, cn)


def hand_ddim(x: torch.Tensor, eps: torch.Tensor, t: int, s: int) -> torch.Tensor:
    at, st = a_s(t)
    as_, ss = a_s(s)
    return as_ * (x - st * eps) / at + ss * eps


@pytest.fixture()
def inputs():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=gen)
    noise = torch.randn(4, 4, 8, 8, generator=gen)
    cp = torch.randn(4, 77, 16, generator=gen)
    cn = torch.randn(4, 77, 16, generator=gen) + 0.3
    return x0, noise, cp, cn


def test_grid_is_the_samplers_four_step_trailing_grid():
    from diffusers import DDIMScheduler

    grid = StudentGrid.trailing(4)
    assert grid.timesteps == GRID and grid.jump == 250
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == list(GRID)
    alpha, sigma = grid.alpha_sigma(torch.tensor([-1, 0, 249, 999]))
    assert alpha[0].item() ** 2 == pytest.approx(float(sched.final_alpha_cumprod), rel=1e-7)
    assert alpha[0] == alpha[1]
    np.testing.assert_allclose(alpha.numpy() ** 2, [AC[0], AC[0], AC[249], AC[999]], rtol=1e-6)
    np.testing.assert_allclose(alpha.numpy() ** 2 + sigma.numpy() ** 2, 1.0, rtol=1e-12)


def test_substep_times_are_written_out():
    grid = StudentGrid.trailing(4)
    times = [int(v) for v in torch.stack(grid.substeps(torch.tensor([999, 249]), 6)).T.flatten()]
    # 250 / 6 = 41.67: offsets 0, 42, 83, 125, 167, 208, 250
    assert times == [999, 957, 916, 874, 832, 791, 749, 249, 207, 166, 124, 82, 41, -1]
    assert [int(v[0]) for v in grid.substeps(torch.tensor([499]), 5)] == [499, 449, 399, 349, 299, 249]


def test_cfg_eps_is_eq2_with_one_batched_call(inputs):
    x0, _, cp, cn = inputs
    calls = []

    def teacher(x, t, emb):
        calls.append(x.shape[0])
        return fake_unet(x, t, emb)

    t = torch.tensor([999, 749, 499, 249])
    got = cfg_eps(teacher, x0, t, cp, cn, 8.0)
    want = torch.cat([8 * fake_unet(x0[i : i + 1], t[i : i + 1].float(), cp[i : i + 1])
                      - 7 * fake_unet(x0[i : i + 1], t[i : i + 1].float(), cn[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(got, want)
    assert calls == [8]


@pytest.mark.parametrize("substeps", [6, 3])
def test_teacher_trajectory_matches_hand_ddim_substeps(inputs, substeps):
    x0, _, cp, cn = inputs
    grid = StudentGrid.trailing(4)
    t = torch.tensor(GRID)
    x_s, eps_first = teacher_trajectory(fake_unet, x0, t, cp, cn, grid, substeps, W)
    for b, tb in enumerate(GRID):
        x = x0[b : b + 1].double()
        offsets = [int(math.floor(k * 250 / substeps + 0.5)) for k in range(substeps + 1)]
        times = [tb - o for o in offsets]
        assert times[-1] == tb - 250
        for k, (tc, tn) in enumerate(zip(times[:-1], times[1:])):
            eps = hand_cfg(x, tc, cp[b : b + 1].double(), cn[b : b + 1].double())
            if k == 0:
                torch.testing.assert_close(eps_first[b : b + 1].double(), eps, rtol=1e-5, atol=1e-5)
            x = hand_ddim(x, eps, tc, tn)
        torch.testing.assert_close(x_s[b : b + 1].double(), x, rtol=1e-4, atol=1e-4)


def test_teacher_trajectory_matches_diffusers_ddim_with_20_steps(inputs):
    """N = 5: 4 x 5 = 20 divides 1000, so the teacher's path is a 20-step trailing DDIM run."""
    from diffusers import DDIMScheduler

    x0, _, cp, cn = inputs
    grid = StudentGrid.trailing(4)
    x_s, _ = teacher_trajectory(fake_unet, x0, torch.tensor(GRID), cp, cn, grid, 5, 8.0)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    sched.set_timesteps(20)
    ts = sched.timesteps.tolist()
    assert ts[::5] == list(GRID)
    for b in range(4):
        x = x0[b : b + 1].clone()
        for t in ts[5 * b : 5 * b + 5]:
            tt = torch.tensor([float(t)])
            eps = 8.0 * fake_unet(x, tt, cp[b : b + 1]) - 7.0 * fake_unet(x, tt, cn[b : b + 1])
            x = sched.step(eps, t, x).prev_sample
        torch.testing.assert_close(x_s[b : b + 1], x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", GRID)
def test_eq10_inverts_one_ddim_step(t):
    gen = torch.Generator().manual_seed(t)
    x_t, x_s, e = (torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    s = t - 250
    coefs = [torch.tensor([v, v], dtype=torch.float64) for v in (*a_s(t), *a_s(s))]
    # eq. 10 gives the eps that maps x_t to x_s in one DDIM step ...
    eps = eps_step(x_s, x_t, *coefs)
    torch.testing.assert_close(hand_ddim(x_t, eps, t, s), x_s, rtol=1e-9, atol=1e-9)
    # ... and recovers the eps of a step taken by hand
    torch.testing.assert_close(eps_step(hand_ddim(x_t, e, t, s), x_t, *coefs), e, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ddim_step(x_t, e, *coefs), hand_ddim(x_t, e, t, s), rtol=1e-12, atol=1e-12)


def hand_teacher_steps(x: torch.Tensor, t: int, cp: torch.Tensor, cn: torch.Tensor, n: int) -> torch.Tensor:
    """n CFG DDIM sub-steps by hand from t to t - 250 (one sample, float64)."""
    times = [t - int(math.floor(k * 250 / n + 0.5)) for k in range(n + 1)]
    for tc, tn in zip(times[:-1], times[1:]):
        x = hand_ddim(x, hand_cfg(x, tc, cp, cn), tc, tn)
    return x


def test_msc_with_p1_feeds_the_students_step_and_keeps_the_teachers_target(inputs):
    x0, noise, cp, cn = inputs
    grid = StudentGrid.trailing(4)
    index = torch.arange(4)  # one sample per grid point
    n = 3

    def targets(replace: bool, student=fake_student):
        mask = torch.full((4,), replace)
        return distillation_targets(fake_unet, student, x0, noise, index, mask, cp, cn, grid, n, W)

    kept, swapped = targets(False), targets(True)
    assert kept.replaced.tolist() == [False] * 4
    assert swapped.replaced.tolist() == [False, True, True, True]  # never at t = 999: no step before it
    assert torch.equal(kept.x_in, kept.x_t)
    for name in ("x_t", "x_in", "x_tilde_s", "eps_cfg", "eps_step"):  # the first grid point is untouched
        assert torch.equal(getattr(swapped, name)[0], getattr(kept, name)[0])
    other = targets(True, student=lambda x, t, c_p, c_n: fake_student(x, t, c_p, c_n) * 2.0)
    assert torch.equal(other.x_tilde_s, swapped.x_tilde_s)  # the target does not depend on the student ...
    assert not torch.equal(other.x_in[1:], swapped.x_in[1:])  # ... its input does

    for b, t in enumerate(GRID):
        cpb, cnb = cp[b : b + 1].double(), cn[b : b + 1].double()
        at, st = a_s(t)
        forward = at * x0[b : b + 1].double() + st * noise[b : b + 1].double()
        torch.testing.assert_close(kept.x_t[b : b + 1].double(), forward, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kept.x_tilde_s[b : b + 1].double(), hand_teacher_steps(forward, t, cpb, cnb, n),
                                   rtol=1e-4, atol=1e-4)
        if b == 0:
            continue
        t_prev = GRID[b - 1]
        ap, sp = a_s(t_prev)
        x_prev = ap * x0[b : b + 1].double() + sp * noise[b : b + 1].double()
        # the original trajectory: the teacher from x_{t+Delta} through x_t to x_tilde_s
        teacher_t = hand_teacher_steps(x_prev, t_prev, cpb, cnb, n)
        torch.testing.assert_close(swapped.x_t[b : b + 1].double(), teacher_t, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(swapped.x_tilde_s[b : b + 1].double(), hand_teacher_steps(teacher_t, t, cpb, cnb, n),
                                   rtol=1e-4, atol=1e-4)
        # the student's input: its own one DDIM step from x_{t+Delta}
        eps_student = fake_student(x_prev, torch.tensor([float(t_prev)], dtype=torch.float64), cpb, cnb)
        x_hat = hand_ddim(x_prev, eps_student, t_prev, t)
        torch.testing.assert_close(swapped.x_in[b : b + 1].double(), x_hat, rtol=1e-5, atol=1e-5)
        # eq. 8's target is the teacher's CFG at the input the student sees
        torch.testing.assert_close(swapped.eps_cfg[b : b + 1].double(), hand_cfg(x_hat, t, cpb, cnb),
                                   rtol=1e-5, atol=1e-5)
    # eq. 10 at the input the student sees: one DDIM step with eps_step lands on the teacher's x_tilde_s
    for tg in (kept, swapped):
        for b, t in enumerate(GRID):
            landed = hand_ddim(tg.x_in[b : b + 1].double(), tg.eps_step[b : b + 1].double(), t, t - 250)
            torch.testing.assert_close(landed, tg.x_tilde_s[b : b + 1].double(), rtol=1e-4, atol=1e-4)


def test_msc_discrepancy_vanishes_for_a_student_that_steps_like_the_teacher(inputs):
    """N = 1 and a student equal to the teacher's CFG: x_hat_t is x_t, and eps_step is the teacher's eps."""
    x0, noise, cp, cn = inputs
    grid = StudentGrid.trailing(4)

    def student(x, t, c_p, c_n):
        return cfg_eps(fake_unet, x, t, c_p, c_n, W)

    tg = distillation_targets(fake_unet, student, x0, noise, torch.arange(4), torch.ones(4, dtype=torch.bool),
                              cp, cn, grid, 1, W)
    torch.testing.assert_close(tg.x_in, tg.x_t)
    torch.testing.assert_close(tg.eps_step, tg.eps_cfg, rtol=1e-4, atol=1e-4)


def test_a_student_that_predicts_eps_step_samples_the_teachers_trajectory(inputs):
    """With the targets' conventions, 4 DDIM trailing steps of a perfect student = 20 DDIM steps of the teacher."""
    from sun_edge.sampling import sample

    _, noise, cp, cn = inputs
    grid = StudentGrid.trailing(4)
    cp1, cn1 = cp[:1], cn[:1]

    def student_eps(latents: np.ndarray, t: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(latents)
        tt = torch.tensor([int(t[0])])
        x_s, _ = teacher_trajectory(fake_unet, x, tt, cp1, cn1, grid, 5, 8.0)
        return eps_step(x_s, x, *grid.alpha_sigma(tt), *grid.alpha_sigma(tt - 250)).numpy()

    def teacher_eps(latents: np.ndarray, t: np.ndarray) -> np.ndarray:
        return cfg_eps(fake_unet, torch.from_numpy(latents), torch.from_numpy(t), cp1, cn1, 8.0).numpy()

    start = noise[:1].numpy()
    four = sample(student_eps, start, steps=4, scheduler="ddim", spacing="trailing")
    twenty = sample(teacher_eps, start, steps=20, scheduler="ddim", spacing="trailing")
    np.testing.assert_allclose(four, twenty, rtol=1e-4, atol=1e-4)


def test_losses_are_unreduced_squared_errors():
    a, b = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for loss in (cfg_distillation_loss(a, b), step_loss(a, b)):
        assert loss.shape == (3, 4, 8, 8)
        torch.testing.assert_close(loss, (a - b) ** 2)


def test_msc_input_is_eq12():
    x, x_hat = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)
    got = msc_input(x, x_hat, torch.tensor([1, 0, 1]))
    assert got[:, 0, 0, 0].tolist() == [0.0, 1.0, 0.0]
