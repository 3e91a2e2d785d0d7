"""Merging kohya/civitai-format LoRA files into an SD1.x UNet and text encoder.

A kohya LoRA names each adapted layer by its module path with ``.`` replaced by ``_``:
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k`` (diffusers UNet
names, what kohya's sd-scripts writes for SD1.x), or the original LDM names
(``lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k``, written by some
trainers), and ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` for the text
encoder. Each layer has ``.lora_down.weight`` [r, in(, kh, kw)], ``.lora_up.weight``
[out, r(, 1, 1)] and optionally ``.alpha`` (default: the rank r). Merging adds

    W += scale * (alpha / r) * up @ down

to the layer's weight, for Linear and Conv2d layers (conv kernels are flattened for the
product and reshaped back). Every key is matched and every shape checked before any
weight changes; problems raise one line naming how many and the first few.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sun_edge.errors import SunEdgeError, first_names

_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_FOREIGN_LAYOUTS = (
    (("lora_A.", "lora_B.", ".lora.down.", ".lora.up.", "lora_linear_layer"), "a diffusers/PEFT-format LoRA"),
    (("hada_w1", "hada_w2", "lokr_w1", "lokr_w2"), "a LyCORIS LoHa/LoKr file"),
    (("lora_te1_", "lora_te2_"), "an SDXL LoRA"),
    ((".dora_scale",), "a DoRA file"),
)
_RESNET_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def ldm_unet_prefixes(unet: Any) -> dict[str, str]:
    """Map diffusers UNet module prefixes to their names in the original LDM UNet.

    Built from the UNet's own blocks: input_blocks count resnet/attention pairs then a
    downsampler per down block, output_blocks count layers per up block with the
    upsampler in the last layer (slot 1, or 2 after an attention).
    """
    pairs = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    index = 1
    for b, block in enumerate(unet.down_blocks):
        for i in range(len(block.resnets)):
            pairs[f"down_blocks.{b}.resnets.{i}"] = f"input_blocks.{index}.0"
            if getattr(block, "attentions", None):
                pairs[f"down_blocks.{b}.attentions.{i}"] = f"input_blocks.{index}.1"
            index += 1
        if getattr(block, "downsamplers", None):
            pairs[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    mid = unet.mid_block
    for i in range(len(mid.resnets)):
        pairs[f"mid_block.resnets.{i}"] = f"middle_block.{2 * i}"
    for i in range(len(getattr(mid, "attentions", None) or ())):
        pairs[f"mid_block.attentions.{i}"] = f"middle_block.{2 * i + 1}"
    index = 0
    for b, block in enumerate(unet.up_blocks):
        has_attention = bool(getattr(block, "attentions", None))
        for i in range(len(block.resnets)):
            pairs[f"up_blocks.{b}.resnets.{i}"] = f"output_blocks.{index}.0"
            if has_attention:
                pairs[f"up_blocks.{b}.attentions.{i}"] = f"output_blocks.{index}.1"
            index += 1
        if getattr(block, "upsamplers", None):
            pairs[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{index - 1}.{2 if has_attention else 1}.conv"
    return pairs


def _ldm_module_name(name: str, prefixes: Mapping[str, str]) -> str | None:
    """The LDM name of a diffusers UNet module, or None when it has no counterpart."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            rest = parts[cut:]
            if rest and ".resnets." in f".{head}.":
                rest = [_RESNET_LDM.get(rest[0], rest[0]), *rest[1:]]
            return ".".join([prefixes[head], *rest])
    return None


def lora_targets(unet: Any, text_encoder: Any) -> tuple[dict[str, Any], set[str]]:
    """LoRA layer names -> Linear/Conv2d modules, and names that are ambiguous (not usable).

    UNet layers are reachable under their diffusers and their LDM names; text encoder
    layers under ``lora_te_text_model_*`` whether or not the installed transformers nests
    CLIPTextModel's modules under ``text_model``.
    """
    import torch

    targets: dict[str, Any] = {}
    ambiguous: set[str] = set()

    def add(name: str, module: Any) -> None:
        if targets.get(name, module) is not module:
            ambiguous.add(name)
        targets[name] = module

    prefixes = ldm_unet_prefixes(unet)
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            add("lora_unet_" + name.replace(".", "_"), module)
            ldm = _ldm_module_name(name, prefixes)
            if ldm is not None:
                add("lora_unet_" + ldm.replace(".", "_"), module)
    for name, module in text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear):  # transformers 5 dropped the text_model wrapper
            add("lora_te_text_model_" + name.removeprefix("text_model.").replace(".", "_"), module)
    for name in ambiguous:
        targets.pop(name, None)
    return targets, ambiguous


def _group(state_dict: Mapping[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Group keys by LoRA layer: ``{layer: {"down": t, "up": t, "alpha": t?}}``; refuse foreign layouts."""
    for markers, layout in _FOREIGN_LAYOUTS:
        hits = [k for k in state_dict if any(m in k for m in markers)]
        if hits:
            raise SunEdgeError(
                f"{source} looks like {layout} ({hits[0]}); sun-edge merges kohya-format SD1.x LoRAs "
                "(lora_unet_*/lora_te_* keys with lora_down/lora_up)"
            )
    groups: dict[str, dict[str, Any]] = {}
    stray = []
    for key, value in state_dict.items():
        part = next((p for p in _PARTS if key.endswith(p)), None)
        if part is None:
            stray.append(key)
            continue
        groups.setdefault(key[: -len(part)], {})[_PARTS[part]] = value
    incomplete = [name for name, parts in groups.items() if "down" not in parts or "up" not in parts]
    if stray or incomplete:
        problems = [f"{len(stray)} keys that are not lora_down/lora_up/alpha ({first_names(stray)})"] if stray else []
        if incomplete:
            problems.append(f"{len(incomplete)} layers without both lora_down and lora_up ({first_names(incomplete)})")
        raise SunEdgeError(f"{source} is not a usable kohya LoRA: {'; '.join(problems)}")
    if not groups:
        raise SunEdgeError(f"{source} holds no LoRA layers")
    return groups


def _delta_fits(weight: Any, down: Any, up: Any) -> bool:
    """Whether ``up @ down`` (kernels flattened) has the layer's weight shape."""
    rank = down.shape[0]
    if up.ndim not in (2, 4) or down.ndim not in (2, 4) or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
        return False
    if tuple(up.flatten(1).shape) != (weight.shape[0], rank) or down.flatten(1).shape[1] != weight[0].numel():
        return False
    kernel = tuple(weight.shape[2:]) or (1, 1)
    return (down.ndim == 2 and kernel == (1, 1)) or (down.ndim == 4 and tuple(down.shape[2:]) == kernel)


def merge_lora(
    unet: Any,
    text_encoder: Any,
    state_dict: Mapping[str, Any],
    scale: float,
    *,
    source: str = "LoRA",
) -> int:
    """Merge a kohya-format LoRA into ``unet`` and ``text_encoder`` in place; return the layers merged.

    ``source`` names the file in error messages. Nothing is changed unless every layer
    matches a module with fitting shapes.
    """
    import torch

    groups = _group(state_dict, source)
    targets, ambiguous = lora_targets(unet, text_encoder)
    unmatched = [name for name in groups if name not in targets]
    if unmatched:
        hint = " (ambiguous names)" if any(n in ambiguous for n in unmatched) else ""
        raise SunEdgeError(
            f"{source}: {len(unmatched)} of {len(groups)} LoRA layers match no layer of this SD1.x model{hint} "
            f"({first_names(unmatched)}); is it a kohya-format SD1.x LoRA?"
        )
    plan = []
    misfits = []
    for name, parts in groups.items():
        module = targets[name]
        down, up = parts["down"].float(), parts["up"].float()
        if not _delta_fits(module.weight, down, up):
            misfits.append(f"{name} down {list(down.shape)} up {list(up.shape)} vs {list(module.weight.shape)}")
            continue
        rank = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        plan.append((module, down, up, scale * alpha / rank))
    if misfits:
        raise SunEdgeError(f"{source}: {len(misfits)} LoRA layers have shapes that do not fit ({first_names(misfits, 2)})")
    with torch.no_grad():
        for module, down, up, factor in plan:
            weight = module.weight
            delta = up.flatten(1) @ down.flatten(1)  # [out, r] @ [r, in*kh*kw] -> [out, in*kh*kw]
            merged = weight.float() + factor * delta.reshape(weight.shape)
            weight.copy_(merged.to(weight.dtype))
    return len(plan)
