"""The export recipe every target follows, written once.

A bundle is exported the same way whatever the target (Apple ml-stable-diffusion's recipe, one
converter per component): plan the components, then for each one wrap its torch module, trace
it, convert it, set its metadata, save it and check what the saved file declares, behind one
progress bar; then write the tokenizer files and the manifest, re-open the bundle as a runtime
will, and record parity. This module holds every step that does not depend on the target:

- ``Plan``: one component to export: what to build, the I/O its file must declare, its
  precision, its file, and ``extra`` for what only one target reads (Core ML's description,
  per-tensor texts, palettization, the UNet whose attention form it switches);
- ``plan_components``: a bundle's plans, their I/O read from ``sun_edge.components.COMPONENTS``
  at the ``Geometry`` of the reference and the options. A target changes an I/O dtype only by an
  explicit override (Core ML: ``input_ids`` int32);
- ``example_inputs``: realistic tracing inputs for a plan's inputs;
- ``run_stages``: the loop over the plans, one progress bar per component;
- ``require_adapter``: the one "exports fuse a SUN adapter into the UNet, and this model has
  none" check (``export()``, ``adapter_entry`` and every target's ``plan`` call it);
- ``manifest_entries``, ``write_tokenizer``, ``common_manifest_fields``, ``finish``: the manifest
  fields every target writes alike, and the bundle's last steps.

Adding a component (say ControlNet residual inputs on the UNet, or a 9-channel inpainting UNet):

1. its entry in ``sun_edge/components.py`` (name, runtime method, inputs and outputs as functions
   of the geometry, precision policy), or the changed inputs of an existing entry;
2. its wrapper in ``export/modules.py``: a module with the runtime protocol's call signature,
   float32 at the boundary;
3. one line in each target's ``plan``: ``"name": lambda: modules.NewGraph(...)`` (Core ML also
   names its package and its Xcode texts in one ``coreml.PACKAGES`` entry).

Its I/O, example inputs, progress bar, file check and manifest entry then follow from here, and
bundle runtimes check calls against the same table entry.

Adding a target: a module whose ``export_bundle`` calls ``plan_components`` with its builds,
``run_stages`` with its ``convert_one``, builds its ``Manifest`` from ``common_manifest_fields``
plus its own ``extra``, and ends with ``finish``; and its entry in ``export/targets.py``.

Torch-free at import (torch and the tokenizer are imported by the functions that use them), so
``sun_edge.export`` can call ``require_adapter`` without loading torch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from tqdm import tqdm

from sun_edge.bundle import Manifest, TensorSpec, write_manifest
from sun_edge.components import COMPONENTS, FREE, Geometry, component
from sun_edge.errors import SunEdgeError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sun_edge.export import ExportOptions, ParityFn
    from sun_edge.runtimes.pytorch import TorchRuntime

EXAMPLE_PROMPT = "a photo of a cat"
NO_ADAPTER = "exports fuse a SUN adapter into the UNet, and this model has none: pass --adapter PATH"
EMPTY: Mapping[str, Any] = MappingProxyType({})
R = TypeVar("R")


@dataclass(frozen=True)
class Plan:
    """One component to export: what to trace and the I/O its file must declare."""

    name: str  # the component (sun_edge.components) and the manifest key
    build: Callable[[], nn.Module]  # made when the component is exported (fp16 copies live only that long)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str  # the manifest's precision of this component
    file: str  # the file (or package) in the bundle
    extra: Mapping[str, Any] = field(default_factory=lambda: EMPTY)  # what only one target reads


def require_adapter(reference: TorchRuntime, model: str | None = None) -> None:
    """Raise unless ``reference`` has a SUN adapter to fuse (naming ``model`` when given)."""
    if reference.adapter is None:
        if model is not None:
            raise SunEdgeError(f"model {model} has no SUN adapter beside it: pass --adapter PATH "
                               "(exports fuse the adapter into the UNet)")
        raise SunEdgeError(NO_ADAPTER)


def geometry(reference: TorchRuntime, options: ExportOptions) -> Geometry:
    """The geometry of a bundle of ``reference`` at ``options``' (sized) image size."""
    if options.height is None or options.width is None:
        raise SunEdgeError("internal error: plan a bundle with sized options (ExportOptions.sized)")
    return Geometry(height=options.height, width=options.width, latent_channels=reference.latent_channels,
                    vae_scale_factor=reference.vae_scale_factor, text_tokens=reference.text_tokens,
                    text_dim=reference.text_dim, batch=FREE if options.max_batch > 1 else 1,
                    unet_in_channels=reference.unet_in_channels, control=control_layout_of(reference))


def control_layout_of(reference: TorchRuntime) -> tuple[tuple[int, int], ...]:
    """The ControlNet residuals' (channels, downscale) of ``reference``'s UNet, when it has a ControlNet (else ())."""
    if getattr(reference, "controlnet_module", None) is None:
        return ()
    from sun_edge.controlnet import residual_layout

    return residual_layout(dict(reference.unet_module.config))


def controlnet_entry(reference: TorchRuntime) -> dict[str, Any] | None:
    """The manifest's ``controlnet``: name, path, sha256 of its weights, parameter count, residual layout (or None)."""
    control = getattr(reference, "controlnet_module", None)
    if control is None:
        return None
    info = reference.info
    return {"name": info.get("controlnet"), "path": info.get("controlnet_path"), "sha256": info.get("controlnet_sha256"),
            "parameters": sum(p.numel() for p in control.parameters()),
            "residuals": [list(pair) for pair in control_layout_of(reference)]}


def _with_dtypes(specs: tuple[TensorSpec, ...], dtypes: Mapping[str, str], where: str) -> tuple[TensorSpec, ...]:
    unknown = sorted(set(dtypes) - {s.name for s in specs})
    if unknown:
        raise SunEdgeError(f"internal error: dtype override for {where} names {', '.join(unknown)}, "
                           f"not among its inputs {', '.join(s.name for s in specs)}")
    return tuple(replace(s, dtype=dtypes[s.name]) if s.name in dtypes else s for s in specs)


def plan_components(reference: TorchRuntime, options: ExportOptions, builds: Mapping[str, Callable[[], nn.Module]], *,
                    file: Callable[[str], str], precision: Callable[[str], str] | None = None,
                    input_dtypes: Mapping[str, Mapping[str, str]] = EMPTY,
                    extra: Mapping[str, Mapping[str, Any]] = EMPTY) -> list[Plan]:
    """The plans of the components in ``builds`` (name -> module factory), in the component table's order.

    Inputs and outputs are ``COMPONENTS[name]``'s at ``geometry(reference, options)``;
    ``input_dtypes`` overrides an input's dtype per component (``{"text_encoder": {"input_ids": "int32"}}``).
    ``precision(name)`` is the manifest's precision (default: the table's policy at
    ``options.precision``); ``file(name)`` the bundle file; ``extra[name]`` the target's own fields.
    """
    require_adapter(reference)
    for name in builds:
        component(name)  # unknown names list the valid ones
    unknown = sorted((set(input_dtypes) | set(extra)) - set(builds))
    if unknown:
        raise SunEdgeError(f"internal error: overrides name components not planned: {', '.join(unknown)}")
    shape = geometry(reference, options)
    plans = []
    for name, spec in COMPONENTS.items():
        if name not in builds:
            continue
        inputs, outputs = spec.io(shape)
        plans.append(Plan(name, builds[name], _with_dtypes(inputs, input_dtypes.get(name, EMPTY), name), outputs,
                          precision(name) if precision is not None else spec.precision(options.precision),
                          file(name), MappingProxyType(dict(extra.get(name, EMPTY)))))
    return plans


def example_inputs(specs: tuple[TensorSpec, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Realistic tracing inputs: tokenized text (int64, as torch models take it), unit noise, t=999;
    free batch dimensions get 2."""
    import torch

    from sun_edge.tokenizer import CLIPTokenizer

    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in specs:
        shape = tuple(2 if s == FREE else s for s in spec.shape)
        if spec.dtype.startswith("int"):
            ids = torch.from_numpy(CLIPTokenizer.default().encode(EXAMPLE_PROMPT, max_length=shape[-1]))  # [1, 77]
            tensors.append(ids.expand(*shape).contiguous())
        elif spec.name == "timestep":
            tensors.append(torch.full(shape, 999.0))
        else:
            tensors.append(torch.randn(shape, generator=gen))
    return tuple(tensors)


def run_stages(plans: Sequence[Plan], convert_one: Callable[[Plan, Callable[[str], None]], R], progress: bool, *,
               stages: Sequence[str] | Callable[[Plan], Sequence[str]],
               label: Callable[[Plan], str] = lambda plan: plan.name) -> dict[str, R]:
    """``convert_one(plan, stage)`` for each plan, behind a progress bar on stderr; results by name.

    ``stages`` (or ``stages(plan)``) names the stages ``convert_one`` announces with ``stage(name)``,
    in order; the bar advances at each after the first and once more when the component is done.
    """
    results: dict[str, R] = {}
    for plan in plans:
        names = tuple(stages(plan) if callable(stages) else stages)
        with tqdm(total=len(names), desc=label(plan), unit="stage", file=sys.stderr, disable=not progress,
                  leave=True) as bar:
            def stage(name: str, bar: tqdm = bar, first: str = names[0]) -> None:
                bar.set_postfix_str(name)
                bar.update(0 if name == first else 1)

            results[plan.name] = convert_one(plan, stage)
            bar.update(1)
    return results


def manifest_entries(reference: TorchRuntime, model: dict[str, Any] | None,
                     adapter: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest's ``model`` and ``adapter`` as given, or taken from ``reference.info``."""
    from sun_edge.export import adapter_entry, model_entry

    return (model if model is not None else model_entry(reference),
            adapter if adapter is not None else adapter_entry(reference))


def write_tokenizer(directory: Path) -> dict[str, str]:
    """Write ``vocab.json`` and ``merges.txt`` into ``directory``; the manifest's ``tokenizer``."""
    from sun_edge.tokenizer import MERGES_FILE, VOCAB_FILE, write_tokenizer_files

    write_tokenizer_files(directory)
    return {"vocab": VOCAB_FILE, "merges": MERGES_FILE}


def common_manifest_fields(reference: TorchRuntime, options: ExportOptions, *, model: dict[str, Any],
                           adapter: dict[str, Any], tokenizer: dict[str, str]) -> dict[str, Any]:
    """The ``Manifest`` fields every target writes alike: geometry, model, adapter, TAESD source,
    scheduler and baseline defaults, tokenizer, version (a target adds target, precision,
    components, extra)."""
    from sun_edge import __version__
    from sun_edge.export import tiny_decoder_entry
    from sun_edge.pipeline import Settings

    shape = geometry(reference, options)
    sun, base = Settings(), Settings.baseline()
    return {
        "image": {"height": shape.height, "width": shape.width},
        "latent": {"channels": shape.latent_channels, "height": shape.latent_height, "width": shape.latent_width,
                   "scaling_factor": reference.scaling_factor, "unet_in_channels": shape.unet_latents[1]},
        "text": {"tokens": shape.text_tokens, "dim": shape.text_dim},
        "model": model, "adapter": adapter,
        "scheduler": {"name": sun.scheduler, "spacing": sun.spacing, "steps": sun.steps},
        "baseline": {"name": base.scheduler, "spacing": base.spacing, "steps": base.steps, "guidance": base.guidance},
        "tokenizer": tokenizer, "sun_edge_version": __version__,
        "vae_decoder_tiny": tiny_decoder_entry(reference),
        "batch": {"min": 1, "max": options.max_batch},
        "controlnet": controlnet_entry(reference),
    }


def finish(directory: Path, manifest: Manifest, reference: TorchRuntime, *, check: Callable[[Path], Any],
           parity: ParityFn | None) -> Manifest:
    """Write ``manifest``, ``check(directory)`` the bundle as a runtime will see it, then record
    ``parity(reference, directory)`` in the manifest. Returns the manifest written last."""
    write_manifest(directory, manifest)
    check(directory)
    if parity is not None:
        from sun_edge.runtimes.base import return_freed_memory

        return_freed_memory()  # what tracing freed, before parity loads each graph beside the reference
        manifest = replace(manifest, parity=dict(parity(reference, directory)))
        write_manifest(directory, manifest)
    return manifest
