"""Export bundles: a directory of graphs, tokenizer files and ``manifest.json``.

The manifest says everything a runtime needs to drive the graphs without PyTorch: the target
and precision, image and latent geometry, each component's file(s) with their input/output
names, dtypes and shapes, the model and adapter the graphs were made from (names, sha256), and
the TAESD decoder when the bundle has one, scheduler defaults, tokenizer files, the sun-edge
version, and the parity measured at export.

A bundle is written into a partial sibling folder and renamed into place only when complete
(``bundle_writer``, over ``sun_edge.files``), so a failed export never leaves a half bundle that
looks valid; ``--force`` replaces an existing sun-edge bundle and nothing else.
``open_bundle`` validates the manifest (``sun_edge.bundle_check``: types, geometry, file names
confined to the folder), checks that every file it lists is present with the recorded size and,
unless told otherwise, that their sha256 match (``sun_edge.bundle_hashes``: once per file
version, cached); runtimes then check each graph's inputs against the manifest.

NumPy-free and torch-free: an app that only runs bundles imports this.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from sun_edge.errors import SunEdgeError, first_line
from sun_edge.files import atomic_directory, write_text

FORMAT = "sun-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
Verify = Literal["sizes", "cached", "full"]
VERIFY_MODES: tuple[str, ...] = ("sizes", "cached", "full")


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
    batch: dict[str, int] = field(default_factory=lambda: {"min": 1, "max": 1})  # images per SUN UNet call
    controlnet: dict[str, Any] | None = None  # the ControlNet graph's source: name, path, sha256, parameters, residuals
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST) -> "Manifest":
        """Parse and validate (``sun_edge.bundle_check``); every problem is one line naming the field."""
        from sun_edge.bundle_check import check_manifest

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SunEdgeError(f"{where} is not a sun-edge bundle manifest (format is not {FORMAT!r})")
        version = data.get("format_version")
        if not (isinstance(version, int) and not isinstance(version, bool) and version == FORMAT_VERSION):
            raise SunEdgeError(f"{where}: bundle format version {version!r} is not supported "
                               f"(this sun-edge reads version {FORMAT_VERSION}); re-export the bundle")
        optional = ("parity", "extra", "format", "format_version", "adapter", "vae_decoder_tiny", "batch", "controlnet")
        required = {f for f in cls.__dataclass_fields__ if f not in optional}
        missing = sorted(required - data.keys())
        if missing:
            raise SunEdgeError(f"{where}: missing field(s) {', '.join(missing)}; the manifest was edited or is "
                               "incomplete: re-export the bundle")
        check_manifest(data, where)
        components = {name: _component(c) for name, c in data["components"].items()}
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "components"}
        fields.setdefault("adapter", None)  # optional in the file, a field without default in the class
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

    def verify_hashes(self, *, cache: bool = False) -> None:
        """Recompute every recorded file's sha256 and compare with the manifest (``cache``: skip files verified before)."""
        from sun_edge.bundle_hashes import verify_hashes

        verify_hashes(self, use_cache=cache)


def open_bundle(path: Path | str, verify: Verify = "cached") -> Bundle:
    """Read and check a bundle; ``verify`` says how far its files are checked against the manifest.

    Always: the manifest is valid (``sun_edge.bundle_check``: types, geometry, file names inside
    the folder, no symbolic link leading out) and every file it lists is present with its
    recorded size. Then, by ``verify``:

    - ``"sizes"``: nothing more (a bundle whose hashes were just computed, e.g. by its exporter);
    - ``"cached"`` (the default; ``generate``, the runtimes, the server): every recorded sha256,
      except files verified before in the same version (device and inode, size, mtime, ctime):
      a cache file under the sun-edge home (``sun_edge.bundle_hashes`` says why), so a multi-GB
      bundle is hashed once, not at every run;
    - ``"full"``: every recorded sha256, now (``sun-edge parity``).
    """
    from sun_edge.bundle_check import check_paths

    if verify not in VERIFY_MODES:
        raise SunEdgeError(f"unknown bundle verification {verify!r}; valid: {', '.join(VERIFY_MODES)}")
    path = Path(path)
    if not path.is_dir():
        raise SunEdgeError(f"bundle {path} does not exist or is not a directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise SunEdgeError(f"{path} is not a bundle: it has no {MANIFEST}")
    try:
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise SunEdgeError(f"{manifest_path} is {manifest_path.stat().st_size} bytes, too big for a manifest "
                               "(a few KB); re-export the bundle")
        data = json.loads(manifest_path.read_text("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise SunEdgeError(f"{manifest_path}: not valid JSON ({first_line(e)}); re-export the bundle") from e
    manifest = Manifest.from_dict(data, str(manifest_path))
    check_paths(path, manifest, str(manifest_path))
    expected = {name: size for c in manifest.components.values() for name, size in c.files.items()}
    for name in (manifest.tokenizer["vocab"], manifest.tokenizer["merges"]):
        expected.setdefault(name, -1)
    for name, size in expected.items():
        file = path / name
        if not file.exists():
            raise SunEdgeError(f"bundle {path} is missing {name}; re-export it (the bundle is incomplete)")
        if size >= 0 and (not file.is_file() or file.stat().st_size != size):
            actual = f"{file.stat().st_size} bytes" if file.is_file() else "a folder"
            raise SunEdgeError(f"bundle {path}: {name} has {actual}, the manifest says {size}; "
                               "the file was changed after export: re-export the bundle")
    bundle = Bundle(path, manifest)
    if verify != "sizes":
        bundle.verify_hashes(cache=verify == "cached")
    return bundle


def is_bundle(path: Path | str) -> bool:
    """Whether ``path`` is a folder whose ``manifest.json`` says it is a sun-edge bundle (any format version)."""
    return _not_a_bundle(Path(path)) is None


def _not_a_bundle(path: Path) -> str | None:
    """Why ``path`` (which exists) is not a sun-edge bundle that ``--force`` may replace; None if it is one."""
    if path.is_symlink():
        return "is a symbolic link"
    if not path.is_dir():
        return "is a file, not a sun-edge bundle"
    try:
        if not any(path.iterdir()):
            return None  # an empty folder: nothing to lose
        data = json.loads((path / MANIFEST).read_text("utf-8"))
    except FileNotFoundError:
        return f"is a folder that is not a sun-edge bundle (it has no {MANIFEST})"
    except (OSError, ValueError, RecursionError):
        return f"is a folder whose {MANIFEST} is not a sun-edge manifest"
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return f"is a folder whose {MANIFEST} is not a sun-edge manifest"
    return None


def check_destination(out: Path, force: bool) -> None:
    """Fail early (before any work) unless ``out`` is free, or an existing sun-edge bundle and ``force`` is set.

    ``--force`` replaces only a sun-edge bundle (a folder whose ``manifest.json`` says so) or an
    empty folder: a file, a symbolic link or a folder of anything else is refused, untouched.
    """
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise SunEdgeError(f"-o {out} names no new folder; give the bundle a name, e.g. -o {Path(out, 'bundle')}")
    if os.path.lexists(out):
        problem = _not_a_bundle(out)
        if problem is not None:
            raise SunEdgeError(f"{out} already exists and {problem}; choose another -o "
                               "(--force replaces only a sun-edge bundle)")
        if not force:
            raise SunEdgeError(f"{out} already exists; pass --force to replace it, or choose another -o")
    if not out.parent.resolve().is_dir():
        raise SunEdgeError(f"output folder {out.parent} does not exist; create it first")


@contextmanager
def bundle_writer(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a partial folder beside ``out`` (``sun_edge.files.atomic_directory``); on success it becomes ``out``.

    The destination is checked before (``check_destination``) and again just before the rename:
    with ``force`` only a sun-edge bundle is replaced, and only once the new one is complete.
    On failure the partial is removed and ``out`` is left as it was.
    """
    out = Path(out)
    check_destination(out, force)

    def complete(tmp: Path) -> None:
        if not (tmp / MANIFEST).is_file():
            raise SunEdgeError(f"internal error: export finished without writing {MANIFEST}")
        check_destination(out, force)  # what is at ``out`` may have changed during the export

    with atomic_directory(out, replace=True, before_commit=complete) as tmp:
        yield tmp


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (last, once every component is in place): readers never see half of one."""
    return write_text(Path(directory) / MANIFEST, manifest.to_json())


def describe_files(directory: Path, files: list[str]) -> tuple[dict[str, int], dict[str, str]]:
    """Sizes and sha256 of a component's files, for its manifest entry."""
    from sun_edge.weights import sha256_file

    sizes = {f: (Path(directory) / f).stat().st_size for f in files}
    hashes = {f: sha256_file(Path(directory) / f) for f in files}
    return sizes, hashes
