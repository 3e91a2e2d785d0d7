"""The CLI as a user meets it: commands that work, and bad input that gets one clear line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from sun_edge.adapter import SUNAdapter, cross_attention_layers, save_adapter
from sun_edge.imaging import read_parameters
from sun_edge.models import resolve_model
from sun_edge.weights import sha256_file
from cli_helpers import error_line, run

SMALL = ["--height", "64", "--width", "64"]


def test_generate_on_the_default_model(home_env, tmp_path, capsys):
    out = tmp_path / "a.png"
    code, stdout, err = run(capsys, "generate", "--prompt", "a red circle", "--negative-prompt", "blue", *SMALL, "-o", str(out))
    assert code == 0, err
    assert Image.open(out).size == (64, 64)
    params = read_parameters(out)
    assert params.startswith("a red circle\nNegative prompt: blue\nSteps: 4, Sampler: DDIM")
    assert "Model: pocket-base" in params and "SUN adapter sha256: " in params  # the default: the shipped Pocket SD base
    shipped = resolve_model("pocket-base") / "sun-adapter.safetensors"  # ... with the adapter shipped beside it
    assert f"SUN adapter sha256: {sha256_file(shipped)}" in params
    assert re.search(r"adapter sun-adapter.safetensors: 0\.\d\dM parameters", err)
    assert f"wrote {out}" in stdout


def test_generate_compare_and_seeds(home_env, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    code, stdout, err = run(capsys, "generate", "--prompt", "a circle", "--seed", "4", "5", "--compare", *SMALL, "-o", str(out))
    assert code == 0, err
    for seed in (4, 5):
        sheet = Image.open(tmp_path / f"cmp-s{seed}.png")
        assert sheet.width > 2 * 256 and sheet.height > 256  # two tiles, scaled up, with captions
        assert f"Seed: {seed}" in read_parameters(tmp_path / f"cmp-s{seed}.png")
    assert "sun: " in err and "cfg: " in err and "25 UNet calls" in err
    assert not out.exists()


def test_generate_cfg_mode(home_env, tmp_path, capsys):
    out = tmp_path / "cfg.png"
    code, _, err = run(capsys, "generate", "--prompt", "x", "--mode", "cfg", "--steps", "3", *SMALL, "-o", str(out))
    assert code == 0, err
    params = read_parameters(out)
    assert "Steps: 3, Sampler: DPM++ 2M" in params and "CFG scale: 8.0" in params and "SUN: off" in params


@pytest.mark.parametrize("args,message", [
    (["--height", "100", "--width", "64"], "error: height 100 is not a positive multiple of 8"),
    (["--model", "toonyou", *SMALL], "error: model 'toonyou' is not installed"),
    (["--model", "no-such-model", *SMALL], "error: unknown model 'no-such-model'"),
    (["--scheduler", "plms", *SMALL], "error: unknown scheduler 'plms'"),
    (["--lora", "x.safetensors:abc", *SMALL], "error:"),
])
def test_bad_generate_input_is_one_line_and_writes_nothing(home_env, tmp_path, capsys, args, message):
    out = tmp_path / "x.png"
    code, _, err = run(capsys, "generate", "--prompt", "x", *args, "-o", str(out))
    assert code == 2
    assert error_line(err).startswith(message), err
    assert list(tmp_path.iterdir()) == []


def test_pickle_checkpoint_refused_unless_allowed(home_env, tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    code, _, err = run(capsys, "generate", "--prompt", "x", "--model", str(ckpt), *SMALL, "-o", str(tmp_path / "x.png"))
    assert code == 2
    assert "refusing to load pickle checkpoint model.ckpt" in error_line(err)
    assert not (tmp_path / "x.png").exists()


def test_wrong_architecture_adapter(home_env, tiny, tmp_path, capsys):
    config = dict(tiny["unet"].config)
    config["cross_attention_dim"] = 2048
    path = save_adapter(SUNAdapter(cross_attention_layers(config)), tmp_path / "sdxl.safetensors")
    code, _, err = run(capsys, "generate", "--prompt", "x", "--adapter", str(path), *SMALL, "-o", str(tmp_path / "x.png"))
    assert code == 2
    assert "adapter does not fit this UNet (an SDXL adapter?)" in error_line(err)
    assert not (tmp_path / "x.png").exists()


def test_truncated_adapter(home_env, tmp_path, capsys):
    src = home_env / "models" / "tiny-random" / "sun-adapter.safetensors"
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(src.read_bytes()[:1000])
    code, _, err = run(capsys, "generate", "--prompt", "x", "--adapter", str(bad), *SMALL, "-o", str(tmp_path / "x.png"))
    assert code == 2 and "cut.safetensors" in error_line(err)


def test_missing_output_folder(home_env, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--prompt", "x", *SMALL, "-o", str(tmp_path / "nope" / "x.png"))
    assert code == 2 and "does not exist" in error_line(err)


def test_over_long_prompt_warns_and_names_the_cut(home_env, tmp_path, capsys):
    words = " ".join(f"word{i}" for i in range(60)) + " zebra elephant"
    code, _, err = run(capsys, "generate", "--prompt", words, *SMALL, "-o", str(tmp_path / "x.png"))
    assert code == 0
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "zebra elephant" in warning[0]


def test_models_lists_the_registry(home_env, capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    for name in ("sd15", "toonyou", "realistic-vision-v51", "anything-v5", "rev-animated", "fancy-pet", "tiny-random"):
        assert name in out
    assert str(home_env / "models" / "tiny-random") in out


def test_adapter_command_reports_parameters(home_env, tiny, tmp_path, capsys):
    sd15 = SUNAdapter(cross_attention_layers(__import__("sun_edge.adapter").adapter.sd15_unet_config()), extra_positive=True)
    path = save_adapter(sd15, tmp_path / "released.safetensors", layout="released", dtype=torch.float16)
    code, out, _ = run(capsys, "adapter", str(path))
    assert code == 0
    assert "released layout, 16 cross-attention layers, extra-positive branch yes, 38.39M parameters (38,388,480)" in out


def test_entry_point_prints_no_traceback(tmp_path):
    env = {**os.environ, "SUN_EDGE_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "sun_edge.cli", "generate", "--prompt", "x", "--model", "anything-v5",
                           "-o", str(tmp_path / "x.png")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: model 'anything-v5' is not installed")
