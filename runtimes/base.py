"""What every bundle runtime shares: the manifest, its geometry, the shipped tokenizer, generation
info, the check of a loaded graph's declared I/O, and the runtime protocol expressed over one
primitive, ``run(component, *arrays) -> first output``.

NumPy only: the backends (ONNX Runtime, TensorRT, Core ML) subclass ``GraphRuntime`` and import
their own libraries.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np

from sun_edge.bundle import MANIFEST, Bundle, Component, Manifest, TensorSpec
from sun_edge.components import COMPONENTS, Geometry, describe
from sun_edge.errors import SunEdgeError
from sun_edge.runtimes import check_input
from sun_edge.tokenizer import CLIPTokenizer

Decoder = Literal["full", "tiny"]
DECODERS: tuple[str, ...] = ("full", "tiny")
TINY_DECODER = "vae_decoder_tiny"  # the bundle component of TAESD's decoder


def return_freed_memory() -> None:
    """Give memory freed by a released graph back to the operating system, where the C library allows.

    glibc keeps freed heap pages (below its 32 MB mmap threshold) for reuse. On a full-size fp32 parity
    run at batch 4, 9.6 GB stayed resident after ONNX Runtime's UNet session was released, and the next
    sessions ran the 24 GB machine out of memory. ``malloc_trim(0)`` returns free pages: in a smaller
    run (UNet session at batch 2, released) it took the process from 5.8 to 4.6 GB. It did not by itself
    make a full-size ``--max-batch 4`` export fit in 24 GB; with parity holding one graph at a time
    (``hold_one_graph``) it fits (21.6 GB peak). Elsewhere (macOS, musl) this only collects Python garbage.
    """
    import gc

    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` from the symbols already in the process, or None (macOS, musl, Windows)."""
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # no handle on the process's own symbols here
        return None


class BundleRuntime:
    """Bundle plumbing: subclasses call ``_open_bundle`` first in ``__init__``."""

    bundle: Bundle
    name: str
    info: dict[str, Any]
    TARGETS: tuple[str, ...] = ()  # the bundle targets this runtime runs

    def _open_bundle(self, bundle: Bundle) -> None:
        """Check the bundle's target and take its geometry (latent channels, VAE factor, text length and width)."""
        if bundle.manifest.target not in self.TARGETS:
            raise SunEdgeError(f"bundle {bundle.path} is a {bundle.manifest.target} bundle; the {self.name} runtime runs "
                               f"{', '.join(self.TARGETS)} bundles")
        self.bundle = bundle
        g = self.geometry = Geometry.from_manifest(bundle.manifest)
        self.latent_channels, self.vae_scale_factor = g.latent_channels, g.vae_scale_factor
        self.unet_in_channels = g.unet_latents[1]  # 9: an inpainting UNet
        self.text_tokens, self.text_dim = g.text_tokens, g.text_dim
        self.scaling_factor = float(bundle.manifest.latent["scaling_factor"])

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    def tokenizer(self) -> CLIPTokenizer:
        """The tokenizer shipped in the bundle."""
        tok = self.manifest.tokenizer
        return CLIPTokenizer.from_files(self.bundle.path / tok["vocab"], self.bundle.path / tok["merges"])

    @property
    def max_batch(self) -> int:
        """The most images one ``unet`` call takes: the SUN UNet graph's batch (a free batch: the manifest's range)."""
        unet = self.manifest.components.get("unet")
        batch = unet.inputs[0].shape[0] if unet is not None else -1
        return int(self.manifest.batch["max"]) if batch < 0 else batch

    def require_components(self) -> None:
        """Raise unless the bundle holds every component the table does not mark optional (a runtime that
        cannot run partial bundles calls it; ONNX bundles of single graphs are fine for ONNX Runtime)."""
        missing = [name for name, c in COMPONENTS.items() if not c.optional and not self.has(name)]
        if missing:
            raise SunEdgeError(f"bundle {self.bundle.path} lacks the {', '.join(missing)} component(s); re-export it")

    def has(self, component: str) -> bool:
        """Whether the bundle holds ``component`` (a name of ``sun_edge.components.COMPONENTS``)."""
        return component in self.manifest.components

    def release(self, component: str) -> None:
        """Free what ``component`` holds (nothing by default)."""

    # True: loading a graph first releases every other graph this runtime holds, so that at most one is
    # resident (parity sets it: its whole-pipeline rows would otherwise hold four full-size graphs at once).
    hold_one_graph: bool = False

    def make_room(self, component: str, loaded: Iterable[str]) -> None:
        """Called by a backend before it loads ``component``: with ``hold_one_graph``, release the ``loaded`` others."""
        if self.hold_one_graph:
            for other in [c for c in loaded if c != component]:
                self.release(other)

    def _component(self, component: str) -> Component:
        self.bundle.file(component)  # raises naming the components the bundle has
        return self.manifest.components[component]

    def check_declared(self, component: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
        """Raise unless a loaded graph declares the I/O the manifest lists for ``component``."""
        comp = self._component(component)
        for what, have, want in (("inputs", inputs, comp.inputs), ("outputs", outputs, comp.outputs)):
            if have != want:
                raise SunEdgeError(f"bundle {self.bundle.path}: {comp.file} declares {what} {describe(have)}, but "
                                   f"{MANIFEST} says {describe(want)}; the manifest was edited or belongs to other "
                                   "graphs: re-export the bundle")

    def manifest_info(self, **backend: Any) -> dict[str, Any]:
        """Generation info from the manifest (model, LoRAs, adapter), plus the backend's own fields."""
        m = self.manifest
        info: dict[str, Any] = {"model": m.model.get("name"), "model_sha256": m.model.get("sha256"),
                                "bundle": str(self.bundle.path), "precision": m.precision, **backend}
        if m.model.get("loras"):
            info["loras"] = [f"{lora['file']}:{float(lora['scale']):g}" for lora in m.model["loras"]]
        if m.adapter:
            info.update(adapter=m.adapter.get("name"), adapter_sha256=m.adapter.get("sha256"),
                        adapter_parameters=m.adapter.get("parameters"))
        if m.controlnet:
            info.update(controlnet=m.controlnet.get("name"), controlnet_sha256=m.controlnet.get("sha256"))
        return info


class GraphRuntime(BundleRuntime):
    """The runtime protocol over ``run``, for backends whose graphs take the component table's I/O.

    ``decode`` uses the decoder chosen with ``use_decoder`` (default ``full``: the model's VAE);
    ``decode_full`` and ``decode_tiny`` name each one, as ``TorchRuntime``'s do.
    """

    latent_channels: int
    text_tokens: int
    text_dim: int
    _decoder: Decoder = "full"

    def use_decoder(self, decoder: Decoder) -> None:
        """Choose what ``decode`` runs: ``full`` (``vae_decoder``) or ``tiny`` (TAESD, ``vae_decoder_tiny``)."""
        if decoder not in DECODERS:
            raise SunEdgeError(f"unknown VAE decoder {decoder!r} for a bundle; valid decoders: {', '.join(DECODERS)}")
        if decoder == "tiny":
            self.require_tiny_decoder()
        self._decoder = decoder
        self.info.pop("vae_decoder", None)
        if decoder == "tiny":  # as TorchRuntime: "tiny:<TAESD source name>"
            self.info["vae_decoder"] = f"tiny:{(self.manifest.vae_decoder_tiny or {}).get('name') or TINY_DECODER}"

    @property
    def decoder(self) -> Decoder:
        """Which decoder ``decode`` uses."""
        return self._decoder

    @property
    def has_tiny_decoder(self) -> bool:
        return self.has(TINY_DECODER)

    def require_tiny_decoder(self) -> None:
        """Raise unless the bundle has TAESD's decoder (exported with ``--vae-decoder tiny:PATH``)."""
        if not self.has_tiny_decoder:
            raise SunEdgeError(f"bundle {self.bundle.path} has no TAESD decoder ({TINY_DECODER}.onnx)", fix="export_tiny")

    def run(self, component: str, *arrays: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def _timestep(t: np.ndarray | float | int) -> np.ndarray:
        return np.asarray(t, dtype=np.float32).reshape(-1)  # [1]

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [1,77] int64 -> last hidden state [1,77,D] float32."""
        return self.run("text_encoder", ids)

    def unet(self, latents: np.ndarray, t: np.ndarray | float, pos: np.ndarray, neg: np.ndarray,
             residuals: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
        """One SUN forward (adapter fused): eps [1,4,h,w]; ControlNet residuals when given (``_residuals``)."""
        return self.run("unet", latents, self._timestep(t), pos, neg, *self._residuals("unet", latents, residuals))

    def _residuals(self, component: str, latents: np.ndarray,
                   residuals: tuple[np.ndarray, ...] | None) -> tuple[np.ndarray, ...]:
        """What a UNet graph takes after its text inputs: nothing (no ControlNet in the bundle), the residuals
        given, or zeros (a ControlNet bundle generating without a condition: adding zero changes nothing)."""
        specs = self.geometry.residuals(int(np.shape(latents)[0]))
        if residuals is None:
            return tuple(np.zeros(s.shape, np.float32) for s in specs)
        if not specs:
            raise SunEdgeError(f"bundle {self.bundle.path} was exported without a ControlNet, so its {component} takes no "
                               "residuals; re-export it with --controlnet FILE")
        if len(residuals) != len(specs):
            raise SunEdgeError(f"{len(residuals)} ControlNet residual(s) given; this bundle's {component} takes "
                               f"{len(specs)}")
        return tuple(residuals)

    def controlnet(self, latents: np.ndarray, t: np.ndarray | float, pos: np.ndarray, neg: np.ndarray,
                   cond: np.ndarray, scale: np.ndarray | float) -> tuple[np.ndarray, ...]:
        """The ControlNet graph: residuals (down..., mid) for latents, both prompts, condition [B,3,H,W], scale [1]."""
        if not self.has("controlnet"):
            raise SunEdgeError(f"bundle {self.bundle.path} has no ControlNet; export it with --controlnet FILE")
        return self.run_outputs("controlnet", latents, self._timestep(t), pos, neg, cond,
                                np.asarray(scale, np.float32).reshape(-1)[:1])

    def require_baseline(self) -> None:
        """Raise unless the bundle has the UNet without the adapter (exported with ``--with-baseline``)."""
        if not self.has("unet_plain"):
            raise SunEdgeError(f"bundle {self.bundle.path} has no UNet without the adapter, which CFG mode needs",
                               fix="export_baseline")

    def unet_plain(self, latents: np.ndarray, t: np.ndarray | float, emb: np.ndarray,
                   residuals: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
        """The UNet without the adapter, batch 1 or 2 (the CFG baseline): eps [B,4,h,w]."""
        self.require_baseline()
        batch = check_input("unet_plain input sample", latents, (None, self.unet_in_channels, None, None),
                            np.float32).shape[0]
        check_input("unet_plain input encoder_hidden_states", emb, (batch, self.text_tokens, self.text_dim), np.float32)
        return self.run("unet_plain", latents, self._timestep(t), emb, *self._residuals("unet_plain", latents, residuals))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Sampler latents [1,4,h,w] -> image [1,3,8h,8w] in [-1, 1], with the chosen decoder (``decoder``)."""
        return self.decode_tiny(latents) if self._decoder == "tiny" else self.decode_full(latents)

    def decode_full(self, latents: np.ndarray) -> np.ndarray:
        """The model's VAE: latents [1,4,h,w] -> image [1,3,8h,8w] in [-1, 1] (1/scaling_factor inside the graph)."""
        return self.run("vae_decoder", latents)

    def decode_tiny(self, latents: np.ndarray) -> np.ndarray:
        """TAESD: latents [1,4,h,w] as the sampler returns them -> image [1,3,8h,8w] in [-1, 1]."""
        self.require_tiny_decoder()
        return self.run(TINY_DECODER, latents)

    def encode(self, image: np.ndarray) -> np.ndarray:
        """Image [1,3,H,W] in [-1, 1] -> scaled latents [1,4,H/8,W/8] (the posterior mean)."""
        return self.run("vae_encoder", image)

    def encode_dist(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image [1,3,H,W] in [-1, 1] -> the scaled posterior's mean and std [1,4,H/8,W/8] (img2img samples from them).

        A bundle exported before the encoder had its ``latent_std`` output gets one line: re-export it."""
        outputs = self._component("vae_encoder").outputs
        if len(outputs) < 2:
            raise SunEdgeError(f"bundle {self.bundle.path}: its VAE encoder returns the posterior mean alone (exported "
                               "by an older sun-edge), and img2img samples the posterior; re-export the bundle")
        mean, std = self.run_outputs("vae_encoder", image)[:2]
        return mean, std

    def run_outputs(self, component: str, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """Every output of ``component`` in manifest order (``run`` returns the first). Backends whose ``run``
        can return several override this; the default serves components with one output."""
        if len(self._component(component).outputs) != 1:
            raise NotImplementedError(f"{type(self).__name__} returns only the first output of {component}")
        return (self.run(component, *arrays),)
