"""Time UNet steps side by side on the PyTorch runtime: SUN batch 1, plain batch 1, CFG batch 2.

    python scripts/measure_steps.py --model PATH [--adapter FILE] [--size 512] [--repeats 3]

The three forms are interleaved, repeat by repeat, so that they see the same machine state;
the median of each is reported with the ratios. Inputs are real: the tokenized prompts and the
initial noise of a seed, at the first SUN timestep.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    import numpy as np
    import torch

    from sun_edge.pipeline import Pipeline, Settings
    from sun_edge.runtimes.pytorch import TorchRuntime

    runtime = TorchRuntime.load(args.model, args.adapter)
    pipe = Pipeline(runtime)
    settings = Settings(height=args.size, width=args.size)
    latents = pipe.initial_latents(0, settings)
    pos, neg = pipe.embed("a photo of a cat"), pipe.embed("blurry, lowres")
    t = np.array([999.0], np.float32)
    forms = {
        "sun_batch1": lambda: runtime.unet(latents, t, pos, neg),
        "plain_batch1": lambda: runtime.unet_plain(latents, t, pos),
        "cfg_batch2": lambda: runtime.unet_plain(np.concatenate([latents, latents]), t, np.concatenate([neg, pos])),
    }
    for fn in forms.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.repeats):
        for name, fn in forms.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) for name, v in times.items()}
    figures = {
        "size": args.size, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "seconds": med, "all_seconds": times,
        "sun_over_plain": med["sun_batch1"] / med["plain_batch1"],
        "cfg_over_plain": med["cfg_batch2"] / med["plain_batch1"],
        "unet_time_cfg25_over_sun4": 25 * med["cfg_batch2"] / (4 * med["sun_batch1"]),
    }
    for name, value in med.items():
        print(f"{name:<14} {value:8.3f} s/step")
    print(f"SUN step / plain batch-1 step: {figures['sun_over_plain']:.3f}x")
    print(f"CFG batch-2 step / plain batch-1 step: {figures['cfg_over_plain']:.3f}x")
    print(f"UNet time, 25-step CFG over 4-step SUN: {figures['unet_time_cfg25_over_sun4']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
