"""Training data: image-caption pairs from a folder, a JSONL/CSV manifest or a ``datasets`` folder.

Accepted inputs (``--data PATH``):

- a folder of images (``.png .jpg .jpeg .webp .bmp``, searched recursively) each beside a
  ``.txt`` caption with the same stem; images without a caption are left out;
- a ``.jsonl`` or ``.csv`` manifest with columns ``image`` (a path relative to the manifest's
  folder, or absolute), ``caption`` or ``text``, and optionally ``negative_prompt``;
- a Hugging Face ``datasets`` folder written by ``save_to_disk`` (a ``DatasetDict`` uses its
  ``train`` split), columns ``image`` and ``caption`` or ``text``, optionally ``negative_prompt``.

An example without a (non-empty) ``negative_prompt`` gets one sampled from the phrase pool.
Images are made RGB, resized so the shortest side is ``resolution`` (bilinear, as diffusers'
training scripts), centre-cropped to ``resolution`` squared and scaled to [-1, 1].

An image that cannot be read is skipped, never fatal: the item comes back as
``{"skipped": (name, reason)}`` and the collate function drops it from the batch and passes
the name on, so the loop can count and report it. Everything random about an example (its
negative prompt) is drawn from ``(seed, epoch, index)``, so data is the same whatever the
number of workers and across a resume.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sun_edge.errors import SunEdgeError
from sun_edge.tokenizer import CLIPTokenizer, PromptTruncatedWarning
from sun_edge.train.negatives import sample_negative

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
Key = tuple[int, int]  # (epoch, index)
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One example before decoding: a display name, the image (a path, or an HF image value), texts."""

    name: str
    image: Any  # Path, or a `datasets` Image value: {"bytes": ..., "path": ...} or a path string
    caption: str
    negative_prompt: str | None


class RecordList:
    """Records held in memory (folder and manifest inputs)."""

    def __init__(self, records: Sequence[Record]) -> None:
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]


class HFRecords:
    """Records read lazily from a ``datasets.Dataset`` whose images are not decoded by ``datasets``."""

    def __init__(self, dataset: Any, caption_column: str, has_negative: bool) -> None:
        self.dataset, self.caption_column, self.has_negative = dataset, caption_column, has_negative

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Record:
        row = self.dataset[i]
        image = row["image"]
        name = (image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None) or f"row {i}"
        return Record(str(name), image, str(row[self.caption_column] or ""),
                      (row.get("negative_prompt") or None) if self.has_negative else None)


Records = RecordList | HFRecords


def open_records(path: Path | str) -> Records:
    """Read the example list of a folder, manifest or ``datasets`` folder; one error line if unusable."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SunEdgeError(f"training data {path} does not exist: pass an image folder, a .jsonl/.csv manifest "
                           "or a datasets save_to_disk folder")
    if path.is_dir():
        records: Records = _hf_records(path) if any((path / m).is_file() for m in HF_MARKERS) else _folder_records(path)
    elif path.suffix.lower() in (".jsonl", ".csv"):
        records = _manifest_records(path)
    else:
        raise SunEdgeError(f"training data {path.name}: expected a folder, a .jsonl or a .csv manifest")
    if len(records) == 0:
        raise SunEdgeError(f"training data {path} holds no image-caption pairs")
    return records


def _folder_records(root: Path) -> RecordList:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    records = [Record(str(p.relative_to(root)), p, p.with_suffix(".txt").read_text("utf-8", errors="replace").strip(), None)
               for p in images if p.with_suffix(".txt").is_file()]
    if images and not records:
        raise SunEdgeError(f"training data {root}: {len(images)} images but no captions; put a .txt with the same "
                           "name beside each image")
    if len(records) < len(images):
        logger.warning("%d of %d images in %s have no .txt caption and are left out", len(images) - len(records),
                       len(images), root)
    return RecordList(records)


def _manifest_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text("utf-8-sig", errors="replace")
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SunEdgeError(f"{path.name} line {n} is not JSON: {e.msg}") from e
            if not isinstance(row, dict):
                raise SunEdgeError(f"{path.name} line {n}: expected an object with image and caption")
            rows.append(row)
    return rows


def _caption_column(columns: Sequence[str], source: str) -> str:
    for name in ("caption", "text"):
        if name in columns:
            return name
    raise SunEdgeError(f"{source} has no caption column: expected 'caption' or 'text' (found: {', '.join(columns) or 'none'})")


def _manifest_records(path: Path) -> RecordList:
    records = []
    for n, row in enumerate(_manifest_rows(path), 1):
        if not row.get("image"):
            raise SunEdgeError(f"{path.name} row {n}: no 'image' value")
        column = _caption_column(list(row), f"{path.name} row {n}")
        image = Path(str(row["image"])).expanduser()
        image = image if image.is_absolute() else path.parent / image
        records.append(Record(str(row["image"]), image, str(row[column] or ""), row.get("negative_prompt") or None))
    return RecordList(records)


def _hf_records(path: Path) -> HFRecords:
    try:
        import datasets
    except ImportError as e:
        raise SunEdgeError("reading a datasets folder needs the datasets package: pip install 'sun-edge[train]'") from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, arrow errors...
        raise SunEdgeError(f"cannot load datasets folder {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise SunEdgeError(f"datasets folder {path} has splits {', '.join(ds)} but no 'train'")
        ds = ds["train"]
    if "image" not in ds.column_names:
        raise SunEdgeError(f"datasets folder {path} has no 'image' column (found: {', '.join(ds.column_names)})")
    column = _caption_column(ds.column_names, f"datasets folder {path}")
    if isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))  # decode here, so a bad image is skippable
    return HFRecords(ds, column, "negative_prompt" in ds.column_names)


def load_image(image: Any) -> Any:
    """Open an image value (path, path string, bytes, ``{"bytes", "path"}``) fully decoded as RGB."""
    from PIL import Image

    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        image = io.BytesIO(image)
    elif isinstance(image, Image.Image):
        return image.convert("RGB")
    if image is None:
        raise ValueError("no image data")
    with Image.open(image) as img:
        img.load()
        return img.convert("RGB")


def center_crop(image: Any, resolution: int) -> np.ndarray:
    """Shortest side to ``resolution`` (bilinear), centre crop: float32 [3, R, R] in [-1, 1]."""
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # [R, R, 3]
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # [3, R, R]


def token_ids(tokenizer: CLIPTokenizer, text: str) -> np.ndarray:
    """CLIP ids [77] int64, cut at 77 tokens without a warning (the text encoder reads no more)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        return tokenizer.encode(text)[0]


class TrainDataset(Dataset):
    """Items keyed by ``(epoch, index)``: pixels, caption ids, negative ids; or a skip record."""

    def __init__(self, records: Records, pool: tuple[str, ...], *, resolution: int, seed: int,
                 max_negative_phrases: int, tokenizer: CLIPTokenizer | None = None) -> None:
        self.records, self.pool, self.resolution = records, pool, resolution
        self.seed, self.max_negative_phrases = seed, max_negative_phrases
        self.tokenizer = tokenizer or CLIPTokenizer.default()

    def __len__(self) -> int:
        return len(self.records)

    def negative_prompt(self, key: Key) -> str:
        """The example's own negative prompt, else one drawn from the pool with ``(seed, epoch, index)``."""
        record = self.records[key[1]]
        if record.negative_prompt:
            return record.negative_prompt
        rng = np.random.default_rng([self.seed, key[0], key[1]])
        return sample_negative(self.pool, rng, self.max_negative_phrases)

    def __getitem__(self, key: Key) -> dict[str, Any]:
        record = self.records[key[1]]
        try:
            image = load_image(record.image)
            pixels = center_crop(image, self.resolution)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...: skip them all
            reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            return {"key": key, "skipped": (record.name, reason)}
        item = {"key": key, "pixels": pixels, "ids": token_ids(self.tokenizer, record.caption),
                "neg_ids": token_ids(self.tokenizer, self.negative_prompt(key))}
        if min(image.size) < self.resolution:  # trained on, but the user is told (it teaches blur)
            item["upscaled"] = (record.name, image.size)
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the readable items; ``skipped`` lists (name, reason) of the others; ``drawn`` counts all."""
    good = [item for item in items if "skipped" not in item]
    batch: dict[str, Any] = {"drawn": len(items), "keys": [item["key"] for item in good],
                             "skipped": [item["skipped"] for item in items if "skipped" in item],
                             "upscaled": [item["upscaled"] for item in good if "upscaled" in item]}
    if good:
        batch["pixels"] = torch.from_numpy(np.stack([item["pixels"] for item in good]))  # [B,3,R,R]
        batch["ids"] = torch.from_numpy(np.stack([item["ids"] for item in good]))  # [B,77]
        batch["neg_ids"] = torch.from_numpy(np.stack([item["neg_ids"] for item in good]))  # [B,77]
    return batch


class DrawSampler(Sampler):
    """An endless stream of ``(epoch, index)`` keys for one process, starting at draw ``start``.

    Epoch e is ``randperm(n)`` seeded with ``(seed, e)``; process ``rank`` of ``world`` takes every
    ``world``-th entry from ``rank``. The stream is a pure function of its arguments, so a resumed
    run continues exactly where it stopped by passing the number of keys already consumed.
    """

    def __init__(self, n: int, *, seed: int, rank: int = 0, world: int = 1, start: int = 0) -> None:
        if n < world:
            raise SunEdgeError(f"the dataset has {n} examples, fewer than the {world} training processes")
        self.n, self.seed, self.rank, self.world, self.start = n, seed, rank, world, start
        self.per_epoch = len(range(rank, n, world))

    def order(self, epoch: int) -> list[int]:
        """This process's indices for one epoch."""
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        return torch.randperm(self.n, generator=gen)[self.rank :: self.world].tolist()

    def __iter__(self) -> Iterator[Key]:
        epoch, offset = divmod(self.start, self.per_epoch)
        while True:
            for index in self.order(epoch)[offset:]:
                yield (epoch, index)
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return 2**62


def make_loader(dataset: TrainDataset, *, batch_size: int, seed: int, rank: int, world: int, start: int,
                num_workers: int) -> DataLoader:
    """A loader of collated batches from draw ``start`` on (this process's draws so far)."""
    sampler = DrawSampler(len(dataset), seed=seed, rank=rank, world=world, start=start)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=num_workers, persistent_workers=num_workers > 0)
