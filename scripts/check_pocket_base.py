"""How well a Pocket SD base model follows its prompts under CFG 25, on prompts ``sun-edge eval`` does not use.

    python scripts/check_pocket_base.py [--prompts N] [--guidance G[,G...]] [--device cpu|cuda] MODEL [MODEL ...]

For each model (a name such as ``pocket-base`` or a model folder; no adapter needed): ``sun-edge eval``'s reference
sampler (DPM-Solver++ 25 steps, CFG 8) on N held-out prompts (``world.eval_prompts(N, seed 7)``, seeds 100+i, as
scripts/pick_pocket_adapter.py), read back by the world's attribute classifier. One JSON line per model: the share
of images with each attribute right (the colour only where a shape shows, as in the eval), and which colour was
read where the asked one was not. Issue 14's base target is CFG 25 reading back the colour asked for in 90%.
``vae_round_trip`` (``sun_edge.pocket.eval``): the same reading of 256 held-out world renders per style after the
model's VAE encodes and decodes them: what the decoder alone loses, whatever the UNet draws.
``--guidance`` runs the same sampler at other guidance scales too (one line per model and scale).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import replace
from typing import Any

PROMPTS, PROMPT_SEED, IMAGE_SEED = 64, 7, 100


def check(model: str, *, prompts: int, device: str, classifier: Any,
          guidances: list[float | None]) -> list[dict[str, Any]]:
    """The JSON lines for one model, one per guidance scale (None: the eval's); the model is loaded and its VAE's
    round trip measured once (module docstring)."""
    from sun_edge.pipeline import Pipeline
    from sun_edge.pocket.classifier import predict, truth
    from sun_edge.pocket.eval import (adherence, colours_read, generate_images, methods, shape_visible, table2_prompts,
                                      vae_round_trip)
    from sun_edge.pocket.world import COLOURS, STYLES
    from sun_edge.runtimes.pytorch import TorchRuntime

    texts, scenes, _ = table2_prompts(prompts, seed=PROMPT_SEED)
    seeds = [IMAGE_SEED + i for i in range(prompts)]
    asked = truth(list(scenes))["colour"]
    pipe = Pipeline(TorchRuntime.load(model, None, device=device))
    round_trip = {style: vae_round_trip(pipe.runtime.vae, classifier, style, seed=PROMPT_SEED) for style in STYLES}
    lines = []
    for guidance in guidances:
        start = time.perf_counter()
        settings = methods(64)["cfg25"].settings
        settings = settings if guidance is None else replace(settings, guidance=guidance)
        images = generate_images(pipe, texts, seeds, settings)
        scores = adherence(predict(classifier, images), scenes, shape_visible(images))
        read = colours_read(classifier, images)
        misses = Counter(f"{COLOURS[a]} -> {COLOURS[r] if r >= 0 else 'no shape'}"
                         for a, r in zip(asked, read) if a != r)
        lines.append({"model": model, "prompts": prompts, "guidance": settings.guidance,
                      "cfg25": {k: round(v, 4) for k, v in scores.items()}, "colour_misses": dict(misses.most_common()),
                      "vae_round_trip": round_trip, "seconds": round(time.perf_counter() - start, 1)})
    return lines


def scales(text: str) -> list[float]:
    """``--guidance 4,8,12`` -> [4.0, 8.0, 12.0]."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write guidance scales as numbers separated by commas, e.g. 4,8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="MODEL")
    parser.add_argument("--prompts", type=int, default=PROMPTS, help=f"held-out prompts (default {PROMPTS})")
    parser.add_argument("--guidance", type=scales, metavar="G[,G...]",
                        help="guidance scales to run, comma-separated (default: the eval's, 8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    args = parser.parse_args(argv)
    if args.prompts < 1:
        print(f"error: --prompts must be at least 1, got {args.prompts}", file=sys.stderr)
        return 2
    from sun_edge.errors import SunEdgeError
    from sun_edge.pocket.classifier import load_classifier

    classifier = load_classifier()
    for model in args.models:
        try:
            lines = check(model, prompts=args.prompts, device=args.device, classifier=classifier,
                          guidances=args.guidance or [None])
        except SunEdgeError as error:
            print(f"error: {model}: {error}", file=sys.stderr)
            return 2
        for line in lines:
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
