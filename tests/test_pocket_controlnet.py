"""The pocket silhouette ControlNet (sun_edge/data/pocket/controlnet-silhouette, ``--controlnet pocket-silhouette``).

- it ships in diffusers' ControlNet layout (fp16) and has pocket-base's architecture: the same keys and
  shapes as ``ControlNetModel.from_unet(pocket-base's UNet)``, the same config fields;
- it puts the shapes where the condition does: on a few held-out prompts, the IoU of the SUN 4-step
  image's foreground with the condition's silhouette is far above the same seed's IoU without it;
- training: the ControlNet loss on fixed draws falls on a tiny run, and a stopped run resumes exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sun_edge.errors import SunEdgeError  # noqa: E402
from sun_edge.models import CONTROLNETS, POCKET_DIR, resolve_controlnet  # noqa: E402
from sun_edge.pocket.controlnet_train import (  # noqa: E402
    ControlConfig, ControlData, build_controlnet, control_loss, draw, train_controlnet)

pytestmark = pytest.mark.usefixtures("one_thread_module")
CASES = 4


@pytest.fixture(scope="module")
def base():
    from sun_edge.models import load_model

    return load_model("pocket-base")


@pytest.fixture(scope="module")
def shipped():
    from sun_edge.pocket.controlnet_eval import load_pocket_controlnet

    return load_pocket_controlnet("pocket-silhouette")


def test_registry_names_the_shipped_folder():
    entry = CONTROLNETS["pocket-silhouette"]
    assert entry.model == "pocket-base"
    assert resolve_controlnet("pocket-silhouette") == POCKET_DIR / entry.folder
    with pytest.raises(SunEdgeError, match="unknown ControlNet 'pocket-nope'.*pocket-silhouette"):
        resolve_controlnet("pocket-nope")
    with pytest.raises(SunEdgeError, match="does not exist"):
        resolve_controlnet("missing/controlnet.safetensors")


def test_shipped_controlnet_has_pocket_base_architecture(base, shipped):
    from safetensors import safe_open

    folder = resolve_controlnet("pocket-silhouette")
    info = json.loads((folder / "pocket.json").read_text())
    assert info["steps"] == info["runs"][-1]["steps"] > 0 and np.isfinite(info["final_loss"])
    assert info["base_sha256"] == base.sha256  # trained against the pocket-base that ships
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}
    reference = build_controlnet(base.unet)  # an independent build from pocket-base's UNet
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in shipped.state_dict().items()}
    assert got == want
    for key in ("block_out_channels", "down_block_types", "cross_attention_dim", "attention_head_dim",
                "layers_per_block", "norm_num_groups", "in_channels"):
        norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        assert norm(shipped.config[key]) == norm(reference.config[key]) == norm(base.unet.config[key]), key
    # trained: the zero convolutions are no longer zero
    assert float(shipped.controlnet_mid_block.weight.abs().max()) > 1e-3


@pytest.fixture(scope="module")
def runtimes():
    """pocket-base alone, and with the shipped ControlNet through the library (``TorchRuntime.load(controlnet=)``)."""
    from sun_edge.runtimes.pytorch import TorchRuntime

    controlled = TorchRuntime.load("pocket-base", controlnet=resolve_controlnet("pocket-silhouette"))
    return TorchRuntime.load("pocket-base"), controlled


def test_controlnet_puts_the_shapes_where_the_condition_does(runtimes, shipped):
    from sun_edge.pocket.controlnet_eval import METHODS, generate, placement, test_cases

    plain, controlled = runtimes
    settings = METHODS["sun4"][1]
    cases = test_cases(CASES)
    with_cn = [placement(generate(controlled, shipped, c, settings, library=True), c.mask) for c in cases]
    without = [placement(generate(plain, None, c, settings), c.mask) for c in cases]
    assert all(w > o for w, o in zip(with_cn, without)), (with_cn, without)  # each case: same prompt and seed
    assert np.mean(with_cn) > 0.5 and np.mean(with_cn) > np.mean(without) + 0.3, (with_cn, without)
    # control scale 0 is no ControlNet: the same image as the plain pipeline's
    zero = generate(controlled, shipped, cases[0], settings, scale=0.0, library=True)
    np.testing.assert_array_equal(zero, generate(plain, None, cases[0], settings))


def test_library_pipeline_equals_the_residual_wrapper(runtimes, shipped):
    """The library's ControlNet path against controlnet_eval.ControlledRuntime (diffusers' residual arguments)."""
    from sun_edge.pocket.controlnet_eval import METHODS, generate, test_cases

    plain, controlled = runtimes
    case = test_cases(1)[0]
    ours = generate(plain, shipped, case, METHODS["sun4"][1], scale=0.7)
    library = generate(controlled, shipped, case, METHODS["sun4"][1], scale=0.7, library=True)
    assert np.abs(ours.astype(int) - library.astype(int)).max() <= 1


@pytest.fixture(scope="module")
def tiny_data(base):
    return ControlData.render(4, 0, base.vae)


def _fixed_loss(controlnet, base, data, config) -> float:
    from sun_edge.pocket.train_family import sd15_noise_scheduler, tokenize

    alphas, empty = sd15_noise_scheduler().alphas_cumprod.float(), tokenize([""])
    with torch.no_grad():  # the same 4 draws (steps 10**6..) before and after training
        return float(np.mean([control_loss(controlnet, base.unet, base.text_encoder,
                                           *draw(data, config, 10**6 + k, empty, alphas)) for k in range(4)]))


def test_training_lowers_the_loss_on_a_tiny_run(base, tiny_data):
    torch.manual_seed(0)
    controlnet = build_controlnet(base.unet)
    # high noise levels, where the layout is decided and the silhouette tells the most
    config = ControlConfig(steps=25, batch_size=4, learning_rate=3e-3, warmup_steps=1, caption_dropout=0.0,
                           timesteps=(600, 1000))
    before = _fixed_loss(controlnet, base, tiny_data, config)
    result = train_controlnet(controlnet, base.unet, base.text_encoder, tiny_data, config, log=None)
    after = _fixed_loss(controlnet, base, tiny_data, config)
    assert result.steps == 25 and len(result.losses) == 25
    assert after < 0.9 * before, (before, after)


def test_stopped_run_resumes_exactly(base, tiny_data, tmp_path):
    def run(steps: int, folder):
        torch.manual_seed(0)
        controlnet = build_controlnet(base.unet)
        config = ControlConfig(steps=steps, batch_size=2, checkpoint_every=2, warmup_steps=1)
        result = train_controlnet(controlnet, base.unet, base.text_encoder, tiny_data, config,
                                  checkpoint_dir=folder, log=None)
        return controlnet, result

    straight, whole = run(4, tmp_path / "a")
    run(2, tmp_path / "b")  # stopped after 2 steps (and its checkpoint) ...
    resumed, rest = run(4, tmp_path / "b")  # ... and run again to 4
    assert rest.start_step == 2 and rest.losses == whole.losses
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
