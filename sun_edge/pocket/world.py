"""The pocket world: captioned scenes of coloured shapes, rendered at 64x64, in two styles.

A scene is a count (1-3) of identical shapes of one colour and size on a plain background.
``render`` draws it antialiased (at 4x, box-downsampled) with random non-overlapping
positions, small rotations, slight colour jitter and faint background noise; ``toonify`` turns
a plain image into the "toon" style (dark outlines, warm posterized palette, hatched paper
background) that stands in for a fine-tuned model's look. Captions read like prompts:
"two small red circles on a blue background", and may leave attributes out ("red squares").

Everything random is drawn from one ``np.random.Generator``; an example is a pure function of
``(seed, index, style)``. NumPy and Pillow only.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sun_edge.errors import SunEdgeError

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SIZES = ("small", "large")
COUNTS = (1, 2, 3)
BACKGROUNDS = ("white", "black", "blue", "green", "yellow", "grey")
ATTRIBUTES = ("shape", "colour", "size", "count", "background")
OPTIONAL = frozenset({"colour", "size", "count", "background"})  # the shape is always mentioned
STYLES = ("plain", "toon")

RGB: dict[str, tuple[int, int, int]] = {  # object and background colours share one palette
    "red": (215, 35, 35), "green": (35, 170, 60), "blue": (40, 75, 225), "yellow": (245, 220, 35),
    "purple": (145, 45, 190), "orange": (250, 130, 20), "white": (245, 245, 245), "black": (20, 20, 20),
    "grey": (128, 128, 128),
}
SIZE_RADIUS = {"small": 0.09, "large": 0.15}  # nominal radius as a fraction of the width
EXTENT = {"circle": 1.0, "square": 1.2, "triangle": 1.35, "star": 1.35}  # farthest point / radius: areas 2.4-3.1 r^2
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
SUPERSAMPLE = 4
COLOUR_PAIRS = tuple((c, b) for c in COLOURS for b in BACKGROUNDS if c != b)  # 43 valid (colour, background)


@dataclass(frozen=True)
class Scene:
    """What an image shows; ``caption`` says it in words."""

    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    count: int  # one of COUNTS
    background: str  # one of BACKGROUNDS, never equal to colour

    def __post_init__(self) -> None:
        for name, value, valid in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                   ("size", self.size, SIZES), ("count", self.count, COUNTS),
                                   ("background", self.background, BACKGROUNDS)):
            if value not in valid:
                raise SunEdgeError(f"scene {name} {value!r} is not one of {', '.join(map(str, valid))}")
        if self.colour == self.background:
            raise SunEdgeError(f"a {self.colour} object cannot sit on a {self.background} background")

    def caption(self, mention: frozenset[str] | None = None) -> str:
        """"two small red circles on a blue background"; only the attributes in ``mention`` (default all).

        The shape is always named. A single object always reads "a/an ..." (so it implies count 1);
        several objects with the count left out read as a bare plural ("red squares").
        """
        mention = OPTIONAL if mention is None else frozenset(mention)
        if not mention <= OPTIONAL:
            raise SunEdgeError(f"cannot mention {', '.join(sorted(mention - OPTIONAL))}: choose from "
                               f"{', '.join(sorted(OPTIONAL))}")
        words = [w for a, w in (("size", self.size), ("colour", self.colour)) if a in mention]
        noun = self.shape if self.count == 1 else self.shape + "s"
        if self.count == 1:
            words.insert(0, "an" if (words or [noun])[0][0] in "aeiou" else "a")
        elif "count" in mention:
            words.insert(0, COUNT_WORDS[self.count])
        text = " ".join([*words, noun])
        if "background" in mention:
            text += f" on {'an' if self.background[0] in 'aeiou' else 'a'} {self.background} background"
        return text

    def to_dict(self) -> dict[str, str | int]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


Prompt = tuple[Scene, frozenset[str]]  # a scene and the attributes its caption mentions


def parse_caption(caption: str) -> dict[str, str | int]:
    """The attributes a caption states, inverse of ``Scene.caption`` ("a ..." states count 1)."""
    words = caption.strip().split()
    found: dict[str, str | int] = {}
    if "on" in words:
        i = words.index("on")
        tail = words[i + 1:]
        if len(tail) != 3 or tail[0] not in ("a", "an") or tail[1] not in BACKGROUNDS or tail[2] != "background":
            raise SunEdgeError(f"cannot parse caption {caption!r}")
        found["background"], words = tail[1], words[:i]
    if words and words[0] in ("a", "an", "two", "three"):
        found["count"] = {"a": 1, "an": 1, "two": 2, "three": 3}[words.pop(0)]
    for attr, valid in (("size", SIZES), ("colour", COLOURS)):
        if words and words[0] in valid:
            found[attr] = words.pop(0)
    if len(words) != 1 or words[0].removesuffix("s") not in SHAPES:
        raise SunEdgeError(f"cannot parse caption {caption!r}")
    found["shape"] = words[0].removesuffix("s")
    return found


def sample_scene(rng: np.random.Generator) -> Scene:
    """A scene drawn uniformly from all valid scenes (4 shapes x 2 sizes x 3 counts x 43 colour pairs)."""
    colour, background = COLOUR_PAIRS[rng.integers(len(COLOUR_PAIRS))]
    return Scene(SHAPES[rng.integers(len(SHAPES))], colour, SIZES[rng.integers(len(SIZES))],
                 COUNTS[rng.integers(len(COUNTS))], background)


def sample_mention(rng: np.random.Generator, drop: float = 0.25) -> frozenset[str]:
    """The optional attributes a caption names: each one left out with probability ``drop``."""
    keep = rng.random(len(OPTIONAL)) >= drop
    return frozenset(a for a, k in zip(sorted(OPTIONAL), keep) if k)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square, triangle or star of nominal radius ``r`` turned by ``angle`` radians."""
    if shape == "square":
        radii, n, start = [r * EXTENT["square"]], 4, np.pi / 4
    elif shape == "triangle":
        radii, n, start = [r * EXTENT["triangle"]], 3, -np.pi / 2
    else:  # star: 5 points, inner radius half the outer one
        radii, n, start = [r * EXTENT["star"], r * EXTENT["star"] * 0.5], 10, -np.pi / 2
    k = np.arange(n)
    theta = start + angle + 2 * np.pi * k / n
    rad = np.asarray(radii)[k % len(radii)]
    return list(zip((cx + rad * np.cos(theta)).tolist(), (cy + rad * np.sin(theta)).tolist()))


def _layout(rng: np.random.Generator, count: int, extent: float, resolution: int) -> list[tuple[float, float]]:
    """``count`` centres (pixels) whose shapes of reach ``extent`` stay inside and apart by a gap."""
    low, high = extent + 1.0, resolution - extent - 1.0
    apart = 2 * extent + 0.04 * resolution
    for _ in range(200):
        centres: list[tuple[float, float]] = []
        for _ in range(60):
            c = tuple(rng.uniform(low, high, 2).tolist())
            if all((c[0] - x) ** 2 + (c[1] - y) ** 2 >= apart**2 for x, y in centres):
                centres.append(c)
                if len(centres) == count:
                    return centres
    raise SunEdgeError(f"cannot place {count} shapes of reach {extent:.1f}px in {resolution}px")


def render(scene: Scene, rng: np.random.Generator, resolution: int = 64) -> np.ndarray:
    """The scene drawn as uint8 [H, W, 3] (antialiased: drawn at 4x and box-downsampled)."""
    from PIL import Image, ImageDraw

    s = SUPERSAMPLE
    radius = SIZE_RADIUS[scene.size] * resolution * rng.uniform(0.95, 1.05)
    centres = _layout(rng, scene.count, radius * EXTENT[scene.shape], resolution)
    fill = tuple(int(v) for v in np.clip(np.asarray(RGB[scene.colour]) + rng.integers(-10, 11, 3), 0, 255))
    canvas = Image.new("RGB", (resolution * s, resolution * s), RGB[scene.background])
    draw = ImageDraw.Draw(canvas)
    for cx, cy in centres:
        cx, cy, r = cx * s, cy * s, radius * s
        if scene.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(scene.shape, cx, cy, r, rng.uniform(-0.26, 0.26)), fill=fill)
    image = np.asarray(canvas.resize((resolution, resolution), Image.Resampling.BOX), dtype=np.float32)  # [H,W,3]
    ramp = np.linspace(-1.0, 1.0, resolution, dtype=np.float32)
    gx, gy = rng.uniform(-5, 5, 2)
    shade = gx * ramp[None, :, None] + gy * ramp[:, None, None] + rng.uniform(-6, 6, 3).astype(np.float32)  # [H,W,3]
    noise = rng.normal(0.0, 2.5, image.shape).astype(np.float32)  # [H,W,3]
    return np.clip(image + shade + noise, 0, 255).round().astype(np.uint8)


def background_rgb(image: np.ndarray) -> np.ndarray:
    """The background colour of a world image: the median of its border pixels, float32 [3]."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)  # [4W,3]
    return np.median(border, axis=0)


def object_mask(image: np.ndarray, threshold: float = 48.0) -> np.ndarray:
    """bool [H, W]: pixels farther than ``threshold`` (RGB distance) from the background colour."""
    return np.linalg.norm(image.astype(np.float32) - background_rgb(image), axis=-1) > threshold


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation of bool [H, W] by a (2r+1)-square: a max over shifts, one axis at a time."""
    out = mask
    for axis in (0, 1):
        padded = np.pad(out, [(r, r) if a == axis else (0, 0) for a in (0, 1)])
        n = out.shape[axis]
        out = np.logical_or.reduce([np.take(padded, np.arange(d, d + n), axis=axis) for d in range(2 * r + 1)])
    return out


TOON_WARM = np.array([1.06, 1.0, 0.86], np.float32), np.array([12.0, 4.0, -6.0], np.float32)
TOON_LEVELS = 5  # posterize steps per channel
TOON_INK = np.array([35, 25, 20], np.float32)
TOON_PAPER = np.array([250, 238, 210], np.float32)


def toonify(image: np.ndarray, variant: str = "toon") -> np.ndarray:
    """The "toon" look of a plain world image, uint8 [H, W, 3] -> uint8 [H, W, 3]; deterministic.

    Objects get one flat fill (their median colour, warmed and posterized) and a dark ink outline
    (about 1.5 px at 64x64); the background is tinted towards cream paper and hatched with faint
    diagonal lines.
    Worked at 4x and box-downsampled, so outlines are antialiased.
    """
    from PIL import Image

    if variant != "toon":
        raise SunEdgeError(f"unknown toonify variant {variant!r}: choose toon")
    h, w = image.shape[:2]
    s = SUPERSAMPLE
    bg = background_rgb(image)
    dist = np.sqrt(np.square(image.astype(np.float32) - bg).sum(-1))  # [H,W] distance from the background
    mask = np.asarray(Image.fromarray(dist, "F").resize((w * s, h * s), Image.Resampling.BILINEAR)) > 48.0  # [sH,sW]
    scale, shift = TOON_WARM
    step = 255.0 / TOON_LEVELS
    native = dist > 48.0
    fill = np.median(image[native], axis=0) if native.any() else bg  # [3] one flat colour: all objects share it
    fill = np.clip(np.round(np.clip(fill * scale + shift, 0, 255) / step) * step, 0, 255)  # [3]
    diagonal = np.arange(w * s)[None, :] - np.arange(h * s)[:, None]  # [sH,sW]
    shade = np.where(diagonal % (4 * s) < s // 2, np.float32(0.86), np.float32(1.0))  # [sH,sW] hatch every 4 px
    paper = (0.75 * np.clip(bg * scale + shift, 0, 255) + 0.25 * TOON_PAPER).astype(np.float32)  # [3]
    out = shade[..., None] * paper  # [sH,sW,3]
    out[mask] = fill
    out[_dilate(mask, round(1.5 * s)) & ~mask] = TOON_INK
    small = Image.fromarray(out.round().astype(np.uint8)).resize((w, h), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


def stylize(image: np.ndarray, style: str) -> np.ndarray:
    """``image`` in one of STYLES ("plain" returns it unchanged)."""
    if style not in STYLES:
        raise SunEdgeError(f"unknown style {style!r}: choose one of {', '.join(STYLES)}")
    return image if style == "plain" else toonify(image, style)


@dataclass(frozen=True, eq=False)
class Example:
    """One training pair and the truth behind it."""

    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    scene: Scene
    mention: frozenset[str] = field(default=OPTIONAL)  # the attributes the caption names


def make_example(index: int, seed: int, style: str = "plain", drop: float = 0.25, resolution: int = 64) -> Example:
    """Example ``index`` of the world ``seed``: drawn from ``default_rng([seed, index])`` alone.

    The scene, caption and layout do not depend on ``style``: the plain and toon examples of an
    index show the same objects in the same places, under the same caption.
    """
    if style not in STYLES:
        raise SunEdgeError(f"unknown style {style!r}: choose one of {', '.join(STYLES)}")
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng)
    mention = sample_mention(rng, drop)
    image = stylize(render(scene, rng, resolution), style)
    return Example(image, scene.caption(mention), scene, mention)


def scene_batch(n: int, seed: int, style: str = "plain", resolution: int = 64) -> tuple[np.ndarray, list[Scene]]:
    """Examples 0..n-1 of world ``seed``: images uint8 [n, H, W, 3] and their scenes."""
    examples = [make_example(i, seed, style, resolution=resolution) for i in range(n)]
    return np.stack([e.image for e in examples]), [e.scene for e in examples]


def write_dataset(folder: Path, n: int, *, seed: int, style: str = "plain", drop: float = 0.25,
                  resolution: int = 64, progress: bool = True) -> Path:
    """Write ``n`` examples as ``00000.png`` + ``00000.txt`` pairs, ``scenes.jsonl`` and ``world.json``.

    The folder is what ``sun-edge train --data FOLDER`` reads. It is built in a temporary folder
    beside ``folder`` and renamed into place when complete; ``folder`` must not exist yet.
    """
    from PIL import Image
    from tqdm import tqdm

    folder = Path(folder).expanduser()
    if folder.exists():
        raise SunEdgeError(f"{folder} already exists: choose a new folder or remove it first")
    if n < 1:
        raise SunEdgeError(f"a dataset needs at least one example, not {n}")
    if style not in STYLES:
        raise SunEdgeError(f"unknown style {style!r}: choose one of {', '.join(STYLES)}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    width = max(5, len(str(n - 1)))
    try:
        with open(tmp / "scenes.jsonl", "w", encoding="utf-8") as scenes:
            for i in tqdm(range(n), desc="rendering", unit="image", disable=not progress, file=sys.stderr):
                ex = make_example(i, seed, style, drop, resolution)
                name = f"{i:0{width}d}"
                Image.fromarray(ex.image).save(tmp / f"{name}.png")
                (tmp / f"{name}.txt").write_text(ex.caption + "\n", encoding="utf-8")
                scenes.write(json.dumps({"file": f"{name}.png", "index": i, "caption": ex.caption, **ex.scene.to_dict(),
                                         "mention": sorted(ex.mention)}) + "\n")
        (tmp / "world.json").write_text(json.dumps({"seed": seed, "n": n, "style": style, "drop": drop,
                                                    "resolution": resolution}, indent=1) + "\n", encoding="utf-8")
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def eval_prompts(n: int, seed: int) -> list[Prompt]:
    """``n`` fully-specified prompts for prompt-adherence evaluation, deterministic in ``(n, seed)``.

    Every prompt mentions all attributes, so each generated image is scored on all five. Each
    attribute is balanced on its own: its values are dealt in shuffled rounds (shape, size, count,
    and the 43 valid (colour, background) pairs), so over ``n`` prompts every value appears
    ``n / len(values)`` times, give or take one, and the attributes vary independently.
    """
    rng = np.random.default_rng([seed, 0x5E7A1])

    def deal(values: tuple) -> list:
        rounds = -(-n // len(values))
        return [values[j] for _ in range(rounds) for j in rng.permutation(len(values))][:n]

    shapes, sizes, counts, pairs = deal(SHAPES), deal(SIZES), deal(COUNTS), deal(COLOUR_PAIRS)
    return [(Scene(shapes[i], pairs[i][0], sizes[i], counts[i], pairs[i][1]), OPTIONAL) for i in range(n)]


def negative_phrases() -> tuple[str, ...]:
    """The world's words as negative-prompt phrases (for adapter training): colours, shapes, sizes, counts, backgrounds.

    SD1.5 adapters train on phrases people write as negative prompts; a Pocket SD text encoder knows only
    the world's words, so its adapter trains on these (``sun-edge train --negative-pool``).
    """
    plural = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
    words = [*COLOURS, *SHAPES, *(plural[s] for s in SHAPES), *SIZES, "two", "three"]
    words += [f"{c} {plural[s]}" for c in COLOURS for s in SHAPES]
    words += [f"on a {b} background" for b in BACKGROUNDS]
    return tuple(dict.fromkeys(words))


def attribute_negatives() -> tuple[str, ...]:
    """One attribute of the world per phrase: the negatives CFG actually changes in this world.

    The 8 colours, the 4 shapes (singular and plural), the 2 sizes, the counts and the 6 backgrounds:
    26 phrases. The adapter's training draws 0 or 1 of them per example (``scripts/train_pocket.py``):
    half the examples see the empty negative (SUN's default use, Table 2), and the other half one
    attribute, as Fig. 5 and a user's ``--negative-prompt red`` use it.
    """
    plural = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
    words = [*COLOURS, *SHAPES, *(plural[s] for s in SHAPES), *SIZES, "two", "three"]
    words += [f"on a {b} background" for b in BACKGROUNDS]
    return tuple(dict.fromkeys(words))

