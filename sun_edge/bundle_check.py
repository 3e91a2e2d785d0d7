"""Checking a manifest before anything trusts it: every field's type, the geometry, the file names.

``check_manifest(data, where)`` runs on the parsed JSON before ``Manifest`` is built, so a
manifest that was edited, damaged or written by something else fails with one line naming the
field and saying to re-export, never with a traceback later in a runtime. It checks:

- types: every field the runtimes, parity and the pipeline read has the type they expect
  (integers are not booleans, numbers are finite), with sane bounds (image sides up to
  ``MAX_SIDE``, steps up to ``MAX_STEPS``);
- geometry: ``image = latent x f`` with one power-of-two VAE factor ``f`` for both sides, and
  every component's inputs and outputs as the component table (``sun_edge.components``) gives
  them for that geometry (names, shapes; integer token ids may be int32, as Core ML's are), so
  the components agree with each other and with the image size a PNG will report;
- file names: component files, their ``files`` and ``sha256`` keys, tokenizer files and
  TensorRT engine files are relative paths inside the bundle (no absolute path, drive, ``..``,
  backslash or control character); ``check_paths`` adds, on disk, that no symbolic link leads out of it.

NumPy-free and torch-free.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from sun_edge.errors import SunEdgeError

_PRECISION = re.compile(r"^(fp32|fp16)(-pal[123468])?$|^int8$")  # Core ML's palettized fp16-pal6; OpenVINO's int8 weights
DTYPES = ("float32", "float16", "int64", "int32")
INTEGER_DTYPES = ("int64", "int32")  # token ids: int64 (ONNX) or int32 (Core ML)
MAX_SIDE = 16384  # image pixels per side
MAX_BATCH = 256  # images per UNet call a bundle may declare
MAX_STEPS = 1000  # SD1.5 has 1000 training timesteps
MAX_DIM = 1 << 20  # any other tensor dimension
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _show(value: Any) -> str:
    """A value for a one-line message: its JSON type and a short repr (newlines escaped)."""
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object",
             type(None): "null"}
    text = repr(value)
    return f"{kinds.get(type(value), type(value).__name__)} {text[:40] + '...' if len(text) > 40 else text}"


def _printable(text: Any) -> str:
    """A manifest string as it is when printable, else its repr (a name holding a newline stays on one line)."""
    return text if isinstance(text, str) and text.isprintable() else repr(text)


class _Check:
    """Field checks that raise one line: ``<where>: <field> <problem>; re-export the bundle``."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, problem: str) -> SunEdgeError:
        field = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in field)  # keys come from the file
        return SunEdgeError(f"{self.where}: {field} {problem}; the manifest was edited or damaged: re-export the bundle")

    def obj(self, field: str, value: Any, keys: tuple[str, ...] = ()) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(field, f"must be an object, found {_show(value)}")
        missing = [k for k in keys if k not in value]
        if missing:
            raise self.fail(field, f"has no {', '.join(missing)}")
        return value

    def integer(self, field: str, value: Any, lo: int = 1, hi: int = MAX_DIM) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(field, f"must be an integer, found {_show(value)}")
        if not lo <= value <= hi:
            raise self.fail(field, f"is {value}, outside {lo}..{hi}")
        return value

    def number(self, field: str, value: Any, positive: bool = False) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise self.fail(field, f"must be a finite number, found {_show(value)}")
        if positive and value <= 0:
            raise self.fail(field, f"is {value}, must be positive")
        return float(value)

    def string(self, field: str, value: Any, *, optional: bool = False, choices: tuple[str, ...] = ()) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(field, f"must be a non-empty string, found {_show(value)}")
        if choices and value not in choices:
            raise self.fail(field, f"is {value!r}; valid values: {', '.join(choices)}")
        return value

    def precision(self, field: str, value: Any) -> None:
        self.string(field, value)
        if not _PRECISION.match(value):
            raise self.fail(field, f"is {value!r}; valid values: fp32, fp16, or fp16-palN for N-bit palettized weights "
                                   "(int8: OpenVINO IR int8 weights)")

    def optional(self, field: str, value: Any, kind: type) -> None:
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise self.fail(field, f"must be {'an integer' if kind is int else kind.__name__} or null, found {_show(value)}")

    def sha256(self, field: str, value: Any, *, optional: bool = False) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str) or not _SHA256.match(value):
            raise self.fail(field, f"must be a sha256 (64 lowercase hex digits), found {_show(value)}")

    def path(self, field: str, value: Any) -> str:
        """A file name relative to the bundle folder that stays inside it."""
        self.string(field, value)
        windows = PureWindowsPath(value)
        if value.startswith("/") or windows.drive or windows.root:
            raise self.fail(field, f"is {value!r}, an absolute path; a bundle's files must lie inside its folder")
        if "\\" in value or not value.isprintable():
            raise self.fail(field, f"is {value!r}, which holds a backslash or a control character; file names use '/'")
        if any(part == ".." for part in PurePosixPath(value).parts):
            raise self.fail(field, f"is {value!r}, which leads out of the bundle folder ('..')")
        return value


def check_manifest(data: Mapping[str, Any], where: str) -> None:
    """Raise one ``SunEdgeError`` line for the first field of ``data`` (format and version already checked) that is wrong."""
    c = _Check(where)
    c.string("target", data["target"])
    c.precision("precision", data["precision"])
    c.string("sun_edge_version", data["sun_edge_version"])
    image = c.obj("image", data["image"], ("height", "width"))
    latent = c.obj("latent", data["latent"], ("channels", "height", "width", "scaling_factor"))
    text = c.obj("text", data["text"], ("tokens", "dim"))
    for side in ("height", "width"):
        c.integer(f"image.{side}", image[side], hi=MAX_SIDE)
        c.integer(f"latent.{side}", latent[side], hi=MAX_SIDE)
    c.integer("latent.channels", latent["channels"], hi=1024)
    c.number("latent.scaling_factor", latent["scaling_factor"], positive=True)
    c.integer("text.tokens", text["tokens"], hi=4096)
    c.integer("text.dim", text["dim"], hi=65536)
    factor = _vae_factor(c, image, latent)
    if "batch" in data:
        batch = c.obj("batch", data["batch"], ("min", "max"))
        low = c.integer("batch.min", batch["min"], hi=1)
        c.integer("batch.max", batch["max"], lo=low, hi=MAX_BATCH)
    _check_scheduler(c, "scheduler", data["scheduler"], guidance=False)
    _check_scheduler(c, "baseline", data["baseline"], guidance=True)
    tokenizer = c.obj("tokenizer", data["tokenizer"], ("vocab", "merges"))
    c.path("tokenizer.vocab", tokenizer["vocab"])
    c.path("tokenizer.merges", tokenizer["merges"])
    _check_sources(c, data)
    for name in ("parity", "extra"):
        if name in data:
            c.obj(name, data[name])
    components = c.obj("components", data["components"])
    if not components:
        raise c.fail("components", "is empty")
    for name, comp in components.items():
        _check_component(c, f"components.{name}", comp)
    _check_geometry(c, data, factor)
    tensorrt = (data.get("extra") or {}).get("tensorrt")
    if tensorrt is not None:
        _check_tensorrt(c, tensorrt, components)


def _vae_factor(c: _Check, image: Mapping[str, Any], latent: Mapping[str, Any]) -> int:
    """``image = latent x f`` for both sides, with one power-of-two ``f``."""
    h, w, lh, lw = image["height"], image["width"], latent["height"], latent["width"]
    if h % lh or w % lw or h // lh != w // lw or (h // lh) & (h // lh - 1):
        raise c.fail("image", f"is {h}x{w} and latent is {lh}x{lw}: the image is not the latent times one "
                              "power-of-two VAE factor")
    return h // lh


def _check_scheduler(c: _Check, field: str, value: Any, *, guidance: bool) -> None:
    entry = c.obj(field, value, ("name", "spacing", "steps") + (("guidance",) if guidance else ()))
    c.string(f"{field}.name", entry["name"])
    c.string(f"{field}.spacing", entry["spacing"])
    c.integer(f"{field}.steps", entry["steps"], hi=MAX_STEPS)
    if guidance:
        c.number(f"{field}.guidance", entry["guidance"])


def _check_sources(c: _Check, data: Mapping[str, Any]) -> None:
    """``model``, ``adapter``, ``vae_decoder_tiny``: what the graphs were made from (read by info and parity)."""
    model = c.obj("model", data["model"])
    for key in ("name", "path"):
        c.optional(f"model.{key}", model.get(key), str)
    c.sha256("model.sha256", model.get("sha256"), optional=True)
    loras = model.get("loras", [])
    if not isinstance(loras, list):
        raise c.fail("model.loras", f"must be a list, found {_show(loras)}")
    for i, lora in enumerate(loras):
        entry = c.obj(f"model.loras[{i}]", lora, ("file", "scale"))
        c.string(f"model.loras[{i}].file", entry["file"])
        c.number(f"model.loras[{i}].scale", entry["scale"])
        c.optional(f"model.loras[{i}].path", entry.get("path"), str)
        c.sha256(f"model.loras[{i}].sha256", entry.get("sha256"), optional=True)
    for field in ("adapter", "vae_decoder_tiny", "controlnet"):
        entry = data.get(field)
        if entry is None:
            continue
        entry = c.obj(field, entry)
        for key in ("name", "path"):
            c.optional(f"{field}.{key}", entry.get(key), str)
        c.sha256(f"{field}.sha256", entry.get("sha256"), optional=True)
        c.optional(f"{field}.parameters", entry.get("parameters"), int)
        if field == "adapter":
            c.optional("adapter.extra_positive", entry.get("extra_positive"), bool)
        if field == "controlnet":  # the residuals' (channels, downscale): the UNet graphs' extra inputs
            pairs = entry.get("residuals")
            if not (isinstance(pairs, list) and len(pairs) >= 2 and all(
                    isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                and 1 <= x <= MAX_DIM for x in p) for p in pairs)):
                raise c.fail("controlnet.residuals", f"must list [channels, downscale] pairs, found {_show(pairs)}")


def _check_component(c: _Check, field: str, value: Any) -> None:
    comp = c.obj(field, value, ("file", "inputs", "outputs", "precision"))
    file = c.path(f"{field}.file", comp["file"])
    c.precision(f"{field}.precision", comp["precision"])
    for kind in ("inputs", "outputs"):
        specs = comp[kind]
        if not isinstance(specs, list) or not specs:
            raise c.fail(f"{field}.{kind}", f"must be a non-empty list, found {_show(specs)}")
        for i, spec in enumerate(specs):
            where = f"{field}.{kind}[{i}]"
            spec = c.obj(where, spec, ("name", "dtype", "shape"))
            c.string(f"{where}.name", spec["name"])
            c.string(f"{where}.dtype", spec["dtype"], choices=DTYPES)
            shape = spec["shape"]
            if not isinstance(shape, list) or not 1 <= len(shape) <= 8:
                raise c.fail(f"{where}.shape", f"must be a list of 1 to 8 integers, found {_show(shape)}")
            for j, d in enumerate(shape):
                if not (isinstance(d, int) and not isinstance(d, bool) and (d == -1 or 1 <= d <= MAX_DIM)):
                    raise c.fail(f"{where}.shape[{j}]", f"must be a positive integer or -1 (free), found {_show(d)}")
    files = c.obj(f"{field}.files", comp.get("files", {}))
    hashes = c.obj(f"{field}.sha256", comp.get("sha256", {}))
    if not files:
        raise c.fail(f"{field}.files", "is missing or empty: every component lists its files with their sizes")
    for name, size in files.items():
        c.path(f"{field}.files key", name)
        c.integer(f"{field}.files[{name!r}]", size, lo=0, hi=1 << 50)
    for name, digest in hashes.items():
        c.path(f"{field}.sha256 key", name)
        c.sha256(f"{field}.sha256[{name!r}]", digest)
    if set(hashes) != set(files):
        odd = sorted(set(hashes) ^ set(files))
        raise c.fail(f"{field}.sha256", f"and {field}.files list different files ({', '.join(map(repr, odd[:3]))})")
    if not any(f == file or f.startswith(file.rstrip("/") + "/") for f in files):
        raise c.fail(f"{field}.files", f"does not list the component's file {file!r}")


def _check_geometry(c: _Check, data: Mapping[str, Any], factor: int) -> None:
    """Every component's I/O as the component table gives it for the manifest's image, latent and text sizes."""
    from sun_edge.components import COMPONENTS, FREE, Geometry, control_layout, describe, unet_in_channels

    image, latent, text = data["image"], data["latent"], data["text"]
    if "unet_in_channels" in latent:
        c.integer("latent.unet_in_channels", latent["unet_in_channels"], hi=1024)
    dynamic = (data.get("batch") or {}).get("max", 1) > 1  # a batch range: graphs with a free batch dimension
    geometry = Geometry(height=image["height"], width=image["width"], latent_channels=latent["channels"],
                        vae_scale_factor=factor, text_tokens=text["tokens"], text_dim=text["dim"],
                        batch=FREE if dynamic else 1, unet_in_channels=unet_in_channels(latent),
                        control=control_layout(data.get("controlnet")))
    sizes = (f"image {image['height']}x{image['width']}, latent {latent['channels']}x{latent['height']}x"
             f"{latent['width']}, text {text['tokens']}x{text['dim']}")
    for name, comp in data["components"].items():
        if name not in COMPONENTS:
            raise c.fail(f"components.{name}", f"is not a component this sun-edge knows; known: {', '.join(COMPONENTS)}")
        spec = COMPONENTS[name]
        expected = spec.io(geometry)
        for kind, want in zip(("inputs", "outputs"), expected):
            have = comp[kind]
            older = spec.older_outputs(geometry) if kind == "outputs" and spec.older_outputs else None

            def matches(want: Any) -> bool:
                return len(have) == len(want) and all(
                    h["name"] == w.name and _same_shape(h["shape"], w.shape, fixed_batch=data.get("target") == "coreml")
                    and (h["dtype"] == w.dtype or (w.dtype in INTEGER_DTYPES and h["dtype"] in INTEGER_DTYPES))
                    for h, w in zip(have, want))
            same = matches(want) or (older is not None and matches(older))  # an older layout (vae_encoder's mean alone)
            if not same:
                shown = ", ".join(f"{_printable(h['name'])} {_printable(h['dtype'])} "
                                  f"[{','.join('?' if d < 0 else str(d) for d in h['shape'])}]" for h in have)
                raise c.fail(f"components.{name}.{kind}", f"are {shown}, but the bundle's {sizes} needs {describe(want)}")


def _same_shape(have: Any, want: tuple[int, ...], *, fixed_batch: bool) -> bool:
    """A manifest shape against the table's: equal, except that in a Core ML bundle (``fixed_batch``) a free batch
    (the table's first dimension) is fixed at 1: its programs have fixed shapes, and its ControlNet runs SUN's one
    image per call. Every other target's graphs keep the table's free batch."""
    from sun_edge.components import FREE

    have = list(have)
    return len(have) == len(want) and all(h == w or (fixed_batch and i == 0 and w == FREE and h == 1)
                                          for i, (h, w) in enumerate(zip(have, want)))


def _check_tensorrt(c: _Check, value: Any, components: Mapping[str, Any]) -> None:
    section = c.obj("extra.tensorrt", value)
    engines = c.obj("extra.tensorrt.engines", section.get("engines", {}))
    for name, record in engines.items():
        field = f"extra.tensorrt.engines.{name}"
        if name not in components:
            raise c.fail(field, "is an engine for a component the bundle does not have")
        record = c.obj(field, record, ("file", "tensorrt", "sm", "size"))
        c.path(f"{field}.file", record["file"])
        if record.get("source") is not None:
            c.path(f"{field}.source", record["source"])
        c.string(f"{field}.tensorrt", record["tensorrt"])
        c.integer(f"{field}.sm", record["sm"], hi=1000)
        c.integer(f"{field}.size", record["size"], lo=0, hi=1 << 50)
        c.sha256(f"{field}.sha256", record.get("sha256"), optional=True)
        if record.get("build_seconds") is not None:
            c.number(f"{field}.build_seconds", record["build_seconds"])
        c.optional(f"{field}.opt_level", record.get("opt_level"), int)
        c.optional(f"{field}.gpu", record.get("gpu"), str)


def bundle_files(data_or_manifest: Any) -> dict[str, str]:
    """Every file name a manifest points at, with the field it comes from (components, tokenizer, engines)."""
    m = data_or_manifest
    out: dict[str, str] = {}
    for name, comp in m.components.items():
        out.setdefault(comp.file, f"components.{name}.file")
        for f in comp.files:
            out.setdefault(f, f"components.{name}.files")
    out.setdefault(m.tokenizer["vocab"], "tokenizer.vocab")
    out.setdefault(m.tokenizer["merges"], "tokenizer.merges")
    for name, record in ((m.extra or {}).get("tensorrt") or {}).get("engines", {}).items():
        out.setdefault(record["file"], f"extra.tensorrt.engines.{name}.file")
        if record.get("source"):
            out.setdefault(record["source"], f"extra.tensorrt.engines.{name}.source")
    return out


def check_paths(directory: Path, manifest: Any, where: str) -> None:
    """On disk: no file the manifest names resolves (through symbolic links) outside ``directory``."""
    root = Path(directory).resolve()
    for name, field in bundle_files(manifest).items():
        try:
            target = (Path(directory) / name).resolve()
        except (OSError, RuntimeError) as e:  # a symbolic link loop
            raise SunEdgeError(f"{where}: {field} {name!r} cannot be resolved ({e}); re-export the bundle") from e
        if target != root and root not in target.parents:
            raise SunEdgeError(f"{where}: {field} {name!r} is a symbolic link that leads out of the bundle folder "
                               f"(to {target}); the bundle was tampered with: re-export it")
