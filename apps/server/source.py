"""What the server serves: a bundle or a model, opened as ``sun-edge generate`` opens it.

``Source.settings`` builds the ``Settings`` of a request exactly as the CLI's ``generate`` does
(``Settings.from_manifest`` for a bundle, ``Settings.for_mode`` for a model, guidance 8 unless the
CFG baseline is asked for with another scale), so the same request and seed give the image
``sun-edge generate`` gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sun_edge.errors import SunEdgeError
from sun_edge.pipeline import Pipeline
from sun_edge.settings import Settings

DEFAULT_GUIDANCE = 8.0  # the CLI's --guidance default: SUN ignores it, the CFG baseline uses it


@dataclass(frozen=True)
class SourceOptions:
    """``sun-edge serve``'s model flags."""

    bundle: Path | None = None
    model: str = "pocket-base"
    adapter: str | None = None
    controlnet: str | None = None  # with a model: a ControlNet file, folder or registry name (a bundle carries its own)
    runtime: str | None = None  # with a bundle: default the one its target names
    provider: str = "cpu"  # ONNX Runtime execution provider
    cuda_graphs: bool = True  # TensorRT bundles
    device: str = "auto"  # with a model: cuda where there is a GPU, else cpu
    precision: str = "auto"  # with a model: fp16 on CUDA, else fp32
    optimize: str = "auto"  # with a model: CUDA graphs (one per batch size) on CUDA, else none
    threads: int | None = None  # with a model: torch's intra-op threads


@dataclass
class Source:
    """An opened runtime, its pipeline, and the sizes and modes it serves."""

    pipeline: Pipeline
    name: str  # the model's name as clients see it
    description: dict[str, Any]  # for /v1/info
    fixed_size: tuple[int, int] | None  # (height, width) of a bundle's static graphs
    size_range: tuple[int, int]  # smallest and largest side for a model
    native_size: int
    manifest: Any = None
    device: str = "cpu"

    @property
    def runtime(self) -> Any:
        return self.pipeline.runtime

    @property
    def has_baseline(self) -> bool:
        return bool(self.runtime.has("unet_plain"))

    @property
    def has_sun(self) -> bool:
        return bool(self.runtime.has("unet"))

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(m for m, ok in (("sun", self.has_sun), ("cfg", self.has_baseline)) if ok)

    def settings(self, mode: str, *, steps: int | None = None, scheduler: str | None = None,
                 height: int | None = None, width: int | None = None, guidance: float | None = None) -> Settings:
        """A request's settings, as ``sun-edge generate`` builds them from the same values."""
        if mode not in self.modes:
            raise SunEdgeError(f"mode {mode} is not served by this {self.name}; served: {', '.join(self.modes)}")
        common = {"guidance": DEFAULT_GUIDANCE if guidance is None or mode == "sun" else guidance, "noise": "torch"}
        if self.manifest is not None:
            settings = Settings.from_manifest(self.manifest, mode, steps=steps, scheduler=scheduler, height=height,
                                              width=width, **common)
        else:
            size = {"width": self.native_size if width is None else width,
                    "height": self.native_size if height is None else height}
            low, high = self.size_range
            for side, value in size.items():
                if not low <= value <= high or value % 8:
                    raise SunEdgeError(f"{side} {value} is not served: {self.name} makes sides that are multiples of 8 "
                                       f"in [{low}, {high}]")
            settings = Settings.for_mode(mode, steps=steps, scheduler=scheduler, **size, **common)
        settings.validate()
        return settings

    def sizes_text(self) -> str:
        if self.fixed_size is not None:
            return f"{self.fixed_size[1]}x{self.fixed_size[0]}"
        return f"multiples of 8 from {self.size_range[0]} to {self.size_range[1]} per side"


def open_source(options: SourceOptions) -> Source:
    """Open the runtime (this loads the model: seconds) and describe what it serves."""
    if options.bundle is not None:
        from sun_edge.bundle import open_bundle
        from sun_edge.runtimes import open_bundle_runtime

        bundle = open_bundle(options.bundle)
        runtime = open_bundle_runtime(bundle, options.runtime, provider=options.provider,
                                      cuda_graphs=options.cuda_graphs)
        manifest = bundle.manifest
        size = (int(manifest.image["height"]), int(manifest.image["width"]))
        info = runtime.info
        name = str(info.get("model") or Path(options.bundle).name)
        description = {"bundle": Path(options.bundle).name, "target": manifest.target, "precision": manifest.precision,
                       "runtime": runtime.name}
        return Source(Pipeline(runtime, runtime.tokenizer()), name, description, size, (size[0], size[0]), size[0],
                      manifest, device=options.provider)
    from sun_edge.runtimes.pytorch import TorchRuntime
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    cuda = torch.cuda.is_available()
    device = options.device if options.device != "auto" else ("cuda" if cuda else "cpu")
    on_cuda = device.startswith("cuda")
    precision = options.precision if options.precision != "auto" else ("fp16" if on_cuda else "fp32")
    optimize = options.optimize if options.optimize != "auto" else ("cuda-graph" if on_cuda else "none")
    extra = {}
    if options.controlnet is not None:
        from sun_edge.models import resolve_controlnet

        extra["controlnet"] = resolve_controlnet(options.controlnet)  # a path, or a shipped ControlNet's name
    runtime = TorchRuntime.load(options.model, options.adapter, device=device, precision=precision, optimize=optimize,
                                **extra)
    native = runtime.native_size
    name = str(runtime.info.get("model") or options.model)
    description = {"runtime": "pytorch", "device": device, "precision": precision, "optimize": optimize}
    return Source(Pipeline(runtime), name, description, None, (max(8, native // 2), native * 2), native, device=device)
