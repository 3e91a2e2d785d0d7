"""Where SUN's colours fall short of CFG 25's: the teacher, or the adapter's one forward? On held-out prompts.

    python scripts/check_sun_guidance.py [--prompts N] [--threads T] [ADAPTER]

Two JSON lines, on pocket-base with ADAPTER (default: the shipped one), on the held-out prompts of
scripts/pick_pocket_adapter.py (``world.eval_prompts(N, seed 7)``, seeds 100+i):

- ``teacher``: the colour read-back of the adapter's training teacher run as a sampler, CFG 8 DDIM in 24
  trailing steps (4 student steps x 6 sub-steps, ``sun_edge.train.config``), beside CFG 25 (the eval's
  reference) and SUN 4. If the teacher reads back what CFG 25 does and SUN 4 does not, the gap is the
  distillation's.
- ``guidance_share``: each prompt's world render, encoded and noised to timestep t (t = 999 ... 99), and
  SUN's eps (empty negative) against CFG 8's: the share of CFG's guidance term ``eps_cfg - eps_pos``
  that SUN applies (the projection of ``eps_sun - eps_pos`` on it; 1 is all of it) and the error left,
  relative to that term; medians over the prompts. SUN is distilled to take 4 large steps, not to match
  each instantaneous eps, so read these beside ``teacher`` and SUN at more steps (pick_pocket_adapter.py
  ``--steps``), not alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import numpy as np
import torch

PROMPTS, PROMPT_SEED, IMAGE_SEED = 128, 7, 100
TIMESTEPS = (999, 899, 799, 699, 599, 499, 399, 299, 199, 99)
TEACHER_STEPS = 24


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", nargs="?", metavar="ADAPTER", help="adapter file (default: the shipped one)")
    parser.add_argument("--prompts", type=int, default=PROMPTS, help=f"held-out prompts (default {PROMPTS})")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.prompts < 1:
        parser.error(f"--prompts must be at least 1, got {args.prompts}")
    torch.set_num_threads(args.threads)

    from sun_edge.pipeline import Pipeline
    from sun_edge.pocket.classifier import load_classifier, predict
    from sun_edge.pocket.eval import GUIDANCE, adherence, generate_images, methods, shape_visible, table2_prompts
    from sun_edge.pocket.world import render
    from sun_edge.runtimes.pytorch import TorchRuntime
    from sun_edge.sampling import NoiseSchedule, cfg_combine

    classifier, table = load_classifier(), methods(64)
    prompts, scenes, _ = table2_prompts(args.prompts, seed=PROMPT_SEED)
    seeds = [IMAGE_SEED + i for i in range(args.prompts)]
    pipe = Pipeline(TorchRuntime.load("pocket-base", args.adapter))
    label = args.adapter or "the shipped adapter"

    def colour(settings: object) -> float:
        images = generate_images(pipe, prompts, seeds, settings)
        return round(float(adherence(predict(classifier, images), scenes, shape_visible(images))["colour"]), 4)

    teacher = replace(table["ddim4"].settings, steps=TEACHER_STEPS)
    print(json.dumps({"adapter": label, "prompts": args.prompts, "teacher": {
        "cfg25_colour": colour(table["cfg25"].settings), "teacher_ddim24_cfg8_colour": colour(teacher),
        "sun4_colour": colour(table["sun4"].settings)}}), flush=True)

    runtime, n = pipe.runtime, args.prompts
    renders = np.stack([render(scene, np.random.default_rng(IMAGE_SEED + i)) for i, scene in enumerate(scenes)])
    x0 = runtime.encode(renders.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    pos = np.concatenate([pipe.embed(p) for p in prompts])
    neg = np.repeat(pipe.embed(""), n, axis=0)
    abar, rng = NoiseSchedule().alphas_cumprod(), np.random.default_rng(0)
    by_t = {}
    for t in TIMESTEPS:
        x_t = (np.sqrt(abar[t]) * x0 + np.sqrt(1 - abar[t]) * rng.standard_normal(x0.shape)).astype(np.float32)
        steps = np.full(n, t, dtype=np.float32)
        eps_pos, eps_neg = runtime.unet_plain(x_t, steps, pos), runtime.unet_plain(x_t, steps, neg)
        eps_cfg, eps_sun = cfg_combine(eps_neg, eps_pos, GUIDANCE), runtime.unet(x_t, steps, pos, neg)
        term, sun = (eps_cfg - eps_pos).reshape(n, -1), (eps_sun - eps_pos).reshape(n, -1)
        share = (term * sun).sum(1) / (term * term).sum(1)
        error = np.linalg.norm((eps_sun - eps_cfg).reshape(n, -1), axis=1) / np.linalg.norm(term, axis=1)
        by_t[str(t)] = {"share": round(float(np.median(share)), 3), "error": round(float(np.median(error)), 3)}
    print(json.dumps({"adapter": label, "prompts": n, "guidance_share": by_t}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
