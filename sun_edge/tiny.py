"""``tiny-random``: the smallest SD1.5-architecture model, random weights, and a matching adapter.

``--model tiny-random`` lets every command run in seconds, and the tests use it everywhere.
Its weights are random (seeded), so its images are noise: it proves the plumbing, not the
method (the trained default model is the shipped ``pocket-base``). The architecture follows
SD1.5's classes and wiring (UNet2DCondition with cross-attention in three down and three up blocks and the mid block, CLIPTextModel with
the real CLIP vocabulary, AutoencoderKL with a factor-8 latent space), only narrower.

The model is generated, not shipped: ``ensure_tiny_random(home)`` writes it once, atomically,
as a diffusers folder under the models directory, and the adapter beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_SEED = 20231214
TINY_NAME = "tiny-random"

# Narrow, but with SD1.5's block structure: 3 cross-attention down blocks, 3 cross-attention
# up blocks, a cross-attention mid block, so 16 cross-attention layers as in SD1.5.
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [32, 32, 64, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
TINY_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
    "projection_dim": 32,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [8, 16, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}


def build_tiny_components(seed: int = TINY_SEED) -> dict[str, Any]:
    """Build the tiny UNet, text encoder and VAE with weights drawn from ``seed``.

    Weights are re-drawn with a scale that keeps activations in a sane range, so that the
    adapter's effect and numerical parity are measurable (default inits of a random model
    can make outputs nearly constant).
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in (unet, text_encoder, vae):
            for name, param in module.named_parameters():
                if param.ndim >= 2 and "embed" not in name:
                    fan_in = param[0].numel()
                    param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
    return {"unet": unet.eval(), "text_encoder": text_encoder.eval(), "vae": vae.eval()}


def write_diffusers_folder(components: dict[str, Any], dst: Path) -> None:
    """Write components as a diffusers folder (``unet/``, ``text_encoder/``, ``vae/``) in safetensors."""
    for name in ("unet", "text_encoder", "vae"):
        components[name].save_pretrained(dst / name, safe_serialization=True)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (dst / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_tiny_model(dst: Path, seed: int = TINY_SEED, *, replace: bool = False) -> Path:
    """Write the tiny model folder and its adapter to ``dst`` atomically (``replace``: over an existing one)."""
    import torch

    from sun_edge.adapter import BUNDLED_ADAPTER_FILE, SUNAdapter, save_adapter
    from sun_edge.files import atomic_directory

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(dst, replace=replace) as tmp:  # mode as the umask says, not mkdtemp's 0700
        components = build_tiny_components(seed)
        write_diffusers_folder(components, tmp)
        torch.manual_seed(seed + 2)
        adapter = SUNAdapter.from_unet(components["unet"], extra_positive=False)
        adapter.randomize_(seed + 3)
        save_adapter(adapter, tmp / BUNDLED_ADAPTER_FILE)
    return dst


def ensure_tiny_random(models_dir: Path) -> Path:
    """Return the tiny model's folder under ``models_dir``, generating it on first use (or over an incomplete one)."""
    dst = Path(models_dir) / TINY_NAME
    if not (dst / "unet" / "config.json").is_file():
        make_tiny_model(dst, replace=dst.is_dir() and not dst.is_symlink())
    return dst
