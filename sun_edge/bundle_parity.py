"""Re-checking a bundle: open it with the runtime its target names, rebuild the PyTorch reference it
was exported from, compare them (``sun_edge.parity``), and say how the reference differs from what
the bundle recorded. ``export_parity`` is the exporters' hook; ``check_bundle`` is ``sun-edge parity``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sun_edge.components import Runtime
from sun_edge.errors import SunEdgeError
from sun_edge.parity import ParityReport, check_report, compare_runtimes
from sun_edge.pipeline import Settings


def open_checked_runtime(bundle: Any, provider: str = "cpu", runtime: str | None = None, **options: Any) -> Runtime:
    """The runtime for an opened bundle: ``runtime``, by default the one its target checks with here (Core ML's
    evaluator off macOS); ``options`` are that runtime's (``ov_device``, ``ov_precision`` for openvino)."""
    from sun_edge.export.targets import target
    from sun_edge.runtimes import open_bundle_runtime

    return open_bundle_runtime(bundle, runtime or target(bundle.manifest.target).parity_runtime, provider=provider,
                               **options)


def bundle_report(reference: Runtime, bundle_dir: Path, *, precision: str | None = None, seeds: Sequence[int] = (0,),
                  provider: str = "cpu", runtime: str | None = None, **options: Any) -> ParityReport:
    """Compare a bundle's graphs with ``reference`` at the bundle's size and scheduler, each component at its precision
    (or at the one the runtime reports, ``sun_edge.parity.compare_runtimes``); ``runtime`` and ``options`` as
    ``open_checked_runtime``'s. The bundle is opened (and its hashes checked) once."""
    from sun_edge.bundle import open_bundle

    bundle = open_bundle(bundle_dir)
    manifest = bundle.manifest
    candidate = open_checked_runtime(bundle, provider, runtime, **options)
    return compare_runtimes(reference, candidate, precision=precision or manifest.precision, seeds=seeds,
                            settings=Settings.from_manifest(manifest), target=manifest.target,
                            precisions={name: c.precision for name, c in manifest.components.items()},
                            batch=int(manifest.batch["max"]))


def export_parity(reference_runtime: Runtime, bundle_dir: Path, precision: str | None = None, *,
                  seeds: Sequence[int] = (0,), provider: str = "cpu") -> dict[str, Any]:
    """The exporter's hook (``sun_edge.export.ParityFn``), run on the complete bundle before it is moved into place.

    Opens the bundle directory with its runtime, compares it with ``reference_runtime`` on real
    inputs and returns the figures for the manifest's ``parity`` field; raises SunEdgeError if a
    component is below its threshold, so that a bad export never lands. ``precision`` defaults to
    the manifest's.
    """
    report = bundle_report(reference_runtime, bundle_dir, precision=precision, seeds=seeds, provider=provider)
    check_report(report)
    return report.to_dict()


@dataclass(frozen=True)
class BundleCheck:
    """``check_bundle``'s result: the report, and how the reference differs from what the bundle recorded."""

    report: ParityReport
    mismatches: tuple[str, ...]  # empty when the reference's sha256s equal the manifest's

    def to_dict(self) -> dict[str, Any]:
        return {**self.report.to_dict(), "reference_matches_bundle": not self.mismatches,
                "reference_mismatches": list(self.mismatches)}


def reference_mismatches(manifest: Any, info: dict[str, Any],
                         loras: Sequence[tuple[Path, float]] | None = None) -> tuple[str, ...]:
    """Where the reference (its ``runtime.info``, the LoRA files given) differs from what the manifest recorded."""
    from sun_edge.weights import sha256_file

    out = []
    for what, recorded, actual in (("model", (manifest.model or {}).get("sha256"), info.get("model_sha256")),
                                   ("adapter", (manifest.adapter or {}).get("sha256"), info.get("adapter_sha256")),
                                   ("ControlNet", (getattr(manifest, "controlnet", None) or {}).get("sha256"),
                                    info.get("controlnet_sha256"))):
        if recorded and recorded != actual:
            out.append(f"{what} sha256 {actual[:12] + '...' if actual else 'unknown'} differs from the bundle's "
                       f"{recorded[:12]}...")
    if loras is not None:
        recorded_loras = sorted((x.get("sha256"), float(x.get("scale", 1.0))) for x in (manifest.model or {}).get("loras") or [])
        if sorted((sha256_file(Path(p)), float(scale)) for p, scale in loras) != recorded_loras:
            out.append("the LoRAs given (sha256, scale) differ from those merged at export")
    return tuple(out)


def reference_for_bundle(manifest: Any, *, model: str | None = None, adapter: str | None = None,
                         loras: Sequence[tuple[Path, float]] | None = None, allow_pickle: bool = False,
                         vae_decoder: str | None = None) -> Runtime:
    """The PyTorch reference a bundle was exported from: the manifest's model/adapter ``path``s unless overridden.

    A bundle with a TAESD graph gets its TAESD decoder too (``vae_decoder`` ``tiny:PATH``, default the
    path its manifest records), so that ``vae_decoder_tiny`` is checked against its own PyTorch module.
    """
    from sun_edge.runtimes.pytorch import TorchRuntime

    model = model or (manifest.model or {}).get("path")
    adapter = adapter or (manifest.adapter or {}).get("path")
    if not model:
        raise SunEdgeError("the bundle's manifest records no model path; pass --model NAME|PATH (the model it was exported from)")
    if not adapter:
        raise SunEdgeError("the bundle's manifest records no adapter path; pass --adapter PATH (the adapter it was exported from)")
    if loras is None:  # the LoRAs merged at export, where the manifest says where they are
        recorded = (manifest.model or {}).get("loras") or []
        unknown = [str(x.get("file", x)) for x in recorded if not x.get("path")]
        if unknown:
            raise SunEdgeError(f"the bundle was exported with LoRA(s) {', '.join(unknown)} and its manifest records no "
                               "path for them; pass each with --lora FILE[:SCALE]")
        loras = [(Path(x["path"]), float(x.get("scale", 1.0))) for x in recorded]
    if "vae_decoder_tiny" in getattr(manifest, "components", {}):
        recorded_tiny = (getattr(manifest, "vae_decoder_tiny", None) or {}).get("path")
        if not vae_decoder and not recorded_tiny:
            raise SunEdgeError("the bundle has a TAESD decoder and its manifest records no path for it; pass "
                               "--vae-decoder tiny:PATH (the TAESD weights it was exported from)")
        vae_decoder = vae_decoder or f"tiny:{recorded_tiny}"
    elif vae_decoder not in (None, "full"):
        raise SunEdgeError("--vae-decoder checks a bundle's TAESD decoder, and this bundle has none (vae_decoder_tiny)")
    controlnet = None
    if "controlnet" in getattr(manifest, "components", {}):  # its graph is checked against the ControlNet it came from
        controlnet = (getattr(manifest, "controlnet", None) or {}).get("path")
        if not controlnet:
            raise SunEdgeError("the bundle has a ControlNet graph and its manifest records no path for the ControlNet "
                               "it was exported from; re-export it")
    return TorchRuntime.load(model, adapter, loras=tuple(loras), allow_pickle=allow_pickle, vae_decoder=vae_decoder,
                             controlnet=controlnet)


def _tiny_mismatch(manifest: Any, reference: Any) -> tuple[str, ...]:
    """How the reference's TAESD weights differ from those the bundle recorded (sha256), if they do."""
    from sun_edge.taesd import weights_file
    from sun_edge.weights import sha256_file

    recorded = (getattr(manifest, "vae_decoder_tiny", None) or {}).get("sha256")
    tiny = getattr(reference, "tiny_decoder", None)
    if not recorded or tiny is None:
        return ()
    actual = sha256_file(weights_file(Path(tiny.source)))
    return () if actual == recorded else (f"TAESD decoder sha256 {actual[:12]}... differs from the bundle's {recorded[:12]}...",)


def check_bundle(bundle_dir: Path, *, seeds: Sequence[int] = (0,), model: str | None = None, adapter: str | None = None,
                 loras: Sequence[tuple[Path, float]] | None = None, allow_pickle: bool = False,
                 provider: str = "cpu", vae_decoder: str | None = None, runtime: str | None = None,
                 **options: Any) -> BundleCheck:
    """``sun-edge parity``: verify every file of a bundle against its recorded sha256 (no cache), then re-run the
    export's parity check on it, against its reference model."""
    from sun_edge.bundle import open_bundle

    manifest = open_bundle(bundle_dir, verify="full").manifest
    reference = reference_for_bundle(manifest, model=model, adapter=adapter, loras=loras, allow_pickle=allow_pickle,
                                     vae_decoder=vae_decoder)
    mismatches = reference_mismatches(manifest, getattr(reference, "info", {}), loras) + _tiny_mismatch(manifest, reference)
    return BundleCheck(bundle_report(reference, bundle_dir, seeds=seeds, provider=provider, runtime=runtime, **options),
                       mismatches)
