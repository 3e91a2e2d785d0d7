"""Merging kohya-format LoRA files: the arithmetic, both UNet naming layouts, and refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sun_edge.errors import SunEdgeError
from sun_edge.lora import lora_targets, merge_lora
from sun_edge.models import CONFIG_DIR, load_model
from sun_edge.weights import sha256_file, write_safetensors_atomic
from ldm_layout import unet_key_to_ldm

LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
CONV = "down_blocks.0.resnets.0.conv1"
TEXT = "encoder.layers.1.self_attn.q_proj"
LINEAR_LORA = "lora_unet_" + LINEAR.replace(".", "_")
NOWHERE = "lora_unet_down_blocks_9_conv"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SUN_EDGE_HOME", str(tmp_path / "home"))


@pytest.fixture()
def models(tiny):
    """Private copies of the tiny UNet and text encoder (merging mutates them)."""
    return copy.deepcopy(tiny["unet"]), copy.deepcopy(tiny["text_encoder"])


def text_module(text_encoder, name: str):
    return text_encoder.get_submodule(name if hasattr(text_encoder, "embeddings") else f"text_model.{name}")


def layer(down: torch.Tensor, up: torch.Tensor, alpha: float | None, name: str) -> dict[str, torch.Tensor]:
    out = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    if alpha is not None:
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def snapshot(*modules) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message


def test_merge_matches_hand_computation(models):
    unet, text_encoder = models
    g = torch.Generator().manual_seed(7)
    linear, conv = unet.get_submodule(LINEAR), unet.get_submodule(CONV)
    q_proj = text_module(text_encoder, TEXT)
    lin_down, lin_up = torch.randn(4, linear.in_features, generator=g), torch.randn(linear.out_features, 4, generator=g)
    conv_down = torch.randn(2, conv.in_channels, 3, 3, generator=g)  # [r, in, 3, 3]
    conv_up = torch.randn(conv.out_channels, 2, 1, 1, generator=g)  # [out, r, 1, 1]
    te_down, te_up = torch.randn(8, q_proj.in_features, generator=g), torch.randn(q_proj.out_features, 8, generator=g)
    lora = {
        **layer(lin_down, lin_up, 2.0, "lora_unet_" + LINEAR.replace(".", "_")),
        **layer(conv_down.half(), conv_up.half(), 5.0, "lora_unet_" + CONV.replace(".", "_")),
        **layer(te_down, te_up, None, "lora_te_text_model_" + TEXT.replace(".", "_")),  # alpha = rank
    }
    before_unet, before_te = snapshot(unet, text_encoder)

    assert merge_lora(unet, text_encoder, lora, 0.7) == 3

    # W += scale * alpha / rank * up @ down, written out element-wise for the conv.
    expected_linear = before_unet[f"{LINEAR}.weight"] + 0.7 * (2.0 / 4) * lin_up @ lin_down
    c_down, c_up = conv_down.half().float(), conv_up.half().float()[:, :, 0, 0]
    conv_delta = torch.einsum("or,rikl->oikl", c_up, c_down)
    expected_conv = before_unet[f"{CONV}.weight"] + 0.7 * (5.0 / 2) * conv_delta
    expected_q = before_te[f"{TEXT}.weight" if f"{TEXT}.weight" in before_te else f"text_model.{TEXT}.weight"]
    expected_q = expected_q + 0.7 * 1.0 * te_up @ te_down
    torch.testing.assert_close(linear.weight, expected_linear, rtol=0, atol=1e-5)
    torch.testing.assert_close(conv.weight, expected_conv, rtol=0, atol=1e-5)
    torch.testing.assert_close(q_proj.weight, expected_q, rtol=0, atol=1e-5)
    changed = {f"{LINEAR}.weight", f"{CONV}.weight"}
    after = unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before_unet.items() if k not in changed)


def test_ldm_names_reach_the_same_layers_as_diffusers_names(models, tiny):
    """A LoRA over every UNet Linear/Conv2d, once with LDM names and once with diffusers names."""
    by_ldm, _ = models
    by_diffusers, text_encoder = copy.deepcopy(tiny["unet"]), tiny["text_encoder"]
    g = torch.Generator().manual_seed(3)
    ldm_lora, diffusers_lora = {}, {}
    for name, module in by_ldm.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        weight = module.weight
        down = torch.randn(1, *weight.shape[1:], generator=g)  # [1, in(, kh, kw)]
        up = torch.randn(weight.shape[0], 1, *([1, 1] if weight.ndim == 4 else []), generator=g)
        ldm_name = unet_key_to_ldm(f"{name}.weight", by_ldm).removesuffix(".weight")
        ldm_lora.update(layer(down, up, 1.0, "lora_unet_" + ldm_name.replace(".", "_")))
        diffusers_lora.update(layer(down, up, 1.0, "lora_unet_" + name.replace(".", "_")))
    assert any("input_blocks" in k for k in ldm_lora) and any("output_blocks" in k for k in ldm_lora)
    n = merge_lora(by_ldm, text_encoder, ldm_lora, 0.5)
    assert n == merge_lora(by_diffusers, text_encoder, diffusers_lora, 0.5) == len(ldm_lora) // 3
    a, b = by_ldm.state_dict(), by_diffusers.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_size_sd15_names_are_unambiguous():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config = json.loads((CONFIG_DIR / "unet" / "config.json").read_text())
    text_config = json.loads((CONFIG_DIR / "text_encoder" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(text_config))
    targets, ambiguous = lora_targets(unet, text_encoder)
    assert not ambiguous
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in targets
    assert targets["lora_unet_output_blocks_2_1_conv"] is unet.up_blocks[0].upsamplers[0].conv
    assert targets["lora_unet_output_blocks_5_2_conv"] is unet.up_blocks[1].upsamplers[0].conv
    assert targets["lora_unet_middle_block_1_proj_in"] is unet.mid_block.attentions[0].proj_in
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in targets


def test_load_model_merges_lora_files(tiny, tmp_path):
    from sun_edge.tiny import write_diffusers_folder

    write_diffusers_folder(tiny, tmp_path / "tiny")
    g = torch.Generator().manual_seed(5)
    unet_name, text_name = "lora_unet_" + LINEAR.replace(".", "_"), "lora_te_text_model_" + TEXT.replace(".", "_")
    lora = {
        **layer(torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 8.0, unet_name),
        **layer(torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), None, text_name),
    }
    write_safetensors_atomic(lora, tmp_path / "style.safetensors")
    model = load_model(str(tmp_path / "tiny"), loras=[(tmp_path / "style.safetensors", 0.5)])
    unet, text_encoder = copy.deepcopy(tiny["unet"]), copy.deepcopy(tiny["text_encoder"])
    merge_lora(unet, text_encoder, lora, 0.5)
    assert torch.equal(model.unet.get_submodule(LINEAR).weight, unet.get_submodule(LINEAR).weight)
    assert torch.equal(text_module(model.text_encoder, TEXT).weight, text_module(text_encoder, TEXT).weight)
    assert model.loras == (("style.safetensors", 0.5, sha256_file(tmp_path / "style.safetensors")),)

    bad = layer(torch.zeros(1, 32), torch.zeros(32, 1), None, "lora_unet_not_a_layer")
    write_safetensors_atomic(bad, tmp_path / "bad.safetensors")
    with pytest.raises(SunEdgeError) as excinfo:
        load_model(str(tmp_path / "tiny"), loras=[(tmp_path / "bad.safetensors", 1.0)])
    assert one_line_error(excinfo).startswith("bad.safetensors: 1 of 1 LoRA layers match no layer")
    with pytest.raises(SunEdgeError) as excinfo:
        load_model(str(tmp_path / "tiny"), loras=[(tmp_path / "typo.safetensors", 1.0)])
    assert one_line_error(excinfo) == f"LoRA file {tmp_path / 'typo.safetensors'} does not exist"


@pytest.mark.parametrize(
    ("lora", "expected"),
    [
        ({f"{NOWHERE}.lora_down.weight": (1, 32), f"{NOWHERE}.lora_up.weight": (32, 1)}, "match no layer"),
        ({f"{LINEAR_LORA}.lora_down.weight": (4, 77), f"{LINEAR_LORA}.lora_up.weight": (32, 4)}, "shapes that do not fit"),
        ({f"{LINEAR_LORA}.lora_down.weight": (4, 32), f"{LINEAR_LORA}.lora_up.weight": (32, 4, 3, 3)}, "not fit"),
        ({f"{LINEAR_LORA}.lora_down.weight": (4, 32, 3, 3)}, "without both lora_down and lora_up"),
        ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 32)}, "diffusers/PEFT-format"),
        ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 768)}, "SDXL LoRA"),
        ({"lora_unet_conv_in.hada_w1_a": (4, 4)}, "LoHa/LoKr"),
        ({"lora_unet_conv_in.weird": (4,)}, "not lora_down/lora_up/alpha"),
        ({}, "holds no LoRA layers"),
    ],
)
def test_bad_lora_is_refused_and_changes_nothing(models, lora, expected):
    unet, text_encoder = models
    state = {key: torch.ones(shape) for key, shape in lora.items()}
    # A valid layer (linear-style LoRA on a 1x1 conv) that must not be merged either.
    good = layer(torch.ones(1, 32), torch.ones(32, 1), None, "lora_unet_down_blocks_0_attentions_0_proj_in")
    assert merge_lora(copy.deepcopy(unet), text_encoder, good, 1.0) == 1
    if state:
        state.update(good)
    before = snapshot(unet, text_encoder)
    with pytest.raises(SunEdgeError) as excinfo:
        merge_lora(unet, text_encoder, state, 1.0, source="bad.safetensors")
    message = one_line_error(excinfo)
    assert expected in message and message.startswith("bad.safetensors")
    assert all(torch.equal(v, before[0][k]) for k, v in unet.state_dict().items())
    assert all(torch.equal(v, before[1][k]) for k, v in text_encoder.state_dict().items())
