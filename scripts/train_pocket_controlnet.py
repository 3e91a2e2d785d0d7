"""Train the pocket silhouette ControlNet on pocket-base (frozen) into OUT_DIR.

    python scripts/train_pocket_controlnet.py OUT_DIR [--steps N] [--batch-size B] [--lr LR]
                                              [--images N] [--time-box SECONDS] [--threads N]
                                              [--base MODEL] [--seed S]

The recipe is sun_edge/pocket/controlnet_train.py (ControlNetModel.from_unet, the standard ControlNet
loss, the world's silhouettes as the condition). OUT_DIR/checkpoint.pt is written every 100 steps and
at the end of a time box: running the same command again resumes exactly from it (the draws of step
k depend on (seed, k) alone), and ``--steps`` may be raised to continue a finished run. When the run
reaches ``--steps`` the ControlNet is written in fp16 to OUT_DIR/controlnet-silhouette/ (diffusers
layout, with pocket.json); every run appends one JSON line to OUT_DIR/log.jsonl. Progress lines go to
stderr every 25 steps. On the shared 2-core CPU, ``--threads 1`` (the default here) is fastest.

The shipped sun_edge/data/pocket/controlnet-silhouette/ came from (docs/pocket.md):

    nohup python scripts/train_pocket_controlnet.py /tmp/pocket-cn --steps 2000 --images 4000 \\
        --time-box 2700 > /tmp/pocket-cn.log 2>&1 &      # stopped by its time box at step N
    python scripts/train_pocket_controlnet.py /tmp/pocket-cn --steps N --images 4000   # writes the folder
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

WORLD_SEED = 0  # pocket-base's training world
OUTPUT = "controlnet-silhouette"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--images", type=int, default=3000, help="world renders to train on (default 3000)")
    parser.add_argument("--time-box", type=float, metavar="SECONDS", help="stop this run after SECONDS of training")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--base", default="pocket-base", help="the frozen model (name or folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from sun_edge.errors import SunEdgeError
    from sun_edge.models import load_model
    from sun_edge.pocket.controlnet_train import (
        CONDITIONING_CHANNELS, ControlConfig, ControlData, build_controlnet, save_controlnet, train_controlnet)

    torch.set_num_threads(args.threads)
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    try:
        config = ControlConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
                               max_seconds=args.time_box)
        model = load_model(args.base)
        start = time.perf_counter()
        data = ControlData.render(args.images, WORLD_SEED, model.vae)
        print(f"controlnet: {len(data)} training pairs in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        torch.manual_seed(args.seed)
        controlnet = build_controlnet(model.unet)
        result = train_controlnet(controlnet, model.unet, model.text_encoder, data, config, checkpoint_dir=out)
    except SunEdgeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    record = {"base": args.base, "base_sha256": model.sha256, "world_seed": WORLD_SEED, "images": args.images,
              "learning_rate": args.lr, "caption_dropout": config.caption_dropout, "seed": args.seed,
              "conditioning_embedding_out_channels": list(CONDITIONING_CHANNELS), "threads": args.threads,
              "planned_steps": args.steps, "time_box": args.time_box, **result.to_json()}
    with open(out / "log.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")
    if result.steps >= args.steps:
        target = out / OUTPUT
        if target.exists():
            print(f"controlnet: {target} exists; not overwritten", file=sys.stderr)
        else:
            parameters = sum(p.numel() for p in controlnet.parameters())
            info = {"what": "pocket silhouette ControlNet: ControlNetModel.from_unet(pocket-base UNet), base frozen",
                    "command": "python scripts/train_pocket_controlnet.py " + " ".join(argv if argv is not None
                                                                                       else sys.argv[1:]),
                    "recipe": "standard ControlNet loss (epsilon MSE of the frozen UNet plus the ControlNet's "
                              "residuals), t uniform 0..999, SD1.5 DDPM schedule, captions dropped to '' with "
                              f"p={config.caption_dropout}, AdamW lr {args.lr} (linear warm-up), weight decay "
                              f"{config.weight_decay}, grad clip {config.max_grad_norm}",
                    "condition": "world.object_mask of the plain render (the scene's silhouette), white on black, "
                                 "64x64 RGB in [0, 1]",
                    "parameters": parameters, **{k: v for k, v in record.items() if k != "threads"},
                    "device": f"CPU, {args.threads} torch thread(s)",
                    "runs": [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line]}
            save_controlnet(controlnet, target, info)
            print(f"controlnet: wrote {target}", file=sys.stderr)
    else:
        print(f"controlnet: stopped at step {result.steps} of {args.steps}; run again to resume", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
