"""The ``sun-edge`` command line. Each command parses arguments and calls library functions.

Errors the user can fix print one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sun_edge.errors import SunEdgeError

DEFAULT_MODEL = "tiny-random"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name or path (default: {DEFAULT_MODEL}; see `sun-edge models`)")
    p.add_argument("--adapter", help="SUN adapter .safetensors (default: the one shipped beside the model, if any)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="merge a kohya/civitai LoRA first (repeatable)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin/.pt checkpoints (they can run code; only for files you trust)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sun-edge", description="SpeedUpNet (SUN): 4-step Stable Diffusion 1.5 with negative prompts, for edge runtimes.")
    parser.add_argument("--version", action="version", version=f"sun-edge {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="prompt to PNG (SUN 4 steps, or the CFG baseline)")
    _add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--mode", choices=["sun", "cfg"], default="sun", help="sun: one UNet call per step; cfg: the classifier-free guidance baseline")
    g.add_argument("--steps", type=int, help="default: 4 (sun), 25 (cfg)")
    g.add_argument("--scheduler", help="ddim, dpmpp_2m or euler (default: ddim for sun, dpmpp_2m for cfg)")
    g.add_argument("--spacing", help="trailing, leading or linspace (default: trailing for sun, linspace for cfg)")
    g.add_argument("--guidance", type=float, default=8.0, help="CFG scale for --mode cfg and for --compare's baseline (default 8)")
    g.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds; one image each")
    g.add_argument("--height", type=int, default=512)
    g.add_argument("--width", type=int, default=512)
    g.add_argument("--noise", choices=["torch", "numpy"], default="torch", help="torch: same noise as diffusers for a seed (default); numpy: NumPy's generator")
    g.add_argument("--compare", action="store_true", help="write one image: SUN 4 steps beside CFG 25 steps, same seed, labelled")
    g.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, mps")
    g.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="PNG path; several seeds add -s<seed> to the name")

    sub.add_parser("models", help="list the model registry and what is installed ($SUN_EDGE_HOME/models)")

    a = sub.add_parser("adapter", help="describe a SUN adapter file: layout, layers, parameter count")
    a.add_argument("path", type=Path)
    a.add_argument("--model", help="check it against this model's UNet (default: SD1.5's architecture)")
    a.add_argument("--allow-pickle", action="store_true")
    return parser


def _version() -> str:
    from sun_edge import __version__

    return __version__


def _outputs(output: Path, seeds: Sequence[int]) -> list[Path]:
    if len(seeds) == 1:
        return [output]
    return [output.with_name(f"{output.stem}-s{seed}{output.suffix}") for seed in seeds]


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sun_edge import imaging
    from sun_edge.models import parse_lora_arg
    from sun_edge.pipeline import Pipeline, Settings
    from sun_edge.runtimes.pytorch import TorchRuntime

    if args.output.suffix.lower() != ".png":
        raise SunEdgeError(f"output {args.output} must end in .png")
    if not args.output.parent.resolve().is_dir():
        raise SunEdgeError(f"output folder {args.output.parent} does not exist; create it first")
    base = Settings() if args.mode == "sun" else Settings.baseline()
    overrides: dict[str, Any] = {k: v for k, v in (("steps", args.steps), ("scheduler", args.scheduler), ("spacing", args.spacing)) if v is not None}
    settings = Settings(**{**base.__dict__, **overrides, "mode": args.mode, "guidance": args.guidance,
                           "height": args.height, "width": args.width, "noise": args.noise})
    settings.validate()
    loras = tuple(parse_lora_arg(text) for text in args.lora)
    runtime = TorchRuntime.load(args.model, args.adapter, loras=loras, allow_pickle=args.allow_pickle,
                                device=args.device, precision=args.precision)
    if settings.mode == "sun" and runtime.adapter is None:
        raise SunEdgeError(f"model {args.model} has no SUN adapter beside it: pass --adapter PATH, or --mode cfg")
    info = runtime.info
    if "adapter_parameters" in info:
        print(f"adapter {info['adapter']}: {info['adapter_parameters'] / 1e6:.2f}M parameters", file=sys.stderr)
    pipe = Pipeline(runtime)

    runs = [settings] + ([Settings.baseline(guidance=args.guidance, height=args.height, width=args.width, noise=args.noise)] if args.compare else [])
    if args.compare:  # the captions compare times: take one-time set-up out of both
        for s in runs:
            pipe.warm_up(s)
    total = sum(s.steps for s in runs) * len(args.seed)
    bar = None

    def progress(done: int, _total: int) -> None:
        nonlocal bar  # made when sampling starts, so that warnings from text encoding print above it
        bar = bar or tqdm(total=total, unit="step", desc="sampling", file=sys.stderr)
        bar.update(1 if done else 0)

    try:
        results = [pipe.generate(args.prompt, args.negative_prompt, seeds=args.seed, settings=s, progress=progress) for s in runs]
    finally:
        if bar is not None:
            bar.close()

    for i, path in enumerate(_outputs(args.output, args.seed)):
        first = results[0][i]
        image = first.image
        if args.compare:
            image = imaging.side_by_side([r[i].image for r in results], [_caption(r[i]) for r in results])
        imaging.save_png(image, path, first.parameters)
        for r in (r[i] for r in results):
            print(f"{r.settings.mode}: {r.seconds:.2f} s for the image; {r.unet_calls} UNet calls, "
                  f"{r.unet_seconds / r.unet_calls:.3f} s each", file=sys.stderr)
        print(f"wrote {path}")
    return 0


def _caption(g: Any) -> list[str]:
    from sun_edge.imaging import SAMPLER_LABELS

    s = g.settings
    sampler = SAMPLER_LABELS.get(s.scheduler, s.scheduler)
    if s.mode == "sun":
        head, calls = "SUN", f"{g.unet_calls} UNet calls (batch 1)"
    else:
        head, calls = f"CFG {s.guidance:g}", f"{g.unet_calls} UNet calls (batch 2)"
    return [f"{head}: {sampler}, {s.steps} steps", calls, f"{g.seconds:.1f} s, seed {g.seed}"]


def cmd_models(args: argparse.Namespace) -> int:
    from sun_edge.models import list_models, models_dir

    print(f"models folder: {models_dir()}  (set SUN_EDGE_HOME to move it)")
    rows = []
    for entry, path in list_models():
        wanted = entry.files[0] if entry.files else entry.folders[0]
        status = str(path) if path else ("generated on first use" if entry.generated else f"missing: put {wanted} there")
        rows.append((f"{entry.name} ({entry.display_name})", status))
    width = max(len(name) for name, _ in rows)
    for name, where in rows:
        print(f"  {name:<{width}}  {where}")
    return 0


def cmd_adapter(args: argparse.Namespace) -> int:
    from sun_edge.adapter import detect_layout, load_adapter, sd15_unet_config
    from sun_edge.weights import read_state_dict, sha256_file

    config = sd15_unet_config()
    if args.model:
        from sun_edge.models import load_model

        config = load_model(args.model, allow_pickle=args.allow_pickle).unet.config
    layout = detect_layout(list(read_state_dict(args.path)))
    adapter = load_adapter(args.path, config)
    print(f"{args.path.name}: {layout} layout, {len(adapter.specs)} cross-attention layers, "
          f"extra-positive branch {'yes' if adapter.extra_positive else 'no'}, "
          f"{adapter.num_parameters() / 1e6:.2f}M parameters ({adapter.num_parameters():,})")
    print(f"sha256 {sha256_file(args.path)}")
    return 0


COMMANDS = {"generate": cmd_generate, "models": cmd_models, "adapter": cmd_adapter}


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            return COMMANDS[args.command](args)
    except SunEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
