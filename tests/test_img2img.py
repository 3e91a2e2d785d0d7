"""img2img (issue 19): kept timesteps and the sampler's tail against diffusers' schedulers, the pipeline on
tiny-random and pocket-base (strength 0.3 stays near the init image, 1.0 is text-to-image), the VAE posterior,
the PNG's parameters, and bad input as one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cli_helpers import error_line, run
from sun_edge import editing, sampling
from sun_edge.errors import SunEdgeError
from sun_edge.pipeline import Job, Pipeline, Settings

SCHEDULERS = ("ddim", "dpmpp_2m", "euler")
SPACINGS = ("trailing", "leading", "linspace")
SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def diffusers_scheduler(name: str, spacing: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler(**SD15, clip_sample=False, set_alpha_to_one=False, timestep_spacing=spacing)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**SD15, timestep_spacing=spacing)
    return EulerDiscreteScheduler(**SD15, timestep_spacing=spacing)


def diffusers_tail(scheduler, steps: int, strength: float):
    """StableDiffusionImg2ImgPipeline.get_timesteps after set_timesteps: (timesteps, begin index)."""
    scheduler.set_timesteps(steps)
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    return scheduler.timesteps[t_start * scheduler.order:], t_start * scheduler.order


def toy_eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return (np.tanh(x) * 0.5 + 0.01 * float(t[0]) / 1000).astype(np.float32)


def test_strength_half_keeps_the_tail_of_suns_grid():
    assert sampling.kept_timesteps(4, "ddim", "trailing", 0.5).tolist() == [499.0, 249.0]
    assert sampling.kept_timesteps(4, "ddim", "trailing", 1.0).tolist() == [999.0, 749.0, 499.0, 249.0]
    assert sampling.kept_steps(4, 0.1) == 1  # int(0.4) = 0 timesteps in diffusers; at least one here


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_kept_timesteps_equal_diffusers_get_timesteps(name, spacing):
    for steps, strength in ((4, 0.5), (4, 0.3), (4, 0.75), (10, 0.7), (25, 0.6), (25, 0.3), (4, 1.0)):
        theirs, _ = diffusers_tail(diffusers_scheduler(name, spacing), steps, strength)
        ours = sampling.kept_timesteps(steps, name, spacing, strength)
        np.testing.assert_allclose(ours, theirs.numpy().astype(np.float64), atol=1e-3,
                                   err_msg=f"{name} {spacing} {steps} steps, strength {strength}")


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("blend", [False, True])
def test_the_edit_loop_equals_diffusers_img2img_and_inpaint_loops(name, spacing, blend):
    """StableDiffusionImg2ImgPipeline's loop (add_noise at the first kept timestep, full strength from noise as the
    inpainting pipeline's is_strength_max) and StableDiffusionInpaintPipeline's 4-channel blend, written with
    diffusers' schedulers: the same latents and the same timesteps at every UNet call."""
    import torch

    rng = np.random.default_rng(0)
    init, noise = (rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(2))
    mask = (rng.random((1, 1, 8, 8)) > 0.5).astype(np.float32) if blend else None
    for steps, strength in ((4, 0.5), (4, 0.3), (10, 0.7), (4, 1.0)):
        sched = diffusers_scheduler(name, spacing)
        ts, begin = diffusers_tail(sched, steps, strength)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(begin)
        n, x0 = torch.from_numpy(noise), torch.from_numpy(init)
        latents = n * sched.init_noise_sigma if strength == 1.0 else sched.add_noise(x0, n, ts[:1])
        for i, t in enumerate(ts):
            eps = torch.from_numpy(toy_eps(sched.scale_model_input(latents, t).numpy(), np.array([float(t)], np.float32)))
            latents = sched.step(eps, t, latents).prev_sample
            if mask is not None:
                kept = sched.add_noise(x0, n, ts[i + 1:i + 2]) if i < len(ts) - 1 else x0
                latents = (1 - torch.from_numpy(mask)) * kept + torch.from_numpy(mask) * latents
        calls = []

        def eps_fn(x, t, calls=calls):
            calls.append(float(t[0]))
            return toy_eps(x, t)

        ours = sampling.sample(eps_fn, noise, steps=steps, scheduler=name, spacing=spacing,
                               edit=sampling.Edit(init, strength, mask))
        np.testing.assert_allclose(calls, ts.numpy().astype(np.float64), atol=1e-3)
        np.testing.assert_allclose(ours, latents.numpy(), atol=2e-5, err_msg=f"{steps} steps, strength {strength}")
        if mask is not None:  # after the last step the kept region is the init latents themselves
            np.testing.assert_array_equal(ours * (1 - mask), init * (1 - mask))


def test_the_sampler_checks_the_edit():
    noise = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(SunEdgeError, match="init latents have shape"):
        sampling.sample(toy_eps, noise, steps=4, scheduler="ddim", spacing="trailing",
                        edit=sampling.Edit(np.zeros((1, 4, 4, 4)), 0.5))
    with pytest.raises(SunEdgeError, match="strength must be"):
        sampling.sample(toy_eps, noise, steps=4, scheduler="ddim", spacing="trailing", edit=sampling.Edit(noise, 0.0))


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_strength_outside_the_interval_is_one_line(bad):
    with pytest.raises(SunEdgeError) as e:
        Settings(strength=bad).validate()
    assert "strength must be a number in (0, 1]" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("field,bad,text", [("mask_blur", -1, "mask blur"), ("mask_blur", 65, "mask blur"),
                                            ("invert_mask", 1, "invert_mask must be true or false"),
                                            ("paste_back", "yes", "paste_back must be true or false")])
def test_mask_settings_are_checked(field, bad, text):
    with pytest.raises(SunEdgeError, match=text):
        Settings(**{field: bad}).validate()


def test_prepare_image_resizes_and_center_crops():
    image = Image.new("RGB", (200, 100), "black")
    ImageDraw.Draw(image).rectangle([50, 0, 149, 99], fill="white")  # the middle square
    x = editing.prepare_image(image, 64, 64)
    assert x.shape == (1, 3, 64, 64) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x[0, :, 2:-2, 2:-2].min() > 0.9  # the crop is the white middle square, scaled to cover


def test_posterior_std_is_diffusers(tiny_reference):
    import torch

    image = np.random.default_rng(1).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    mean, std = tiny_reference.encode_dist(image)
    dist = tiny_reference.vae.encode(torch.from_numpy(image)).latent_dist
    scale = tiny_reference.vae.config.scaling_factor
    np.testing.assert_allclose(mean, (dist.mean * scale).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, (dist.std * scale).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(tiny_reference.encode(image), mean)
    assert std.min() > 0


def init_picture(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (40, 60, 200))
    ImageDraw.Draw(image).ellipse([size // 6, size // 6, size * 2 // 3, size * 2 // 3], fill=(220, 40, 30))
    return image


class Counting:
    """A runtime whose UNet calls are counted, with the timesteps they were made at."""

    def __init__(self, runtime):
        self.runtime, self.timesteps = runtime, []

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def unet(self, latents, t, pos, neg, *rest):
        self.timesteps.append(float(t[0]))
        return self.runtime.unet(latents, t, pos, neg, *rest)


@pytest.mark.parametrize("strength,expected", [(0.5, [499.0, 249.0]), (0.3, [249.0]), (0.75, [749.0, 499.0, 249.0])])
def test_unet_calls_are_the_kept_timesteps(tiny_reference, strength, expected, one_thread):
    counting = Counting(tiny_reference)
    pipe = Pipeline(counting)
    seen = []
    out = pipe.generate("a red circle", "blurry", seeds=[3], settings=Settings(height=64, width=64, strength=strength),
                        init_image=init_picture(), progress=lambda done, total: seen.append((done, total)))[0]
    assert counting.timesteps == expected and out.unet_calls == len(expected)
    assert seen[0] == (0, len(expected)) and seen[-1] == (len(expected), len(expected))


def test_full_strength_is_text_to_image_on_tiny_random(tiny_reference, one_thread):
    pipe = Pipeline(tiny_reference)
    settings = Settings(height=64, width=64)
    t2i = pipe.generate("a red circle", "blurry", seeds=[5], settings=settings)[0]
    i2i = pipe.generate("a red circle", "blurry", seeds=[5], settings=settings, init_image=init_picture())[0]
    np.testing.assert_array_equal(np.asarray(i2i.image), np.asarray(t2i.image))


def test_batches_of_img2img_jobs_equal_each_job_alone(tiny_reference, one_thread):
    pipe = Pipeline(tiny_reference)
    settings = Settings(height=64, width=64, strength=0.5)
    jobs = [Job("a red circle", "", 1, init_image=init_picture()), Job("a blue square", "", 2),
            Job("a green ring", "", 3, init_image=init_picture().rotate(90))]
    together = pipe.generate_batch(jobs, settings=settings, max_batch=3)
    for job, got in zip(jobs, together):
        alone = pipe.generate_batch([job], settings=settings)[0]
        np.testing.assert_array_equal(np.asarray(got.image), np.asarray(alone.image))
    assert [g.unet_calls for g in together] == [2, 4, 2]  # a text job is its own batch, with the whole grid


def test_png_parameters_record_strength_and_the_init_image_hash(tiny_reference, one_thread):
    init = init_picture()
    out = Pipeline(tiny_reference).generate("a red circle", "", seeds=[0], settings=Settings(height=64, width=64,
                                                                                           strength=0.5),
                                            init_image=init)[0]
    import hashlib

    digest = hashlib.sha256(init.convert("RGB").tobytes()).hexdigest()[:10]
    assert "Denoising strength: 0.5" in out.parameters and f"Init image hash: {digest}" in out.parameters
    assert "Mask blur" not in out.parameters


@pytest.fixture(scope="module")
def pocket():
    from sun_edge.runtimes.pytorch import TorchRuntime

    return TorchRuntime.load("pocket-base")


def psnr8(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(10 * np.log10(255.0**2 / np.mean((x - y) ** 2)))


def test_pocket_base_img2img_stays_near_the_init_image_at_low_strength(pocket, one_thread_module):
    pipe = Pipeline(pocket)
    size = pocket.native_size
    init = pipe.generate("two red circles on a blue background", "", seeds=[1],
                         settings=Settings(height=size, width=size))[0].image
    prompt = "a green square on a yellow background"
    low = pipe.generate(prompt, "", seeds=[2], settings=Settings(height=size, width=size, strength=0.3),
                        init_image=init)[0]
    full = pipe.generate(prompt, "", seeds=[2], settings=Settings(height=size, width=size, strength=1.0),
                         init_image=init)[0]
    t2i = pipe.generate(prompt, "", seeds=[2], settings=Settings(height=size, width=size))[0]
    assert low.unet_calls == 1 and full.unet_calls == 4
    assert psnr8(low.image, init) >= 20.0  # measured 28 dB: the composition is kept
    assert psnr8(full.image, init) < psnr8(low.image, init) - 8.0  # full strength follows the new prompt
    np.testing.assert_array_equal(np.asarray(full.image), np.asarray(t2i.image))  # 1.0 = text-to-image, same seed


def test_cli_img2img_bad_inputs_are_one_line(home_env, tmp_path, capsys):
    init, mask, junk = tmp_path / "init.png", tmp_path / "mask.png", tmp_path / "junk.png"
    init_picture().save(init)
    Image.new("L", (32, 32)).save(mask)
    junk.write_text("not an image")
    base = ["generate", "--model", "tiny-random", "--prompt", "x", "-o", str(tmp_path / "out.png")]
    cases = [
        (["--init-image", str(junk)], "is not an image Pillow can read"),
        (["--init-image", str(tmp_path / "missing.png")], "does not exist"),
        (["--init-image", str(init), "--strength", "0"], "strength must be a number in (0, 1]"),
        (["--init-image", str(init), "--strength", "1.01"], "strength must be a number in (0, 1]"),
        (["--init-image", str(init), "--mask", str(mask)], "is 32x32 and --init-image"),
        (["--strength", "0.5"], "--strength needs --init-image"),
        (["--init-image", str(init), "--invert-mask"], "--invert-mask needs --mask"),
    ]
    for extra, text in cases:
        code, out, err = run(capsys, *base, *extra)
        assert code == 2, (extra, err)
        line = error_line(err)
        assert text in line, (extra, line)
    assert not (tmp_path / "out.png").exists()


def test_cli_img2img_writes_a_png_with_its_parameters(home_env, tmp_path, capsys):
    from sun_edge.imaging import read_parameters

    init = tmp_path / "init.png"
    init_picture(80).save(init)
    out = tmp_path / "out.png"
    code, stdout, err = run(capsys, "generate", "--model", "tiny-random", "--prompt", "a circle", "--height", "64",
                            "--width", "64", "--init-image", str(init), "--strength", "0.5", "-o", str(out))
    assert code == 0, err
    assert "2 UNet calls" in err
    text = read_parameters(out)
    assert "Denoising strength: 0.5" in text and "Init image hash: " in text
