"""Pipeline + PyTorch runtime against diffusers: the whole path from prompt to pixels."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from transformers import CLIPTokenizer as HFCLIPTokenizer

from sun_edge.adapter import SUNAdapter
from sun_edge.errors import SunEdgeError
from sun_edge.imaging import read_parameters, save_png
from sun_edge.pipeline import Pipeline, Settings
from sun_edge.runtimes.pytorch import TorchRuntime

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)
PROMPT, NEGATIVE = "two small red circles on a blue background", "green, blurry"


@pytest.fixture()
def runtime(tiny):
    parts = copy.deepcopy(tiny)
    adapter = SUNAdapter.from_unet(parts["unet"]).randomize_(7)
    return TorchRuntime(parts["unet"], parts["text_encoder"], parts["vae"], adapter, info={"model": "tiny"})


def hf_tokenizer(tmp_path):
    from sun_edge.tokenizer import write_tokenizer_files

    write_tokenizer_files(tmp_path)
    # transformers 5 ignores vocab_file=/merges_file= keywords; from_pretrained reads the folder
    tokenizer = HFCLIPTokenizer.from_pretrained(tmp_path, pad_token="<|endoftext|>",
                                               model_max_length=77, local_files_only=True)
    assert len(tokenizer) == 49408
    return tokenizer


def test_cfg_baseline_matches_diffusers_pipeline(tiny, runtime, tmp_path):
    """CFG-25 with DPM-Solver++: tokenizer, noise, sampler, guidance and VAE all as diffusers does them."""
    settings = Settings.baseline(height=64, width=64)
    ours = Pipeline(runtime).generate(PROMPT, NEGATIVE, seeds=[3], settings=settings)[0]

    parts = copy.deepcopy(tiny)
    scheduler = DPMSolverMultistepScheduler(**SD15, timestep_spacing="linspace")
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=hf_tokenizer(tmp_path),
                                   unet=parts["unet"], scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_inference_steps=25, guidance_scale=8.0,
               generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    want = np.round(out * 255).astype(np.int16)
    got = np.asarray(ours.image).astype(np.int16)
    assert np.abs(got - want).max() <= 1
    assert ours.unet_calls == 25


def test_sun_mode_matches_a_hand_loop_over_diffusers_ddim(runtime):
    """SUN-4: one SUNUNet call per step, DDIM on the trailing grid, torch noise for the seed."""
    settings = Settings(height=64, width=64)
    pipe = Pipeline(runtime)
    ours = pipe.generate(PROMPT, NEGATIVE, seeds=[11], settings=settings)[0]
    assert ours.unet_calls == 4

    scheduler = DDIMScheduler(**SD15, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
    pos = torch.from_numpy(pipe.embed(PROMPT))
    neg = torch.from_numpy(pipe.embed(NEGATIVE))
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = runtime.sun_unet(latents, t.reshape(1), pos, neg)
            latents = scheduler.step(eps, t, latents).prev_sample
        image = runtime.vae.decode(latents / 0.18215).sample.clamp(-1, 1)[0]
    want = np.round((image.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.int16)
    assert np.abs(np.asarray(ours.image).astype(np.int16) - want).max() <= 1


def test_negative_prompt_changes_sun_output(runtime):
    pipe = Pipeline(runtime)
    settings = Settings(height=64, width=64)
    a = np.asarray(pipe.generate(PROMPT, "", seeds=[0], settings=settings)[0].image, dtype=np.float32)
    b = np.asarray(pipe.generate(PROMPT, NEGATIVE, seeds=[0], settings=settings)[0].image, dtype=np.float32)
    assert np.abs(a - b).mean() > 1.0


def test_several_seeds_and_png_parameters(runtime, tmp_path):
    results = Pipeline(runtime).generate(PROMPT, NEGATIVE, seeds=[0, 1], settings=Settings(height=64, width=64))
    assert [r.seed for r in results] == [0, 1]
    assert np.asarray(results[0].image).shape == (64, 64, 3)
    assert not np.array_equal(np.asarray(results[0].image), np.asarray(results[1].image))
    path = save_png(results[1].image, tmp_path / "x.png", results[1].parameters)
    text = read_parameters(path)
    lines = text.split("\n")
    assert lines[0] == PROMPT
    assert lines[1] == f"Negative prompt: {NEGATIVE}"
    fields = dict(item.split(": ", 1) for item in lines[2].split(", "))
    assert fields["Steps"] == "4" and fields["Seed"] == "1" and fields["Sampler"] == "DDIM"
    assert fields["Size"] == "64x64" and fields["Model"] == "tiny" and fields["SUN"] == "on"


@pytest.mark.parametrize("height,width", [(60, 64), (64, 0), (100, 64)])
def test_image_size_must_be_a_multiple_of_8(runtime, height, width):
    with pytest.raises(SunEdgeError, match="multiple of 8"):
        Pipeline(runtime).generate(PROMPT, seeds=[0], settings=Settings(height=height, width=width))


def test_runtime_checks_inputs(runtime):
    ok = np.zeros((1, 4, 8, 8), np.float32)
    emb = np.zeros((1, 77, 32), np.float32)
    with pytest.raises(SunEdgeError, match=r"sample: expected dtype float32, got float64"):
        runtime.unet(ok.astype(np.float64), np.array([999.0]), emb, emb)
    with pytest.raises(SunEdgeError, match=r"negative_encoder_hidden_states: expected shape \[1,77,32\], got \[1,76,32\]"):
        runtime.unet(ok, np.array([999.0]), emb, emb[:, :76])
    with pytest.raises(SunEdgeError, match=r"input_ids: expected dtype int64"):
        runtime.encode_text(np.zeros((1, 77), np.int32))


def test_cfg_only_runtime_refuses_sun_mode(tiny):
    parts = copy.deepcopy(tiny)
    runtime = TorchRuntime(parts["unet"], parts["text_encoder"], parts["vae"], None)
    with pytest.raises(SunEdgeError, match="no SUN adapter"):
        Pipeline(runtime).generate(PROMPT, seeds=[0], settings=Settings(height=64, width=64))
