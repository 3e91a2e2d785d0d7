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
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sun_edge.errors import SunEdgeError, first_line

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
        f"refusing to load pickle checkpoint {path.name}: pickle files can run code; "
        "convert it to .safetensors or pass --allow-pickle if you trust it"
    )


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


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    import pickle
    import re

    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is None:  # not a pickle at all: random or damaged bytes
            raise SunEdgeError(
                f"cannot read {path.name}: file is truncated or not a PyTorch checkpoint; re-download it"
            ) from error
        raise SunEdgeError(
            f"cannot load {path.name} safely: it holds objects other than tensors ({found.group(1)}); "
            "convert it to .safetensors with a tool you trust"
        ) from error
    except Exception as error:  # zip and EOF errors from a damaged file
        raise SunEdgeError(
            f"cannot read {path.name}: file is truncated or not a PyTorch checkpoint "
            f"({first_line(error)}); re-download it"
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

    The data goes to a temporary file in the same directory, which is renamed over
    ``path`` only once complete; on any failure the temporary file is removed and
    ``path`` is left as it was.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad[:3]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        contiguous = {key: value.detach().contiguous() for key, value in tensors.items()}
        save_file(contiguous, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

