"""The NumPy sampler against diffusers' schedulers, run as a diffusers pipeline runs them."""

from __future__ import annotations


import numpy as np
import pytest

from sun_edge.errors import SunEdgeError
from no_torch import run_without_torch
from sun_edge.sampling import (
    SCHEDULERS,
    SD15,
    SPACINGS,
    cfg_combine,
    sample,
    scheduler_names,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD15_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
)
SHAPE = (2, 4, 8, 8)
STEP_COUNTS = (1, 4, 7, 8, 25)


def fake_eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for the UNet, nonlinear in the latents and the timestep."""
    return (np.tanh(0.3 * x) + 0.01 * t / 1000.0 * np.sin(x)).astype(np.float32)


def make_scheduler(name: str, spacing: str):
    """The diffusers scheduler ``name`` stands for, configured as SD1.5."""
    if name == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(
            **SD15_CONFIG, timestep_spacing=spacing, algorithm_type="dpmsolver++", solver_order=2,
            solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
        )
    if name == "ddim":
        return diffusers.DDIMScheduler(
            **SD15_CONFIG, timestep_spacing=spacing, set_alpha_to_one=False, clip_sample=False
        )
    return diffusers.EulerDiscreteScheduler(
        **SD15_CONFIG, timestep_spacing=spacing, prediction_type="epsilon", interpolation_type="linear"
    )


def run_diffusers(name: str, spacing: str, steps: int, noise: np.ndarray):
    """The denoising loop of StableDiffusionPipeline, with ``fake_eps`` as the UNet."""
    scheduler = make_scheduler(name, spacing)
    scheduler.set_timesteps(steps)
    latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
    calls = []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t).numpy()
        timestep = np.array([float(t)], dtype=np.float32)
        calls.append((model_input.copy(), timestep))
        eps = torch.from_numpy(fake_eps(model_input, timestep))
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents.numpy(), calls


def run_ours(name: str, spacing: str, steps: int, noise: np.ndarray):
    """Our loop, recording what the model was called with."""
    calls = []

    def eps_fn(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32 and t.dtype == np.float32 and t.shape == (1,)
        calls.append((x.copy(), t.copy()))
        return fake_eps(x, t)

    return sample(eps_fn, noise, steps=steps, scheduler=name, spacing=spacing), calls


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    """max |out - ref| / max |ref|."""
    return float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", scheduler_names())
def test_matches_diffusers(name: str, spacing: str, steps: int) -> None:
    noise = np.random.default_rng(steps).standard_normal(SHAPE, dtype=np.float32)
    ref, ref_calls = run_diffusers(name, spacing, steps, noise)
    out, calls = run_ours(name, spacing, steps, noise)
    assert out.dtype == np.float32 and out.shape == SHAPE
    assert [c[1].item() for c in calls] == [c[1].item() for c in ref_calls]
    for (x, _), (x_ref, _) in zip(calls, ref_calls):
        assert rel_err(x, x_ref) <= 1e-5
    assert rel_err(out, ref) <= 1e-5


def test_alphas_cumprod_is_diffusers_table() -> None:
    ref = diffusers.DDIMScheduler(**SD15_CONFIG).alphas_cumprod.numpy().astype(np.float64)
    ours = SD15.alphas_cumprod()
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):  # torch.linspace uses FMA there
        np.testing.assert_array_equal(ours, ref)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_sd15_four_step_trailing_timesteps() -> None:
    assert SD15.timesteps(4, "trailing").tolist() == [999, 749, 499, 249]
    assert SD15.timesteps(4, "trailing", grid="intervals").tolist() == [999, 749, 499, 249]


def test_trailing_grid_has_exactly_steps_entries() -> None:
    """diffusers' trailing grid has an extra t=-1 entry for 61 steps; ours stops at `steps`."""
    scheduler = make_scheduler("ddim", "trailing")
    scheduler.set_timesteps(61)
    assert len(scheduler.timesteps) == 62 and scheduler.timesteps[-1].item() == -1
    ours = SD15.timesteps(61, "trailing")
    assert len(ours) == 61 and ours.tolist() == scheduler.timesteps[:61].tolist()


def test_progress_reports_every_step() -> None:
    seen = []
    noise = np.zeros((1, 4, 2, 2), np.float32)
    sample(fake_eps, noise, steps=3, scheduler="euler", spacing="trailing", progress=lambda d, n: seen.append((d, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_unknown_names_list_valid_ones() -> None:
    noise = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(SunEdgeError, match="dpmpp_2m, ddim, euler"):
        sample(fake_eps, noise, steps=4, scheduler="heun", spacing="trailing")
    with pytest.raises(SunEdgeError, match="trailing, leading, linspace"):
        sample(fake_eps, noise, steps=4, scheduler="ddim", spacing="karras")
    assert set(SCHEDULERS) == {"dpmpp_2m", "ddim", "euler"}


def test_bad_inputs_are_clear_errors() -> None:
    noise = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(SunEdgeError, match="steps must be between"):
        sample(fake_eps, noise, steps=0, scheduler="ddim", spacing="trailing")
    with pytest.raises(SunEdgeError, match=r"latents must be a float array \[B,4,h,w\]"):
        sample(fake_eps, noise[0], steps=4, scheduler="ddim", spacing="trailing")
    with pytest.raises(SunEdgeError, match="eps_fn returned shape"):
        sample(lambda x, t: x[:, :3], noise, steps=4, scheduler="ddim", spacing="trailing")


def test_cfg_combine() -> None:
    neg = np.array([1.0, -2.0, 0.5], np.float32)
    pos = np.array([3.0, 2.0, 0.5], np.float32)
    np.testing.assert_allclose(cfg_combine(neg, pos, 7.5), [1.0 + 7.5 * 2.0, -2.0 + 7.5 * 4.0, 0.5])
    np.testing.assert_array_equal(cfg_combine(neg, pos, 1.0), pos)




def test_imports_without_torch() -> None:
    run_without_torch(
        """
        import numpy as np
        from sun_edge.sampling import sample
        x = sample(lambda x, t: np.tanh(x), np.ones((1, 4, 2, 2), np.float32),
                   steps=4, scheduler="dpmpp_2m", spacing="trailing")
        assert x.shape == (1, 4, 2, 2)
        assert not any(m.split(".")[0] in ("torch", "diffusers") for m in sys.modules)
        """
    )
