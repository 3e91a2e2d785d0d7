"""Reading and writing weight files safely.

safetensors is the format sun-edge reads by default: it holds tensors and nothing else.
Pickle formats (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) can run arbitrary code when
loaded, so they are refused unless the caller opts in (``--allow-pickle``), and even
then they are read with ``torch.load(weights_only=True)``.

Every failure is a one-line :class:`~sun_edge.errors.SunEdgeError` that names the file
and what to do about it. Writes go to a temporary file in the destination directory
and are renamed into place, so a failed write never leaves a half file behind.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sun_edge.errors import SunEdgeError, first_line
from sun_edge.files import write_with

if TYPE_CHECKING:
    import torch

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
_HASH_CHUNK = 8 * 1024 * 1024




def _check_readable(path: Path) -> None:
    """Raise a one-line error for a missing or unreadable weight file, or an unknown format."""
    if not path.exists():
        raise SunEdgeError(f"cannot read {path}: no such file")
    if path.is_dir():
        raise SunEdgeError(f"cannot read {path}: it is a directory, expected a weight file")
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        known = ", ".join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
        raise SunEdgeError(
            f"cannot read {path.name}: unknown weight format '{suffix or '(none)'}'; expected one of {known}"
        )


def is_pickle_file(path: Path) -> bool:
    """True for the pickle-based formats (``.ckpt``, ``.bin``, ``.pt``, ``.pth``)."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def _refuse_pickle(path: Path) -> SunEdgeError:
    return SunEdgeError(
        f"refusing to load pickle checkpoint {path.name}: pickle files can run code", fix="allow_pickle")


def _corrupt(path: Path, error: BaseException) -> SunEdgeError:
    reason = first_line(error).removeprefix("Error while deserializing header: ")
    return SunEdgeError(
        f"cannot read {path.name}: file is truncated or not a safetensors file ({reason}); re-download it"
    )


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Return ``{key: shape}`` of a ``.safetensors`` file from its header, reading no tensor data."""
    from safetensors import safe_open

    path = Path(path)
    _check_readable(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise SunEdgeError(f"cannot read shapes of {path.name}: only .safetensors headers can be read lazily")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError, and OSError
        raise _corrupt(path, error) from error


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file's header (empty if it has none), reading no tensor data."""
    from safetensors import safe_open

    path = Path(path)
    _check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:
        raise _corrupt(path, error) from error


def read_state_dict(
    path: Path,
    *,
    allow_pickle: bool = False,
    prefixes: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Read a weight file into ``{key: tensor}`` on the CPU.

    ``.safetensors`` files are always allowed. Pickle formats are refused unless
    ``allow_pickle`` is true, and are then loaded with ``weights_only=True``; a top-level
    ``"state_dict"`` entry (as Stable Diffusion ``.ckpt`` files have) is unwrapped.
    ``prefixes`` limits a safetensors read to keys starting with one of them, so a caller
    can load one component of a large checkpoint at a time. safetensors tensors are
    copy-on-write views of the memory-mapped file: cheap to read, safe to modify.
    """
    path = Path(path)
    _check_readable(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path, prefixes)
    if not allow_pickle:
        raise _refuse_pickle(path)
    state = _read_pickle(path)
    if prefixes is not None:
        state = {k: v for k, v in state.items() if k.startswith(tuple(prefixes))}
    return state


def _read_safetensors(path: Path, prefixes: Sequence[str] | None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = [k for k in handle.keys() if prefixes is None or k.startswith(tuple(prefixes))]
            return {key: handle.get_tensor(key) for key in keys}
    except Exception as error:
        raise _corrupt(path, error) from error


_BLOCKED_GLOBAL = re.compile(r"unsupported global:? GLOBAL ([^\s,]+)", re.IGNORECASE)  # torch 2.4 to 2.13 wordings


def _holds_code(path: Path, error: BaseException) -> str | None:
    """The callable or class a pickle that ``torch.load(weights_only=True)`` refused imports, or None.

    torch names it in its message (``Unsupported global: GLOBAL __main__.C`` for a class,
    ``unsupported GLOBAL posix.system whose module posix is blocked`` for ``os.system``); a plain
    ``pickle.dumps`` file (protocol 4 and up) fails earlier, on an opcode, so its globals are read
    with ``pickletools`` (no code runs): the first one outside ``torch`` and ``collections``.
    """
    import pickletools
    import zipfile

    found = _BLOCKED_GLOBAL.search(str(error))
    if found is not None:
        return found.group(1).rstrip(".")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                with archive.open(name) as stream:
                    return _first_foreign_global(pickletools.genops(stream))
        with open(path, "rb") as stream:
            return _first_foreign_global(pickletools.genops(stream))
    except Exception:  # not a pickle after all (random bytes): no opcode stream to read
        return None


def _first_foreign_global(ops) -> str | None:
    recent: list[object] = []  # values the string and memo-get opcodes pushed, for STACK_GLOBAL
    memo: dict[int, object] = {}
    for op, arg, _ in ops:
        name = None
        if op.name in ("GLOBAL", "INST"):
            name = str(arg).replace(" ", ".")
        elif op.name == "STACK_GLOBAL" and len(recent) >= 2:
            name = f"{recent[-2]}.{recent[-1]}"
        elif "UNICODE" in op.name or "STRING" in op.name:
            recent.append(arg)
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            recent.append(memo.get(int(arg)))
        elif op.name == "MEMOIZE" and recent:
            memo[len(memo)] = recent[-1]
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT") and recent:
            memo[int(arg)] = recent[-1]
        if name is not None and not name.startswith(("torch.", "collections.", "_codecs.")):
            return name
    return None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": the error below says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        code = _holds_code(path, error)
        if code is None:  # not a pickle at all: random or damaged bytes
            raise SunEdgeError(
                f"cannot read {path.name}: file is truncated or not a PyTorch checkpoint; re-download it"
            ) from error
        raise SunEdgeError(
            f"cannot load {path.name} safely: it holds code, not only tensors (it imports {code}), which loading "
            "would run; use a .safetensors file instead, or convert this one with a tool you trust"
        ) from error
    except Exception as error:  # zip and EOF errors from a damaged file
        raise SunEdgeError(
            f"cannot read {path.name}: file is truncated or not a PyTorch checkpoint "
            f"({first_line(error).split('. ')[0]}); re-download it"
        ) from error
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise SunEdgeError(f"cannot read {path.name}: expected a dict of tensors, found {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise SunEdgeError(
            f"cannot read {path.name}: {len(bad)} entries are not named tensors (first: {', '.join(bad[:3])})"
        )
    return dict(obj)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks so that multi-gigabyte files use little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor],
    path: Path,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``tensors`` to ``path`` as safetensors, atomically.

    The data goes to a partial file in the same directory (``sun_edge.files``: its mode
    as the umask says), which is renamed over ``path`` only once complete; on any failure
    the partial is removed and ``path`` is left as it was.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad[:3]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {key: value.detach().contiguous() for key, value in tensors.items()}
    write_with(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))

