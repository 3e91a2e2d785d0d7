"""The SpeedUpNet (SUN) adapter: negative-prompt attention subtracted inside cross-attention.

For every cross-attention layer of the UNet (paper eqs. 4-7), with ``Q`` from the layer's own
``to_q``::

    Zp   = Attn(Q, to_k(c_pos), to_v(c_pos))              # the layer's own weights
    Zn   = Attn(Q, to_k_neg(c_neg), to_v_neg(c_neg))      # adapter weights, no bias
    g(Z) = alpha * Z * ||Zp|| / ||Z|| + beta              # alpha, beta: [hidden]
    out  = to_out(Zp - g(Zn) [+ g_extra(Zx)])

``||.||`` is the L2 norm over all tokens and channels of one sample, so no value depends on
other items of the batch. The optional extra-positive branch (used by the released SD1.5
adapter) attends ``c_pos`` through its own ``to_k_extra_pos``/``to_v_extra_pos`` and is added
with its own alpha and beta.

Two file layouts are read, detected from the keys:

- ours: ``<processor name>.to_k_neg.weight`` etc., e.g.
  ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k_neg.weight``;
- released: keys index ``ModuleList(unet.attn_processors.values())``, so SD1.5's 16
  cross-attention layers sit at odd indices 1..31 (``1.to_k_neg.weight``, ...), stored in fp16.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sun_edge.errors import SunEdgeError

TEXT_TOKENS = 77
FORMAT_NAME = "sun-edge-adapter"
FORMAT_VERSION = "1"
PARAM_NAMES = ("to_k_neg.weight", "to_v_neg.weight", "to_k_neg_alpha", "to_k_neg_beta")
EXTRA_PARAM_NAMES = ("to_k_extra_pos.weight", "to_v_extra_pos.weight", "to_k_extra_pos_alpha", "to_k_extra_pos_beta")
Layout = Literal["sun-edge", "released"]


@dataclass(frozen=True)
class CrossAttnLayer:
    """One cross-attention layer of a UNet, as the adapter sees it."""

    name: str  # processor name without ".processor", e.g. "mid_block.attentions.0.transformer_blocks.0.attn2"
    index: int  # position in unet.attn_processors (the released layout's key)
    hidden_size: int  # query width of the layer (to_q out features)
    cross_attention_dim: int  # text embedding width (to_k in features)


def cross_attention_layers(config: Mapping[str, Any]) -> list[CrossAttnLayer]:
    """List the cross-attention layers of a ``UNet2DConditionModel`` config, in processor order.

    diffusers orders processors down_blocks, up_blocks, mid_block, and within a transformer
    block attn1 (self) before attn2 (cross). Widths come from ``block_out_channels``.
    """
    channels = list(config["block_out_channels"])
    n_blocks = len(channels)
    per_block = config.get("transformer_layers_per_block", 1)
    per_block = list(per_block) if isinstance(per_block, (list, tuple)) else [per_block] * n_blocks
    cross = config["cross_attention_dim"]
    cross = list(cross) if isinstance(cross, (list, tuple)) else [cross] * n_blocks
    layers_per_block = config["layers_per_block"]
    layers_per_block = layers_per_block if isinstance(layers_per_block, int) else layers_per_block[0]

    # (prefix, n_attentions, n_transformer_layers, hidden, cross_dim) per attention-carrying block
    groups: list[tuple[str, int, int, int, int]] = []
    for i, kind in enumerate(config["down_block_types"]):
        if "CrossAttn" in kind:
            groups.append((f"down_blocks.{i}", layers_per_block, per_block[i], channels[i], cross[i]))
    rev = list(reversed(range(n_blocks)))
    for i, kind in enumerate(config["up_block_types"]):
        if "CrossAttn" in kind:
            j = rev[i]
            groups.append((f"up_blocks.{i}", layers_per_block + 1, per_block[j], channels[j], cross[j]))
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type is not None and "CrossAttn" in mid_type:
        groups.append(("mid_block", 1, per_block[-1], channels[-1], cross[-1]))

    layers: list[CrossAttnLayer] = []
    index = 0
    for prefix, n_attn, n_tf, hidden, cross_dim in groups:
        for a in range(n_attn):
            for t in range(n_tf):
                name = f"{prefix}.attentions.{a}.transformer_blocks.{t}"
                index += 1  # attn1 (self-attention) takes the even slot
                layers.append(CrossAttnLayer(f"{name}.attn2", index, hidden, cross_dim))
                index += 1
    return layers


class SUNLayer(nn.Module):
    """The adapter's weights for one cross-attention layer (names as in the released file)."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, extra_positive: bool = False) -> None:
        super().__init__()
        self.to_k_neg = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_neg = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_k_neg_alpha = nn.Parameter(torch.ones(hidden_size))
        self.to_k_neg_beta = nn.Parameter(torch.zeros(hidden_size))
        self.extra_positive = extra_positive
        if extra_positive:
            self.to_k_extra_pos = nn.Linear(cross_attention_dim, hidden_size, bias=False)
            self.to_v_extra_pos = nn.Linear(cross_attention_dim, hidden_size, bias=False)
            self.to_k_extra_pos_alpha = nn.Parameter(torch.ones(hidden_size))
            self.to_k_extra_pos_beta = nn.Parameter(torch.zeros(hidden_size))


def attention_normalization(z: torch.Tensor, z_ref: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Paper eq. 7: ``g(z) = alpha * z * ||z_ref|| / ||z|| + beta``, norms per sample.

    z, z_ref: [B, N, C]; alpha, beta: [C]. The ratio is computed in at least float32, so
    fp16 graphs keep it out of half precision (a sum of squares over N*C elements overflows).
    """
    wide = torch.promote_types(z.dtype, torch.float32)
    ratio = z_ref.to(wide).flatten(1).norm(dim=1) / z.to(wide).flatten(1).norm(dim=1)  # [B]
    return alpha * (z * ratio.to(z.dtype)[:, None, None]) + beta  # [B, N, C]


def _attend(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Multi-head scaled dot-product attention with the layer's head count: [B,N,C] -> [B,N,C]."""
    batch, _, inner = query.shape
    head_dim = inner // attn.heads
    q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, N, d]
    k = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, T, d]
    v = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, T, d]
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # [B, H, N, d]
    return out.transpose(1, 2).reshape(batch, -1, inner)  # [B, N, C]


def _attend_stacked(attn: Any, query: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """``Attn(Q, K_i, V_i)`` for m key/value sets in ONE attention call: eqs. 4-5 share ``Q``, so the sets
    become extra heads ([B, mH, ...]); each head attends only its own keys, so every output equals its
    separate call up to float rounding. query [B,N,C], keys/values [B,T,C] -> m x [B,N,C]."""
    batch, tokens, inner = query.shape
    heads, m = attn.heads, len(pairs)
    head_dim = inner // heads
    q = query.view(batch, tokens, heads, head_dim).transpose(1, 2).repeat(1, m, 1, 1)  # [B, mH, N, d]
    k = torch.cat([key.view(batch, -1, heads, head_dim).transpose(1, 2) for key, _ in pairs], dim=1)  # [B, mH, T, d]
    v = torch.cat([value.view(batch, -1, heads, head_dim).transpose(1, 2) for _, value in pairs], dim=1)  # [B, mH, T, d]
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # [B, mH, N, d]
    return [o.transpose(1, 2).reshape(batch, tokens, inner) for o in out.chunk(m, dim=1)]  # m x [B, N, C]


class SUNAttnProcessor:
    """diffusers attention processor for one cross-attention layer with the SUN adapter.

    ``encoder_hidden_states`` carries the positive and negative embeddings concatenated along
    the tokens ([B, 2*77, D], positive first), so the UNet's own call signature is unchanged.
    Given only 77 tokens it computes the layer's plain attention (the CFG baseline). The
    processor is a plain object: its weights belong to the ``SUNAdapter`` that made it.
    ``attend`` is the multi-head attention kernel ([B,N,C] query, [B,T,C] key and value ->
    [B,N,C]); exporters substitute a layout of their own (Core ML's split einsum) in a subclass.
    With ``fused`` (the default) the SUN branches share one attention call over their stacked
    key/value sets (``_attend_stacked``); a subclass with its own ``attend`` sets it False.
    """

    attend = staticmethod(_attend)
    fused = True

    def __init__(self, layer: SUNLayer, num_tokens: int = TEXT_TOKENS) -> None:
        self.layer = layer
        self.num_tokens = num_tokens

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is None or attention_mask is not None:
            raise SunEdgeError("SUN processors are for cross-attention without masks")
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)  # [B, N, C]

        tokens = encoder_hidden_states.shape[1]
        if tokens not in (self.num_tokens, 2 * self.num_tokens):
            raise SunEdgeError(f"SUN attention expects {self.num_tokens} or {2 * self.num_tokens} text tokens, got {tokens}")
        c_pos = encoder_hidden_states[:, : self.num_tokens]  # [B, 77, D]
        query = attn.to_q(hidden_states)  # [B, N, C]
        pairs = [(attn.to_k(c_pos), attn.to_v(c_pos))]  # Zp's keys and values: [B, 77, C] each
        if tokens == 2 * self.num_tokens:
            layer = self.layer
            c_neg = encoder_hidden_states[:, self.num_tokens :]  # [B, 77, D]
            pairs.append((layer.to_k_neg(c_neg), layer.to_v_neg(c_neg)))
            if layer.extra_positive:
                pairs.append((layer.to_k_extra_pos(c_pos), layer.to_v_extra_pos(c_pos)))
        if self.fused and len(pairs) > 1:
            zs = _attend_stacked(attn, query, pairs)  # Zp, Zn[, Z_extra]: [B, N, C] each
        else:
            zs = [self.attend(attn, query, key, value) for key, value in pairs]
        z = zs[0]
        if len(zs) > 1:
            out = z - attention_normalization(zs[1], z, layer.to_k_neg_alpha, layer.to_k_neg_beta)
            if layer.extra_positive:
                out = out + attention_normalization(zs[2], z, layer.to_k_extra_pos_alpha, layer.to_k_extra_pos_beta)
            z = out

        hidden_states = attn.to_out[1](attn.to_out[0](z))  # [B, N, C_out]
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class SUNAdapter(nn.Module):
    """The adapter's weights for every cross-attention layer of one UNet architecture."""

    def __init__(self, layers: list[CrossAttnLayer], extra_positive: bool = False) -> None:
        super().__init__()
        self.specs = list(layers)
        self.extra_positive = extra_positive
        self.layers = nn.ModuleList(SUNLayer(s.hidden_size, s.cross_attention_dim, extra_positive) for s in layers)

    @classmethod
    def from_unet(cls, unet: nn.Module, extra_positive: bool = False) -> "SUNAdapter":
        """A freshly initialised adapter for ``unet`` (alpha 1, beta 0, default Linear init)."""
        return cls(cross_attention_layers(unet.config), extra_positive)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def processors(self) -> dict[str, SUNAttnProcessor]:
        """Processors keyed as ``unet.attn_processors`` keys them."""
        return {f"{s.name}.processor": SUNAttnProcessor(layer) for s, layer in zip(self.specs, self.layers)}

    def state_dict_ours(self) -> dict[str, torch.Tensor]:
        """Weights keyed by layer name (our file layout)."""
        return {f"{s.name}.{k}": v for s, layer in zip(self.specs, self.layers) for k, v in layer.state_dict().items()}

    def state_dict_released(self) -> dict[str, torch.Tensor]:
        """Weights keyed by processor index (the released file layout)."""
        return {f"{s.index}.{k}": v for s, layer in zip(self.specs, self.layers) for k, v in layer.state_dict().items()}

    def check_fits(self, config: Mapping[str, Any]) -> None:
        """Raise one SunEdgeError listing what differs if this adapter does not fit a UNet config."""
        check_layers(self.specs, cross_attention_layers(config), "adapter")

    @torch.no_grad()
    def randomize_(self, seed: int, scale: float = 0.5) -> "SUNAdapter":
        """Fill with seeded random weights (for tiny test models: makes the adapter's effect visible)."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("alpha"):
                p.copy_(scale + 0.1 * noise)
            elif name.endswith("beta"):
                p.copy_(0.01 * noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)
        return self


def _hint(cross_dims: set[int]) -> str:
    known = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
    names = sorted(known[d] for d in cross_dims if d in known)
    return f" (an {'/'.join(names)} adapter?)" if names else ""


def check_layers(have: list[CrossAttnLayer], want: list[CrossAttnLayer], what: str) -> None:
    """Compare layer lists by name and widths; raise one line naming the differences."""
    have_by, want_by = {s.name: s for s in have}, {s.name: s for s in want}
    problems: list[str] = []
    for name in want_by.keys() - have_by.keys():
        problems.append(f"missing {name}")
    for name in have_by.keys() - want_by.keys():
        problems.append(f"unexpected {name}")
    for name in want_by.keys() & have_by.keys():
        h, w = have_by[name], want_by[name]
        if (h.cross_attention_dim, h.hidden_size) != (w.cross_attention_dim, w.hidden_size):
            problems.append(f"{name}: {what} maps {h.cross_attention_dim}->{h.hidden_size}, "
                            f"UNet needs {w.cross_attention_dim}->{w.hidden_size}")
    if problems:
        problems.sort()
        hint = _hint({h.cross_attention_dim for h in have} - {w.cross_attention_dim for w in want})
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise SunEdgeError(f"{what} does not fit this UNet{hint}: {len(problems)} layer(s) differ: {shown}")


_RELEASED_KEY = re.compile(r"^(\d+)\.(.+)$")


def detect_layout(keys: list[str]) -> Layout:
    """``released`` if every key starts with a processor index, ``sun-edge`` otherwise."""
    return "released" if keys and all(_RELEASED_KEY.match(k) for k in keys) else "sun-edge"


def _split_key(key: str, layout: Layout) -> tuple[str, str]:
    """``"1.to_k_neg.weight"`` -> ``("1", "to_k_neg.weight")``; ours split at the parameter name."""
    if layout == "released":
        layer_key, _, param = key.partition(".")
        return layer_key, param
    for param in PARAM_NAMES + EXTRA_PARAM_NAMES:
        if key.endswith("." + param):
            return key[: -len(param) - 1], param
    raise SunEdgeError(f"adapter key {key!r} is not a SUN adapter parameter; is this a SUN adapter file?")


def adapter_from_state_dict(state: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]) -> SUNAdapter:
    """Build an adapter from weights in either layout, checking every key and shape against the UNet."""
    keys = list(state)
    if not keys:
        raise SunEdgeError("adapter file holds no tensors")
    layout = detect_layout(keys)
    want = cross_attention_layers(unet_config)
    # group the file's keys by layer: {layer key: {param name: tensor}}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        layer_key, param = _split_key(k, layout)
        groups.setdefault(layer_key, {})[param] = v
    by_key = {str(s.index) if layout == "released" else s.name: s for s in want}
    unknown = sorted(set(groups) - set(by_key), key=lambda s: (len(s), s))
    extra_positive = any("to_k_extra_pos.weight" in g for g in groups.values())
    have: list[CrossAttnLayer] = []
    for key, params in groups.items():
        k_neg = params.get("to_k_neg.weight")
        if k_neg is None or k_neg.ndim != 2:
            raise SunEdgeError(f"adapter layer {key} has no 2-D to_k_neg.weight; is this a SUN adapter file?")
        name = by_key[key].name if key in by_key else f"<layer {key}>"
        have.append(CrossAttnLayer(name, by_key[key].index if key in by_key else -1, k_neg.shape[0], k_neg.shape[1]))
    if unknown and layout == "released":
        raise SunEdgeError(f"adapter does not fit this UNet{_hint({h.cross_attention_dim for h in have})}: "
                           f"it has layers at processor indices {', '.join(unknown[:5])} that the UNet lacks "
                           f"({len(groups)} layers in the file, {len(want)} in the UNet)")
    check_layers(have, want, "adapter")

    adapter = SUNAdapter(want, extra_positive)
    expected = set(PARAM_NAMES) | (set(EXTRA_PARAM_NAMES) if extra_positive else set())
    for spec, layer in zip(adapter.specs, adapter.layers):
        params = groups[str(spec.index) if layout == "released" else spec.name]
        if set(params) != expected:
            missing, unexpected = sorted(expected - set(params)), sorted(set(params) - expected)
            raise SunEdgeError(f"adapter layer {spec.name}: missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}")
        own = layer.state_dict()
        for p, tensor in params.items():
            if tuple(tensor.shape) != tuple(own[p].shape):
                raise SunEdgeError(f"adapter layer {spec.name}: {p} has shape {tuple(tensor.shape)}, expected {tuple(own[p].shape)}")
        layer.load_state_dict({p: t.float() for p, t in params.items()})
    return adapter


def sd15_unet_config() -> dict[str, Any]:
    """The bundled SD1.5 UNet config (the released adapter's architecture)."""
    from sun_edge.checkpoint import read_config

    return read_config("unet")


BUNDLED_ADAPTER_FILE = "sun-adapter.safetensors"


def find_adapter(adapter: str | Path | None, model_path: Path) -> Path | None:
    """The adapter file to use: an explicit path (which must exist), else one shipped in the model's folder."""
    if adapter is not None:
        path = Path(adapter).expanduser()
        if not path.is_file():
            raise SunEdgeError(f"adapter file {path} does not exist", fix="adapter")
        return path
    shipped = Path(model_path) / BUNDLED_ADAPTER_FILE
    return shipped if shipped.is_file() else None


def load_adapter(path: Path | str, unet_config: Mapping[str, Any] | None = None) -> SUNAdapter:
    """Read an adapter (either layout, detected from the keys) for a UNet config (default: SD1.5)."""
    from sun_edge.weights import read_metadata, read_state_dict

    path = Path(path)
    if path.suffix != ".safetensors":
        raise SunEdgeError(f"adapter {path.name}: expected a .safetensors file")
    meta = read_metadata(path)  # the released adapter has none; ours say format and format_version
    if meta.get("format") == FORMAT_NAME and meta.get("format_version") != FORMAT_VERSION:
        raise SunEdgeError(f"adapter {path.name} has format version {meta.get('format_version')!r}, and this sun-edge "
                           f"reads version {FORMAT_VERSION}: upgrade sun-edge, or use an adapter saved by this version")
    state = read_state_dict(path)
    if bad := [key for key, t in state.items() if t.is_floating_point() and not bool(t.isfinite().all())]:
        raise SunEdgeError(f"adapter {path.name} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s), first "
                           f"{bad[0]}; the file is damaged or came from a diverged training run")
    return adapter_from_state_dict(state, unet_config if unet_config is not None else sd15_unet_config())


def save_adapter(adapter: SUNAdapter, path: Path | str, layout: Layout = "sun-edge",
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write the adapter as safetensors, atomically; ``released`` writes the released layout."""
    from sun_edge.weights import write_safetensors_atomic

    state = adapter.state_dict_ours() if layout == "sun-edge" else adapter.state_dict_released()
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "layout": layout,
                "extra_positive": str(adapter.extra_positive).lower(), "layers": str(len(adapter.specs))}
    write_safetensors_atomic(tensors, Path(path), metadata=metadata)
    return Path(path)
