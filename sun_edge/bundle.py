"""Export bundles: a directory of graphs, tokenizer files and ``manifest.json``.

The manifest says everything a runtime needs to drive the graphs without PyTorch: the target
and precision, image and latent geometry, each component's file(s) with their input/output
names, dtypes and shapes, the model and adapter the graphs were made from (names, sha256), and
the TAESD decoder when the bundle has one, scheduler defaults, tokenizer files, the sun-edge
version, and the parity measured at export.

A bundle is written into a temporary sibling directory and renamed into place only when
complete (``bundle_writer``), so a failed export never leaves a half bundle that looks valid.
``open_bundle`` checks the manifest's structure and that every file it lists is present with
the recorded size; runtimes then check each graph's inputs against the manifest.

NumPy-free and torch-free: an app that only runs bundles imports this.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sun_edge.errors import SunEdgeError

FORMAT = "sun-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64"
    shape: tuple[int, ...]  # -1: a free dimension (the CFG baseline UNet's batch, 1 or 2)


@dataclass(frozen=True)
class Component:
    """One graph of the bundle and the files that hold it."""

    file: str  # the graph, relative to the bundle
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str  # "fp32" | "fp16" (fp16 graphs keep fragile parts in fp32)
    files: dict[str, int] = field(default_factory=dict)  # every file of the component (graph + external data): bytes
    sha256: dict[str, str] = field(default_factory=dict)  # file -> sha256

    def input(self, name: str) -> TensorSpec:
        return next(s for s in self.inputs if s.name == name)


@dataclass(frozen=True)
class Manifest:
    """The contents of ``manifest.json``."""

    target: str
    precision: str
    image: dict[str, int]  # height, width
    latent: dict[str, Any]  # channels, height, width, scaling_factor
    text: dict[str, int]  # tokens, dim
    components: dict[str, Component]
    model: dict[str, Any]  # name, sha256, loras
    adapter: dict[str, Any] | None  # name, sha256, parameters, extra_positive
    scheduler: dict[str, Any]  # SUN defaults: name, spacing, steps
    baseline: dict[str, Any]  # CFG defaults: name, spacing, steps, guidance
    tokenizer: dict[str, str]  # vocab, merges
    sun_edge_version: str
    parity: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # target-specific (e.g. TensorRT engines)
    vae_decoder_tiny: dict[str, Any] | None = None  # TAESD source of the vae_decoder_tiny graph: name, path, sha256, parameters
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST) -> "Manifest":
        """Parse and validate; every problem is one line naming the field."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SunEdgeError(f"{where} is not a sun-edge bundle manifest (format is not {FORMAT!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise SunEdgeError(f"{where}: bundle format version {data.get('format_version')!r} is not supported "
                               f"(this sun-edge reads version {FORMAT_VERSION}); re-export the bundle")
        optional = ("parity", "extra", "format", "format_version", "adapter", "vae_decoder_tiny")
        required = {f for f in cls.__dataclass_fields__ if f not in optional}
        missing = sorted(required - data.keys())
        if missing:
            raise SunEdgeError(f"{where}: missing field(s) {', '.join(missing)}; the manifest was edited or is incomplete")
        try:
            components = {name: _component(c) for name, c in data["components"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SunEdgeError(f"{where}: malformed components entry ({type(e).__name__}: {e}); re-export the bundle") from e
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "components"}
        return cls(components=components, **fields)


def _spec(d: dict[str, Any]) -> TensorSpec:
    return TensorSpec(str(d["name"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]))


def _component(d: dict[str, Any]) -> Component:
    return Component(file=str(d["file"]), inputs=tuple(_spec(s) for s in d["inputs"]),
                     outputs=tuple(_spec(s) for s in d["outputs"]), precision=str(d["precision"]),
                     files={str(k): int(v) for k, v in d.get("files", {}).items()},
                     sha256={str(k): str(v) for k, v in d.get("sha256", {}).items()})


@dataclass(frozen=True)
class Bundle:
    """An opened bundle: its directory and manifest."""

    path: Path
    manifest: Manifest

    def file(self, component: str) -> Path:
        if component not in self.manifest.components:
            raise SunEdgeError(f"bundle {self.path} has no {component} component; "
                               f"it has: {', '.join(self.manifest.components)}")
        return self.path / self.manifest.components[component].file

    def verify_hashes(self) -> None:
        """Recompute every component file's sha256 and compare with the manifest (slow for big graphs)."""
        from sun_edge.weights import sha256_file

        for name, comp in self.manifest.components.items():
            for rel, digest in comp.sha256.items():
                if sha256_file(self.path / rel) != digest:
                    raise SunEdgeError(f"bundle {self.path}: {rel} ({name}) does not match the sha256 in {MANIFEST}; "
                                       "the file was changed after export: re-export the bundle")


def open_bundle(path: Path | str) -> Bundle:
    """Read and check a bundle: manifest structure, and every listed file present with its recorded size."""
    path = Path(path)
    if not path.is_dir():
        raise SunEdgeError(f"bundle {path} does not exist or is not a directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise SunEdgeError(f"{path} is not a bundle: it has no {MANIFEST}")
    try:
        data = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise SunEdgeError(f"{manifest_path}: not valid JSON ({e}); re-export the bundle") from e
    manifest = Manifest.from_dict(data, str(manifest_path))
    expected = {name: size for c in manifest.components.values() for name, size in c.files.items()}
    for name in (manifest.tokenizer.get("vocab"), manifest.tokenizer.get("merges")):
        if name:
            expected.setdefault(name, -1)
    for name, size in expected.items():
        file = path / name
        if not file.is_file():
            raise SunEdgeError(f"bundle {path} is missing {name}; re-export it (the bundle is incomplete)")
        if size >= 0 and file.stat().st_size != size:
            raise SunEdgeError(f"bundle {path}: {name} has {file.stat().st_size} bytes, the manifest says {size}; "
                               "the file was changed after export: re-export the bundle")
    return Bundle(path, manifest)


def check_destination(out: Path, force: bool) -> None:
    """Fail early (before any work) if ``out`` exists and ``force`` is not set."""
    out = Path(out)
    if out.exists() and not force:
        raise SunEdgeError(f"{out} already exists; pass --force to replace it, or choose another -o")
    if not out.parent.resolve().is_dir():
        raise SunEdgeError(f"output folder {out.parent} does not exist; create it first")


@contextmanager
def bundle_writer(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it replaces ``out``, on failure it is removed.

    The old bundle (with ``force``) is removed only after the new one is complete.
    """
    out = Path(out)
    check_destination(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise SunEdgeError(f"internal error: export finished without writing {MANIFEST}")
        os.chmod(tmp, _directory_mode())  # mkdtemp makes it private (0700); a bundle is shared like any folder
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _directory_mode() -> int:
    """The mode a new directory gets under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` (last, once every component is in place)."""
    target = Path(directory) / MANIFEST
    target.write_text(manifest.to_json())
    return target


def describe_files(directory: Path, files: list[str]) -> tuple[dict[str, int], dict[str, str]]:
    """Sizes and sha256 of a component's files, for its manifest entry."""
    from sun_edge.weights import sha256_file

    sizes = {f: (Path(directory) / f).stat().st_size for f in files}
    hashes = {f: sha256_file(Path(directory) / f) for f in files}
    return sizes, hashes
