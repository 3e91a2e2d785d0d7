"""Single-file SD1.x checkpoints in the original LDM layout, as civitai distributes them.

Converted offline into diffusers models built from the bundled SD1.5 configs, one component
at a time, with every key and shape checked; an inpainting UNet (sd-1.5-inpainting: 9 input
channels) is recognised from its conv_in weight and built with 9. Other architectures (SD2.x,
SDXL, InstructPix2Pix, SD3/Flux, a LoRA passed as a model) are recognised from keys and shapes
and refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sun_edge.errors import SunEdgeError
from sun_edge.errors import first_names
from sun_edge.weights import SAFETENSORS_SUFFIXES, read_shapes, read_state_dict

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sd15"
COMPONENTS = ("unet", "text_encoder", "vae")


def read_config(component: str, config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """One component's ``config.json`` (default: the bundled SD1.5 configs)."""
    file = Path(config_dir) / component / "config.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise SunEdgeError(f"cannot read model config {file}: {error}") from error


UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."
_NOT_SD1 = "sun-edge supports SD1.x models"


def check_sd1_architecture(filename: str, shapes: dict[str, tuple[int, ...]], unet_config: dict[str, Any]) -> None:
    """Refuse, by name, checkpoints that are not SD1.x (or do not fit ``unet_config``), from keys and shapes."""

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in shapes)

    if has("conditioner.embedders."):
        raise SunEdgeError(f"{filename} looks like an SDXL checkpoint (conditioner.embedders.* keys); {_NOT_SD1}")
    if has("lora_unet_") or has("lora_te"):
        raise SunEdgeError(f"{filename} is a LoRA, not a model: pass it with --lora {filename}")
    if not has(UNET_PREFIX):
        if has("down_blocks.") or has("text_model.") or has("encoder.down_blocks."):
            raise SunEdgeError(
                f"{filename} looks like one component of a diffusers folder; pass the whole folder as --model"
            )
        raise SunEdgeError(f"{filename} is not a Stable Diffusion checkpoint: no {UNET_PREFIX}* (UNet) weights")
    if not has(UNET_PREFIX + "input_blocks."):
        raise SunEdgeError(
            f"{filename} has no SD1.x UNet ({UNET_PREFIX}input_blocks.*); transformer models such as SD3 or Flux "
            f"are not supported; {_NOT_SD1}"
        )
    if has("cond_stage_model.model."):
        raise SunEdgeError(f"{filename} looks like an SD2.x checkpoint (OpenCLIP text encoder); {_NOT_SD1}")
    widths = [s[1] for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    expected_width = unet_config["cross_attention_dim"]
    if widths and widths[0] != expected_width:
        known = {1024: "an SD2.x", 2048: "an SDXL", 1280: "an SDXL refiner"}.get(widths[0])
        if known:
            raise SunEdgeError(
                f"{filename} looks like {known} checkpoint (cross-attention width {widths[0]}); {_NOT_SD1}"
            )
        raise SunEdgeError(f"{filename} has cross-attention width {widths[0]}, expected {expected_width}; {_NOT_SD1}")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] not in unet_channels(unet_config):
        kind = {8: "an InstructPix2Pix"}.get(conv_in[1], f"a {conv_in[1]}-channel")
        raise SunEdgeError(
            f"{filename} looks like {kind} UNet ({conv_in[1]} input channels, expected "
            f"{' or '.join(map(str, unet_channels(unet_config)))}); sun-edge supports SD1.x text-to-image and "
            "inpainting UNets"
        )
    for prefix, what in ((TEXT_PREFIX, "CLIP text encoder"), (VAE_PREFIX, "VAE")):
        if not has(prefix):
            raise SunEdgeError(f"{filename} has no {what} weights ({prefix}*); use a full SD1.x checkpoint")


def unet_channels(unet_config: dict[str, Any]) -> tuple[int, int]:
    """The UNet input channels sun-edge runs: text-to-image (the latents) and inpainting (latents, mask,
    masked-image latents: sd-1.5-inpainting's 9)."""
    latent = int(unet_config["out_channels"])
    return (latent, 2 * latent + 1)


def with_in_channels(unet_config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """``unet_config`` with the input channels the checkpoint's own conv_in weight has (an inpainting UNet: 9)."""
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4 or conv_in[1] == unet_config["in_channels"]:
        return unet_config
    return {**unet_config, "in_channels": int(conv_in[1])}


def _read_configs(config_dir: Path) -> dict[str, dict[str, Any]]:
    return {component: read_config(component, config_dir) for component in COMPONENTS}


def load_single_file(path: Path, config_dir: Path, *, allow_pickle: bool) -> dict[str, Any]:
    """Convert an LDM-layout checkpoint into diffusers models, one component at a time.

    safetensors files are read lazily: the header gives the shapes for the architecture
    check, then each component's tensors are read, converted and assigned into a model
    built on the meta device, so weights are never held twice in float32.
    """
    configs = _read_configs(config_dir)
    raw: dict[str, Any] | None = None
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        shapes = read_shapes(path)
    else:
        raw = read_state_dict(path, allow_pickle=allow_pickle)
        shapes = {key: tuple(value.shape) for key, value in raw.items()}
    check_sd1_architecture(path.name, shapes, configs["unet"])
    configs["unet"] = with_in_channels(configs["unet"], shapes)  # read from the tensors, not assumed

    def take(prefix: str) -> dict[str, Any]:
        if raw is None:
            return read_state_dict(path, prefixes=(prefix,))
        return {key: raw.pop(key) for key in [k for k in raw if k.startswith(prefix)]}

    unet = _unet_from_ldm(take(UNET_PREFIX), configs["unet"], path.name)
    text_encoder = _text_encoder_from_ldm(take(TEXT_PREFIX), configs["text_encoder"], path.name)
    vae = _vae_from_ldm(take(VAE_PREFIX), configs["vae"], path.name)
    return {"unet": unet, "text_encoder": text_encoder, "vae": vae}


def _unet_from_ldm(state: dict[str, Any], config: dict[str, Any], filename: str) -> Any:
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    converted = convert_ldm_unet_checkpoint(state, config)
    leftovers = _unconsumed(state, converted)
    state.clear()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    _assign(unet, converted, leftovers, "UNet", filename)
    return unet


def _text_encoder_from_ldm(state: dict[str, Any], config: dict[str, Any], filename: str) -> Any:
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    converted = convert_ldm_clip_checkpoint(state)
    # Checkpoints name weights ``text_model.*`` (very old ones omit it); transformers 5's
    # CLIPTextModel has no ``text_model`` submodule, earlier versions do: match the model.
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    # A non-persistent buffer (and sometimes stored damaged): rebuilt below, not loaded.
    converted.pop("embeddings.position_ids", None)
    leftovers = [k for k in _unconsumed(state, converted) if not k.endswith("embeddings.position_ids")]
    state.clear()
    clip_config = CLIPTextConfig.from_dict(config)
    with torch.device("meta"):
        text_encoder = CLIPTextModel(clip_config)
    if any(key.startswith("text_model.") for key in text_encoder.state_dict()):
        converted = {f"text_model.{k}": v for k, v in converted.items()}
    _assign(text_encoder, converted, leftovers, "text encoder", filename)
    for name, buffer in list(text_encoder.named_buffers()):
        if buffer.is_meta and name.endswith("position_ids"):
            positions = torch.arange(clip_config.max_position_embeddings).expand((1, -1))  # [1, 77]
            owner = text_encoder.get_submodule(name.rpartition(".")[0])
            owner.register_buffer("position_ids", positions, persistent=False)
    _check_materialised(text_encoder)
    return text_encoder


def _vae_from_ldm(state: dict[str, Any], config: dict[str, Any], filename: str) -> Any:
    import torch
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    converted = convert_ldm_vae_checkpoint(state, config)  # mid attention: 1x1 conv -> linear
    leftovers = _unconsumed(state, converted)
    state.clear()
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    _assign(vae, converted, leftovers, "VAE", filename)
    return vae


def _unconsumed(source: dict[str, Any], converted: dict[str, Any]) -> list[str]:
    """Source keys whose tensors the diffusers conversion dropped (it skips keys it does not know)."""
    used = {value.untyped_storage().data_ptr() for value in converted.values() if value is not None}
    return [key for key, value in source.items() if value.untyped_storage().data_ptr() not in used]


def _assign(model: Any, state: dict[str, Any], leftovers: list[str], label: str, filename: str) -> None:
    """Check every key and shape against the meta-device ``model``, then assign float32 tensors into it."""
    import torch

    expected = model.state_dict()
    missing = [key for key in expected if state.get(key) is None]
    unexpected = leftovers + [key for key in state if key not in expected]
    wrong = [
        f"{key} {list(state[key].shape)} vs {list(expected[key].shape)}"
        for key in expected
        if state.get(key) is not None and state[key].shape != expected[key].shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{len(names)} {what} ({first_names(names)})"
            for names, what in ((missing, "missing"), (unexpected, "unexpected"), (wrong, "with wrong shapes"))
            if names
        ]
        raise SunEdgeError(f"{filename}: {label} weights do not fit the SD1.x {label}: {'; '.join(parts)}")
    for key in expected:  # one tensor at a time, so a float16 file never exists twice in float32
        source = state[key]
        state[key] = torch.empty(source.shape, dtype=torch.float32).copy_(source)  # see models._own_memory
        del source
    model.load_state_dict(state, strict=True, assign=True)
    state.clear()
    if label != "text encoder":
        _check_materialised(model)


def _check_materialised(model: Any) -> None:
    import itertools

    left = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: {type(model).__name__} tensors left on the meta device: {left[:3]}")
