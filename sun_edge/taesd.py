"""TAESD, the tiny autoencoder (diffusers' ``AutoencoderTiny``), as a fast decoder for SD1.x latents.

The full SD1.5 VAE decoder costs about a third of a 4-step SUN image on a CPU; TAESD's decoder
(1.2M parameters, no attention, no normalization) decodes the same latents in a fraction of that,
at some cost in fine detail.

What it expects and returns, from diffusers' source (``models/autoencoders/autoencoder_tiny.py``
and ``DecoderTiny`` in ``models/autoencoders/vae.py``, diffusers 0.42):

- input: the sampler's latents as they are, in the UNet's latent space. AutoencoderTiny's
  ``scaling_factor`` is 1.0 and diffusers' pipelines divide by ``vae.config.scaling_factor``
  before decoding, so nothing is divided by SD's 0.18215 (the full VAE's decode does that);
- ``DecoderTiny.forward`` soft-clamps its input (``3 * tanh(x / 3)``) and maps its [0, 1]
  output to [-1, 1] with ``2x - 1``, with no hard clamp; ``TinyDecoder`` clamps to [-1, 1] as
  ``TorchRuntime.decode`` does for the full VAE.

Weights the user provides, in one of three forms (nothing is downloaded):

- a diffusers folder: ``config.json`` (``AutoencoderTiny``) and ``diffusion_pytorch_model.safetensors``;
- a ``.safetensors`` file in diffusers' key layout (``decoder.layers.*``; ``encoder.*`` ignored),
  read with AutoencoderTiny's default config, which is TAESD for SD1.x (latent_channels 4,
  scaling_factor 1.0);
- TAESD's own ``taesd_decoder.safetensors`` (keys ``1.weight``, ``3.conv.0.weight``, ...: the
  decoder ``nn.Sequential`` whose entry 0 is the parameter-free clamp), with the default config.

Every key and shape is checked; a mismatch is one line naming the file and the first bad key.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sun_edge.errors import SunEdgeError, first_names

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
_SPEC_HELP = "use 'full' (the model's own VAE) or 'tiny:PATH' (a TAESD folder or .safetensors file)"


def parse_vae_decoder(spec: str | None) -> Path | None:
    """Parse ``--vae-decoder``: ``full`` (or None) gives None, ``tiny:PATH`` gives PATH."""
    if spec is None or spec == "full":
        return None
    kind, sep, path = spec.partition(":")
    if kind != "tiny" or not sep or not path:
        raise SunEdgeError(f"bad --vae-decoder {spec!r}: {_SPEC_HELP}")
    return Path(path).expanduser()


def weights_file(path: Path) -> Path:
    """The weights file of a TAESD source as ``load_tiny_decoder`` reads it: the folder's, or the file itself."""
    return path / WEIGHTS_FILE if path.is_dir() else path


class TinyDecoder(nn.Module):
    """TAESD's decoder: sampler latents [B,C,h,w] -> image [B,3,8h,8w] in [-1, 1]."""

    def __init__(self, decoder: nn.Module, config: dict[str, Any], source: str) -> None:
        super().__init__()
        self.decoder = decoder
        self.scaling_factor = float(config["scaling_factor"])  # 1.0 for TAESD: the latents go in as they are
        self.latent_channels = int(config["latent_channels"])
        self.scale_factor = int(config["upsampling_scaling_factor"]) ** (len(config["decoder_block_out_channels"]) - 1)
        self.source = source

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents / self.scaling_factor).clamp(-1, 1)  # [B, 3, 8h, 8w]


def _read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SunEdgeError(f"TAESD folder {folder} has no config.json; expected a diffusers AutoencoderTiny folder")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise SunEdgeError(f"{config_path}: not valid JSON ({e})") from e
    kind = config.get("_class_name", "AutoencoderTiny")
    if kind != "AutoencoderTiny":
        raise SunEdgeError(f"{folder} holds {kind} weights, not a TAESD decoder (AutoencoderTiny); "
                           "pass a TAESD folder, or leave --vae-decoder at 'full' for the model's VAE")
    return config


def _decoder_state(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The ``DecoderTiny`` state dict (keys ``layers.N...``) from either accepted key layout."""
    if any(k.startswith(("decoder.conv_in.", "decoder.mid_block.")) for k in state):
        raise SunEdgeError(f"{source} holds a full VAE (AutoencoderKL), not a TAESD decoder; "
                           "leave --vae-decoder at 'full' to decode with the model's VAE")
    if any(k.startswith("decoder.") for k in state):
        return {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}
    if state and all(re.match(r"\d+\.", k) for k in state):  # TAESD's own file: entry 0 is the clamp
        return {f"layers.{int(k.split('.', 1)[0]) - 1}.{k.split('.', 1)[1]}": v for k, v in state.items()}
    raise SunEdgeError(f"{source} holds no TAESD decoder weights: expected keys 'decoder.layers.*' (diffusers) "
                       f"or '1.weight', '3.conv.0.weight', ... (taesd_decoder.safetensors); first keys: "
                       f"{first_names(sorted(state))}")


def _check(decoder: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """Every key present, none extra, every shape right; else one line."""
    want = decoder.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    wrong = sorted(k for k in set(want) & set(state) if tuple(want[k].shape) != tuple(state[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first: {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} unexpected (first: {extra[0]})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} of the wrong shape (first: {k} is {list(state[k].shape)}, "
                        f"expected {list(want[k].shape)})")
    if problems:
        raise SunEdgeError(f"{source} does not fit {what}: keys {'; '.join(problems)}")


def load_tiny_decoder(path: str | Path) -> TinyDecoder:
    """Load a TAESD decoder from a diffusers folder or a ``.safetensors`` file (see the module docstring)."""
    from diffusers import AutoencoderTiny

    from sun_edge.weights import read_state_dict

    path = Path(path).expanduser()
    if not path.exists():
        raise SunEdgeError(f"TAESD decoder {path} does not exist; {_SPEC_HELP}")
    if path.is_dir():
        config, weights = _read_config(path), path / WEIGHTS_FILE
        if not weights.is_file():
            raise SunEdgeError(f"TAESD folder {path} has no {WEIGHTS_FILE}")
    else:
        if path.suffix.lower() != ".safetensors":
            raise SunEdgeError(f"TAESD decoder {path.name} is not a .safetensors file or a diffusers folder")
        config, weights = {}, path
    accepted = set(inspect.signature(AutoencoderTiny.__init__).parameters) - {"self"}
    try:
        model = AutoencoderTiny.from_config({k: v for k, v in config.items() if k in accepted})
    except Exception as e:  # a config diffusers cannot build from
        raise SunEdgeError(f"{path}: cannot build AutoencoderTiny from its config.json ({type(e).__name__}: {e})") from e
    state = _decoder_state(read_state_dict(weights), weights.name)
    what = "the decoder its config.json describes" if path.is_dir() else "TAESD's decoder with the default SD1.x config"
    _check(model.decoder, state, weights.name, what)
    model.decoder.load_state_dict(state, strict=True)
    tiny = TinyDecoder(model.decoder, dict(model.config), str(path))
    return tiny.float().eval().requires_grad_(False)
