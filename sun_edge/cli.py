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

from sun_edge import __version__
from sun_edge import cli_check, cli_make, cli_triton
from sun_edge.cli_common import (DEFAULT_MODEL, add_model_args, add_openvino_args, openvino_options,
                                 openvino_provider, runtime_options)
from sun_edge.errors import SunEdgeError
from sun_edge.settings import check_output_file
from sun_edge.runtimes.torch_speed import OPTIMIZATIONS

DEFAULT_STRENGTH = 0.75  # --init-image without --strength: A1111's default denoising strength

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sun-edge", description="SpeedUpNet (SUN): 4-step Stable Diffusion 1.5 with negative prompts, for edge runtimes.")
    parser.add_argument("--version", action="version", version=f"sun-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="prompt to PNG (SUN 4 steps, or the CFG baseline)")
    add_model_args(g)
    g.add_argument("--bundle", type=Path, help="run an exported bundle (sun-edge export) instead of --model, with ONNX Runtime or Core ML as its target says; needs no PyTorch")
    g.add_argument("--runtime", help="with --bundle: the runtime to run it with (default: the one its target names; "
                                     "coreml-mil: a Core ML bundle through the NumPy MIL evaluator, for checking off macOS)")
    g.add_argument("--provider", default="cpu", help="with --bundle: ONNX Runtime execution provider: cpu (default), cuda, tensorrt, coreml")
    g.add_argument("--no-cuda-graphs", action="store_true", help="with a TensorRT bundle: run each UNet step without CUDA graph replay")
    g.add_argument("--compute-units", default="all", help="with a Core ML bundle on macOS: all (default), cpu-and-gpu, cpu-and-ne, cpu-only")
    add_openvino_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--mode", choices=["sun", "cfg"], default="sun", help="sun: one UNet call per step; cfg: the classifier-free guidance baseline")
    g.add_argument("--steps", type=int, help="default: 4 (sun), 25 (cfg)")
    g.add_argument("--scheduler", help="ddim, dpmpp_2m or euler (default: ddim for sun, dpmpp_2m for cfg)")
    g.add_argument("--spacing", help="trailing, leading or linspace (default: trailing for sun, linspace for cfg)")
    g.add_argument("--guidance", type=float, default=8.0, help="CFG scale for --mode cfg and for --compare's baseline (default 8)")
    g.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds; one image each")
    g.add_argument("--batch", type=int, default=1, metavar="N",
                   help="run up to N seeds in one UNet call per step (each image stays the one its seed gives alone; "
                        "a bundle's graphs cap it at their batch range)")
    g.add_argument("--height", type=int, help="default: the model's own size (SD1.5: 512), or the bundle's with --bundle")
    g.add_argument("--width", type=int, help="default: the model's own size (SD1.5: 512), or the bundle's with --bundle")
    g.add_argument("--noise", choices=["torch", "numpy"], default="torch", help="torch: same noise as diffusers for a seed (default); numpy: NumPy's generator")
    g.add_argument("--compare", action="store_true", help="write one image: SUN 4 steps beside CFG 25 steps, same seed, labelled")
    g.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, mps")
    g.add_argument("--optimize", default="none", choices=OPTIMIZATIONS,
                   help="with --model: UNet calls eager (none), as CUDA graphs, or through torch.compile (default: none)")
    g.add_argument("--vae-decoder", default="full", metavar="full|tiny:PATH",
                   help="full: the model's VAE (default); tiny:PATH: a TAESD decoder (diffusers folder or .safetensors), "
                        "faster; with --bundle: full or tiny (the TAESD graph exported into it)")
    g.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="PNG path; several seeds add -s<seed> to the name")
    e = g.add_argument_group("img2img and inpainting")
    e.add_argument("--init-image", type=Path, metavar="FILE", help="img2img: start from this image (resized and center-cropped to the model's size)")
    e.add_argument("--strength", type=float, help=f"with --init-image: denoising strength in (0, 1], the fraction of the steps that run (default {DEFAULT_STRENGTH})")
    e.add_argument("--mask", type=Path, metavar="FILE", help="with --init-image: inpaint where this mask is white (same size as the init image)")
    e.add_argument("--mask-blur", type=int, default=0, metavar="N", help="with --mask: blur the mask by N pixels (0..64, default 0)")
    e.add_argument("--invert-mask", action="store_true", help="with --mask: repaint where the mask is black")
    e.add_argument("--paste-back", action="store_true", help="with --mask: paste the original pixels back outside the (blurred) mask")
    c = g.add_argument_group("ControlNet")
    c.add_argument("--controlnet", metavar="FILE|NAME",
                   help="with --model: a ControlNet for it (.safetensors in diffusers' or the original control_v11 layout, "
                        "a diffusers folder, or a shipped one: pocket-silhouette); a bundle carries its own")
    c.add_argument("--control-image", type=Path, metavar="FILE",
                   help="the ControlNet's condition (edges, depth, pose, ...), fitted to the image size")
    c.add_argument("--control-scale", type=float, metavar="X", help="the ControlNet's weight in [0, 2] (default 1)")

    sub.add_parser("models", help="list the model registry and what is installed ($SUN_EDGE_HOME/models)")

    a = sub.add_parser("adapter", help="describe a SUN adapter file: layout, layers, parameter count")
    a.add_argument("path", type=Path)
    a.add_argument("--model", help="check it against this model's UNet (default: SD1.5's architecture)")
    a.add_argument("--allow-pickle", action="store_true")
    cli_make.add_export_parser(sub, add_model_args)
    cli_make.add_build_engines_parser(sub)
    cli_check.add_check_parsers(sub)
    _add_serve_parsers(sub)
    cli_triton.add_triton_parser(sub)
    cli_make.add_train_parser(sub)
    cli_make.add_eval_parser(sub)
    return parser


def _outputs(output: Path, seeds: Sequence[int]) -> list[Path]:
    if len(seeds) == 1:
        return [output]
    return [output.with_name(f"{output.stem}-s{seed}{output.suffix}") for seed in seeds]


def _bundle_runtime(args: argparse.Namespace, bundle: Any) -> tuple[Any, Any]:
    """The bundle's runtime (as its target says) and its tokenizer; imports no torch."""
    from sun_edge.runtimes import open_bundle_runtime

    if args.adapter or args.lora:
        raise SunEdgeError("--adapter and --lora are fused into a bundle at export; drop them with --bundle")
    openvino_provider(args)
    openvino = openvino_options(args, [args.runtime])
    if (args.precision, "cpu" if openvino else args.device) != ("fp32", "cpu"):
        raise SunEdgeError("--precision and --device apply to --model; a bundle's are fixed at export "
                           "(choose the hardware with --provider)")
    if args.vae_decoder not in ("full", "tiny"):
        raise SunEdgeError(f"--vae-decoder {args.vae_decoder} applies to --model; with --bundle use full or tiny "
                           "(the TAESD graph exported into the bundle with --vae-decoder tiny:PATH)")
    if args.optimize != "none":
        raise SunEdgeError("--optimize applies to --model (the PyTorch runtime); a TensorRT bundle captures CUDA graphs "
                           "itself (--no-cuda-graphs turns that off)")
    runtime = open_bundle_runtime(bundle, args.runtime, **runtime_options(args), **openvino)
    if args.mode == "cfg" or args.compare:
        runtime.require_baseline()  # before sampling starts
    return runtime, runtime.tokenizer()


def _control_image(args: argparse.Namespace) -> Any:
    """The ``--control-image``, read before any model loads; the flags that need each other, checked."""
    from sun_edge.control_image import read_control_image

    if args.control_image is None:
        if args.controlnet is not None or args.control_scale is not None:
            raise SunEdgeError("--controlnet and --control-scale need --control-image FILE (the ControlNet's condition)")
        return None
    if args.bundle is not None and args.controlnet is not None:
        raise SunEdgeError("--controlnet applies to --model; a bundle runs the ControlNet exported into it "
                           "(sun-edge export --controlnet FILE)")
    if args.bundle is None and args.controlnet is None:
        raise SunEdgeError("--control-image needs --controlnet FILE (the ControlNet that reads it)")
    return read_control_image(args.control_image)


def _torch_runtime(args: argparse.Namespace, mode: str) -> Any:
    from sun_edge.models import parse_lora_arg
    from sun_edge.runtimes.pytorch import TorchRuntime

    loras = tuple(parse_lora_arg(text) for text in args.lora)
    runtime = TorchRuntime.load(args.model, args.adapter, loras=loras, allow_pickle=args.allow_pickle,
                                device=args.device, precision=args.precision, vae_decoder=args.vae_decoder,
                                optimize=args.optimize, controlnet=args.controlnet)
    if mode == "sun" and runtime.adapter is None:
        raise SunEdgeError(f"model {args.model} has no SUN adapter beside it: pass --adapter PATH, or --mode cfg")
    return runtime


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sun_edge import imaging
    from sun_edge.pipeline import Pipeline, Settings
    from sun_edge.sampling import kept_steps
    from sun_edge.settings import check_seeds, check_text

    check_output_file(args.output, "-o", suffix=".png")
    check_text(args.prompt, "prompt")
    check_text(args.negative_prompt, "negative prompt")
    check_seeds(args.seed)
    if args.batch < 1:
        raise SunEdgeError(f"--batch must be at least 1, got {args.batch}")
    overrides = {"steps": args.steps, "scheduler": args.scheduler, "spacing": args.spacing, "height": args.height,
                 "width": args.width}
    common = {"guidance": args.guidance, "noise": args.noise, **_edit_settings(args)}
    init_image, mask = _edit_images(args)
    control = _control_image(args)
    if args.control_scale is not None:
        common["control_scale"] = args.control_scale
    if args.bundle is not None:  # --bundle runs without PyTorch: nothing on this path imports it
        from sun_edge.bundle import open_bundle

        bundle = open_bundle(args.bundle)
        size = {"height": args.height, "width": args.width}
        settings = Settings.from_manifest(bundle.manifest, args.mode, **overrides, **common)
        baseline = Settings.from_manifest(bundle.manifest, "cfg", **size, **common)
        settings.validate()
        runtime, tokenizer = _bundle_runtime(args, bundle)
        pipe = Pipeline(runtime, tokenizer)
    else:  # everything that needs no model is checked before loading it (seconds for a real checkpoint)
        given = {k: 8 if v is None else v for k, v in (("height", args.height), ("width", args.width))}  # size: later
        Settings.for_mode(args.mode, **{**overrides, **given}, **common).validate()
        runtime = _torch_runtime(args, args.mode)
        size = {"height": runtime.native_size if args.height is None else args.height,
                "width": runtime.native_size if args.width is None else args.width}
        settings = Settings.for_mode(args.mode, **{**overrides, **size}, **common)
        baseline = Settings.for_mode("cfg", **size, **common)
        settings.validate()
        pipe = Pipeline(runtime)
    info = runtime.info
    if info.get("adapter_parameters"):
        print(f"adapter {info['adapter']}: {info['adapter_parameters'] / 1e6:.2f}M parameters", file=sys.stderr)

    runs = [settings] + ([baseline] if args.compare else [])
    if args.compare:  # the captions compare times: take one-time set-up out of both
        for s in runs:
            pipe.warm_up(s)
    total = sum(kept_steps(s.steps, s.strength) if init_image is not None else s.steps for s in runs) * len(args.seed)
    bar = None

    def progress(done: int, _total: int) -> None:
        nonlocal bar  # made when sampling starts, so that warnings from text encoding print above it
        bar = bar or tqdm(total=total, unit="step", desc="sampling", file=sys.stderr)
        bar.update(1 if done else 0)

    try:
        results = [pipe.generate(args.prompt, args.negative_prompt, seeds=args.seed, settings=s, progress=progress,
                                 max_batch=args.batch, init_image=init_image, mask=mask, control_image=control)
                   for s in runs]
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


def _edit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The img2img/inpainting settings the flags ask for; flags that need --init-image or --mask without it: one line."""
    if args.init_image is None:
        for flag, value in (("--strength", args.strength), ("--mask", args.mask)):
            if value is not None:
                raise SunEdgeError(f"{flag} needs --init-image FILE (the image to start from)")
    if args.mask is None:
        for flag, given in (("--mask-blur", args.mask_blur != 0), ("--invert-mask", args.invert_mask),
                            ("--paste-back", args.paste_back)):
            if given:
                raise SunEdgeError(f"{flag} needs --mask FILE (white = repaint)")
    if args.init_image is None:
        return {}
    return {"strength": DEFAULT_STRENGTH if args.strength is None else args.strength, "mask_blur": args.mask_blur,
            "invert_mask": args.invert_mask, "paste_back": args.paste_back}


def _edit_images(args: argparse.Namespace) -> tuple[Any, Any]:
    """--init-image and --mask read (a file that is not an image, a mask of another size: one line), before a model loads."""
    from sun_edge.editing import open_image

    if args.init_image is None:
        return None, None
    init = open_image(args.init_image, "--init-image")
    mask = open_image(args.mask, "--mask") if args.mask is not None else None
    if mask is not None and mask.size != init.size:
        raise SunEdgeError(f"--mask {args.mask} is {mask.width}x{mask.height} and --init-image {args.init_image} is "
                           f"{init.width}x{init.height}; give a mask of the init image's size")
    return init, mask


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


CLI_FIXES = {
    "adapter": ": pass --adapter PATH to a SUN adapter .safetensors",
    "adapter_or_cfg": ": pass --adapter, or use --mode cfg",
    "load_tiny": ": load it with --vae-decoder tiny:PATH",
    "export_tiny": "; re-export it with --vae-decoder tiny:PATH, or use --vae-decoder full",
    "export_baseline": "; re-export it with --with-baseline",
    "coreml_cfg": "; --mode cfg and --compare need the UNet without the adapter: use an ONNX bundle exported with "
                  "--with-baseline, or --model",
    "model_path": " or pass --model PATH",
    "allow_pickle": "; convert it to .safetensors or pass --allow-pickle if you trust it",
}

def _add_serve_parsers(sub: Any) -> None:
    """``serve`` and ``bench-serve`` (apps/server: argparse only here; FastAPI loads when the command runs)."""
    from sun_edge_server.cli_args import add_serve_parsers

    add_serve_parsers(sub, DEFAULT_MODEL)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from sun_edge_server.serve import cmd_serve as serve
    except ImportError as e:
        raise SunEdgeError(f"sun-edge serve needs the server extra ({e.name} is missing): "
                           'pip install "sun-edge[server]"') from e
    return serve(args)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from sun_edge_server.loadtest import cmd_bench_serve as bench

    return bench(args)


COMMANDS = {"generate": cmd_generate, "models": cmd_models, "adapter": cmd_adapter, **cli_check.COMMANDS,
            "serve": cmd_serve, "bench-serve": cmd_bench_serve, "triton": cli_triton.cmd_triton, **cli_make.COMMANDS}


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line as given, for reports that record how they were made
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            code = COMMANDS[args.command](args)
        sys.stdout.flush()  # inside the try: a reader that left (`| head`) is a BrokenPipeError here, not at exit
        return code
    except SunEdgeError as e:
        print(f"error: {e.render(CLI_FIXES)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sun-edge models | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
