"""TAESD (AutoencoderTiny) as the fast decoder: what it is fed, the file forms it reads, the CLI option."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from PIL import Image
from safetensors.torch import save_file

from sun_edge.errors import SunEdgeError
from sun_edge.runtimes.pytorch import TorchRuntime
from sun_edge.taesd import load_tiny_decoder, parse_vae_decoder
from cli_helpers import error_line, run

SMALL = ["--height", "64", "--width", "64"]


def small_taesd(seed: int = 0, **config: int) -> AutoencoderTiny:
    """A random, narrow AutoencoderTiny with TAESD's structure (4 blocks: 8x upsampling, 4 latent channels)."""
    torch.manual_seed(seed)
    args = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), **config)
    return AutoencoderTiny(**args).eval()


def taesd_layout(decoder_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers' ``layers.N.*`` keys as TAESD's own decoder file has them: ``N+1.*`` (entry 0 is the clamp)."""
    return {f"{int(k.split('.')[1]) + 1}.{k.split('.', 2)[2]}": v.contiguous() for k, v in decoder_state.items()}


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("taesd") / "taesd"
    small_taesd().save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("spec,want", [(None, None), ("full", None), ("tiny:/x/taesd", Path("/x/taesd"))])
def test_parse_vae_decoder(spec, want):
    assert parse_vae_decoder(spec) == want


@pytest.mark.parametrize("spec", ["tiny", "tiny:", "taesd:/x", "", "TINY:/x"])
def test_bad_vae_decoder_spec(spec):
    with pytest.raises(SunEdgeError, match=r"bad --vae-decoder .*use 'full' .* or 'tiny:PATH'"):
        parse_vae_decoder(spec)


def test_decodes_sampler_latents_as_they_are_into_minus_one_one(taesd_dir, tiny):
    """TAESD takes the UNet's latents without the 1/0.18215 of the full VAE, and returns [-1, 1]."""
    model = AutoencoderTiny.from_pretrained(taesd_dir).eval()
    assert model.config.scaling_factor == 1.0
    parts = copy.deepcopy(tiny)
    runtime = TorchRuntime(parts["unet"], parts["text_encoder"], parts["vae"], tiny_decoder=load_tiny_decoder(taesd_dir))
    latents = 2.0 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.decode(latents).sample.clamp(-1, 1).numpy()  # diffusers: latents / scaling_factor (1.0)
        unscaled = model.decode(latents / 0.18215).sample.clamp(-1, 1).numpy()
    got = runtime.decode_tiny(latents.numpy())
    assert got.shape == (1, 3, 64, 64) and got.min() >= -1 and got.max() <= 1
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(got - unscaled).max() > 1e-2
    assert runtime.decoder == "tiny" and runtime.has_tiny_decoder
    np.testing.assert_array_equal(runtime.decode(latents.numpy()), got)
    assert not np.allclose(runtime.decode_full(latents.numpy()), got)


def test_single_files_in_both_key_layouts(tmp_path):
    """A diffusers-layout file and TAESD's own decoder file, both with the default (SD1.x TAESD) config."""
    model = AutoencoderTiny().eval()  # the default config is TAESD for SD1.x: 64 channels, 4 latent channels
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "diffusers.safetensors"))
    save_file(taesd_layout(model.decoder.state_dict()), str(tmp_path / "taesd_decoder.safetensors"))
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model.decode(latents).sample.clamp(-1, 1)
        for name in ("diffusers.safetensors", "taesd_decoder.safetensors"):
            assert torch.equal(load_tiny_decoder(tmp_path / name)(latents), want), name


def test_bad_files_give_one_line(tmp_path, taesd_dir, home_env):
    with pytest.raises(SunEdgeError, match="does not exist"):
        load_tiny_decoder(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SunEdgeError, match="not a .safetensors file or a diffusers folder"):
        load_tiny_decoder(tmp_path / "notes.txt")
    vae = home_env / "models" / "tiny-random" / "vae"
    with pytest.raises(SunEdgeError, match="holds AutoencoderKL weights, not a TAESD decoder"):
        load_tiny_decoder(vae)
    with pytest.raises(SunEdgeError, match=r"holds a full VAE \(AutoencoderKL\), not a TAESD decoder"):
        load_tiny_decoder(vae / "diffusion_pytorch_model.safetensors")
    save_file({"text_model.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SunEdgeError, match=r"holds no TAESD decoder weights.*first keys: text_model.weight"):
        load_tiny_decoder(tmp_path / "other.safetensors")
    with pytest.raises(SunEdgeError, match=r"does not fit TAESD's decoder with the default SD1.x config: keys .*wrong shape"):
        load_tiny_decoder(taesd_dir / "diffusion_pytorch_model.safetensors")  # narrow weights, default config
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SunEdgeError, match="has no config.json"):
        load_tiny_decoder(empty)


def test_latent_channels_must_match_the_model(tmp_path, tiny):
    path = tmp_path / "taesd8"
    small_taesd(latent_channels=8).save_pretrained(path)
    parts = copy.deepcopy(tiny)
    with pytest.raises(SunEdgeError, match="takes 8 latent channels"):
        TorchRuntime(parts["unet"], parts["text_encoder"], parts["vae"], tiny_decoder=load_tiny_decoder(path))


def test_generate_with_the_tiny_decoder(home_env, taesd_dir, tmp_path, capsys):
    full, fast = tmp_path / "full.png", tmp_path / "tiny.png"
    code, _, err = run(capsys, "generate", "--model", "tiny-random", "--prompt", "a red circle", *SMALL, "-o", str(full))
    assert code == 0, err
    code, stdout, err = run(capsys, "generate", "--model", "tiny-random", "--prompt", "a red circle", *SMALL, "--vae-decoder", f"tiny:{taesd_dir}",
                            "-o", str(fast))
    assert code == 0, err
    assert f"wrote {fast}" in stdout
    a, b = (np.asarray(Image.open(p), dtype=np.float32) for p in (full, fast))
    assert a.shape == b.shape == (64, 64, 3)
    assert np.abs(a - b).mean() > 1.0


@pytest.mark.parametrize("spec,message", [
    ("tiny", "error: bad --vae-decoder 'tiny'"),
    ("tiny:{tmp}/missing", "error: TAESD decoder {tmp}/missing does not exist"),
    ("tiny:{vae}", "holds AutoencoderKL weights, not a TAESD decoder"),
])
def test_generate_refuses_bad_decoders_in_one_line(home_env, tmp_path, capsys, spec, message):
    vae = home_env / "models" / "tiny-random" / "vae"
    out = tmp_path / "x.png"
    code, _, err = run(capsys, "generate", "--prompt", "x", *SMALL, "--vae-decoder", spec.format(tmp=tmp_path, vae=vae),
                       "-o", str(out))
    assert code == 2
    assert message.format(tmp=tmp_path) in error_line(err)
    assert not out.exists()
