"""Images out: array to PIL, PNG with generation parameters, side-by-side comparison sheets.

PNG metadata follows AUTOMATIC1111's ``parameters`` text chunk, which image browsers and
sharing sites read::

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 4, Sampler: DDIM, Schedule type: trailing, CFG scale: 1, Seed: 0, Size: 512x512, ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from sun_edge.errors import SunEdgeError
from sun_edge.files import write_with

# A1111 sampler names for our schedulers.
SAMPLER_LABELS = {"dpmpp_2m": "DPM++ 2M", "ddim": "DDIM", "euler": "Euler"}


def to_pil(image: np.ndarray) -> Image.Image:
    """One decoded image [3,H,W] in [-1, 1] -> 8-bit RGB."""
    pixels = np.clip((image.transpose(1, 2, 0) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)  # [H, W, 3]
    return Image.fromarray(pixels, "RGB")


def _clean(value: Any) -> str:
    return str(value).replace("\n", " ").replace(",", ";") if not isinstance(value, str) else value.replace("\n", " ")


def a1111_parameters(prompt: str, negative_prompt: str, fields: Mapping[str, Any]) -> str:
    """Format generation parameters as AUTOMATIC1111 writes them (three lines)."""
    lines = [prompt.replace("\n", " ")]
    if negative_prompt:
        lines.append("Negative prompt: " + negative_prompt.replace("\n", " "))
    items = []
    for key, value in fields.items():
        if value is None:
            continue
        text = _clean(value)
        if any(c in text for c in ",:\""):
            text = '"' + text.replace('"', "'") + '"'
        items.append(f"{key}: {text}")
    lines.append(", ".join(items))
    return "\n".join(lines)


def read_parameters(path: Path) -> str | None:
    """The ``parameters`` text chunk of a PNG, or None."""
    with Image.open(path) as image:
        return image.text.get("parameters") if hasattr(image, "text") else None


def save_png(image: Image.Image, path: Path, parameters: str | None = None) -> Path:
    """Write a PNG atomically (``sun_edge.files``: mode as the umask says), with the ``parameters`` chunk if given."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SunEdgeError(f"output {path} must end in .png")
    if not path.parent.is_dir():
        raise SunEdgeError(f"output folder {path.parent} does not exist; create it first")
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    return write_with(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def side_by_side(images: Sequence[Image.Image], labels: Sequence[Sequence[str]], min_width: int = 256) -> Image.Image:
    """Images in a row, each with lines of caption beneath (small images are scaled up, pixelated)."""
    scale = max(1, -(-min_width // max(im.width for im in images)))
    tiles = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    font_size = max(12, tiles[0].width // 22)
    font = _font(font_size)
    pad, line_h = 8, int(font_size * 1.35)
    caption_h = pad + line_h * max(len(lines) for lines in labels) + pad
    width = sum(t.width for t in tiles) + pad * (len(tiles) + 1)
    height = max(t.height for t in tiles) + caption_h + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    x = pad
    for tile, lines in zip(tiles, labels):
        sheet.paste(tile, (x, pad))
        for i, line in enumerate(lines):
            draw.text((x, pad + tile.height + pad + i * line_h), line, fill="black", font=font)
        x += tile.width + pad
    return sheet


def grid(cells: Sequence[Sequence[np.ndarray]], col_labels: Sequence[str], row_labels: Sequence[str] = (),
         scale: int = 2) -> Image.Image:
    """uint8 images [H,W,3] in rows and columns (scaled up ``scale`` times, pixelated), labelled above and left."""
    h, w = cells[0][0].shape[:2]
    th, tw = h * scale, w * scale
    font_size = max(11, tw // 9)
    font = _font(font_size)
    pad, line_h = 4, int(font_size * 1.35)
    left = (max((int(font.getlength(s)) for s in row_labels), default=0) + 2 * pad) if row_labels else 0
    top = line_h + 2 * pad
    sheet = Image.new("RGB", (left + len(cells[0]) * (tw + pad) + pad, top + len(cells) * (th + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, label in enumerate(col_labels):
        draw.text((left + pad + j * (tw + pad), pad), label, fill="black", font=font)
    for i, row in enumerate(cells):
        y = top + i * (th + pad)
        if i < len(row_labels):
            draw.text((pad, y + th // 2 - line_h // 2), row_labels[i], fill="black", font=font)
        for j, cell in enumerate(row):
            tile = Image.fromarray(np.asarray(cell, np.uint8)).resize((tw, th), Image.NEAREST)
            sheet.paste(tile, (left + pad + j * (tw + pad), y))
    return sheet
