"""ControlNet on the PyTorch side: loading (folder, diffusers-layout file, original ControlNet/LDM file), refusing
other architectures and non-images in one line, residuals against diffusers' own modules, and the pipeline (the
residuals change the image, scale 0 equals no ControlNet, batch items stay independent)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet_helpers import condition_image, save_layouts, tiny_controlnet
from sun_edge.errors import SunEdgeError

SIZE = 64  # image side: latents [1, 4, 8, 8]


@pytest.fixture(scope="module")
def layouts(tiny, tmp_path_factory):
    """The tiny ControlNet (random, zero convolutions included) and its three saved layouts."""
    net = tiny_controlnet(tiny["unet"])
    return net, save_layouts(net, tiny["unet"], tmp_path_factory.mktemp("controlnet"))


@pytest.fixture(scope="module")
def runtimes(tiny_home, layouts):
    """The tiny model's PyTorch runtime with the ControlNet (from its LDM-layout file), and without."""
    from sun_edge.runtimes.pytorch import TorchRuntime

    model = str(tiny_home / "models" / "tiny-random")
    return TorchRuntime.load(model, controlnet=layouts[1]["ldm"]), TorchRuntime.load(model)


def _inputs(seed: int = 0, batch: int = 1, dim: int = 32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, SIZE // 8, SIZE // 8, generator=g)
    pos, neg = torch.randn(batch, 77, dim, generator=g), torch.randn(batch, 77, dim, generator=g)
    cond = torch.rand(batch, 3, SIZE, SIZE, generator=g)
    return x, pos, neg, cond


@pytest.mark.parametrize("layout", ["folder", "diffusers", "ldm"])
def test_every_layout_loads_the_same_weights(tiny, layouts, layout):
    from sun_edge.controlnet import load_controlnet

    net, paths = layouts
    loaded = load_controlnet(paths[layout], dict(tiny["unet"].config))
    want = net.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_residuals_equal_diffusers_controlnet_forward(tiny, layouts, runtimes):
    """The runtime's residuals are diffusers' ControlNetModel output on [pos; neg] (the released SUN pipeline's
    prompt_embeds), times the scale."""
    net = layouts[0]
    x, pos, neg, cond = _inputs()
    t = torch.tensor([749.0])
    with torch.no_grad():
        down, mid = net(x, t, torch.cat([pos, neg], 1), cond, conditioning_scale=0.7, return_dict=False)
    got = runtimes[0].controlnet(x.numpy(), t.numpy(), pos.numpy(), neg.numpy(), cond.numpy(), np.array([0.7], np.float32))
    assert len(got) == len(down) + 1 == 13
    for want, have in zip([*down, mid], got):
        np.testing.assert_allclose(have, want.numpy(), rtol=1e-5, atol=1e-6)
    assert max(float(np.abs(r).max()) for r in got) > 1e-3  # the random zero convolutions make them count


def test_sun_unet_with_residuals_equals_diffusers_unet_with_sun_processors(tiny, runtimes):
    """SUNUNet(residuals) against diffusers' UNet2DConditionModel given down_block_additional_residuals and
    mid_block_additional_residual, with the same SUN processors installed."""
    ref = runtimes[0]
    x, pos, neg, cond = _inputs(1)
    t = np.array([499.0], np.float32)
    res = ref.controlnet(x.numpy(), t, pos.numpy(), neg.numpy(), cond.numpy(), np.array([1.0], np.float32))
    unet = copy.deepcopy(ref.unet_module)
    unet.set_attn_processor({**unet.attn_processors, **ref.adapter.processors()})
    with torch.no_grad():
        want = unet(x, torch.from_numpy(t), torch.cat([pos, neg], 1), return_dict=False,
                    down_block_additional_residuals=tuple(torch.from_numpy(r) for r in res[:-1]),
                    mid_block_additional_residual=torch.from_numpy(res[-1]))[0]
    got = ref.unet(x.numpy(), t, pos.numpy(), neg.numpy(), res)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    assert float(np.abs(got - ref.unet(x.numpy(), t, pos.numpy(), neg.numpy())).max()) > 1e-3


def test_cfg_controlnet_reads_each_text_alone(runtimes, layouts):
    """The CFG pair feeds [c; c]: equal to diffusers' 77-token ControlNet call up to float rounding."""
    net = layouts[0]
    x, pos, _, cond = _inputs(2)
    t = torch.tensor([999.0])
    with torch.no_grad():
        down, mid = net(x, t, pos, cond, return_dict=False)
    got = runtimes[0].controlnet(x.numpy(), t.numpy(), pos.numpy(), pos.numpy(), cond.numpy(), np.array([1.0], np.float32))
    for want, have in zip([*down, mid], got):
        np.testing.assert_allclose(have, want.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["sun", "cfg"])
def test_residuals_change_the_image_and_scale_zero_equals_none(runtimes, mode):
    from sun_edge.pipeline import Pipeline, Settings

    with_cn, without = runtimes
    settings = Settings.for_mode(mode, height=SIZE, width=SIZE, steps=4 if mode == "sun" else 3)
    image = condition_image(96, 80)
    plain = np.asarray(Pipeline(without).generate("a red ball", "blue", seeds=[3], settings=settings)[0].image)
    controlled = Pipeline(with_cn).generate("a red ball", "blue", seeds=[3], settings=settings, control_image=image)[0]
    zero = Pipeline(with_cn).generate("a red ball", "blue", seeds=[3], control_image=image,
                                      settings=Settings.for_mode(mode, height=SIZE, width=SIZE, control_scale=0.0,
                                                                 steps=settings.steps))[0]
    assert np.array_equal(np.asarray(zero.image), plain)
    assert np.abs(np.asarray(controlled.image).astype(int) - plain).mean() > 1.0
    assert "ControlNet 0: \"Module: none, Model: control_tiny_ldm [" in controlled.parameters
    assert "Weight: 1" in controlled.parameters and "ControlNet image hash" in controlled.parameters


def test_batch_items_with_and_without_condition_equal_each_alone(runtimes):
    from sun_edge.pipeline import Job, Pipeline, Settings

    pipe, settings = Pipeline(runtimes[0]), Settings(height=SIZE, width=SIZE)
    image = condition_image(96, 80)
    jobs = [Job("a cat", "", 1, control_image=image), Job("a dog", "grey", 2), Job("a cow", "", 3, control_image=image)]
    together = pipe.generate_batch(jobs, settings=settings, max_batch=3)
    for job, got in zip(jobs, together):
        alone = pipe.generate_batch([job], settings=settings)[0]
        assert np.array_equal(np.asarray(got.image), np.asarray(alone.image))


def test_a_controlnet_for_another_architecture_gets_one_line(tiny, tmp_path):
    from safetensors.torch import save_file

    from sun_edge.controlnet import load_controlnet

    config = dict(tiny["unet"].config)
    cases = {
        "sd2.safetensors": ({"controlnet_cond_embedding.conv_in.weight": [16, 3, 3, 3],
                             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": [32, 1024]},
                            "cross-attention width 1024 (an SD2.x ControlNet)"),
        "sdxl.safetensors": ({"control_model.input_hint_block.0.weight": [16, 3, 3, 3],
                              "control_model.label_emb.0.0.weight": [1280, 2816]}, "an SDXL ControlNet"),
        "wide.safetensors": ({"controlnet_cond_embedding.conv_in.weight": [16, 3, 3, 3],
                              "conv_in.weight": [320, 4, 3, 3]}, "starts with 320 channels"),
        "unet.safetensors": ({"conv_in.weight": [32, 4, 3, 3]}, "is not a ControlNet"),
    }
    for name, (shapes, words) in cases.items():
        save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(tmp_path / name))
        with pytest.raises(SunEdgeError) as err:
            load_controlnet(tmp_path / name, config)
        assert words in str(err.value) and "\n" not in str(err.value)
    # a real ControlNet of a wider UNet: every shape is read and the block widths are named
    other = tiny_controlnet(type(tiny["unet"]).from_config({**config, "block_out_channels": [32, 32, 64, 128]}))
    paths = save_layouts(other, tiny["unet"], tmp_path / "other")
    with pytest.raises(SunEdgeError, match=r"does not fit this model's UNet \(block widths \[32, 32, 64, 64\]\)"):
        load_controlnet(paths["diffusers"], config)


def test_pickle_controlnets_are_refused_unless_allowed(tiny, layouts, tmp_path):
    from sun_edge.controlnet import load_controlnet

    path = tmp_path / "control.pth"
    torch.save(layouts[0].state_dict(), path)
    with pytest.raises(SunEdgeError, match="pickle"):
        load_controlnet(path, dict(tiny["unet"].config))
    loaded = load_controlnet(path, dict(tiny["unet"].config), allow_pickle=True)
    assert torch.equal(loaded.controlnet_mid_block.weight, layouts[0].controlnet_mid_block.weight)


def test_a_control_image_that_is_not_an_image_gets_one_line(tmp_path, runtimes):
    from sun_edge.control_image import read_control_image
    from sun_edge.pipeline import Pipeline, Settings

    bad = tmp_path / "edges.png"
    bad.write_text("not a picture")
    with pytest.raises(SunEdgeError, match=r"control image .*edges.png is not an image"):
        read_control_image(bad)
    with pytest.raises(SunEdgeError, match="must be a PIL image, got ndarray"):
        Pipeline(runtimes[0]).generate("x", settings=Settings(height=SIZE, width=SIZE), control_image=np.zeros((8, 8)))
    with pytest.raises(SunEdgeError, match="has no ControlNet"):
        Pipeline(runtimes[1]).generate("x", settings=Settings(height=SIZE, width=SIZE), control_image=condition_image(96, 80))


@pytest.mark.parametrize("scale", [-0.1, 2.5, float("nan"), "1", True])
def test_control_scale_outside_its_range_gets_one_line(scale):
    from sun_edge.settings import Settings

    with pytest.raises(SunEdgeError, match="control scale must be a number in"):
        Settings(control_scale=scale).validate()


def test_the_condition_is_crop_resized_into_zero_one():
    from sun_edge.control_image import control_condition

    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 30, 100))  # a band on the left: cropped away by the centre square crop (50..150)
    cond = control_condition(image, 64, 64)
    assert cond.shape == (1, 3, 64, 64) and cond.dtype == np.float32
    assert np.allclose(cond[0, 0], 1.0, atol=0.02) and np.allclose(cond[0, 2], 0.0, atol=0.02)
