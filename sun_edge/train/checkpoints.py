"""Training checkpoints: adapter, optimizer, step, RNG states and data position, written atomically.

A checkpoint is a folder ``step-NNNNNNNN/`` in the checkpoint directory::

    adapter.safetensors   the adapter (sun_edge.adapter.save_adapter, float32)
    optimizer.pt          the optimizer's state_dict (AdamW moments, step counts)
    scaler.pt             the fp16 gradient scaler's state, when there is one
    rng.pt                python, numpy, torch (and CUDA) generator states of the main process
    state.json            step, per-process data positions, skipped images, the run's config

It is written into a partial folder ``.step-NNNNNNNN.partial-<pid>-<hex>/`` and renamed into
place when complete (``sun_edge.files.atomic_directory``), so a run killed while saving leaves
no folder that looks like a checkpoint; leftovers are removed when the next run starts.
Only the main process writes. The data order and each micro-step's
noise are pure functions of (seed, position, step, process), so the other processes need
nothing else to resume; with several machines the directory must be on a shared filesystem.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sun_edge.adapter import SUNAdapter, load_adapter, save_adapter
from sun_edge.errors import SunEdgeError
from sun_edge.files import atomic_directory

FORMAT_NAME = "sun-edge-train-checkpoint"
FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d+)$")
ADAPTER_FILE = "adapter.safetensors"


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A checkpoint read back: its folder, ``state.json`` and the tensors it holds."""

    path: Path
    state: dict[str, Any]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (``state.json`` present) in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / "state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def remove_partial(directory: Path) -> None:
    """Delete what a killed save left behind: stale partials (``sun_edge.files``) and the folders of sun-edge < 0.2."""
    from sun_edge.files import clean_stale_partials

    if Path(directory).is_dir():
        clean_stale_partials(directory)
        for child in Path(directory).iterdir():
            if child.name.startswith((".tmp-step-", ".old-step-")) and child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)


def capture_rng() -> dict[str, Any]:
    """The global generators' states: python, numpy, torch CPU and (when present) CUDA."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "python": (version, tuple(internal), gauss),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` captured."""
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(directory: Path, step: int, *, adapter: SUNAdapter, optimizer: dict[str, Any],
                    scaler: dict[str, Any] | None, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    with atomic_directory(final, replace=True) as tmp:  # replace: re-saving a step (a resumed run with nothing left to do)
        save_adapter(adapter, tmp / ADAPTER_FILE)
        torch.save(optimizer, tmp / "optimizer.pt")
        if scaler is not None:
            torch.save(scaler, tmp / "scaler.pt")
        torch.save(capture_rng(), tmp / "rng.pt")
        body = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "step": step, **state}
        (tmp / "state.json").write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    for _, path in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder (the adapter is read separately with :func:`load_checkpoint_adapter`)."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text("utf-8"))
        if state.get("format") != FORMAT_NAME:
            raise SunEdgeError(f"{path} is not a sun-edge training checkpoint")
        if state.get("format_version") != FORMAT_VERSION:
            raise SunEdgeError(f"checkpoint {path.name} has format version {state.get('format_version')}, "
                               f"this sun-edge reads {FORMAT_VERSION}")
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        scaler_file = path / "scaler.pt"
        scaler = torch.load(scaler_file, map_location="cpu", weights_only=True) if scaler_file.is_file() else None
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise SunEdgeError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                           "delete it to resume from the one before") from e
    return Checkpoint(path, state, optimizer, scaler, rng)


def load_checkpoint_adapter(path: Path, unet_config: Any) -> SUNAdapter:
    """The adapter stored in checkpoint folder ``path``, checked against ``unet_config``."""
    return load_adapter(Path(path) / ADAPTER_FILE, unet_config)
