"""Inpainting (issue 19): mask preparation, a tiny random 9-channel inpainting UNet in the real layouts (diffusers
folder, single LDM file) with its mask and masked-image inputs, blending for ordinary UNets, and the unmasked
region kept (latents exactly; pixels with paste-back), on tiny-random and pocket-base."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from inpaint_helpers import SIZE, init_picture, psnr8, right_half
from sun_edge import editing, noise
from sun_edge.errors import SunEdgeError
from sun_edge.pipeline import Pipeline, Settings


class Recording:
    """A runtime whose UNet inputs and decoder inputs are kept."""

    def __init__(self, runtime):
        self.runtime, self.samples, self.decoded = runtime, [], []

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def unet(self, latents, t, pos, neg, *rest):
        self.samples.append(latents.copy())
        return self.runtime.unet(latents, t, pos, neg, *rest)

    def decode(self, latents):
        self.decoded.append(latents.copy())
        return self.runtime.decode(latents)


# --- the mask

def test_mask_is_resized_to_the_latent_grid_inverted_and_blurred():
    mask = editing.prepare_mask(right_half(96), (96, 96), 64, 64, 8)
    assert mask.pixels.shape == (1, 1, 64, 64) and mask.latent.shape == (1, 1, 8, 8)
    assert mask.latent[0, 0, :, :4].max() == 0 and mask.latent[0, 0, :, 4:].min() == 1
    inverted = editing.prepare_mask(right_half(96), (96, 96), 64, 64, 8, invert=True)
    np.testing.assert_array_equal(inverted.latent, 1 - mask.latent)
    blurred = editing.prepare_mask(right_half(96), (96, 96), 64, 64, 8, blur=4)
    edge = blurred.pixels[0, 0, 32, 28:36]
    assert 0 < edge.min() < 0.5 < edge.max() < 1  # a soft edge for paste-back ...
    np.testing.assert_array_equal(blurred.latent, mask.latent)  # ... and the same 0/1 latent grid


def test_a_mask_of_another_size_is_one_line():
    with pytest.raises(SunEdgeError) as e:
        editing.prepare_mask(Image.new("L", (32, 32)), (64, 48), 64, 64, 8)
    assert "the mask is 32x32 and the init image 64x48" in str(e.value) and "\n" not in str(e.value)


def test_a_mask_needs_an_init_image(tiny_reference):
    with pytest.raises(SunEdgeError, match="a mask needs an init image"):
        Pipeline(tiny_reference).generate("x", seeds=[0], settings=Settings(height=SIZE, width=SIZE), mask=right_half())


# --- blending on an ordinary (4-channel) UNet

def test_blending_keeps_the_unmasked_latents_and_changes_the_masked_ones(tiny_reference, one_thread):
    rec = Recording(tiny_reference)
    pipe = Pipeline(rec)
    settings = Settings(height=SIZE, width=SIZE, strength=1.0)
    out = pipe.generate("a green square", "", seeds=[4], settings=settings, init_image=init_picture(),
                        mask=right_half())[0]
    init = editing.sample_posterior(*tiny_reference.encode_dist(editing.prepare_image(init_picture(), SIZE, SIZE)),
                                    noise.initial_noise(4, (3, 4, 8, 8), kind="torch")[1:2])
    final = rec.decoded[0]
    np.testing.assert_array_equal(final[..., :4], init[..., :4])  # kept: the init latents themselves
    assert np.abs(final[..., 4:] - init[..., 4:]).mean() > 0.1  # repainted
    assert out.unet_calls == 4 and all(s.shape == (1, 4, 8, 8) for s in rec.samples)
    assert "Mask blur: 0" in out.parameters and "Denoising strength: 1.0" in out.parameters


def test_paste_back_returns_the_original_pixels_outside_the_mask(tiny_reference, one_thread):
    settings = Settings(height=SIZE, width=SIZE, strength=0.75, mask_blur=2, paste_back=True)
    out = Pipeline(tiny_reference).generate("a green square", "", seeds=[4], settings=settings,
                                            init_image=init_picture(), mask=right_half())[0]
    got, want = np.asarray(out.image), np.asarray(init_picture())
    assert psnr8(got[:, :SIZE // 2 - 8], want[:, :SIZE // 2 - 8]) == float("inf")  # outside the blurred edge
    assert np.abs(got[:, SIZE // 2 + 8:].astype(float) - want[:, SIZE // 2 + 8:]).mean() > 5
    assert "Paste back: on" in out.parameters


# --- a 9-channel inpainting UNet (sd-1.5-inpainting layout), tiny and random

@pytest.fixture(scope="module")
def inpaint_runtime(inpaint_model):
    from sun_edge.runtimes.pytorch import TorchRuntime

    return TorchRuntime.load(str(inpaint_model["folder"]))


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert np.array_equal(sa[key].numpy(), sb[key].numpy()), key


def test_nine_channel_unet_loads_from_a_folder_and_a_single_file(inpaint_model, tiny_home):
    from sun_edge.models import load_model

    folder = load_model(str(inpaint_model["folder"]))
    assert folder.unet.config.in_channels == 9 and folder.unet.config.out_channels == 4
    _same_weights(folder.unet, inpaint_model["unet"])
    # the single file is built from a 4-channel config: the 9 channels are read from its conv_in weight
    single = load_model(str(inpaint_model["single"]), config_dir=tiny_home / "models" / "tiny-random")
    assert single.unet.config.in_channels == 9
    _same_weights(single.unet, inpaint_model["unet"])


def test_a_config_that_disagrees_with_the_tensors_is_one_line(inpaint_model, tmp_path):
    from sun_edge.models import load_model

    bad = tmp_path / "bad"
    shutil.copytree(inpaint_model["folder"], bad)
    config = json.loads((bad / "unet" / "config.json").read_text())
    (bad / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 4}))
    with pytest.raises(SunEdgeError) as e:
        load_model(str(bad))
    assert "says in_channels 4, but its conv_in weight takes 9 channels" in str(e.value)


def test_the_inpainting_unet_sees_latents_mask_and_masked_image_latents(inpaint_runtime, one_thread):
    import torch

    rec = Recording(inpaint_runtime)
    settings = Settings(height=SIZE, width=SIZE, strength=1.0)
    out = Pipeline(rec).generate("a green square", "", seeds=[6], settings=settings, init_image=init_picture(),
                                 mask=right_half())[0]
    assert out.unet_calls == 4 and all(s.shape == (1, 9, 8, 8) for s in rec.samples)
    mask = np.zeros((1, 1, 8, 8), np.float32)
    mask[..., 4:] = 1
    image = torch.from_numpy(editing.prepare_image(init_picture(), SIZE, SIZE))
    masked = image * (torch.from_numpy(np.repeat(np.repeat(mask, 8, 2), 8, 3)) < 0.5)  # diffusers' masked_image
    dist = inpaint_runtime.vae.encode(masked).latent_dist
    eps = torch.from_numpy(noise.initial_noise(6, (3, 4, 8, 8), kind="torch")[2:3])
    expected = ((dist.mean + dist.std * eps) * inpaint_runtime.vae.config.scaling_factor).numpy()
    for sample in rec.samples:
        np.testing.assert_array_equal(sample[:, 4:5], mask)
        np.testing.assert_allclose(sample[:, 5:], expected, rtol=1e-4, atol=1e-5)
    final = rec.decoded[0]
    init = editing.sample_posterior(*inpaint_runtime.encode_dist(image.numpy()),
                                    noise.initial_noise(6, (3, 4, 8, 8), kind="torch")[1:2])
    np.testing.assert_array_equal(final[..., :4], init[..., :4])  # kept by the blend, as A1111 does
    assert np.abs(final[..., 4:] - init[..., 4:]).mean() > 0.1


@pytest.mark.parametrize("mode", ["sun", "cfg"])
def test_the_inpainting_unet_keeps_the_unmasked_pixels_with_paste_back(inpaint_runtime, mode, one_thread):
    settings = Settings.for_mode(mode, height=SIZE, width=SIZE, steps=4, strength=0.75, paste_back=True)
    out = Pipeline(inpaint_runtime).generate("a green square", "blurry", seeds=[7], settings=settings,
                                             init_image=init_picture(), mask=right_half())[0]
    got, want = np.asarray(out.image), np.asarray(init_picture())
    assert psnr8(got[:, :SIZE // 2], want[:, :SIZE // 2]) >= 30.0
    assert psnr8(got[:, SIZE // 2:], want[:, SIZE // 2:]) < 25.0  # repainted


def test_text_to_image_with_an_inpainting_unet_repaints_everything(inpaint_runtime, one_thread):
    rec = Recording(inpaint_runtime)
    Pipeline(rec).generate("a green square", "", seeds=[1], settings=Settings(height=SIZE, width=SIZE))
    assert all(s.shape == (1, 9, 8, 8) for s in rec.samples)
    assert np.all(rec.samples[0][:, 4] == 1.0)  # the mask channel: all repainted


# --- pocket-base, blending (its UNet has 4 channels)

def test_pocket_base_inpainting_keeps_the_unmasked_region(one_thread_module):
    from sun_edge.runtimes.pytorch import TorchRuntime

    runtime = TorchRuntime.load("pocket-base")
    size = runtime.native_size
    pipe = Pipeline(runtime)
    init = pipe.generate("two red circles on a blue background", "", seeds=[1],
                         settings=Settings(height=size, width=size))[0].image
    mask = right_half(size)
    settings = Settings(height=size, width=size, strength=1.0, paste_back=True)
    out = pipe.generate("a yellow square on a green background", "", seeds=[2], settings=settings, init_image=init,
                        mask=mask)[0]
    got, want, half = np.asarray(out.image), np.asarray(init), size // 2
    assert psnr8(got[:, :half], want[:, :half]) >= 30.0
    assert psnr8(got[:, half:], want[:, half:]) < 20.0
