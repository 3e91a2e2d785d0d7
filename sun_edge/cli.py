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
from sun_edge.errors import SunEdgeError
from sun_edge.runtimes.torch_speed import OPTIMIZATIONS

DEFAULT_MODEL = "pocket-base"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name or path (default: {DEFAULT_MODEL}; see `sun-edge models`)")
    p.add_argument("--adapter", help="SUN adapter .safetensors (default: the one shipped beside the model, if any)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="merge a kohya/civitai LoRA first (repeatable)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin/.pt checkpoints (they can run code; only for files you trust)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sun-edge", description="SpeedUpNet (SUN): 4-step Stable Diffusion 1.5 with negative prompts, for edge runtimes.")
    parser.add_argument("--version", action="version", version=f"sun-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="prompt to PNG (SUN 4 steps, or the CFG baseline)")
    _add_model_args(g)
    g.add_argument("--bundle", type=Path, help="run an exported bundle (sun-edge export) instead of --model, with ONNX Runtime or Core ML as its target says; needs no PyTorch")
    g.add_argument("--runtime", help="with --bundle: the runtime to run it with (default: the one its target names; "
                                     "coreml-mil: a Core ML bundle through the NumPy MIL evaluator, for checking off macOS)")
    g.add_argument("--provider", default="cpu", help="with --bundle: ONNX Runtime execution provider: cpu (default), cuda, tensorrt, coreml")
    g.add_argument("--no-cuda-graphs", action="store_true", help="with a TensorRT bundle: run each UNet step without CUDA graph replay")
    g.add_argument("--compute-units", default="all", help="with a Core ML bundle on macOS: all (default), cpu-and-gpu, cpu-and-ne, cpu-only")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--mode", choices=["sun", "cfg"], default="sun", help="sun: one UNet call per step; cfg: the classifier-free guidance baseline")
    g.add_argument("--steps", type=int, help="default: 4 (sun), 25 (cfg)")
    g.add_argument("--scheduler", help="ddim, dpmpp_2m or euler (default: ddim for sun, dpmpp_2m for cfg)")
    g.add_argument("--spacing", help="trailing, leading or linspace (default: trailing for sun, linspace for cfg)")
    g.add_argument("--guidance", type=float, default=8.0, help="CFG scale for --mode cfg and for --compare's baseline (default 8)")
    g.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds; one image each")
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

    sub.add_parser("models", help="list the model registry and what is installed ($SUN_EDGE_HOME/models)")

    a = sub.add_parser("adapter", help="describe a SUN adapter file: layout, layers, parameter count")
    a.add_argument("path", type=Path)
    a.add_argument("--model", help="check it against this model's UNet (default: SD1.5's architecture)")
    a.add_argument("--allow-pickle", action="store_true")
    _add_export_parser(sub)
    _add_build_engines_parser(sub)
    _add_check_parsers(sub)
    _add_train_parser(sub)
    _add_eval_parser(sub)
    return parser


def _add_eval_parser(sub: Any) -> None:
    """The ``eval`` subcommand: the paper's tables in miniature on the Pocket SD family."""
    v = sub.add_parser("eval", help="Pocket SD: Table 2 (4-step samplers vs 25-step CFG), Table 4 (MSC p), Fig. 5 "
                                    "(negative prompts), scored by the world's attribute classifier")
    v.add_argument("--model", action="append", metavar="NAME|PATH",
                   help="models to evaluate, the base first (default: pocket-base pocket-toon)")
    v.add_argument("--adapter", help="SUN adapter trained on the first model (default: the one beside it)")
    v.add_argument("--msc-adapter", action="append", default=[], metavar="LABEL:PATH",
                   help="Table 4: an adapter trained with another MSC probability, e.g. p=0:sun-p0.safetensors")
    v.add_argument("--prompts", type=int, default=64, help="Table 2 prompts, one seed each (default 64)")
    v.add_argument("--negative-seeds", type=int, default=8, help="Fig. 5 seeds per shape (default 8; 0 skips Fig. 5)")
    v.add_argument("--classifier", help="attribute classifier weights (default: the shipped one)")
    v.add_argument("-o", "--output", type=Path, required=True, help="folder for eval.json, tables.md and the grids")


def cmd_eval(args: argparse.Namespace) -> int:
    import shlex

    from sun_edge.pocket.report import EvalRequest, run_eval

    if args.prompts < 1 or args.negative_seeds < 0:
        raise SunEdgeError("--prompts must be at least 1 and --negative-seeds at least 0")
    msc = []
    for text in args.msc_adapter:
        label, sep, path = text.partition(":")
        if not sep or not label or not path:
            raise SunEdgeError(f"bad --msc-adapter {text!r}: write LABEL:PATH, e.g. p=0:sun-p0.safetensors")
        msc.append((label, path))
    request = EvalRequest(models=tuple(args.model or ("pocket-base", "pocket-toon")), adapter=args.adapter,
                          msc_adapters=tuple(msc), prompts=args.prompts, negative_seeds=args.negative_seeds,
                          classifier=args.classifier, command="sun-edge " + shlex.join(args.argv))
    report = run_eval(request, args.output)
    print(report.markdown())
    print(f"wrote {args.output}/eval.json, tables.md and the grids ({report.seconds:.0f} s)")
    return 0


def _add_train_parser(sub: Any) -> None:
    """The ``train`` subcommand (options defined with the training code)."""
    from sun_edge.train.args import add_train_arguments

    t = sub.add_parser("train", help="train a SUN adapter for a base model (CFG distillation + MSC; accelerate-ready)")
    add_train_arguments(t)


def cmd_train(args: argparse.Namespace) -> int:
    from sun_edge.train.args import config_from_args
    from sun_edge.train.loop import train

    result = train(config_from_args(args))
    if not result.main_process:
        return 0
    if result.start_step:
        print(f"resumed from step {result.start_step} ({result.checkpoint_dir})", file=sys.stderr)
    if result.skipped_count:
        print(f"warning: skipped {len(result.skipped)} unreadable image(s) ({result.skipped_count} draws), "
              f"first: {next(iter(result.skipped))}", file=sys.stderr)
    speed = f", {result.examples_per_second:.3g} examples/s" if result.history else ", nothing left to train"
    print(f"wrote {result.output} after {result.steps} steps{speed}; checkpoints and logs in {result.checkpoint_dir}")
    return 0



def _outputs(output: Path, seeds: Sequence[int]) -> list[Path]:
    if len(seeds) == 1:
        return [output]
    return [output.with_name(f"{output.stem}-s{seed}{output.suffix}") for seed in seeds]


def _bundle_runtime(args: argparse.Namespace, bundle: Any) -> tuple[Any, Any]:
    """The bundle's runtime (as its target says) and its tokenizer; imports no torch."""
    from sun_edge.runtimes import open_bundle_runtime

    if args.adapter or args.lora:
        raise SunEdgeError("--adapter and --lora are fused into a bundle at export; drop them with --bundle")
    if (args.precision, args.device) != ("fp32", "cpu"):
        raise SunEdgeError("--precision and --device apply to --model; a bundle's are fixed at export "
                           "(choose the hardware with --provider)")
    if args.vae_decoder not in ("full", "tiny"):
        raise SunEdgeError(f"--vae-decoder {args.vae_decoder} applies to --model; with --bundle use full or tiny "
                           "(the TAESD graph exported into the bundle with --vae-decoder tiny:PATH)")
    if args.optimize != "none":
        raise SunEdgeError("--optimize applies to --model (the PyTorch runtime); a TensorRT bundle captures CUDA graphs "
                           "itself (--no-cuda-graphs turns that off)")
    runtime = open_bundle_runtime(bundle, args.runtime, **_runtime_options(args))
    if args.mode == "cfg" or args.compare:
        runtime.require_baseline()  # before sampling starts
    return runtime, runtime.tokenizer()


def _runtime_options(args: argparse.Namespace) -> dict[str, Any]:
    """The bundle-runtime options given on the command line (``open_bundle_runtime`` refuses those that do not apply)."""
    return {"provider": args.provider, "compute_units": getattr(args, "compute_units", "all"),
            "cuda_graphs": not getattr(args, "no_cuda_graphs", False), "vae_decoder": getattr(args, "vae_decoder", "full")}


def _torch_runtime(args: argparse.Namespace, mode: str) -> Any:
    from sun_edge.models import parse_lora_arg
    from sun_edge.runtimes.pytorch import TorchRuntime

    loras = tuple(parse_lora_arg(text) for text in args.lora)
    runtime = TorchRuntime.load(args.model, args.adapter, loras=loras, allow_pickle=args.allow_pickle,
                                device=args.device, precision=args.precision, vae_decoder=args.vae_decoder,
                                optimize=args.optimize)
    if mode == "sun" and runtime.adapter is None:
        raise SunEdgeError(f"model {args.model} has no SUN adapter beside it: pass --adapter PATH, or --mode cfg")
    return runtime


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sun_edge import imaging
    from sun_edge.pipeline import Pipeline, Settings

    if args.output.suffix.lower() != ".png":
        raise SunEdgeError(f"output {args.output} must end in .png")
    if not args.output.parent.resolve().is_dir():
        raise SunEdgeError(f"output folder {args.output.parent} does not exist; create it first")
    overrides = {"steps": args.steps, "scheduler": args.scheduler, "spacing": args.spacing, "height": args.height,
                 "width": args.width}
    common = {"guidance": args.guidance, "noise": args.noise}
    if args.bundle is not None:  # --bundle runs without PyTorch: nothing on this path imports it
        from sun_edge.bundle import open_bundle

        bundle = open_bundle(args.bundle)
        size = {"height": args.height, "width": args.width}
        settings = Settings.from_manifest(bundle.manifest, args.mode, **overrides, **common)
        baseline = Settings.from_manifest(bundle.manifest, "cfg", **size, **common)
        settings.validate()
        runtime, tokenizer = _bundle_runtime(args, bundle)
        pipe = Pipeline(runtime, tokenizer)
    else:
        runtime = _torch_runtime(args, args.mode)
        size = {"height": args.height or runtime.native_size, "width": args.width or runtime.native_size}
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


def _add_export_parser(sub: Any) -> None:
    """The ``export`` subcommand: a model with its adapter fused in, as a bundle for a target runtime."""
    from sun_edge.export import TARGETS

    e = sub.add_parser("export", help="export a model with its SUN adapter fused in as a bundle (graphs, tokenizer, manifest)")
    e.add_argument("--target", required=True, help=f"what to export for: {', '.join(TARGETS)}")
    _add_model_args(e)
    e.add_argument("--precision", choices=["fp32", "fp16"],
                   help="fp16 keeps softmax, normalisation and the adapter's norm ratio in fp32; the VAE stays fp32 "
                        "(default: fp32; fp16 for coreml and tensorrt)")
    e.add_argument("--height", type=int, help="image height the graphs are made for (static; default: the model's own, SD1.5 512)")
    e.add_argument("--width", type=int, help="image width the graphs are made for (static; default: the model's own, SD1.5 512)")
    e.add_argument("--with-baseline", action="store_true", help="also export the UNet without the adapter (batch 1 or 2) for --mode cfg")
    e.add_argument("--vae-decoder", default="full", metavar="full|tiny:PATH",
                   help="tiny:PATH: also export this TAESD decoder (diffusers folder or .safetensors) as vae_decoder_tiny, "
                        "for generate --vae-decoder tiny (onnx target only; default: full, the model's VAE alone)")
    e.add_argument("--force", action="store_true", help="replace an existing bundle at -o")
    e.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to write")
    for target in TARGETS.values():  # each target's own options, declared in its registry entry
        if target.options:
            group = e.add_argument_group(f"{target.name} target")
            for option in target.options:
                group.add_argument(f"--{option.name.replace('_', '-')}", type=option.type, choices=option.choices,
                                   help=option.help)


def _add_build_engines_parser(sub: Any) -> None:
    """The ``build-engines`` subcommand: TensorRT engines for a tensorrt bundle, on the GPU that will serve it."""
    from sun_edge.export.tensorrt import DEFAULT_OPT_LEVEL, DEFAULT_WORKSPACE_GB

    b = sub.add_parser("build-engines", help="build TensorRT engines for a --target tensorrt bundle on this machine's GPU")
    b.add_argument("--bundle", type=Path, required=True, help="the bundle directory (sun-edge export --target tensorrt)")
    b.add_argument("--opt-level", type=int, default=DEFAULT_OPT_LEVEL, choices=range(6), metavar="0-5",
                   help=f"TensorRT builder optimisation level (default {DEFAULT_OPT_LEVEL})")
    b.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file: read if present, written after each build")
    b.add_argument("--workspace-gb", type=float, default=DEFAULT_WORKSPACE_GB,
                   help=f"builder workspace memory pool limit in GiB (default {DEFAULT_WORKSPACE_GB:g})")
    b.add_argument("--force", action="store_true", help="rebuild engines that are already current")


def cmd_build_engines(args: argparse.Namespace) -> int:
    from sun_edge.export.tensorrt import build_engines

    manifest = build_engines(args.bundle, opt_level=args.opt_level, timing_cache=args.timing_cache,
                             workspace_gb=args.workspace_gb, force=args.force)
    for name, engine in manifest.extra["tensorrt"]["engines"].items():
        print(f"{name}: {engine['file']} ({engine['gpu']}, sm{engine['sm']}, TensorRT {engine['tensorrt']})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sun_edge.bundle_parity import export_parity
    from sun_edge.export import TARGETS, export, export_options
    from sun_edge.models import parse_lora_arg

    chosen = TARGETS.get(args.target)
    for target in TARGETS.values():  # options of another target are refused, not ignored
        for option in target.options:
            if getattr(args, option.name) is not None and target is not chosen:
                raise SunEdgeError(f"--{option.name.replace('_', '-')} applies to --target {target.name} only")
    specific = {o.name: getattr(args, o.name) for o in (chosen.options if chosen else ()) if getattr(args, o.name) is not None}
    options = export_options(args.target, precision=args.precision, height=args.height, width=args.width,
                             with_baseline=args.with_baseline, **specific)
    loras = tuple(parse_lora_arg(text) for text in args.lora)
    path = export(args.target, args.model, args.output, adapter=args.adapter, loras=loras, allow_pickle=args.allow_pickle,
                  options=options, force=args.force, parity=export_parity, vae_decoder=args.vae_decoder)
    print(f"wrote {path}")
    return 0


def _add_check_parsers(sub: Any) -> None:
    """The ``parity`` and ``bench`` subcommands."""
    p = sub.add_parser("parity", help="re-check a bundle against the PyTorch reference: PSNR per component on real inputs")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="check seeds 0..N-1 (default 1)")
    p.add_argument("--model", help="reference model (default: the path recorded in the bundle's manifest)")
    p.add_argument("--adapter", help="reference adapter (default: the path recorded in the bundle's manifest)")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="LoRAs merged at export (default: as recorded)")
    p.add_argument("--vae-decoder", metavar="tiny:PATH",
                   help="reference TAESD decoder for a bundle that has one (default: the path recorded in its manifest)")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--provider", default="cpu", help="ONNX Runtime execution provider (default: cpu)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")

    b = sub.add_parser("bench", help="time SUN 4 steps against CFG 25 steps: UNet steps, whole images, decode, memory")
    source = b.add_mutually_exclusive_group()
    source.add_argument("--bundle", type=Path, help="an exported bundle, run with ONNX Runtime")
    source.add_argument("--model", help=f"a model for the PyTorch reference (default: {DEFAULT_MODEL})")
    b.add_argument("--adapter", help="with --model: SUN adapter (default: the one beside the model)")
    b.add_argument("--vae-decoder", default="full", metavar="full|tiny:PATH", help="with --model: also time a TAESD decoder")
    b.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32", help="with --model (default: fp32)")
    b.add_argument("--device", default="cpu", help="with --model: torch device (default: cpu)")
    b.add_argument("--optimize", default="none", choices=OPTIMIZATIONS,
                   help="with --model: UNet calls eager (none), as CUDA graphs, or through torch.compile (default: none)")
    b.add_argument("--runtime", help="with --bundle: the runtime to time (default: the one its target names)")
    b.add_argument("--provider", default="cpu", help="with --bundle: ONNX Runtime execution provider (default: cpu)")
    b.add_argument("--repeats", type=int, default=3, help="timed repeats per form, after one warm-up (default 3)")
    b.add_argument("--size", type=int, help="image height = width (default: the bundle's, or the model's own: SD1.5 512)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--steps-only", action="store_true", help="time the UNet steps and decoders only, not whole images")
    b.add_argument("--json", type=Path, help="also write every figure (and the machine) to this file")


def _check_json_path(path: Path | None) -> None:
    if path is not None and not path.parent.resolve().is_dir():
        raise SunEdgeError(f"folder {path.parent} for --json does not exist; create it first")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def cmd_parity(args: argparse.Namespace) -> int:
    from sun_edge.bundle_parity import check_bundle
    from sun_edge.models import parse_lora_arg

    _check_json_path(args.json)
    if args.seeds < 1:
        raise SunEdgeError(f"--seeds must be at least 1, got {args.seeds}")
    loras = [parse_lora_arg(text) for text in args.lora] if args.lora else None
    check = check_bundle(args.bundle, seeds=range(args.seeds), model=args.model, adapter=args.adapter, loras=loras,
                         allow_pickle=args.allow_pickle, provider=args.provider, vae_decoder=args.vae_decoder)
    for problem in check.mismatches:
        print(f"warning: the reference is not what {args.bundle} was exported from: {problem}", file=sys.stderr)
    print(check.report.table())
    if args.json:
        _write_json(args.json, check.to_dict())
    return 0 if check.report.passed else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from sun_edge.bench import run_bench

    _check_json_path(args.json)
    info: dict[str, Any] = {}
    size = (args.size, args.size) if args.size else None
    if args.bundle:
        from sun_edge.bundle import open_bundle
        from sun_edge.runtimes import open_bundle_runtime

        if args.adapter or args.vae_decoder != "full":
            raise SunEdgeError("--adapter and --vae-decoder apply to --model; a bundle has its graphs built in "
                               "(its TAESD decoder, if exported, is timed as well)")
        bundle = open_bundle(args.bundle)
        manifest = bundle.manifest
        size = size if args.size else (int(manifest.image["height"]), int(manifest.image["width"]))
        runtime = open_bundle_runtime(bundle, args.runtime, provider=args.provider)
        info.update(bundle=str(args.bundle), target=manifest.target, precision=manifest.precision, provider=args.provider)
    else:
        from sun_edge.runtimes.pytorch import TorchRuntime

        runtime = TorchRuntime.load(args.model or DEFAULT_MODEL, args.adapter, device=args.device,
                                    precision=args.precision, vae_decoder=args.vae_decoder, optimize=args.optimize)
        info.update(precision=args.precision, device=args.device, vae_decoder=args.vae_decoder, optimize=args.optimize)
        size = size or (runtime.native_size, runtime.native_size)
    result = run_bench(runtime, repeats=args.repeats, height=size[0], width=size[1], steps_only=args.steps_only,
                       seed=args.seed, info=info)
    print(result.table())
    if args.json:
        _write_json(args.json, result.to_dict())
    return 0


COMMANDS = {"generate": cmd_generate, "models": cmd_models, "adapter": cmd_adapter, "parity": cmd_parity, "bench": cmd_bench,
            "train": cmd_train, "export": cmd_export, "build-engines": cmd_build_engines, "eval": cmd_eval}


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
            return COMMANDS[args.command](args)
    except SunEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
