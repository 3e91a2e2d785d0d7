"""``sun-edge export --target triton``: a Triton Inference Server model repository around a sun-edge bundle.

Layout (one model, ``sun_edge`` unless ``model_name`` says otherwise)::

    REPO/
      sun_edge_repository.json     what sun-edge wrote (so --force replaces only its own repositories)
      sun_edge/
        config.pbtxt               backend "python", max_batch_size from the bundle's batch range,
                                   dynamic_batching, instance_group (KIND_CPU, or KIND_GPU count/gpus),
                                   parameters: runtime, provider, max_steps, the bundle's manifest
        1/model.py                 imports sun_edge.export.triton_model.TritonPythonModel
        1/bundle/                  the bundle (ONNX: ONNX Runtime; TensorRT: the TensorRT runtime)

The pipeline is ONE python-backend model running ``sun_edge.Pipeline`` (NumPy sampler, the bundle's
runtime) rather than one model per component (tensorrt_plan) called step by step through BLS: the
exported UNet takes one ``timestep`` for its whole batch, so Triton could only batch UNet calls of
requests at the same step, which is exactly what batching whole requests in ``execute`` already does
(every request of a dynamic batch shares every UNet call), with none of BLS's per-step round trips
and with images equal to ``sun-edge generate`` by construction. TensorRT engines stay sun-edge's own
(``sun-edge build-engines``, per GPU generation, with its version rules) instead of plans Triton
must find prebuilt. docs/deploy.md says how the repository is served on a GPU fleet.

From a bundle (``bundle=PATH``: ONNX or TensorRT) nothing is loaded; from a model the bundle is
exported first (``bundle_target``: onnx or tensorrt) straight into the repository. The repository is
written to a partial folder and renamed into place when complete. No Triton package is needed to
write one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sun_edge.errors import SunEdgeError
from sun_edge.export import ExportOptions
from sun_edge.export.triton_model import INPUTS, OUTPUTS

MARKER = "sun_edge_repository.json"
FORMAT = "sun-edge-triton-repository"
KINDS = ("cpu", "gpu")
BUNDLE_TARGETS = ("onnx", "tensorrt")  # what the pipeline model runs (Core ML bundles are for Apple devices)
MODEL_PY = '''"""sun-edge's pipeline model (written by sun-edge export --target triton): the code is sun_edge.export.triton_model.

sun-edge and its runtime (onnxruntime or tensorrt) must be importable by the Python backend's stub:
installed into the container's Python with numpy<2 (the stub has NumPy 1's ABI), or named in
$SUN_EDGE_TRITON_SITE (sun-edge triton sets it, NumPy 1's folder first).
"""

import os
import site
import sys

_before = list(sys.path)
for _path in filter(None, os.environ.get("SUN_EDGE_TRITON_SITE", "").split(os.pathsep)):
    site.addsitedir(_path)  # processes .pth files (editable installs) too
sys.path[:] = [p for p in sys.path if p not in _before] + _before  # first: the stub's NumPy 1 before any NumPy 2

from sun_edge.export.triton_model import TritonPythonModel  # noqa: E402,F401
'''


@dataclass(frozen=True)
class TritonOptions(ExportOptions):
    """The model repository's options (the bundle options apply when a model is exported into it)."""

    bundle: Path | str | None = None  # package this bundle (nothing is loaded); None: export the model
    bundle_target: str = "onnx"  # from a model: the bundle inside (onnx or tensorrt)
    instance_kind: str | None = None  # cpu or gpu; default: gpu for a TensorRT bundle or with gpus, else cpu
    instances: int = 1  # model instances per device (each is one stub process holding the runtime)
    gpus: str | None = None  # with gpu: "0,1,2" (default: every GPU Triton sees)
    queue_delay_us: int = 20000  # how long the dynamic batcher holds a request for others
    max_steps: int = 50  # most sampling steps a request may ask for
    model_name: str = "sun_edge"

    def validate(self) -> None:
        super().validate()
        if self.bundle_target not in BUNDLE_TARGETS:
            raise SunEdgeError(f"--bundle-target {self.bundle_target!r} is not one Triton serves; valid: {', '.join(BUNDLE_TARGETS)}")
        if self.instance_kind is not None and self.instance_kind not in KINDS:
            raise SunEdgeError(f"--instance-kind {self.instance_kind!r} is unknown; valid: {', '.join(KINDS)}")
        for name, value, low, high in (("instances", self.instances, 1, 64), ("queue_delay_us", self.queue_delay_us, 0, 10**7),
                                       ("max_steps", self.max_steps, 1, 1000)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise SunEdgeError(f"--{name.replace('_', '-')} {value!r} is outside [{low}, {high}]")
        self.gpu_list()
        if not self.model_name or not all(c.isalnum() or c in "_-" for c in self.model_name):
            raise SunEdgeError(f"--model-name {self.model_name!r}: use letters, digits, '_' and '-'")

    def gpu_list(self) -> tuple[int, ...]:
        if self.gpus is None:
            return ()
        if self.instance_kind == "cpu":
            raise SunEdgeError("--gpus applies to --instance-kind gpu")
        try:
            ids = tuple(int(g) for g in str(self.gpus).split(","))
        except ValueError:
            raise SunEdgeError(f"--gpus {self.gpus!r}: give GPU numbers separated by commas, e.g. 0,1") from None
        if not ids or any(g < 0 for g in ids) or len(set(ids)) != len(ids):
            raise SunEdgeError(f"--gpus {self.gpus!r}: give distinct GPU numbers separated by commas, e.g. 0,1")
        return ids


def _quote(text: str) -> str:
    """A protobuf text-format string literal (UTF-8 passes through)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dims(shape: Sequence[int]) -> str:
    return "[ " + ", ".join(str(d) for d in shape) + " ]"


def model_config(manifest: Any, options: TritonOptions) -> str:
    """The pipeline model's ``config.pbtxt`` for a bundle's manifest."""
    kind = options.instance_kind or ("gpu" if manifest.target == "tensorrt" or options.gpus is not None else "cpu")
    if manifest.target == "tensorrt" and kind != "gpu":
        raise SunEdgeError("a TensorRT bundle runs on NVIDIA GPUs: drop --instance-kind cpu, or package an ONNX bundle")
    runtime = "tensorrt" if manifest.target == "tensorrt" else "onnxruntime"
    params = {"bundle": "bundle", "runtime": runtime, "max_steps": str(options.max_steps), "warm_up": "true",
              "sun_edge_manifest": json.dumps(asdict(manifest), separators=(",", ":"), ensure_ascii=False)}
    if runtime == "onnxruntime":
        params["provider"] = "cuda" if kind == "gpu" else "cpu"
    height, width = int(manifest.image["height"]), int(manifest.image["width"])
    max_batch = int((manifest.batch or {}).get("max", 1))
    group = f"kind: KIND_{kind.upper()} count: {options.instances}"
    if options.gpu_list():
        group += f" gpus: {_dims(options.gpu_list())}"
    lines = [f"name: {_quote(options.model_name)}", 'backend: "python"', f"max_batch_size: {max_batch}", "input ["]
    lines += [",\n".join(f"  {{ name: {_quote(n)} data_type: {t} dims: [ 1 ]{' optional: true' if opt else ''} }}"
                         for n, t, opt in INPUTS)]
    lines += ["]", "output ["]
    shapes = {"image": (height, width, 3)}
    lines += [",\n".join(f"  {{ name: {_quote(n)} data_type: {t} dims: {_dims(shapes.get(n, (1,)))} }}" for n, t in OUTPUTS)]
    lines += ["]", f"dynamic_batching {{ max_queue_delay_microseconds: {options.queue_delay_us} "
                   f"preferred_batch_size: [ {max_batch} ] }}",
              f"instance_group [ {{ {group} }} ]", "parameters ["]
    lines += [",\n".join(f"  {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}" for k, v in params.items())]
    lines += ["]"]
    return "\n".join(lines) + "\n"


def _check_destination(out: Path, force: bool) -> None:
    import os

    if out.name in ("", ".", ".."):
        raise SunEdgeError(f"-o {out} names no new folder; give the repository a name, e.g. -o {Path(out, 'triton-repo')}")
    if os.path.lexists(out):
        ours = out.is_dir() and not out.is_symlink() and ((out / MARKER).is_file() or not any(out.iterdir()))
        if not ours:
            raise SunEdgeError(f"{out} already exists and is not a model repository sun-edge wrote; choose another -o "
                               "(--force replaces only sun-edge's own)")
        if not force:
            raise SunEdgeError(f"{out} already exists; pass --force to replace it, or choose another -o")
    if not out.parent.resolve().is_dir():
        raise SunEdgeError(f"output folder {out.parent} does not exist; create it first")


def write_repository(out: Path | str, options: TritonOptions, fill_bundle: Any, *, force: bool = False) -> Path:
    """Write the repository to ``out``: ``fill_bundle(dest)`` puts the bundle at ``dest`` (it must not exist yet)."""
    from sun_edge.bundle import open_bundle
    from sun_edge.files import atomic_directory, write_text

    options.validate()
    out = Path(out)
    _check_destination(out, force)
    with atomic_directory(out, replace=True, before_commit=lambda _: _check_destination(out, force)) as tmp:
        version = tmp / options.model_name / "1"
        version.mkdir(parents=True)
        fill_bundle(version / "bundle")
        manifest = open_bundle(version / "bundle").manifest
        if manifest.target not in BUNDLE_TARGETS:
            raise SunEdgeError(f"a {manifest.target} bundle cannot be served by Triton; export one with --target onnx "
                               "or --target tensorrt")
        write_text(tmp / options.model_name / "config.pbtxt", model_config(manifest, options))
        write_text(version / "model.py", MODEL_PY)
        write_text(tmp / MARKER, json.dumps({"format": FORMAT, "model": options.model_name, "bundle_target": manifest.target,
                                             "max_batch_size": int(manifest.batch.get("max", 1)),
                                             "sun_edge_version": manifest.sun_edge_version}, indent=2) + "\n")
    return out


def export_from_bundle(bundle: Path | str, out: Path | str, options: TritonOptions, *, force: bool = False,
                       progress: bool = True) -> Path:
    """The repository of an existing bundle (copied in; its hashes are checked first)."""
    from sun_edge.bundle import open_bundle

    source = open_bundle(bundle).path

    def copy(dest: Path) -> None:
        shutil.copytree(source, dest, symlinks=False)

    return write_repository(out, options, copy, force=force)


def export_model(model: str, out: Path | str, options: TritonOptions, *, adapter: Path | str | None = None,
                 loras: Sequence[tuple[Path, float]] = (), allow_pickle: bool = False, force: bool = False,
                 parity: Any = None, progress: bool = True, vae_decoder: str | None = None) -> Path:
    """From a model: ``sun_edge.export.export`` writes a ``bundle_target`` bundle straight into the repository."""
    from sun_edge.export import export, export_options

    options.validate()
    _check_destination(Path(out), force)  # before the model loads
    inner = export_options(options.bundle_target, precision=options.precision, height=options.height,
                           width=options.width, with_baseline=options.with_baseline, max_batch=options.max_batch)

    def fill(dest: Path) -> None:
        export(options.bundle_target, model, dest, adapter=adapter, loras=loras, allow_pickle=allow_pickle,
               options=inner, parity=parity, progress=progress, vae_decoder=vae_decoder)

    return write_repository(out, options, fill, force=force)
