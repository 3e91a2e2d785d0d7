"""The SUN adapter: equations against an independent implementation, layouts, fit checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers.models.attention_processor import Attention

from sun_edge.adapter import (
    SUNAdapter,
    SUNAttnProcessor,
    SUNLayer,
    cross_attention_layers,
    detect_layout,
    load_adapter,
    save_adapter,
    sd15_unet_config,
)
from sun_edge.errors import SunEdgeError
from sun_edge.unet import SUNUNet


def reference_sun_attention(x, c_pos, c_neg, w, heads, extra=False):
    """Paper eqs. 4-7 written out with explicit softmax, from raw weight matrices."""

    def attn(q, k, v):
        b, n, c = q.shape
        d = c // heads
        q = q.reshape(b, n, heads, d).permute(0, 2, 1, 3)
        k = k.reshape(b, -1, heads, d).permute(0, 2, 1, 3)
        v = v.reshape(b, -1, heads, d).permute(0, 2, 1, 3)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        return (p @ v).permute(0, 2, 1, 3).reshape(b, n, c)

    def g(z, z_ref, alpha, beta):
        out = torch.empty_like(z)
        for i in range(z.shape[0]):  # the norm is taken per sample, over tokens and channels
            out[i] = alpha * z[i] * torch.sqrt((z_ref[i] ** 2).sum()) / torch.sqrt((z[i] ** 2).sum()) + beta
        return out

    q = x @ w["q"].T
    zp = attn(q, c_pos @ w["k"].T, c_pos @ w["v"].T)
    zn = attn(q, c_neg @ w["k_neg"].T, c_neg @ w["v_neg"].T)
    z = zp - g(zn, zp, w["alpha"], w["beta"])
    if extra:
        zx = attn(q, c_pos @ w["k_x"].T, c_pos @ w["v_x"].T)
        z = z + g(zx, zp, w["alpha_x"], w["beta_x"])
    return z @ w["out"].T + w["out_b"]


@pytest.mark.parametrize("extra", [False, True])
def test_processor_matches_equations(extra):
    torch.manual_seed(0)
    hidden, cross, heads = 48, 24, 4
    attn = Attention(query_dim=hidden, cross_attention_dim=cross, heads=heads, dim_head=hidden // heads).double()
    layer = SUNLayer(hidden, cross, extra_positive=extra).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    x = torch.randn(3, 10, hidden, dtype=torch.float64)
    c_pos, c_neg = torch.randn(3, 77, cross, dtype=torch.float64), torch.randn(3, 77, cross, dtype=torch.float64) * 3
    got = SUNAttnProcessor(layer)(attn, x, torch.cat([c_pos, c_neg], dim=1))
    w = {"q": attn.to_q.weight, "k": attn.to_k.weight, "v": attn.to_v.weight, "k_neg": layer.to_k_neg.weight,
         "v_neg": layer.to_v_neg.weight, "alpha": layer.to_k_neg_alpha, "beta": layer.to_k_neg_beta,
         "out": attn.to_out[0].weight, "out_b": attn.to_out[0].bias}
    if extra:
        w.update(k_x=layer.to_k_extra_pos.weight, v_x=layer.to_v_extra_pos.weight,
                 alpha_x=layer.to_k_extra_pos_alpha, beta_x=layer.to_k_extra_pos_beta)
    want = reference_sun_attention(x, c_pos, c_neg, w, heads, extra)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # 77 tokens only: the layer's plain attention, untouched by the adapter
    plain = SUNAttnProcessor(layer)(attn, x, c_pos)
    torch.testing.assert_close(plain, attn(x, c_pos), rtol=1e-10, atol=1e-10)


def test_sd15_layer_list_and_parameter_counts():
    config = sd15_unet_config()
    layers = cross_attention_layers(config)
    assert len(layers) == 16
    assert [s.index for s in layers] == list(range(1, 32, 2))
    assert layers[0].name == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert layers[-1].name == "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert sorted({s.hidden_size for s in layers}) == [320, 640, 1280]
    with torch.device("meta"):
        plain, extra = SUNAdapter(layers), SUNAdapter(layers, extra_positive=True)
    assert plain.num_parameters() == 19_194_240  # 19.19M
    assert extra.num_parameters() == 38_388_480  # 38.39M


def test_layer_list_matches_diffusers_processor_order(tiny):
    unet = tiny["unet"]
    keys = list(unet.attn_processors)
    layers = cross_attention_layers(unet.config)
    assert len(layers) == 16
    assert [keys[s.index] for s in layers] == [f"{s.name}.processor" for s in layers]
    for s in layers:
        module = unet.get_submodule(s.name)
        assert (module.to_q.out_features, module.to_k.in_features) == (s.hidden_size, s.cross_attention_dim)


@pytest.mark.parametrize("layout", ["sun-edge", "released"])
@pytest.mark.parametrize("extra", [False, True])
def test_layout_round_trip(tmp_path, tiny, layout, extra):
    adapter = SUNAdapter.from_unet(tiny["unet"], extra_positive=extra).randomize_(5)
    dtype = torch.float16 if layout == "released" else torch.float32
    path = save_adapter(adapter, tmp_path / "a.safetensors", layout=layout, dtype=dtype)
    from safetensors.torch import load_file

    keys = list(load_file(path))
    assert detect_layout(keys) == layout
    if layout == "released":
        assert "1.to_k_neg.weight" in keys and "31.to_k_neg_alpha" in keys
        assert all(int(k.split(".")[0]) % 2 == 1 for k in keys)
    loaded = load_adapter(path, tiny["unet"].config)
    assert loaded.extra_positive == extra
    for (k, a), (k2, b) in zip(adapter.state_dict_ours().items(), loaded.state_dict_ours().items()):
        assert k == k2
        torch.testing.assert_close(b, a.to(dtype).float(), rtol=0, atol=0)


def test_batch_of_two_equals_two_batches_of_one(tiny_sun_unet):
    model = tiny_sun_unet
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([749])
    pos = torch.randn(2, 77, 32)
    neg = torch.randn(2, 77, 32) * torch.tensor([1.0, 40.0]).view(2, 1, 1)  # very different norms per sample
    with torch.no_grad():
        both = model(x, t, pos, neg)
        one = torch.cat([model(x[i : i + 1], t, pos[i : i + 1], neg[i : i + 1]) for i in range(2)])
        plain_both = model.plain(x, t, pos)
        plain_one = torch.cat([model.plain(x[i : i + 1], t, pos[i : i + 1]) for i in range(2)])
    # the only difference allowed is what the plain UNet itself shows from batching (GEMM blocking)
    tolerance = max(1e-6, 4 * (plain_both - plain_one).abs().max().item())
    assert (both - one).abs().max().item() <= tolerance
    # and the adapter does act: SUN differs from the plain UNet
    assert (both - plain_both).abs().max().item() > 1e-2


def test_exports_with_torch_export(tiny_sun_unet):
    x, t, pos, neg = torch.randn(1, 4, 8, 8), torch.tensor([999]), torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    program = torch.export.export(tiny_sun_unet, (x, t, pos, neg))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, t, pos, neg), tiny_sun_unet(x, t, pos, neg), rtol=0, atol=0)
    names = program.graph_signature.parameters
    assert sum(n.endswith(("to_k_neg.weight", "to_v_neg.weight")) for n in names) == 32
    assert sum(n.endswith(("to_k_neg_alpha", "to_k_neg_beta")) for n in names) == 32  # all of the adapter is in the graph


def test_wrong_architecture_adapter_is_one_clear_error(tmp_path, tiny):
    sd2_like = dict(tiny["unet"].config)
    sd2_like["cross_attention_dim"] = 1024
    wrong = SUNAdapter(cross_attention_layers(sd2_like)).randomize_(0)
    for layout in ("sun-edge", "released"):
        path = save_adapter(wrong, tmp_path / f"sd2-{layout}.safetensors", layout=layout)
        with pytest.raises(SunEdgeError, match=r"does not fit this UNet \(an SD2.x adapter\?\): 16 layer\(s\) differ") as e:
            load_adapter(path, tiny["unet"].config)
        assert "\n" not in str(e.value)


def test_released_adapter_with_more_layers_than_the_unet(tmp_path, tiny):
    state = SUNAdapter.from_unet(tiny["unet"]).state_dict_released()
    state["71.to_k_neg.weight"] = torch.zeros(32, 2048)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "x.safetensors")
    with pytest.raises(SunEdgeError, match="processor indices 71"):
        load_adapter(tmp_path / "x.safetensors", tiny["unet"].config)


def test_sun_unet_refuses_adapter_for_another_unet(tiny):
    other = dict(tiny["unet"].config)
    other["block_out_channels"] = [64, 64, 128, 128]
    adapter = SUNAdapter(cross_attention_layers(other))
    with pytest.raises(SunEdgeError, match="layer\\(s\\) differ"):
        SUNUNet(tiny["unet"], adapter)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all" * 10])
def test_corrupt_adapter_file(tmp_path, tiny, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(SunEdgeError, match="bad.safetensors"):
        load_adapter(path, tiny["unet"].config)


def test_truncated_adapter_file(tmp_path, tiny):
    path = save_adapter(SUNAdapter.from_unet(tiny["unet"]), tmp_path / "a.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SunEdgeError, match="a.safetensors"):
        load_adapter(path, tiny["unet"].config)


def test_not_an_adapter(tmp_path, tiny):
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(2, 2)}, tmp_path / "ckpt.safetensors")
    with pytest.raises(SunEdgeError, match="not a SUN adapter parameter"):
        load_adapter(tmp_path / "ckpt.safetensors", tiny["unet"].config)


def test_save_is_atomic_on_failure(tmp_path, tiny, monkeypatch):
    adapter = SUNAdapter.from_unet(tiny["unet"])
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(SunEdgeError, match=r"^cannot write .*a\.safetensors: disk full"):  # one line, not OSError
        save_adapter(adapter, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [False, True])
def test_fused_attention_equals_separate_calls(tiny, extra, monkeypatch):
    """One attention call over the stacked key/value sets (issue 15) computes what separate calls do."""
    unet = copy.deepcopy(tiny["unet"])
    model = SUNUNet(unet, SUNAdapter.from_unet(unet, extra_positive=extra).randomize_(5)).eval()
    torch.manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([499])
    pos, neg = torch.randn(2, 77, 32), torch.randn(2, 77, 32) * 3
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        fused = model(x, t, pos, neg)
        fused_calls, calls[:] = len(calls), []
        monkeypatch.setattr(SUNAttnProcessor, "fused", False)
        separate = model(x, t, pos, neg)
    assert fused_calls < len(calls)  # fewer attention kernels: one per SUN layer instead of 2 (3 with extra)
    scale = separate.abs().max().item()
    assert (fused - separate).abs().max().item() <= 1e-5 * scale
