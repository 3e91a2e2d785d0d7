"""Exporters: one module per target, each writing a bundle (DESIGN.md, "Contracts")::

    from sun_edge.export import ExportOptions, export
    export("onnx", "toonyou", "toonyou-onnx", adapter="sun-adapter.safetensors",
           options=ExportOptions(precision="fp16", with_baseline=True))

``TARGETS`` maps each target name to the module implementing it; the module is imported only
when its target is used, so ``import sun_edge.export`` imports neither torch nor a converter.
Every target module provides::

    export_bundle(reference: TorchRuntime, out: Path, options: ExportOptions, *, model: dict | None,
                  adapter: dict | None, force: bool, parity: ParityFn | None, progress: bool) -> Path

``parity(reference, bundle_dir) -> dict`` is called on the complete bundle (manifest included)
before it is renamed into place; its result is recorded as the manifest's ``parity``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from sun_edge.errors import SunEdgeError
from sun_edge.bundle_check import MAX_BATCH
from sun_edge.settings import MAX_SIDE

from sun_edge.export.targets import TARGETS, Target, target

if TYPE_CHECKING:
    from sun_edge.runtimes.pytorch import TorchRuntime

TINY_DECODER_TARGETS = tuple(name for name, t in TARGETS.items() if t.tiny_decoder)  # can carry TAESD
Precision = Literal["fp32", "fp16"]
ParityFn = Callable[["TorchRuntime", Path], dict[str, Any]]


@dataclass(frozen=True)
class ExportOptions:
    """What to export. Shapes are static: a bundle generates at one image size."""

    precision: Precision = "fp32"  # fp16 keeps softmax, normalisation and the adapter's norm ratio in fp32
    height: int | None = None  # None: the model's own size (UNet sample size x VAE factor: SD1.5 512)
    width: int | None = None
    with_baseline: bool = False  # also the UNet without the adapter (batch 1 or 2), for CFG mode
    max_batch: int = 1  # > 1: graphs with a free batch dimension, 1..max_batch images per call (CFG: 2x)

    def sized(self, native: int) -> ExportOptions:
        """These options with an unset height or width taken from the model's own size ``native``."""
        return replace(self, height=native if self.height is None else self.height,
                       width=native if self.width is None else self.width)

    def validate(self) -> None:
        if self.precision not in ("fp32", "fp16"):
            raise SunEdgeError(f"unknown precision {self.precision!r}; valid precisions: fp16, fp32")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or not 1 <= self.max_batch <= MAX_BATCH:
            raise SunEdgeError(f"max batch {self.max_batch!r} is outside [1, {MAX_BATCH}]")
        for side, value in (("height", self.height), ("width", self.width)):
            if value is not None and (value < 8 or value % 8):
                raise SunEdgeError(f"{side} {value} is not a positive multiple of 8; use e.g. {max(8, value // 8 * 8)}")
            if value is not None and value > MAX_SIDE:
                raise SunEdgeError(f"{side} {value} is outside [8, {MAX_SIDE}]")


def target_module(name: str) -> ModuleType:
    """Import the module of export target ``name``; unknown names list the valid ones."""
    return importlib.import_module(target(name).module)


def export_options(target_name: str, *, precision: str | None = None, **options: Any) -> ExportOptions:
    """The options for ``target_name``: its own options class (its entry's ``options_class``, with the
    target's own keywords), at its default precision unless ``precision`` is given."""
    entry = target(target_name)
    module, _, name = entry.options_class.partition(":")
    cls = globals()[name] if module == __name__ else getattr(importlib.import_module(module), name)
    return cls(precision=precision or entry.default_precision, **options)


def model_entry(reference: TorchRuntime, path: str | None = None,
                loras: Sequence[tuple[Path, float]] = ()) -> dict[str, Any]:
    """The manifest's ``model``: name, sha256, the path or name as given, merged LoRAs (file, path, scale, sha256)."""
    from sun_edge.weights import sha256_file

    info = reference.info
    return {"name": info.get("model"), "sha256": info.get("model_sha256"), "path": path,
            "loras": [{"file": Path(p).name, "path": str(p), "scale": float(s), "sha256": sha256_file(Path(p))}
                      for p, s in loras]}


def adapter_entry(reference: TorchRuntime, path: Path | str | None = None) -> dict[str, Any]:
    """The manifest's ``adapter``: name, path, sha256, parameter count, extra-positive branch."""
    from sun_edge.export.recipe import require_adapter

    require_adapter(reference)
    info = reference.info
    return {"name": info.get("adapter"), "path": str(path) if path is not None else None,
            "sha256": info.get("adapter_sha256"), "parameters": reference.adapter.num_parameters(),
            "extra_positive": bool(reference.adapter.extra_positive)}


def tiny_decoder_entry(reference: TorchRuntime) -> dict[str, Any] | None:
    """The manifest's ``vae_decoder_tiny``: the TAESD weights' name, path, sha256, parameter count (None without one)."""
    from sun_edge.taesd import weights_file
    from sun_edge.weights import sha256_file

    tiny = reference.tiny_decoder
    if tiny is None:
        return None
    path = Path(tiny.source)
    return {"name": path.name, "path": str(path), "sha256": sha256_file(weights_file(path)),
            "parameters": sum(p.numel() for p in tiny.parameters())}


def refuse_tiny_decoder(reference: TorchRuntime, target: str) -> None:
    """Raise for a reference carrying a TAESD decoder when ``target`` cannot export it (one line)."""
    if target not in TINY_DECODER_TARGETS and reference.tiny_decoder is not None:
        raise SunEdgeError(_tiny_target_message(target))


def _tiny_target_message(target: str) -> str:
    return (f"--vae-decoder tiny:PATH applies to --target {', '.join(TINY_DECODER_TARGETS)}; {target} bundles decode "
            "with the model's VAE only (drop --vae-decoder)")


def export(target: str, model: str, out: Path | str, *, adapter: Path | str | None = None,
           loras: Sequence[tuple[Path, float]] = (), allow_pickle: bool = False,
           options: ExportOptions = ExportOptions(), force: bool = False, parity: ParityFn | None = None,
           progress: bool = True, vae_decoder: str | None = None, controlnet: Path | str | None = None) -> Path:
    """Load ``model`` with its adapter (float32 reference) and write a ``target`` bundle to ``out``.

    ``vae_decoder``: ``"full"`` (or None) or ``"tiny:PATH"``: also export that TAESD decoder as
    ``vae_decoder_tiny`` (ONNX only; the full VAE is always exported). Checks the target, the
    options, the decoder spec and the destination (``force`` to replace an existing one) before
    loading anything. ``controlnet``: also export this ControlNet as its own graph, and the UNet graphs with its
    residual inputs (every target). Returns the bundle's path.
    """
    from sun_edge.bundle import check_destination
    from sun_edge.taesd import parse_vae_decoder

    module = target_module(target)
    options.validate()
    if parse_vae_decoder(vae_decoder) is not None and target not in TINY_DECODER_TARGETS:
        raise SunEdgeError(_tiny_target_message(target))
    out = Path(out)
    check_destination(out, force)

    from sun_edge.adapter import find_adapter
    from sun_edge.export.recipe import require_adapter
    from sun_edge.models import resolve_model
    from sun_edge.runtimes.pytorch import TorchRuntime

    reference = TorchRuntime.load(model, adapter, loras=tuple(loras), allow_pickle=allow_pickle, vae_decoder=vae_decoder,
                                  controlnet=controlnet)
    require_adapter(reference, model)
    adapter_path = find_adapter(adapter, resolve_model(model))
    return module.export_bundle(reference, out, options, model=model_entry(reference, model, loras),
                                adapter=adapter_entry(reference, adapter_path), force=force, parity=parity,
                                progress=progress)
