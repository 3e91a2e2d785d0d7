"""Pocket SD: a small Stable Diffusion 1.5-architecture family trained on the synthetic world.

No SD1.5 weights can be downloaded where this project is built and tested, so SUN's claims
are measured on a family of small models that keep SD1.5's classes and wiring and are
trained from scratch on ``sun_edge.pocket.world``'s coloured shapes:

- ``pocket-base``: VAE + text encoder + UNet trained from scratch (the role of SD1.5);
- ``pocket-toon``: ``pocket-base`` fine-tuned on the world's toon style (the role of a
  civitai fine-tune such as ToonYou), sharing the base model's VAE.

The architecture, fixed here as constants:

- images 64x64 RGB; ``AutoencoderKL`` with 3 resolution levels, so a factor-4 latent
  space: latents [4, 16, 16] (SD1.5: factor 8, [4, 64, 64] for 512x512);
- ``CLIPTextModel`` with the real CLIP vocabulary (49408 tokens, our
  ``sun_edge.tokenizer.CLIPTokenizer``) and 77 positions, hidden size 32, 3 layers. Its token
  embedding (49408 x 32 = 1.58M parameters, 3.2 MB in fp16) is 98% of the text encoder and
  the largest single tensor of the model; the vocabulary is kept so that prompts tokenize
  exactly as for SD1.5;
- ``UNet2DConditionModel`` with SD1.5's block layout (three ``CrossAttnDownBlock2D`` and a
  ``DownBlock2D``, the mirror going up, a cross-attention mid block, 2 layers per block), so
  it has SD1.5's 16 cross-attention layers at the same processor indices (odd 1..31) and a
  SUN adapter has SD1.5's layer layout; only narrower (32..48 channels, 2 attention heads,
  1.66M parameters).

About 3.96M parameters, 7.9 MB of fp16 weights per model folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from sun_edge.errors import SunEdgeError

POCKET_MODELS: tuple[str, ...] = ("pocket-base", "pocket-toon")
POCKET_SEED = 20240601
RESOLUTION = 64  # image side in pixels
LATENT_SIZE = 16  # latent side: RESOLUTION / 4
LATENT_CHANNELS = 4
TEXT_HIDDEN = 32

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": LATENT_CHANNELS,
    "block_out_channels": [16, 32, 64],  # 3 levels: 2 downsamplings, factor 4
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": RESOLUTION,
    "scaling_factor": 1.0,  # replaced by 1/std of the trained VAE's latents (train_family.calibrate_vae)
}
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,  # CLIP's BPE vocabulary, as SD1.5
    "hidden_size": TEXT_HIDDEN,
    "intermediate_size": 4 * TEXT_HIDDEN,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,  # our tokenizer pads with EOS, as SD1.5's
    "projection_dim": TEXT_HIDDEN,
}
UNET_CONFIG: dict[str, Any] = {
    "sample_size": LATENT_SIZE,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "layers_per_block": 2,
    "block_out_channels": [32, 32, 48, 48],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": TEXT_HIDDEN,
    # diffusers' name for the number of heads (SD1.5: 8 heads of 40..160 channels). 2 heads of 16..24
    # channels here: 8 heads of 4 trained half as fast a step on a CPU and read prompts back worse.
    "attention_head_dim": 2,
    "norm_num_groups": 8,
}

# Budget (parameters and fp16 bytes) the tests hold the architecture to.
MAX_MODEL_PARAMETERS = 4_200_000  # <= 8.4 MB of fp16 weights per model folder
UNET_PARAMETER_RANGE = (1_000_000, 3_000_000)
CROSS_ATTENTION_LAYERS = 16  # as SD1.5

SavePrecision = Literal["fp32", "fp16"]
COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "vae")


def build_components(seed: int = POCKET_SEED) -> dict[str, Any]:
    """Fresh, untrained ``{"unet", "text_encoder", "vae"}`` modules (library default inits) from ``seed``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return {"unet": unet, "text_encoder": text_encoder, "vae": vae}


def parameter_counts(components: dict[str, Any]) -> dict[str, int]:
    """Parameters per component, plus ``"total"``."""
    counts = {name: sum(p.numel() for p in components[name].parameters()) for name in COMPONENTS}
    counts["total"] = sum(counts.values())
    return counts


def describe(components: dict[str, Any]) -> str:
    """One line per component: parameters and fp16 megabytes (the token embedding named)."""
    counts = parameter_counts(components)
    embed = components["text_encoder"].get_input_embeddings().weight.numel()
    lines = [f"{name}: {counts[name] / 1e6:.2f}M parameters, {2 * counts[name] / 1e6:.2f} MB fp16" for name in COMPONENTS]
    lines.append(f"  (text token embedding 49408 x {TEXT_HIDDEN}: {embed / 1e6:.2f}M, {2 * embed / 1e6:.2f} MB fp16)")
    lines.append(f"total: {counts['total'] / 1e6:.2f}M parameters, {2 * counts['total'] / 1e6:.2f} MB fp16")
    return "\n".join(lines)


def write_model(components: dict[str, Any], dst: Path, *, precision: SavePrecision = "fp16",
                extra: dict[str, Any] | None = None) -> Path:
    """Write a diffusers folder (``unet/``, ``text_encoder/``, ``vae/``, ``model_index.json``) atomically.

    ``precision="fp16"`` stores half-precision weights under the plain file names (as most
    SD1.5 fine-tunes ship), which ``sun_edge.models.load_model`` reads back as float32.
    ``extra`` is written as ``pocket.json`` beside them (how the model was made). ``dst`` must
    not exist; the folder appears only when complete.
    """
    import copy

    from sun_edge.tiny import write_diffusers_folder

    if precision not in ("fp32", "fp16"):
        raise SunEdgeError(f"unknown save precision {precision!r}; choose fp32 or fp16")
    dst = Path(dst)
    if dst.exists():
        raise SunEdgeError(f"{dst} already exists; remove it or pick another folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        saved = {name: copy.deepcopy(components[name]).cpu() for name in COMPONENTS}
        for module in saved.values():  # .half()/.float(), not .to(dtype): diffusers warns on the latter
            if precision == "fp16":
                module.half()
            else:
                module.float()
        write_diffusers_folder(saved, tmp)
        if extra is not None:
            (tmp / "pocket.json").write_text(json.dumps(extra, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_pocket_info(folder: Path) -> dict[str, Any]:
    """The ``pocket.json`` written beside a pocket model (empty when absent)."""
    path = Path(folder) / "pocket.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_components(folder: Path) -> dict[str, Any]:
    """A pocket model folder's modules, float32, ready to train further (``requires_grad`` on)."""
    from sun_edge.models import load_model

    loaded = load_model(str(folder))
    components = {"unet": loaded.unet, "text_encoder": loaded.text_encoder, "vae": loaded.vae}
    for module in components.values():
        module.requires_grad_(True)
    return components
