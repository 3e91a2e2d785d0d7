"""Write a full-size SD1.5-architecture model with random weights, and a random SUN adapter.

For measurements on machines that cannot download SD1.5: the shapes, and so the cost, are
SD1.5's exactly; the images are noise.

    python scripts/make_random_sd15.py OUT_DIR [--extra-positive]

writes OUT_DIR/{unet,text_encoder,vae}/ (a diffusers folder, fp32 safetensors) and
OUT_DIR/sun-adapter.safetensors.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--extra-positive", action="store_true", help="adapter with the extra-positive branch (38.39M)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sun_edge.adapter import BUNDLED_ADAPTER_FILE, SUNAdapter, save_adapter
    from sun_edge.tiny import write_diffusers_folder

    def config(part: str) -> dict:
        return json.loads(resources.files("sun_edge").joinpath(f"configs/sd15/{part}/config.json").read_text())

    torch.manual_seed(args.seed)
    text_config = {k: v for k, v in config("text_encoder").items() if not k.startswith("_")}
    components = {
        "unet": UNet2DConditionModel.from_config(config("unet")),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**text_config)),
        "vae": AutoencoderKL.from_config(config("vae")),
    }
    args.out.mkdir(parents=True, exist_ok=False)
    write_diffusers_folder(components, args.out)
    adapter = SUNAdapter.from_unet(components["unet"], extra_positive=args.extra_positive).randomize_(args.seed)
    save_adapter(adapter, args.out / BUNDLED_ADAPTER_FILE)
    print(f"wrote {args.out}: UNet {sum(p.numel() for p in components['unet'].parameters()) / 1e6:.2f}M, "
          f"adapter {adapter.num_parameters() / 1e6:.2f}M parameters")


if __name__ == "__main__":
    main()
