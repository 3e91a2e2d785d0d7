"""The ``sun-edge`` commands that make things: ``export``, ``build-engines``, ``train`` and ``eval``.

Each parses its arguments and calls library functions, as every command in ``sun_edge.cli`` does;
``sun_edge.cli`` assembles the parser and runs them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sun_edge.errors import SunEdgeError
from sun_edge.settings import check_output_file


def add_eval_parser(sub: Any) -> None:
    """The ``eval`` subcommand: the paper's tables in miniature on the Pocket SD family."""
    v = sub.add_parser("eval", help="Pocket SD: Table 2 (4-step samplers vs 25-step CFG), Table 4 (MSC p), Fig. 5 "
                                    "(negative prompts), scored by the world's attribute classifier")
    v.add_argument("--model", action="append", metavar="NAME|PATH",
                   help="models to evaluate, the base first (default: pocket-base pocket-toon)")
    v.add_argument("--adapter", help="SUN adapter trained on the first model (default: the one beside it)")
    v.add_argument("--msc-adapter", action="append", default=[], metavar="LABEL:PATH",
                   help="Table 4: an adapter trained with another MSC probability, e.g. p=0:sun-p0.safetensors; the "
                        "same LABEL again adds another training seed of it (Table 4 then gives their mean ± s.d.)")
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


def add_train_parser(sub: Any) -> None:
    """The ``train`` subcommand (options defined with the training code)."""
    from sun_edge.train.args import add_train_arguments

    t = sub.add_parser("train", help="train a SUN adapter for a base model (CFG distillation + MSC; accelerate-ready)")
    add_train_arguments(t)


def cmd_train(args: argparse.Namespace) -> int:
    from sun_edge.train.args import config_from_args
    from sun_edge.train.loop import train

    check_output_file(args.output, "-o")  # before the model loads and hours of training, not after
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



def add_export_parser(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """The ``export`` subcommand: a model with its adapter fused in, as a bundle for a target runtime."""
    from sun_edge.export import TARGETS
    from sun_edge.export.targets import PACKAGINGS

    e = sub.add_parser("export", help="export a model with its SUN adapter fused in as a bundle (graphs, tokenizer, manifest)")
    e.add_argument("--target", required=True, help=f"what to export for: {', '.join([*TARGETS, *PACKAGINGS])} "
                                                   f"({', '.join(PACKAGINGS)}: a serving system's repository around a bundle)")
    add_model_args(e)
    e.add_argument("--precision", choices=["fp32", "fp16"],
                   help="fp16 keeps softmax, normalisation and the adapter's norm ratio in fp32; the VAE stays fp32 "
                        "(default: fp32; fp16 for coreml and tensorrt)")
    e.add_argument("--height", type=int, help="image height the graphs are made for (static; default: the model's own, SD1.5 512)")
    e.add_argument("--width", type=int, help="image width the graphs are made for (static; default: the model's own, SD1.5 512)")
    e.add_argument("--with-baseline", action="store_true", help="also export the UNet without the adapter (batch 1 or 2) for --mode cfg")
    e.add_argument("--max-batch", type=int, default=1, metavar="N",
                   help="graphs take 1..N images per call (a free batch dimension; the CFG baseline 2N); default 1: "
                        "static batch-1 graphs (onnx and tensorrt; coreml is batch 1)")
    e.add_argument("--vae-decoder", default="full", metavar="full|tiny:PATH",
                   help="tiny:PATH: also export this TAESD decoder (diffusers folder or .safetensors) as vae_decoder_tiny, "
                        "for generate --vae-decoder tiny (onnx target only; default: full, the model's VAE alone)")
    e.add_argument("--controlnet", metavar="FILE|NAME",
                   help="also export this ControlNet (.safetensors or diffusers folder) as its own graph, and the UNet "
                        "graphs with its residual inputs (coreml: ControlledUnet + controlnet/<Name>.mlpackage)")
    e.add_argument("--force", action="store_true", help="replace an existing bundle at -o")
    e.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to write")
    for target in [*TARGETS.values(), *PACKAGINGS.values()]:  # each target's own options, declared in its registry entry
        if target.options:
            group = e.add_argument_group(f"{target.name} target")
            for option in target.options:
                group.add_argument(f"--{option.name.replace('_', '-')}", type=option.type, choices=option.choices,
                                   help=option.help)


def add_build_engines_parser(sub: Any) -> None:
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

    from sun_edge.export.targets import PACKAGINGS

    chosen = TARGETS.get(args.target) or PACKAGINGS.get(args.target)
    for target in [*TARGETS.values(), *PACKAGINGS.values()]:  # options of another target are refused, not ignored
        for option in target.options:
            if getattr(args, option.name) is not None and target is not chosen:
                raise SunEdgeError(f"--{option.name.replace('_', '-')} applies to --target {target.name} only")
    specific = {o.name: getattr(args, o.name) for o in (chosen.options if chosen else ()) if getattr(args, o.name) is not None}
    if args.target in PACKAGINGS:  # a serving system's repository around a bundle (sun_edge/cli_triton.py)
        from sun_edge.cli_triton import cmd_package

        return cmd_package(args, PACKAGINGS[args.target])
    options = export_options(args.target, precision=args.precision, height=args.height, width=args.width,
                             with_baseline=args.with_baseline, max_batch=args.max_batch, **specific)
    loras = tuple(parse_lora_arg(text) for text in args.lora)
    path = export(args.target, args.model, args.output, adapter=args.adapter, loras=loras, allow_pickle=args.allow_pickle,
                  options=options, force=args.force, parity=export_parity, vae_decoder=args.vae_decoder,
                  controlnet=args.controlnet)
    print(f"wrote {path}")
    return 0


COMMANDS = {"export": cmd_export, "build-engines": cmd_build_engines, "train": cmd_train, "eval": cmd_eval}
