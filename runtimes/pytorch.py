"""The PyTorch reference runtime: the runtime protocol over diffusers modules and ``SUNUNet``.

Every export is checked against this runtime, so it does nothing clever: float32 (or a chosen
dtype) on one device, NumPy in and out, inputs checked like every other runtime's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from sun_edge.adapter import SUNAdapter, find_adapter, load_adapter
from sun_edge.errors import SunEdgeError
from sun_edge.runtimes import check_input
from sun_edge.runtimes.torch_speed import Optimize, check_optimize, optimized
from sun_edge.unet import SUNUNet

Precision = Literal["fp32", "fp16", "bf16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_device(device: str) -> None:
    """Raise one line unless ``device`` names a torch device this machine has (before anything loads)."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise SunEdgeError(f"unknown torch device {device!r}; use e.g. cpu, cuda, cuda:1, mps") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise SunEdgeError(f"device {device} needs CUDA, and this PyTorch {torch.__version__} sees no CUDA GPU; use cpu")
    if kind == "cuda" and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise SunEdgeError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise SunEdgeError(f"device {device} needs Apple's Metal (macOS on Apple silicon); use cpu")


@dataclass
class TorchRuntime:
    """Runtime protocol over PyTorch modules. ``adapter`` None means CFG-only (no ``unet``)."""

    unet_module: nn.Module
    text_encoder: nn.Module
    vae: nn.Module
    adapter: SUNAdapter | None = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    info: dict[str, Any] = field(default_factory=dict)
    name: str = "pytorch"
    tiny_decoder: nn.Module | None = None  # TAESD (sun_edge.taesd.TinyDecoder): ``decode`` uses it when set
    optimize: Optimize = "none"  # UNet calls: eager, CUDA graphs and/or torch.compile (runtimes/torch_speed.py)
    controlnet_module: nn.Module | None = None  # diffusers ControlNetModel (sun_edge.controlnet): ``controlnet`` uses it
    hold_one_graph: bool = False  # the protocol's flag; the modules stay loaded whatever it says (``release``)

    def __post_init__(self) -> None:
        self.sun_unet = SUNUNet(self.unet_module, self.adapter) if self.adapter is not None else None
        for module in (self.unet_module, self.text_encoder, self.vae, self.adapter, self.tiny_decoder,
                       self.controlnet_module):
            if module is not None:
                if next(module.parameters()).dtype != self.dtype:
                    module.to(dtype=self.dtype)
                module.to(self.device).eval().requires_grad_(False)
        self._sun_call = optimized(self.sun_unet, self.optimize, self.device) if self.sun_unet is not None else None
        self._plain_call = optimized(self.sun_unet.plain if self.sun_unet is not None else self._plain, self.optimize,
                                     self.device)
        if self.optimize != "none":
            self.info["optimize"] = self.optimize
        self.text_dim = int(self.text_encoder.config.hidden_size)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.unet_in_channels = int(self.unet_module.config.in_channels)  # 9: an inpainting UNet (latents, mask, masked image)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.text_tokens = int(self.text_encoder.config.max_position_embeddings)
        if self.tiny_decoder is not None:
            got = (self.tiny_decoder.latent_channels, self.tiny_decoder.scale_factor)
            if got != (self.latent_channels, self.vae_scale_factor):
                raise SunEdgeError(f"TAESD decoder {self.tiny_decoder.source} takes {got[0]} latent channels and upsamples "
                                   f"{got[1]}x; this model's VAE has {self.latent_channels} and {self.vae_scale_factor}x")

    @classmethod
    def load(cls, model: str, adapter: str | Path | None = None, *, loras: tuple[tuple[Path, float], ...] = (),
             allow_pickle: bool = False, device: str = "cpu", precision: Precision = "fp32",
             vae_decoder: str | None = None, optimize: Optimize = "none",
             controlnet: str | Path | None = None) -> "TorchRuntime":
        """Load a model (registry name or path) and an adapter file (default: one shipped beside the model).

        ``vae_decoder``: ``"full"`` (or None) decodes with the model's VAE; ``"tiny:PATH"`` with a TAESD
        decoder (``sun_edge.taesd``), the full VAE staying available as ``decode_full``. ``optimize``:
        how UNet calls run (``sun_edge.runtimes.torch_speed``), checked before anything loads.
        ``controlnet``: a ControlNet file or diffusers folder (``sun_edge.controlnet``), checked against the UNet.
        """
        check_optimize(optimize, device)
        check_device(device)
        from sun_edge.models import load_model
        from sun_edge.taesd import load_tiny_decoder, parse_vae_decoder
        from sun_edge.weights import sha256_file

        tiny_path = parse_vae_decoder(vae_decoder)
        tiny = load_tiny_decoder(tiny_path) if tiny_path is not None else None  # before the (slower) model
        loaded = load_model(model, loras=loras, allow_pickle=allow_pickle)
        info: dict[str, Any] = {"model": loaded.name, "model_sha256": loaded.sha256}
        sun_adapter = None
        adapter_path = find_adapter(adapter, loaded.path)
        if adapter_path is not None:
            sun_adapter = load_adapter(adapter_path, loaded.unet.config)
            info.update(adapter=adapter_path.name, adapter_sha256=sha256_file(adapter_path),
                        adapter_parameters=sun_adapter.num_parameters())
        if loras:
            info["loras"] = [f"{Path(p).name}:{s:g}" for p, s in loras]
        if tiny_path is not None:
            info["vae_decoder"] = f"tiny:{tiny_path.name}"
        control = None
        if controlnet is not None:
            from sun_edge.controlnet import load_controlnet
            from sun_edge.models import resolve_controlnet

            control_path = resolve_controlnet(str(controlnet))  # a path, or a shipped name (pocket-silhouette)
            control = load_controlnet(control_path, dict(loaded.unet.config), allow_pickle=allow_pickle)
            info.update(controlnet=control_path.name, controlnet_sha256=sha256_file(Path(control.weights_file)),
                        controlnet_path=str(control_path))
        return cls(loaded.unet, loaded.text_encoder, loaded.vae, sun_adapter, device, DTYPES[precision], info,
                   tiny_decoder=tiny, optimize=optimize, controlnet_module=control)

    max_batch = 1 << 16  # any batch: memory is the limit

    def has(self, component: str) -> bool:
        """Whether this runtime computes ``component``: the SUN UNet needs an adapter, TAESD a tiny decoder."""
        if component == "unet":
            return self.sun_unet is not None
        if component == "vae_decoder_tiny":
            return self.tiny_decoder is not None
        if component == "controlnet":
            return self.controlnet_module is not None
        return component in ("text_encoder", "unet_plain", "vae_decoder", "vae_encoder")

    def release(self, component: str) -> None:
        """Nothing to free: the reference keeps its modules loaded."""

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, self.dtype)

    def _latents(self, what: str, latents: np.ndarray, channels: int | None = None) -> np.ndarray:
        return check_input(what, latents, (None, channels or self.latent_channels, None, None), np.float32)

    def _timestep(self, t: np.ndarray | float | int) -> torch.Tensor:
        return torch.as_tensor(np.asarray(t, dtype=np.float32).reshape(-1)[:1], device=self.device)  # [1]

    @torch.no_grad()
    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [B,77] int64 -> last hidden state [B,77,D] float32."""
        check_input("input_ids", ids, (None, self.text_tokens), np.int64)
        ids_t = torch.from_numpy(ids).to(self.device)
        return self.text_encoder(ids_t, return_dict=False)[0].float().cpu().numpy()  # [B, 77, D]

    @torch.no_grad()
    def unet(self, latents: np.ndarray, t: np.ndarray | float, pos: np.ndarray, neg: np.ndarray,
             residuals: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
        """One SUN forward: eps [B,4,h,w] from latents, timestep and both text embeddings (plus ControlNet
        residuals when given: eager, whatever ``optimize`` says)."""
        if self.sun_unet is None:
            raise SunEdgeError("this runtime has no SUN adapter", fix="adapter_or_cfg")
        batch = self._latents("sample", latents, self.unet_in_channels).shape[0]
        check_input("encoder_hidden_states", pos, (batch, self.text_tokens, self.text_dim), np.float32)
        check_input("negative_encoder_hidden_states", neg, (batch, self.text_tokens, self.text_dim), np.float32)
        args = (self._tensor(latents), self._timestep(t), self._tensor(pos), self._tensor(neg))
        if residuals is not None:
            return self.sun_unet(*args, self._residuals(latents, residuals)).float().cpu().numpy()
        return self._sun_call(*args).float().cpu().numpy()

    @torch.no_grad()
    def unet_plain(self, latents: np.ndarray, t: np.ndarray | float, emb: np.ndarray,
                   residuals: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
        """The UNet without the adapter (batched CFG baseline): eps [B,4,h,w] (ControlNet residuals as ``unet``'s)."""
        batch = self._latents("sample", latents, self.unet_in_channels).shape[0]
        check_input("encoder_hidden_states", emb, (batch, self.text_tokens, self.text_dim), np.float32)
        args = (self._tensor(latents), self._timestep(t), self._tensor(emb))
        if residuals is not None:
            plain = self.sun_unet.plain if self.sun_unet is not None else self._plain
            return plain(*args, self._residuals(latents, residuals)).float().cpu().numpy()
        return self._plain_call(*args).float().cpu().numpy()

    def _plain(self, sample: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
               residuals: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        from sun_edge.unet import _control

        return self.unet_module(sample, t, emb, return_dict=False, **_control(residuals))[0]

    def _residuals(self, latents: np.ndarray, residuals: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, ...]:
        """Checked ControlNet residuals for ``latents`` [B,4,h,w]: (down..., mid), shapes from the UNet's config."""
        from sun_edge.components import Geometry
        from sun_edge.controlnet import residual_layout

        b, _, h, w = latents.shape
        g = Geometry(height=h * self.vae_scale_factor, width=w * self.vae_scale_factor,
                     vae_scale_factor=self.vae_scale_factor, control=residual_layout(dict(self.unet_module.config)))
        specs = g.residuals(b)
        if len(residuals) != len(specs):
            raise SunEdgeError(f"{len(residuals)} ControlNet residual(s) given; this UNet takes {len(specs)} "
                               f"({len(specs) - 1} down-block and one mid-block)")
        return tuple(self._tensor(check_input(s.name, r, s.shape, np.float32)) for s, r in zip(specs, residuals))

    @torch.no_grad()
    def controlnet(self, latents: np.ndarray, t: np.ndarray | float, pos: np.ndarray, neg: np.ndarray,
                   cond: np.ndarray, scale: np.ndarray | float) -> tuple[np.ndarray, ...]:
        """The ControlNet's residuals (down..., mid) for latents [B,4,h,w], both prompts [B,77,D] (attended as
        ``[pos; neg]``, ``sun_edge.controlnet.control_residuals``), condition [B,3,H,W] in [0, 1], scale [1]."""
        from sun_edge.controlnet import control_residuals

        if self.controlnet_module is None:
            raise SunEdgeError("this runtime has no ControlNet; load one with --controlnet FILE")
        batch, _, h, w = self._latents("sample", latents).shape
        for name, emb in (("encoder_hidden_states", pos), ("negative_encoder_hidden_states", neg)):
            check_input(name, emb, (batch, self.text_tokens, self.text_dim), np.float32)
        check_input("controlnet_cond", cond, (batch, 3, h * self.vae_scale_factor, w * self.vae_scale_factor),
                    np.float32)
        scale_t = torch.as_tensor(np.asarray(scale, dtype=np.float32).reshape(-1)[:1], device=self.device)  # [1]
        out = control_residuals(self.controlnet_module, self._tensor(latents), self._timestep(t), self._tensor(pos),
                                self._tensor(neg), self._tensor(cond), scale_t)
        return tuple(r.float().cpu().numpy() for r in out)

    @property
    def native_size(self) -> int:
        """The image side the model was trained at: the UNet's sample size times the VAE's factor (SD1.5: 512)."""
        return int(self.unet_module.config.sample_size) * self.vae_scale_factor

    @property
    def decoder(self) -> Literal["full", "tiny"]:
        """Which decoder ``decode`` uses."""
        return "tiny" if self.tiny_decoder is not None else "full"

    @property
    def has_tiny_decoder(self) -> bool:
        return self.tiny_decoder is not None

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Sampler latents [B,4,h,w] -> image [B,3,8h,8w] in [-1, 1], with the TAESD decoder when one is loaded."""
        return self.decode_tiny(latents) if self.tiny_decoder is not None else self.decode_full(latents)

    @torch.no_grad()
    def decode_full(self, latents: np.ndarray) -> np.ndarray:
        """The model's VAE: latents [B,4,h,w] -> image [B,3,8h,8w] in [-1, 1] (the 1/scaling_factor is applied here)."""
        z = self._tensor(self._latents("latents", latents)) / self.scaling_factor
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1).cpu().numpy()

    @torch.no_grad()
    def decode_tiny(self, latents: np.ndarray) -> np.ndarray:
        """TAESD: latents [B,4,h,w] as the sampler returns them (no 1/0.18215) -> image [B,3,8h,8w] in [-1, 1]."""
        if self.tiny_decoder is None:
            raise SunEdgeError("this runtime has no TAESD decoder", fix="load_tiny")
        return self.tiny_decoder(self._tensor(self._latents("latents", latents))).float().cpu().numpy()

    def encode(self, image: np.ndarray) -> np.ndarray:
        """Image [B,3,H,W] in [-1, 1] -> scaled latents [B,4,H/8,W/8] (the posterior mean)."""
        return self.encode_dist(image)[0]

    @torch.no_grad()
    def encode_dist(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image [B,3,H,W] in [-1, 1] -> the scaled posterior's mean and std [B,4,H/8,W/8] each (diffusers'
        ``DiagonalGaussianDistribution``: logvar clamped to [-30, 20]); img2img samples mean + std * noise."""
        check_input("image", image, (None, 3, None, None), np.float32)
        dist = self.vae.encode(self._tensor(image)).latent_dist
        return ((dist.mean * self.scaling_factor).float().cpu().numpy(),
                (dist.std * self.scaling_factor).float().cpu().numpy())
