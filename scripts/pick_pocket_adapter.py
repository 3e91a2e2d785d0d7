"""Pick the Pocket SUN adapter checkpoint to ship, on prompts and seeds ``sun-edge eval`` does not use.

    python scripts/pick_pocket_adapter.py [--prompts N] [--steps N[,N...]] [--fig5-seeds N] CHECKPOINT.safetensors [...]

For each adapter (on pocket-base): SUN 4's colour read-back against CFG 25's on N prompts (``--prompts``, default 32)
that are not Table 2's (``world.eval_prompts(N, seed 7)``, seeds 100+i), and Fig. 5's fall (``a <shape>``, 8 seeds per
shape from 5000). One JSON line per adapter. docs/pocket.md records the rule and the figures.
``--steps 4,8,25`` also reads back SUN's colours at those DDIM step counts (``sun_colour_by_steps``): whether a
gap to CFG 25 is the few-step sampler's or the adapter's guidance at every step.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import torch

from sun_edge.pipeline import Pipeline
from sun_edge.pocket.classifier import load_classifier, predict
from sun_edge.pocket.eval import adherence, generate_images, methods, negative_steering, shape_visible, table2_prompts
from sun_edge.runtimes.pytorch import TorchRuntime

PROMPTS, PROMPT_SEED, IMAGE_SEED = 32, 7, 100
FIG5_SEEDS, FIG5_SEED = 8, 5000


def steps_list(text: str) -> list[int]:
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected step counts like 4,8,25, got {text!r}") from None
    if any(n < 1 for n in steps):
        raise argparse.ArgumentTypeError(f"step counts must be at least 1, got {text!r}")
    return steps


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER")
    parser.add_argument("--prompts", type=int, default=PROMPTS, help=f"held-out prompts (default {PROMPTS})")
    parser.add_argument("--steps", type=steps_list, default=[],
                        help="also SUN's colour read-back at these DDIM step counts, e.g. 4,8,25")
    parser.add_argument("--fig5-seeds", type=int, default=FIG5_SEEDS, help=f"seeds per shape (default {FIG5_SEEDS})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    classifier, table = load_classifier(), methods(64)
    prompts, scenes, _ = table2_prompts(args.prompts, seed=PROMPT_SEED)
    seeds = [IMAGE_SEED + i for i in range(args.prompts)]
    reference = None  # CFG 25 does not use the adapter: made once
    for path in args.adapters:
        pipe = Pipeline(TorchRuntime.load("pocket-base", path))
        if reference is None:
            reference = generate_images(pipe, prompts, seeds, table["cfg25"].settings)
        sun = generate_images(pipe, prompts, seeds, table["sun4"].settings)
        cfg_colour = adherence(predict(classifier, reference), scenes, shape_visible(reference))["colour"]
        gap = cfg_colour - adherence(predict(classifier, sun), scenes, shape_visible(sun))["colour"]
        steering = negative_steering(pipe, classifier, table["sun4"].settings, seeds_per_shape=args.fig5_seeds,
                                     first_seed=FIG5_SEED)
        fall = steering.fall()
        line = {"adapter": path, "colour_gap_vs_cfg25": round(float(gap), 4), "fig5_fall": round(float(fall), 3),
                "cfg25_colour": cfg_colour}
        if args.steps:
            by_steps = {}
            for n in args.steps:
                images = generate_images(pipe, prompts, seeds, replace(table["sun4"].settings, steps=n))
                by_steps[str(n)] = adherence(predict(classifier, images), scenes, shape_visible(images))["colour"]
            line["sun_colour_by_steps"] = by_steps
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
