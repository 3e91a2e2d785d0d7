"""The component table: every graph a bundle can hold, declared once.

A component is one network a runtime evaluates: the text encoder, the SUN UNet, the UNet without
the adapter (the CFG baseline), the VAE decoder and encoder, TAESD's tiny decoder. Each entry
names the runtime method that runs it, its inputs and outputs as functions of one ``Geometry``
(batch, image and latent size, text length), whether a bundle may lack it, and its precision
policy. Exporters build their graphs' I/O from it, bundle runtimes check calls against it,
parity and bench loop over it; nothing else restates a signature.

Adding an input to a component (ControlNet residuals, a 9-channel inpainting sample) is a change
to its entry here; adding a component is one more entry (and the method on the runtimes).

``Runtime`` is the protocol every runtime implements (DESIGN.md, "Contracts"): NumPy in and out,
with ``has(component)`` saying which components it can compute, so that callers never probe
for methods.

NumPy-free and torch-free: bundle runtimes and apps import this.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from sun_edge.bundle import TensorSpec
from sun_edge.errors import SunEdgeError

if TYPE_CHECKING:
    import numpy as np

    from sun_edge.bundle import Manifest

FREE = -1  # a free dimension in a TensorSpec (the CFG baseline UNet's batch: 1 or 2)
Policy = Literal["bundle", "fp32"]  # "bundle": the bundle's precision (fp16 with fp32 islands); "fp32": always


@dataclass(frozen=True)
class Geometry:
    """The sizes every component's I/O is computed from."""

    height: int  # image
    width: int
    latent_channels: int = 4
    vae_scale_factor: int = 8
    text_tokens: int = 77
    text_dim: int = 768
    batch: int = 1
    unet_in_channels: int | None = None  # the UNet's sample channels; None: latent_channels (9: an inpainting UNet)
    control: tuple[tuple[int, int], ...] = ()  # ControlNet residuals (channels, latent downscale): down..., mid; () none

    @property
    def latent_height(self) -> int:
        return self.height // self.vae_scale_factor

    @property
    def latent_width(self) -> int:
        return self.width // self.vae_scale_factor

    @property
    def latents(self) -> tuple[int, int, int, int]:
        return (self.batch, self.latent_channels, self.latent_height, self.latent_width)

    @property
    def unet_latents(self) -> tuple[int, int, int, int]:
        """The UNet's ``sample``: the latents, and for an inpainting UNet the mask (1) and masked-image latents (4)."""
        return (self.batch, self.unet_in_channels or self.latent_channels, self.latent_height, self.latent_width)

    @property
    def image(self) -> tuple[int, int, int, int]:
        return (self.batch, 3, self.height, self.width)

    @property
    def text(self) -> tuple[int, int, int]:
        return (self.batch, self.text_tokens, self.text_dim)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> Geometry:
        """The geometry a bundle's graphs were exported for."""
        image, latent, text = manifest.image, manifest.latent, manifest.text
        return cls(height=int(image["height"]), width=int(image["width"]), latent_channels=int(latent["channels"]),
                   vae_scale_factor=int(image["height"]) // int(latent["height"]), text_tokens=int(text["tokens"]),
                   text_dim=int(text["dim"]), unet_in_channels=unet_in_channels(latent),
                   control=control_layout(getattr(manifest, "controlnet", None)))

    def residuals(self, batch: int) -> tuple[TensorSpec, ...]:
        """The ControlNet residuals at ``batch``: ``down_block_res_0..N-1`` then ``mid_block_res`` (none without one)."""
        def spec(name: str, channels: int, factor: int) -> TensorSpec:
            return _f32(name, (batch, channels, -(-self.latent_height // factor), -(-self.latent_width // factor)))

        down = tuple(spec(f"down_block_res_{i}", c, f) for i, (c, f) in enumerate(self.control[:-1]))
        return (*down, spec("mid_block_res", *self.control[-1])) if self.control else ()


def control_layout(entry: Mapping[str, Any] | None) -> tuple[tuple[int, int], ...]:
    """A manifest's ``controlnet.residuals`` as (channels, downscale) pairs (no ControlNet: ``()``)."""
    return tuple((int(c), int(f)) for c, f in (entry or {}).get("residuals", ())) if entry else ()


def unet_in_channels(latent: Mapping[str, Any]) -> int:
    """A manifest's UNet sample channels: ``latent.unet_in_channels`` (bundles before it: the latent channels)."""
    return int(latent.get("unet_in_channels", latent["channels"]))


IO = Callable[[Geometry], tuple[TensorSpec, ...]]


@dataclass(frozen=True)
class ComponentSpec:
    """One component: how a runtime runs it and what its graph takes and returns."""

    name: str  # the manifest key and the parity row
    method: str  # the ``Runtime`` method that computes it
    inputs: IO
    outputs: IO
    optional: bool  # a bundle may lack it
    policy: Policy
    summary: str
    older_outputs: IO | None = None  # the outputs of bundles written before the current ones, still read

    def io(self, geometry: Geometry) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        return self.inputs(geometry), self.outputs(geometry)

    def precision(self, bundle_precision: str) -> str:
        """This component's precision in a bundle of ``bundle_precision`` (its VAE stays float32)."""
        return "fp32" if self.policy == "fp32" else bundle_precision


def _f32(name: str, shape: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(name, "float32", tuple(shape))


def _cfg_batch(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (FREE, *shape[1:])


COMPONENTS: Mapping[str, ComponentSpec] = MappingProxyType({c.name: c for c in (
    ComponentSpec("text_encoder", "encode_text",
                  lambda g: (TensorSpec("input_ids", "int64", (g.batch, g.text_tokens)),),
                  lambda g: (_f32("last_hidden_state", g.text),),
                  optional=False, policy="bundle", summary="token ids -> text embedding (CLIP's last hidden state)"),
    ComponentSpec("unet", "unet",
                  lambda g: (_f32("sample", g.unet_latents), _f32("timestep", (1,)), _f32("encoder_hidden_states", g.text),
                             _f32("negative_encoder_hidden_states", g.text), *g.residuals(g.batch)),
                  lambda g: (_f32("noise_pred", g.latents),),
                  optional=False, policy="bundle", summary="the SUN UNet, adapter fused: one forward per step"),
    ComponentSpec("unet_plain", "unet_plain",
                  lambda g: (_f32("sample", _cfg_batch(g.unet_latents)), _f32("timestep", (1,)),
                             _f32("encoder_hidden_states", _cfg_batch(g.text)), *g.residuals(FREE)),
                  lambda g: (_f32("noise_pred", _cfg_batch(g.latents)),),
                  optional=True, policy="bundle", summary="the UNet without the adapter, batch 1 or 2 (CFG baseline)"),
    ComponentSpec("vae_decoder", "decode_full",
                  lambda g: (_f32("latent_sample", g.latents),), lambda g: (_f32("sample", g.image),),
                  optional=False, policy="fp32", summary="sampler latents -> image in [-1, 1] (1/scaling inside)"),
    ComponentSpec("vae_encoder", "encode",
                  lambda g: (_f32("sample", g.image),),
                  lambda g: (_f32("latent_sample", g.latents), _f32("latent_std", g.latents)),
                  optional=True, policy="fp32", summary="image in [-1, 1] -> scaled posterior mean and std (img2img)",
                  older_outputs=lambda g: (_f32("latent_sample", g.latents),)),  # the mean alone: no posterior sampling
    ComponentSpec("vae_decoder_tiny", "decode_tiny",
                  lambda g: (_f32("latents", g.latents),), lambda g: (_f32("image", g.image),),
                  optional=True, policy="bundle", summary="TAESD: sampler latents -> image in [-1, 1]"),
    ComponentSpec("controlnet", "controlnet",
                  lambda g: (_f32("sample", _cfg_batch(g.latents)), _f32("timestep", (1,)),
                             _f32("encoder_hidden_states", _cfg_batch(g.text)),
                             _f32("negative_encoder_hidden_states", _cfg_batch(g.text)),
                             _f32("controlnet_cond", _cfg_batch(g.image)), _f32("conditioning_scale", (1,))),
                  lambda g: g.residuals(FREE),
                  optional=True, policy="bundle",
                  summary="ControlNet: latents, t, both prompts (attended as [pos; neg]), condition in [0, 1], scale "
                          "-> the UNet's residuals (batch B for SUN, 2B for CFG)"),
)})


def component(name: str) -> ComponentSpec:
    """The entry of ``name``; unknown names list the valid ones."""
    if name not in COMPONENTS:
        raise SunEdgeError(f"unknown component {name!r}; valid components: {', '.join(COMPONENTS)}")
    return COMPONENTS[name]


def describe(specs: tuple[TensorSpec, ...]) -> str:
    """``"sample float32 [1,4,64,64], timestep float32 [1]"``: specs for one-line messages (free dims as ``?``)."""
    return ", ".join(f"{s.name} {s.dtype} [{','.join('?' if d < 0 else str(d) for d in s.shape)}]" for s in specs)


@runtime_checkable
class Runtime(Protocol):
    """What a pipeline, parity and bench need of a runtime. NumPy in and out; shapes as in ``COMPONENTS``.

    ``has(name)`` says whether a component can be computed (a bundle without ``unet_plain``, a
    model without an adapter lacks ``unet``); a method whose component is missing raises a
    ``SunEdgeError`` naming it. ``decode`` runs the chosen decoder (``decode_full`` or ``decode_tiny``).
    ``encode`` returns the VAE's scaled posterior mean, ``encode_dist`` its mean and std (img2img samples
    ``mean + std * noise``); ``unet_in_channels`` is the UNet's sample channels (9: an inpainting UNet).
    ``release(name)`` frees what a component holds (sessions, weights); the next call loads it again.
    Batched calls take ``[B, ...]`` for B up to ``max_batch`` (``unet_plain``: 2B, the CFG pair).
    ``controlnet`` returns the UNet's ControlNet residuals (``Geometry.residuals``), which ``unet`` and
    ``unet_plain`` add when given (``None``: no ControlNet; a bundle exported with one feeds zeros).
    """

    name: str
    info: dict[str, Any]
    latent_channels: int
    vae_scale_factor: int
    max_batch: int  # the most images one ``unet`` call takes (a bundle's graphs: their batch range)
    unet_in_channels: int  # the UNet's sample channels: latent_channels, or 9 for an inpainting UNet
    hold_one_graph: bool  # True: loading a graph first releases the others (``release``); parity sets it

    def has(self, component: str) -> bool: ...
    def encode_text(self, ids: np.ndarray) -> np.ndarray: ...
    def unet(self, latents: np.ndarray, t: np.ndarray, pos: np.ndarray, neg: np.ndarray,
             residuals: tuple[np.ndarray, ...] | None = None) -> np.ndarray: ...
    def unet_plain(self, latents: np.ndarray, t: np.ndarray, emb: np.ndarray,
                   residuals: tuple[np.ndarray, ...] | None = None) -> np.ndarray: ...
    def decode(self, latents: np.ndarray) -> np.ndarray: ...
    def decode_full(self, latents: np.ndarray) -> np.ndarray: ...
    def decode_tiny(self, latents: np.ndarray) -> np.ndarray: ...
    def encode(self, image: np.ndarray) -> np.ndarray: ...
    def encode_dist(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def controlnet(self, latents: np.ndarray, t: np.ndarray, pos: np.ndarray, neg: np.ndarray, cond: np.ndarray,
                   scale: np.ndarray) -> tuple[np.ndarray, ...]: ...
    def release(self, component: str) -> None: ...


def run_component(runtime: Runtime, name: str, *arrays: np.ndarray) -> np.ndarray:
    """Compute component ``name`` on ``runtime`` through the method the table names."""
    return getattr(runtime, component(name).method)(*arrays)
