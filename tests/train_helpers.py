"""Tiny synthetic image-caption data for the training tests: coloured squares on a contrasting ground."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def square_images(n: int = 16, size: tuple[int, int] = (80, 72), seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """``n`` RGB uint8 images [H, W, 3] with a centred square, and their captions."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        colour = rng.integers(0, 256, 3)
        image = np.empty((size[0], size[1], 3), np.uint8)
        image[:] = 255 - colour
        h, w = size[0] // 4, size[1] // 4
        image[h : size[0] - h, w : size[1] - w] = colour
        out.append((image, f"a square of colour {colour[0]} {colour[1]} {colour[2]}"))
    return out


def write_folder(root: Path, n: int = 16, *, corrupt: int = 0, uncaptioned: int = 0) -> Path:
    """An image folder: ``img00.png`` beside ``img00.txt``...; plus unreadable and uncaptioned images."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i, (image, caption) in enumerate(square_images(n)):
        Image.fromarray(image).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(caption)
    for i in range(corrupt):
        (root / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
        (root / f"bad{i}.txt").write_text("a broken file")
    for i in range(uncaptioned):
        Image.fromarray(square_images(1, seed=99 + i)[0][0]).save(root / f"lonely{i}.png")
    return root


def state_sha256(module) -> str:
    """A hash of a module's whole state dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()
