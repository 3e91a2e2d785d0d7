"""Batches (issue 15): several jobs in one UNet call, each image the one its seed gives alone."""

from __future__ import annotations

import numpy as np
import pytest

from sun_edge.errors import SunEdgeError
from sun_edge.pipeline import Job, Pipeline, Settings

SMALL = Settings(height=64, width=64)
JOBS = [Job("a red circle", "", 3), Job("two blue squares", "red", 11), Job("a red circle", "green", 3)]

pytestmark = pytest.mark.usefixtures("one_thread")


def pixels(generated) -> list[np.ndarray]:
    return [np.asarray(g.image) for g in generated]


@pytest.mark.parametrize("settings", [SMALL, Settings.baseline(height=64, width=64, steps=5)], ids=["sun", "cfg"])
def test_a_batch_equals_each_job_alone_on_pytorch(tiny_reference, settings):
    pipe = Pipeline(tiny_reference)
    batched = pipe.generate_batch(JOBS, settings=settings, max_batch=3)
    alone = [pipe.generate_batch([job], settings=settings)[0] for job in JOBS]
    assert [g.batch for g in batched] == [3, 3, 3] and [g.batch for g in alone] == [1, 1, 1]
    assert [(g.prompt, g.negative_prompt, g.seed) for g in batched] == [(j.prompt, j.negative_prompt, j.seed) for j in JOBS]
    for got, want in zip(pixels(batched), pixels(alone)):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # at most one 8-bit level of GEMM blocking noise
    calls = batched[0].unet_calls
    assert calls == settings.steps  # one UNet call per step for all three
    assert not np.array_equal(pixels(batched)[0], pixels(batched)[2])  # the negative prompt acts per item


def test_generate_batches_seeds_up_to_max_batch(tiny_reference):
    pipe = Pipeline(tiny_reference)
    seen = []
    real = tiny_reference.unet

    def spy(latents, t, pos, neg):
        seen.append(latents.shape[0])
        return real(latents, t, pos, neg)

    pipe.runtime = type("Spy", (), {})()  # a view of the reference with a counting unet
    for name in ("name", "info", "latent_channels", "vae_scale_factor", "max_batch", "has", "encode_text", "decode"):
        setattr(pipe.runtime, name, getattr(tiny_reference, name))
    pipe.runtime.unet = spy
    out = pipe.generate("a circle", seeds=[1, 2, 3, 4, 5], settings=SMALL, max_batch=2)
    assert [g.seed for g in out] == [1, 2, 3, 4, 5] and [g.batch for g in out] == [2, 2, 2, 2, 1]
    assert seen == [2] * 4 + [2] * 4 + [1] * 4


def test_a_bundle_runtime_caps_the_batch(onnx_fp32_bundle, tiny_reference):
    from sun_edge.bundle import open_bundle
    from sun_edge.parity import psnr
    from sun_edge.runtimes import open_bundle_runtime

    runtime = open_bundle_runtime(open_bundle(onnx_fp32_bundle))
    assert runtime.max_batch == 1  # batch-1 graphs
    pipe = Pipeline(runtime, runtime.tokenizer())
    batched = pipe.generate_batch(JOBS, settings=SMALL, max_batch=8)
    assert [g.batch for g in batched] == [1, 1, 1]
    reference = Pipeline(tiny_reference).generate_batch(JOBS, settings=SMALL, max_batch=3)
    for got, want in zip(pixels(batched), pixels(reference)):
        assert psnr(want.astype(np.float64), got.astype(np.float64)) > 40


def test_bad_batches_are_one_line(tiny_reference):
    pipe = Pipeline(tiny_reference)
    with pytest.raises(SunEdgeError, match=r"^max_batch must be a positive whole number, got 0$"):
        pipe.generate_batch(JOBS, settings=SMALL, max_batch=0)
    with pytest.raises(SunEdgeError, match=r"^the negative prompt is not valid UTF-8 text"):
        pipe.generate_batch([Job("ok", "\udcff", 1)], settings=SMALL)
    with pytest.raises(SunEdgeError, match=r"^seed -4 is outside"):
        pipe.generate_batch([Job("ok", "", -4)], settings=SMALL)
