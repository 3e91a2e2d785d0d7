"""ControlNet: diffusers' ``ControlNetModel`` loaded offline, checked against the UNet it controls.

A ControlNet is read from

- a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``);
- one ``.safetensors`` file in diffusers' key layout (``conv_in.*``, ``controlnet_cond_embedding.*``,
  ``controlnet_down_blocks.*``), its config derived from the UNet's (what ``ControlNetModel.from_unet``
  copies), the condition embedding's widths read from the file;
- one file in the original ControlNet/LDM layout (``control_model.input_blocks.*``, ``zero_convs.*``,
  ``input_hint_block.*``, ``middle_block_out.*``), as lllyasviel and civitai distribute
  ``control_v11*.safetensors``: its keys converted as diffusers' single-file loader does
  (``convert_controlnet_checkpoint``), with the same derived config, no download.

Pickle files (``.ckpt``, ``.pth``, ``.bin``) are refused unless allowed (``sun_edge.weights``).
Before any weight is read, the file's shapes are compared with the ControlNet this model's UNet
would have: a ControlNet for another architecture (SD2.x's 1024-wide or SDXL's 2048-wide text,
other block widths, added time/text embeddings) gets one line naming what differs.

``control_residuals`` is the call every runtime computes (the ``controlnet`` component of
``sun_edge.components``): the released SUN pipeline (``SUNPipe``) gives diffusers' ControlNet
pipeline ``prompt_embeds = cat([pos, neg], dim=1)`` with guidance 0, so the ControlNet attends over the
154 tokens of the positive then the negative prompt with its own (plain) attention; sun-edge does the
same. The CFG baseline feeds each half of its batch ``[c, c]`` (its own embedding twice): attention
over a key set repeated twice equals attention over it once, so that is diffusers' 77-token
ControlNet call up to float rounding, through the same graph.

``residual_layout`` says the residuals' (channels, downscale) for a UNet config: 12 down-block
residuals and one mid-block residual for SD1.5, what the UNet graphs' extra inputs are made of.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sun_edge.errors import SunEdgeError, first_names

if TYPE_CHECKING:
    import torch
    from torch import nn

LDM_PREFIX = "control_model."
WEIGHTS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# What ``ControlNetModel.from_unet`` copies from the UNet's config (diffusers 0.3x-0.4x).
_FROM_UNET = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
              "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
              "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
              "encoder_hid_dim", "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads",
              "use_linear_projection", "class_embed_type", "addition_embed_type", "addition_time_embed_dim",
              "num_class_embeds", "upcast_attention", "resnet_time_scale_shift", "projection_class_embeddings_input_dim",
              "mid_block_type")
_KNOWN_WIDTHS = {1024: "an SD2.x", 2048: "an SDXL", 1280: "an SDXL refiner"}


def residual_layout(unet_config: dict[str, Any]) -> tuple[tuple[int, int], ...]:
    """(channels, downscale of the latent) of each down-block residual, then the mid-block one.

    SD1.5: conv_in (320, 1); block 0's two resnets (320, 1) and downsampler (320, 2); block 1 (640, 2) x2,
    (640, 4); block 2 (1280, 4) x2, (1280, 8); block 3 (1280, 8) x2; mid (1280, 8): 12 + 1."""
    channels = list(unet_config["block_out_channels"])
    layers = int(unet_config["layers_per_block"])
    layout = [(channels[0], 1)]
    for i, width in enumerate(channels):
        layout += [(width, 2 ** i)] * layers
        if i < len(channels) - 1:
            layout.append((width, 2 ** (i + 1)))
    return (*layout, (channels[-1], 2 ** (len(channels) - 1)))


def controlnet_config(unet_config: dict[str, Any], embedding: tuple[int, ...] = (16, 32, 96, 256)) -> dict[str, Any]:
    """The config of the ControlNet of a UNet (as ``ControlNetModel.from_unet``), condition embedding widths given."""
    import inspect

    from diffusers import ControlNetModel

    accepted = set(inspect.signature(ControlNetModel.__init__).parameters)
    config = {k: v for k, v in unet_config.items() if k in _FROM_UNET and k in accepted and not k.startswith("_")}
    config.update(conditioning_channels=3, conditioning_embedding_out_channels=tuple(embedding))
    return config


def _is_ldm(shapes: dict[str, tuple[int, ...]]) -> bool:
    return any(k.startswith(LDM_PREFIX) or k.startswith("input_hint_block.") or k.startswith("zero_convs.")
               for k in shapes)


def _strip(shapes: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix(LDM_PREFIX): v for k, v in shapes.items()}


def _embedding_widths(shapes: dict[str, tuple[int, ...]], ldm: bool) -> tuple[int, ...]:
    """The condition embedding's widths (16, 32, 96, 256 in lllyasviel's ControlNets), from the file."""
    if ldm:
        convs = sorted((int(k.split(".")[1]), s[0]) for k, s in _strip(shapes).items()
                       if k.startswith("input_hint_block.") and k.endswith(".weight") and len(s) == 4)
        widths = [c for _, c in convs[:-1]]  # the last conv is the zero conv into the UNet's width
        return tuple(widths[0::2]) if widths else (16, 32, 96, 256)  # pairs: (c, c) then (c -> next) strided
    first = shapes.get("controlnet_cond_embedding.conv_in.weight")
    blocks = sorted((int(k.split(".")[2]), s[0]) for k, s in shapes.items()
                    if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight"))
    if first is None:
        return (16, 32, 96, 256)
    return (first[0], *[c for i, c in blocks if i % 2 == 1])


def check_architecture(filename: str, shapes: dict[str, tuple[int, ...]], unet_config: dict[str, Any]) -> None:
    """Refuse, in one line naming what differs, a ControlNet that does not fit this model's UNet."""
    keys = _strip(shapes)
    if any(k.startswith(("add_embedding.", "label_emb.")) for k in keys):
        raise SunEdgeError(f"ControlNet {filename} has added time/text embeddings (an SDXL ControlNet); this model is "
                           "SD1.x: use an SD1.5 ControlNet (e.g. control_v11p_sd15_*)")
    if not any(k.startswith(("controlnet_cond_embedding.", "input_hint_block.")) for k in keys):
        raise SunEdgeError(f"{filename} is not a ControlNet: no condition embedding (controlnet_cond_embedding.* or "
                           "control_model.input_hint_block.*) weights")
    widths = sorted({s[1] for k, s in keys.items() if k.endswith("attn2.to_k.weight") and len(s) == 2})
    expected = int(unet_config["cross_attention_dim"])
    if widths and widths != [expected]:
        known = _KNOWN_WIDTHS.get(widths[0])
        raise SunEdgeError(f"ControlNet {filename} has cross-attention width {widths[0]}"
                           f"{f' ({known} ControlNet)' if known else ''}; this model's UNet takes {expected}: use a "
                           "ControlNet trained for its architecture")
    conv_in = keys.get("conv_in.weight") or keys.get("input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4:
        want = (int(unet_config["block_out_channels"][0]), int(unet_config["in_channels"]))
        if (conv_in[0], conv_in[1]) != want:
            raise SunEdgeError(f"ControlNet {filename} starts with {conv_in[0]} channels from {conv_in[1]} latent "
                               f"channels; this model's UNet has {want[0]} from {want[1]}: it is for another "
                               "architecture")


def _check_fits(filename: str, model: nn.Module, state: dict[str, Any], unet_config: dict[str, Any]) -> None:
    """Every key and shape of ``state`` against ``model``'s; one line for the block widths that differ."""
    expected = model.state_dict()
    wrong = [f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}" for k in expected
             if state.get(k) is not None and tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise SunEdgeError(f"ControlNet {filename} does not fit this model's UNet (block widths "
                           f"{list(unet_config['block_out_channels'])}): {len(wrong)} tensor(s) with other shapes "
                           f"({first_names(wrong)}); it is for another architecture")


def _from_state(state: dict[str, Any], unet_config: dict[str, Any], filename: str, ldm: bool,
                embedding: tuple[int, ...]) -> nn.Module:
    import torch
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from sun_edge.checkpoint import _assign, _unconsumed

    config = controlnet_config(unet_config, embedding)
    if ldm:
        converted = convert_controlnet_checkpoint(_strip(state), config)
        converted = {k: v for k, v in converted.items() if v is not None}
        leftovers = _unconsumed(state, converted)
    else:
        converted, leftovers = dict(state), []
    with torch.device("meta"):
        model = ControlNetModel.from_config(config)
    _check_fits(filename, model, converted, unet_config)
    _assign(model, converted, leftovers, "ControlNet", filename)
    return model


def weights_path(path: Path) -> Path:
    """The weights file of a ControlNet: the file itself, or the one in a diffusers folder."""
    path = Path(path)
    if path.is_dir():
        for name in WEIGHTS_FILES:
            if (path / name).is_file():
                return path / name
        raise SunEdgeError(f"ControlNet folder {path} has no {' or '.join(WEIGHTS_FILES)}; pass a diffusers "
                           "ControlNet folder or one .safetensors file")
    if not path.is_file():
        raise SunEdgeError(f"ControlNet {path} does not exist; pass a .safetensors file or a diffusers folder")
    return path


def load_controlnet(path: Path | str, unet_config: dict[str, Any], *, allow_pickle: bool = False) -> nn.Module:
    """A float32 ``ControlNetModel`` for a UNet of ``unet_config`` from a file or a diffusers folder (module docstring).

    The returned module carries ``source`` (the path given) and ``weights_file`` (what its sha256 is of)."""
    import json

    from sun_edge.weights import SAFETENSORS_SUFFIXES, read_shapes, read_state_dict

    path = Path(path)
    weights = weights_path(path)
    if weights.suffix.lower() in SAFETENSORS_SUFFIXES:
        shapes = read_shapes(weights)
        state = None
    else:
        state = read_state_dict(weights, allow_pickle=allow_pickle)  # refuses pickle unless allowed
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    if path.is_dir() and (path / "config.json").is_file():
        try:
            folder_config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise SunEdgeError(f"cannot read ControlNet config {path / 'config.json'}: {e}") from e
        if folder_config.get("global_pool_conditions"):
            raise SunEdgeError(f"ControlNet {path.name} pools its residuals globally (a shuffle ControlNet); "
                               "sun-edge's UNet graphs take full-size residuals")
    check_architecture(weights.name if not path.is_dir() else path.name, shapes, unet_config)
    ldm = _is_ldm(shapes)
    if state is None:
        state = read_state_dict(weights)
    model = _from_state(state, unet_config, path.name, ldm, _embedding_widths(shapes, ldm))
    model.source, model.weights_file = str(path), str(weights)
    return model.eval().requires_grad_(False)


def control_residuals(controlnet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, pos: torch.Tensor,
                      neg: torch.Tensor, cond: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The ``controlnet`` component: (down residuals..., mid residual), each times ``scale``.

    sample [B,4,h,w], timestep [1], pos/neg [B,77,D] (the ControlNet attends over ``cat([pos, neg], 1)``,
    [B,154,D], as the released SUN pipeline feeds it), cond [B,3,H,W] in [0, 1], scale [1]."""
    import torch

    context = torch.cat([pos, neg], dim=1)  # [B, 154, D]
    down, mid = controlnet(sample, timestep, context, cond, conditioning_scale=1.0, return_dict=False)
    s = scale.reshape(()).to(mid.dtype)
    return (*(d * s for d in down), mid * s)
