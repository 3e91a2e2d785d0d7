"""Does SUN follow the pocket silhouette ControlNet as CFG does? Shapes drawn where the condition puts them.

Test cases (:func:`test_cases`): ``world.eval_prompts(n, seed)`` (fully specified, balanced prompts,
a held-out seed), each scene rendered with its own layout (``default_rng([seed, i, LAYOUT_SALT])``);
the condition is that render's silhouette (``controlnet_train.silhouette``, white on black) and the
prompt is the scene's full caption, so prompt and condition describe the same scene.

Score (:func:`placement`): the generated image's foreground is ``world.object_mask`` (pixels farther
than 48 RGB units from the median border colour); ``IoU = |fg & cond| / |fg | cond|`` against the
condition's silhouette; an image **puts the shapes where the condition does** when its IoU is at least
:data:`IOU_PASS` (0.5). The figure asked for is the share of images that pass, per method.

Methods: SUN 4 steps (DDIM, the adapter, no CFG) and CFG 25 (DPM-Solver++ 25 steps, CFG 8: the
``Settings.baseline()`` reference of ``sun-edge eval``), each with the ControlNet at ``control_scale``
and without it (the control group: where the shapes land from the seed alone). As in
``sun_edge.controlnet``: under SUN the ControlNet attends over ``cat([pos, neg])`` (154 tokens, what
the released SUN pipeline gives diffusers' ControlNet pipeline); under CFG it runs on both halves of
the batch, each half over ``[c, c]``, its own embedding twice (the same attention as over ``c``).

Images come from ``sun_edge.pipeline.Pipeline`` through :class:`ControlledRuntime`, a wrapper that adds
the ControlNet's residuals to a PyTorch runtime's UNet calls (``down_block_additional_residuals``);
the library's own ControlNet support (``Job.control_image``) is used instead when ``library=True``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sun_edge.errors import SunEdgeError
from sun_edge.pipeline import Pipeline, Settings
from sun_edge.pocket.controlnet_train import condition_image, condition_tensor, silhouette
from sun_edge.pocket.world import eval_prompts, object_mask, render

IOU_PASS = 0.5
TEST_SEED = 7  # the classifier's and Table 2's held-out prompt seed world; layouts drawn with LAYOUT_SALT
LAYOUT_SALT = 0xC0417
GRID_ROWS = 6
METHODS = {  # name -> (label, settings at 64x64)
    "cfg25": ("CFG 25 (DPM-Solver++ 25 steps, CFG 8)", Settings.baseline(height=64, width=64)),
    "sun4": ("SUN 4 steps (DDIM, no CFG)", Settings(height=64, width=64)),
}


@dataclass(frozen=True, eq=False)
class Case:
    prompt: str
    condition: np.ndarray  # uint8 [H, W, 3], white shapes on black
    mask: np.ndarray  # bool [H, W], the condition's silhouette
    seed: int


def test_cases(n: int, seed: int = TEST_SEED, resolution: int = 64) -> list[Case]:
    """``n`` prompts with the silhouettes of their own scenes (module docstring)."""
    cases = []
    for i, (scene, mention) in enumerate(eval_prompts(n, seed)):
        mask = silhouette(render(scene, np.random.default_rng([seed, i, LAYOUT_SALT]), resolution))
        cases.append(Case(scene.caption(mention), condition_image(mask), mask, 1000 + i))
    return cases


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def placement(image: np.ndarray, mask: np.ndarray) -> float:
    """IoU of a generated uint8 [H, W, 3] image's foreground (``world.object_mask``) with the condition's mask."""
    return iou(object_mask(image), mask)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, np.float32))


class ControlledRuntime:
    """A PyTorch runtime whose UNet calls add a ControlNet's residuals for one fixed condition image.

    ``unet`` (SUN): the ControlNet sees the latents, the timestep and ``cat([pos, neg])``; the SUN
    UNet gets (positive, negative) as usual plus the residuals. ``unet_plain`` (CFG's batch of
    negatives then positives): the ControlNet runs on the whole batch, each item over ``[c, c]``.
    Everything else is the wrapped runtime's.
    """

    def __init__(self, runtime: Any, controlnet: torch.nn.Module, condition: np.ndarray, scale: float = 1.0) -> None:
        if runtime.sun_unet is None:
            raise SunEdgeError("the runtime has no SUN adapter; load the model with its adapter")
        self._runtime, self.controlnet, self.scale = runtime, controlnet.float().eval().requires_grad_(False), scale
        self.cond = condition_tensor(condition[None])  # [1, 3, H, W]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)

    def _residuals(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> dict[str, Any]:
        cond = self.cond.expand(len(x), -1, -1, -1)
        down, mid = self.controlnet(x, t, emb, cond, conditioning_scale=self.scale, return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    @torch.no_grad()
    def unet(self, latents: np.ndarray, t: np.ndarray | float, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
        x, tt, p, n = (_tensor(a) for a in (latents, np.asarray(t).reshape(-1)[:1], pos, neg))
        unet = self._runtime.sun_unet.unet
        context = torch.cat([p, n], dim=1)  # [B, 154, D]
        eps = unet(x, tt, context, **self._residuals(x, tt, context), return_dict=False)[0]
        return eps.float().numpy()

    @torch.no_grad()
    def unet_plain(self, latents: np.ndarray, t: np.ndarray | float, emb: np.ndarray) -> np.ndarray:
        x, tt, e = (_tensor(a) for a in (latents, np.asarray(t).reshape(-1)[:1], emb))
        residuals = self._residuals(x, tt, torch.cat([e, e], dim=1))  # [2B, 154, D]
        eps = self._runtime.sun_unet.unet(x, tt, e, **residuals, return_dict=False)[0]
        return eps.float().numpy()


def load_pocket_controlnet(name_or_path: str = "pocket-silhouette") -> torch.nn.Module:
    """The shipped pocket ControlNet (registry name) or a diffusers ControlNet folder, float32, eval mode."""
    from diffusers import ControlNetModel

    from sun_edge.models import resolve_controlnet

    path = resolve_controlnet(name_or_path)
    model = ControlNetModel.from_pretrained(str(path), torch_dtype=torch.float32, local_files_only=True)
    return model.eval().requires_grad_(False)


def generate(runtime: Any, controlnet: torch.nn.Module | None, case: Case, settings: Settings, *,
             scale: float = 1.0, library: bool = False) -> np.ndarray:
    """One uint8 [H, W, 3] image for ``case`` (no ControlNet when ``controlnet`` is None)."""
    if controlnet is None:
        pipe = Pipeline(runtime)
        out = pipe.generate(case.prompt, "", seeds=[case.seed], settings=settings)
    elif library:  # the library's ControlNet support (issue 19's Job.control_image)
        from PIL import Image

        from dataclasses import replace

        pipe = Pipeline(runtime)
        out = pipe.generate(case.prompt, "", seeds=[case.seed], settings=replace(settings, control_scale=scale),
                            control_image=Image.fromarray(case.condition))
    else:
        out = Pipeline(ControlledRuntime(runtime, controlnet, case.condition, scale)).generate(
            case.prompt, "", seeds=[case.seed], settings=settings)
    return np.asarray(out[0].image.convert("RGB"))


def evaluate(runtime: Any, controlnet: torch.nn.Module, cases: Sequence[Case], *, scale: float = 1.0,
             library: bool = False, library_runtime: Any = None,
             progress: Callable[[], None] | None = None) -> tuple[dict[str, Any], dict[str, list[np.ndarray]]]:
    """Per method, with and without the ControlNet: every image's IoU, the mean and the pass share; and the images."""
    table: dict[str, Any] = {}
    images: dict[str, list[np.ndarray]] = {}
    for name, (label, settings) in METHODS.items():
        for controlled in (True, False):
            key = name if controlled else f"{name}-none"
            imgs = []
            for case in cases:
                if controlled and library:
                    imgs.append(generate(library_runtime, controlnet, case, settings, scale=scale, library=True))
                else:
                    imgs.append(generate(runtime, controlnet if controlled else None, case, settings, scale=scale))
                if progress is not None:
                    progress()
            scores = [placement(im, c.mask) for im, c in zip(imgs, cases)]
            table[key] = {"label": label + ("" if controlled else ", no ControlNet"), "controlnet": controlled,
                          "mean_iou": float(np.mean(scores)), "pass": float(np.mean([s >= IOU_PASS for s in scores])),
                          "iou": [round(s, 4) for s in scores]}
            images[key] = imgs
    return table, images


def write_report(table: dict[str, Any], images: dict[str, list[np.ndarray]], cases: Sequence[Case], out_dir: Path,
                 grid_path: Path, meta: dict[str, Any]) -> None:
    """``controlnet.json`` and ``controlnet.md`` in ``out_dir``; the picture grid at ``grid_path``."""
    from sun_edge import imaging

    out_dir.mkdir(parents=True, exist_ok=True)
    definition = (f"IoU of world.object_mask(generated image) (pixels > 48 RGB units from the median border colour) "
                  f"with the condition's silhouette; an image passes when IoU >= {IOU_PASS}")
    doc = {**meta, "score": definition, "prompts": [c.prompt for c in cases], "seeds": [c.seed for c in cases],
           "methods": table}
    (out_dir / "controlnet.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# Pocket silhouette ControlNet: shapes where the condition puts them ({len(cases)} test images)", "",
             f"Score: {definition}. ControlNet {meta.get('controlnet')}, control scale {meta.get('scale')}; "
             f"images from {meta.get('images_from')}.", "",
             "| method | ControlNet | images passing (IoU >= 0.5) | mean IoU |", "|---|---|---|---|"]
    for row in table.values():
        lines.append(f"| {row['label']} | {'yes' if row['controlnet'] else 'no'} | {row['pass']:.3f} | "
                     f"{row['mean_iou']:.3f} |")
    (out_dir / "controlnet.md").write_text("\n".join(lines) + "\n")
    n = min(GRID_ROWS, len(cases))
    rows = [[cases[i].condition, images["cfg25"][i], images["sun4"][i], images["sun4-none"][i]] for i in range(n)]
    imaging.grid(rows, ["condition", "CFG 25", "SUN 4", "SUN 4, no CN"],
                 [c.prompt[:40] for c in cases[:n]], scale=2).save(grid_path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from tqdm import tqdm

    from sun_edge.runtimes.pytorch import TorchRuntime

    parser = argparse.ArgumentParser(description="evaluate the pocket silhouette ControlNet (module docstring)")
    parser.add_argument("--model", default="pocket-base")
    parser.add_argument("--controlnet", default="pocket-silhouette")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--library", action="store_true", help="controlled images through Job.control_image")
    parser.add_argument("-o", "--out", type=Path, default=Path("docs/pocket/eval"))
    parser.add_argument("--grid", type=Path, default=Path("docs/pocket/controlnet-grid.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    runtime = TorchRuntime.load(args.model)
    controlnet = load_pocket_controlnet(args.controlnet)
    library_runtime = None
    if args.library:
        from sun_edge.models import resolve_controlnet

        library_runtime = TorchRuntime.load(args.model, controlnet=resolve_controlnet(args.controlnet))
    cases = test_cases(args.prompts)
    bar = tqdm(total=4 * len(cases), desc="controlnet eval", unit="image")
    table, images = evaluate(runtime, controlnet, cases, scale=args.scale, library=args.library,
                             library_runtime=library_runtime, progress=lambda: bar.update(1))
    bar.close()
    meta = {"model": args.model, "controlnet": args.controlnet, "scale": args.scale, "test_seed": TEST_SEED,
            "images_from": "sun_edge Pipeline, Job.control_image" if args.library else
            "sun_edge Pipeline over controlnet_eval.ControlledRuntime (PyTorch)",
            "command": "python -m sun_edge.pocket.controlnet_eval " + " ".join(argv or []),
            "seconds": round(time.perf_counter() - start, 1)}
    write_report(table, images, cases, args.out, args.grid, meta)
    for key, row in table.items():
        print(f"{key:10s} pass {row['pass']:.3f}  mean IoU {row['mean_iou']:.3f}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
