"""Issue 13, settings and outputs: bad settings, prompts, seeds, paths and non-finite numbers are one clear
line before any work, and no image is ever written from NaN or inf (sun_edge/settings.py, the CLI)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from cli_helpers import error_line, run
from sun_edge.errors import SunEdgeError
from sun_edge.pipeline import Pipeline, Settings


class NumpyRuntime:
    """A tiny runtime in NumPy (the Runtime protocol): eps is a fixed function of its inputs."""

    name = "numpy-test"
    latent_channels, vae_scale_factor, max_batch = 4, 8, 4

    def __init__(self, eps_scale: float = 0.5) -> None:
        self.info: dict[str, Any] = {"model": "numpy-test"}
        self.eps_scale = eps_scale

    def has(self, component: str) -> bool:
        return component in ("text_encoder", "unet", "unet_plain", "vae_decoder")

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        return np.tanh(ids[..., None].astype(np.float32) / 1000.0 + np.zeros((1, 1, 8), np.float32))

    def unet(self, latents, t, pos, neg):
        return (self.eps_scale * latents + float(pos.mean() - neg.mean())).astype(np.float32)

    def unet_plain(self, latents, t, emb):
        return (self.eps_scale * latents).astype(np.float32)

    def decode_full(self, latents):
        image = np.tanh(latents[:, :3]).repeat(8, axis=2).repeat(8, axis=3)
        return image.astype(np.float32)

    decode = decode_full

    def decode_tiny(self, latents):
        raise SunEdgeError("no tiny decoder")

    def encode(self, image):
        raise SunEdgeError("no encoder")

    def release(self, component: str) -> None:
        pass


def one_line(e: SunEdgeError) -> bool:
    return "\n" not in str(e) and len(str(e)) > 0


WEIRD = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.floats(allow_nan=True, allow_infinity=True),
                  st.integers(-10**20, 10**20))


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.one_of(st.sampled_from(["sun", "cfg"]), WEIRD),
       steps=st.one_of(st.integers(-3, 30), WEIRD),
       scheduler=st.one_of(st.sampled_from(["ddim", "dpmpp_2m", "euler"]), WEIRD),
       spacing=st.one_of(st.sampled_from(["trailing", "leading", "linspace"]), WEIRD),
       guidance=st.one_of(st.floats(-2, 60, allow_nan=False), WEIRD),
       side=st.one_of(st.sampled_from([0, 7, 8, 16, 24, 100, 4096, -8]), WEIRD),
       noise=st.one_of(st.sampled_from(["torch", "numpy"]), WEIRD))
def test_any_setting_generates_a_correct_image_or_is_one_line(mode, steps, scheduler, spacing, guidance, side, noise):
    s = Settings(mode=mode, steps=steps, scheduler=scheduler, spacing=spacing, guidance=guidance, height=side, width=16,
                 noise=noise)
    pipe = Pipeline(NumpyRuntime())
    try:
        s.validate()
    except SunEdgeError as e:
        assert one_line(e)
        with pytest.raises(SunEdgeError):
            pipe.generate("a circle", settings=s)  # generate validates too: no way around the check
        return
    if side > 64 or steps > 20:
        return  # valid; too big to sample in a property test (sizes up to 2048 are valid)
    out = pipe.generate("a circle", "red", seeds=[3], settings=s)[0]
    assert out.image.size == (16, side) and out.unet_calls == steps
    assert np.isfinite(np.asarray(out.image, np.float32)).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_outputs_never_become_images():
    pipe = Pipeline(NumpyRuntime(eps_scale=math.inf))
    with pytest.raises(SunEdgeError, match=r"^\d+ non-finite value\(s\) \(NaN or inf\) in the final latents, from the UNet"):
        pipe.generate("a circle", settings=Settings(height=16, width=16))
    runtime = NumpyRuntime()
    runtime.decode = lambda latents: np.full((1, 3, 16, 16), np.nan, np.float32)
    with pytest.raises(SunEdgeError, match=r"in the image, from the VAE decoder"):
        Pipeline(runtime).generate("a circle", settings=Settings(height=16, width=16))


@pytest.mark.parametrize("text", ["\udcff bad bytes", b"bytes".decode("utf-8") + "\ud800"])
def test_prompts_that_are_not_utf8_text_are_refused_before_sampling(text):
    with pytest.raises(SunEdgeError, match=r"^the prompt is not valid UTF-8 text"):
        Pipeline(NumpyRuntime()).generate(text, settings=Settings(height=16, width=16))


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if the CLI loads a model: these checks must come first."""
    from sun_edge.runtimes.pytorch import TorchRuntime

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")
    monkeypatch.setattr(TorchRuntime, "load", classmethod(lambda cls, *a, **k: refuse()))


@pytest.mark.parametrize("args,message", [
    (["--width", "0"], "width 0 is not a positive multiple of 8; use e.g. 8"),
    (["--height", "0"], "height 0 is not a positive multiple of 8; use e.g. 8"),
    (["--height", "4096"], "height 4096 is outside [8, 2048]"),
    (["--width", "100000", "--height", "100000"], "is outside [8, 2048]"),
    (["--width", "100"], "width 100 is not a positive multiple of 8"),
    (["--steps", "0"], "steps 0 is outside [1, 1000]"),
    (["--guidance", "nan"], "guidance must be a finite number, got nan"),
    (["--guidance", "inf"], "guidance must be a finite number, got inf"),
    (["--seed", "-1"], "seed -1 is outside [0, 18446744073709551615]"),
    (["--scheduler", "heun"], "unknown scheduler 'heun'; valid schedulers: dpmpp_2m, ddim, euler"),
    (["--prompt", "a \udcff circle"], "the prompt is not valid UTF-8 text"),
    (["--negative-prompt", "\udcff"], "the negative prompt is not valid UTF-8 text"),
])
def test_bad_settings_are_one_line_before_the_model_loads(no_model_load, home_env, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    out.mkdir()
    base = ["generate", "--prompt", "a circle", "-o", str(out / "x.png")]
    code, _, err = run(capsys, *base, *args)
    assert code == 2 and message in error_line(err)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("target,message", [
    (lambda tmp: Path("/proc/x.png"), "cannot write in /proc"),
    (lambda tmp: tmp, "is a folder; give a file path inside it"),
    (lambda tmp: (tmp / "a.png").mkdir() or tmp / "a.png", "is a folder; give a file path inside it"),
    (lambda tmp: tmp / "missing" / "x.png", "does not exist; create it first"),
    (lambda tmp: tmp / "x.jpg", "must end in .png"),
])
def test_bad_output_paths_are_one_line_before_any_work(no_model_load, home_env, tmp_path, capsys, target, message):
    path = target(tmp_path)
    before = sorted(tmp_path.iterdir())
    code, _, err = run(capsys, "generate", "--prompt", "a circle", "-o", str(path))
    assert code == 2 and message in error_line(err)
    assert sorted(tmp_path.iterdir()) == before


def test_bad_json_paths_for_parity_and_bench(home_env, tmp_path, capsys):
    for command in (["bench", "--repeats", "1"], ["parity", "--bundle", str(tmp_path)]):
        code, _, err = run(capsys, *command, "--json", "/proc/figures.json")
        assert code == 2 and "cannot write in /proc" in error_line(err)
        code, _, err = run(capsys, *command, "--json", str(tmp_path))
        assert code == 2 and "is a folder" in error_line(err)


def test_sizes_of_zero_reach_the_check_in_bench_and_export(home_env, tmp_path, capsys):
    code, _, err = run(capsys, "bench", "--size", "0")
    assert code == 2 and "height 0 is not a positive multiple of 8" in error_line(err)
    code, _, err = run(capsys, "export", "--target", "onnx", "--model", "tiny-random", "--height", "0",
                       "-o", str(tmp_path / "b"))
    assert code == 2 and "height 0 is not a positive multiple of 8" in error_line(err)
    assert not (tmp_path / "b").exists()


def test_a_cuda_device_without_cuda_is_one_line(home_env, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, "generate", "--model", "tiny-random", "--prompt", "x", "--device", "cuda",
                       "-o", str(tmp_path / "x.png"))
    assert code == 2 and "needs CUDA, and this PyTorch" in error_line(err)
    code, _, err = run(capsys, "generate", "--model", "tiny-random", "--prompt", "x", "--device", "tpu9",
                       "-o", str(tmp_path / "x.png"))
    assert code == 2 and "unknown torch device 'tpu9'" in error_line(err)


def test_a_nan_adapter_is_refused(home_env, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    from sun_edge.adapter import BUNDLED_ADAPTER_FILE
    from sun_edge.models import models_dir

    source = next(models_dir().rglob(BUNDLED_ADAPTER_FILE))
    tensors = load_file(str(source))
    first = next(iter(tensors))
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    bad = tmp_path / "nan-adapter.safetensors"
    save_file(tensors, str(bad))
    out = tmp_path / "x.png"
    code, _, err = run(capsys, "generate", "--model", "tiny-random", "--adapter", str(bad), "--prompt", "x", "-o", str(out))
    assert code == 2 and "holds non-finite weights (NaN or inf)" in error_line(err)
    assert not out.exists()


def test_a_closed_pipe_is_not_a_traceback(home_env):
    """``sun-edge models | head -1``: the reader leaves early; no BrokenPipeError traceback."""
    script = "import sys; from sun_edge.cli import main; sys.exit(main(['models']))"
    producer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd="/")
    producer.stdout.close()  # like head exiting before the first line arrives
    _, err = producer.communicate(timeout=120)
    assert producer.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err
