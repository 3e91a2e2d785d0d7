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
from sun_edge import cli_make
from sun_edge.errors import SunEdgeError
from sun_edge.settings import check_output_file
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
    _add_openvino_args(g)
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

    sub.add_parser("models", help="list the model registry and what is installed ($SUN_EDGE_HOME/models)")

    a = sub.add_parser("adapter", help="describe a SUN adapter file: layout, layers, parameter count")
    a.add_argument("path", type=Path)
    a.add_argument("--model", help="check it against this model's UNet (default: SD1.5's architecture)")
    a.add_argument("--allow-pickle", action="store_true")
    cli_make.add_export_parser(sub, _add_model_args)
    cli_make.add_build_engines_parser(sub)
    _add_check_parsers(sub)
    _add_serve_parsers(sub)
    cli_make.add_train_parser(sub)
    cli_make.add_eval_parser(sub)
    return parser


def _outputs(output: Path, seeds: Sequence[int]) -> list[Path]:
    if len(seeds) == 1:
        return [output]
    return [output.with_name(f"{output.stem}-s{seed}{output.suffix}") for seed in seeds]


def _add_openvino_args(p: argparse.ArgumentParser) -> None:
    """The OpenVINO runtime's flags (``--device`` names its device: CPU, GPU, NPU, AUTO)."""
    o = p.add_argument_group("openvino runtime (with --bundle --runtime openvino, or --provider openvino)")
    o.add_argument("--ov-precision", choices=["f32", "bf16", "f16"],
                   help="inference precision (default: bf16 on CPUs with AMX or AVX512-BF16, else f32; f16 on GPU/NPU)")
    o.add_argument("--ov-cache-dir", type=Path, help="cache compiled models here: the second start imports them")


def _openvino_provider(args: argparse.Namespace) -> None:
    """``--provider openvino`` is ``--runtime openvino``: OpenVINO runs the ONNX bundle itself here."""
    if getattr(args, "provider", None) != "openvino":
        return
    runtimes = args.runtime if isinstance(args.runtime, list) else [args.runtime] if args.runtime else []
    if any(r != "openvino" for r in runtimes):
        raise SunEdgeError(f"--provider openvino runs the bundle with the openvino runtime; drop --runtime {runtimes[0]}")
    args.runtime = ["openvino"] if isinstance(args.runtime, list) or args.command == "bench" else "openvino"
    args.provider = "cpu"


def _openvino_options(args: argparse.Namespace, runtimes: Sequence[str | None]) -> dict[str, Any]:
    """``ov_device`` (from ``--device``), ``ov_precision``, ``ov_cache_dir`` for a bundle run with openvino; refused otherwise."""
    if "openvino" not in runtimes:
        for flag in ("ov_precision", "ov_cache_dir"):
            if getattr(args, flag, None) is not None:
                raise SunEdgeError(f"--{flag.replace('_', '-')} applies to --runtime openvino")
        return {}
    from sun_edge.runtimes.openvino import check_device

    try:
        device = check_device(args.device)
    except SunEdgeError:
        raise SunEdgeError(f"--device {args.device} is a torch device (for --model); with --runtime openvino give an "
                           "OpenVINO device: CPU, GPU, NPU or AUTO") from None
    return {"ov_device": device, "ov_precision": args.ov_precision, "ov_cache_dir": args.ov_cache_dir}


def _bundle_runtime(args: argparse.Namespace, bundle: Any) -> tuple[Any, Any]:
    """The bundle's runtime (as its target says) and its tokenizer; imports no torch."""
    from sun_edge.runtimes import open_bundle_runtime

    if args.adapter or args.lora:
        raise SunEdgeError("--adapter and --lora are fused into a bundle at export; drop them with --bundle")
    _openvino_provider(args)
    openvino = _openvino_options(args, [args.runtime])
    if (args.precision, "cpu" if openvino else args.device) != ("fp32", "cpu"):
        raise SunEdgeError("--precision and --device apply to --model; a bundle's are fixed at export "
                           "(choose the hardware with --provider)")
    if args.vae_decoder not in ("full", "tiny"):
        raise SunEdgeError(f"--vae-decoder {args.vae_decoder} applies to --model; with --bundle use full or tiny "
                           "(the TAESD graph exported into the bundle with --vae-decoder tiny:PATH)")
    if args.optimize != "none":
        raise SunEdgeError("--optimize applies to --model (the PyTorch runtime); a TensorRT bundle captures CUDA graphs "
                           "itself (--no-cuda-graphs turns that off)")
    runtime = open_bundle_runtime(bundle, args.runtime, **_runtime_options(args), **openvino)
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
    from sun_edge.settings import check_seeds, check_text

    check_output_file(args.output, "-o", suffix=".png")
    check_text(args.prompt, "prompt")
    check_text(args.negative_prompt, "negative prompt")
    check_seeds(args.seed)
    if args.batch < 1:
        raise SunEdgeError(f"--batch must be at least 1, got {args.batch}")
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
    total = sum(s.steps for s in runs) * len(args.seed)
    bar = None

    def progress(done: int, _total: int) -> None:
        nonlocal bar  # made when sampling starts, so that warnings from text encoding print above it
        bar = bar or tqdm(total=total, unit="step", desc="sampling", file=sys.stderr)
        bar.update(1 if done else 0)

    try:
        results = [pipe.generate(args.prompt, args.negative_prompt, seeds=args.seed, settings=s, progress=progress,
                                 max_batch=args.batch) for s in runs]
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
    p.add_argument("--provider", default="cpu", help="ONNX Runtime execution provider (default: cpu; openvino: --runtime openvino)")
    p.add_argument("--runtime", help="the runtime to check the bundle with (default: the one its target is checked with)")
    p.add_argument("--device", default="cpu", help="with --runtime openvino: CPU (default), GPU, NPU or AUTO")
    _add_openvino_args(p)
    p.add_argument("--json", type=Path, help="also write the figures to this file")

    b = sub.add_parser("bench", help="time SUN 4 steps against CFG 25 steps: UNet steps, whole images, decode, memory")
    source = b.add_mutually_exclusive_group()
    source.add_argument("--bundle", type=Path, help="an exported bundle, run with ONNX Runtime")
    source.add_argument("--model", help=f"a model for the PyTorch reference (default: {DEFAULT_MODEL})")
    b.add_argument("--adapter", help="with --model: SUN adapter (default: the one beside the model)")
    b.add_argument("--vae-decoder", default="full", metavar="full|tiny:PATH", help="with --model: also time a TAESD decoder")
    b.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32", help="with --model (default: fp32)")
    b.add_argument("--device", default="cpu", help="with --model: torch device (default: cpu); with --runtime openvino: "
                                                 "CPU, GPU, NPU or AUTO")
    b.add_argument("--optimize", default="none", choices=OPTIMIZATIONS,
                   help="with --model: UNet calls eager (none), as CUDA graphs, or through torch.compile (default: none)")
    b.add_argument("--runtime", nargs="+", help="with --bundle: the runtime(s) to time (default: the one its target "
                                                "names); several, e.g. onnxruntime openvino: side by side in one run")
    b.add_argument("--provider", default="cpu", help="with --bundle: ONNX Runtime execution provider (default: cpu)")
    _add_openvino_args(b)
    b.add_argument("--repeats", type=int, default=3, help="timed repeats per form, after one warm-up (default 3)")
    b.add_argument("--size", type=int, help="image height = width (default: the bundle's, or the model's own: SD1.5 512)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--steps-only", action="store_true", help="time the UNet steps and decoders only, not whole images")
    b.add_argument("--json", type=Path, help="also write every figure (and the machine) to this file")


def _check_json_path(path: Path | None) -> None:
    check_output_file(path, "--json")


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
    _openvino_provider(args)
    openvino = _openvino_options(args, [args.runtime])
    if args.device != "cpu" and not openvino:
        raise SunEdgeError("--device applies to --runtime openvino (an OpenVINO device: CPU, GPU, NPU, AUTO)")
    check = check_bundle(args.bundle, seeds=range(args.seeds), model=args.model, adapter=args.adapter, loras=loras,
                         allow_pickle=args.allow_pickle, provider=args.provider, vae_decoder=args.vae_decoder,
                         **({"runtime": args.runtime} if args.runtime else {}), **openvino)
    for problem in check.mismatches:
        print(f"warning: the reference is not what {args.bundle} was exported from: {problem}", file=sys.stderr)
    print(check.report.table())
    if args.json:
        _write_json(args.json, check.to_dict())
    return 0 if check.report.passed else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from sun_edge.bench import run_bench, run_bench_many

    _check_json_path(args.json)
    info: dict[str, Any] = {}
    size = (args.size, args.size) if args.size is not None else None
    if size is not None:
        from sun_edge.settings import Settings

        Settings(height=args.size, width=args.size).validate()
    if args.bundle:
        from sun_edge.bundle import open_bundle
        from sun_edge.runtimes import open_bundle_runtime

        if args.adapter or args.vae_decoder != "full":
            raise SunEdgeError("--adapter and --vae-decoder apply to --model; a bundle has its graphs built in "
                               "(its TAESD decoder, if exported, is timed as well)")
        _openvino_provider(args)
        names = args.runtime or [None]
        openvino = _openvino_options(args, names)
        if args.device != "cpu" and not openvino:
            raise SunEdgeError("--device applies to --model (a torch device) or to --runtime openvino (an OpenVINO device)")
        bundle = open_bundle(args.bundle)
        manifest = bundle.manifest
        size = size or (int(manifest.image["height"]), int(manifest.image["width"]))
        info.update(bundle=str(args.bundle), target=manifest.target, precision=manifest.precision, provider=args.provider)
        if len(names) > 1:
            runtimes = [open_bundle_runtime(bundle, name, provider=args.provider,
                                            **(openvino if name == "openvino" else {})) for name in names]
            infos = [{**info, **{k: v for k, v in r.info.items() if k in ("ov_device", "inference_precision",
                                                                          "precision_reason", "openvino")}}
                     for r in runtimes]
            compared = run_bench_many(runtimes, repeats=args.repeats, height=size[0], width=size[1],
                                      steps_only=args.steps_only, seed=args.seed, infos=infos)
            print(compared.table())
            if args.json:
                _write_json(args.json, compared.to_dict())
            return 0
        runtime = open_bundle_runtime(bundle, names[0], provider=args.provider, **openvino)
        info.update({k: v for k, v in runtime.info.items() if k in ("ov_device", "inference_precision",
                                                                    "precision_reason", "openvino")})
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


# The CLI's words for the library's fixes (sun_edge.errors.FIXES): the flags to pass.
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


COMMANDS = {"generate": cmd_generate, "models": cmd_models, "adapter": cmd_adapter, "parity": cmd_parity, "bench": cmd_bench,
            "serve": cmd_serve, "bench-serve": cmd_bench_serve, **cli_make.COMMANDS}


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
