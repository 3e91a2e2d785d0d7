"""Render the README's and docs/pocket.md's image-editing pictures with pocket-base (issue 19).

    python scripts/render_edit_pictures.py [--out docs/pocket] [--threads N]

One sheet per task, each from the same init image (pocket-base's own text-to-image picture of
two red circles on blue, seed 1): ``edit-img2img.png`` (init image, SUN 4, CFG 25 at strength
0.75) and ``edit-inpaint.png`` (init image, mask, SUN 4, CFG 25 repainting the right half at
strength 1.0 by latent blending, with paste-back). The captions say the UNet calls each made.
Everything goes through ``Pipeline.generate``, as ``sun-edge generate --init-image`` does.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageDraw

from sun_edge import imaging
from sun_edge.pipeline import Pipeline, Settings
from sun_edge.runtimes.pytorch import TorchRuntime

INIT_PROMPT = "two red circles on a blue background"
IMG2IMG_PROMPT = "two yellow circles on a green background"
INPAINT_PROMPT = "a yellow square on a blue background"
NEGATIVE = ""
SEED = 1


def right_half(size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle([size // 2, 0, size, size], fill=255)
    return mask


def shown(mask: Image.Image) -> Image.Image:
    """The mask as a tile: white = repaint, with a grey outline so that its white stands out of the sheet."""
    tile = mask.convert("RGB")
    ImageDraw.Draw(tile).rectangle([0, 0, tile.width - 1, tile.height - 1], outline=(128, 128, 128))
    return tile


def caption(result, what: str) -> list[str]:
    s = result.settings
    head = "SUN 4" if s.mode == "sun" else f"CFG {s.guidance:g}, {s.steps} steps"
    return [f"{head} ({what})", f"strength {s.strength:g}: {result.unet_calls} UNet calls"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "pocket")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    runtime = TorchRuntime.load("pocket-base")
    pipe, size = Pipeline(runtime), runtime.native_size
    init = pipe.generate(INIT_PROMPT, NEGATIVE, seeds=[SEED], settings=Settings(height=size, width=size))[0].image

    sun, cfg = Settings(height=size, width=size), Settings.baseline(height=size, width=size)
    jobs = {"img2img": (IMG2IMG_PROMPT, None, {"strength": 0.75}),
            "inpaint": (INPAINT_PROMPT, right_half(size), {"strength": 1.0, "paste_back": True})}
    for task, (prompt, mask, edit) in jobs.items():
        made = [pipe.generate(prompt, NEGATIVE, seeds=[SEED + 1], settings=replace(s, **edit),
                              init_image=init, mask=mask)[0] for s in (sun, cfg)]
        images = [init] + ([shown(mask)] if mask is not None else []) + [m.image for m in made]
        labels = [["init image", INIT_PROMPT[:24]]] + ([["mask", "white = repaint"]] if mask is not None else [])
        labels += [caption(m, prompt[:22]) for m in made]
        path = args.out / f"edit-{task}.png"
        imaging.save_png(imaging.side_by_side(images, labels), path)
        print(f"wrote {path}: " + ", ".join(f"{m.settings.mode} {m.unet_calls} UNet calls" for m in made))


if __name__ == "__main__":
    main()
