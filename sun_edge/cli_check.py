"""The ``sun-edge`` commands that check bundles and runtimes: ``parity`` and ``bench``.

Each parses its arguments and calls library functions (``sun_edge.bundle_parity``, ``sun_edge.bench``);
``sun_edge.cli`` assembles the parser and runs them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sun_edge.cli_common import DEFAULT_MODEL, add_openvino_args, openvino_options, openvino_provider
from sun_edge.errors import SunEdgeError
from sun_edge.runtimes.torch_speed import OPTIMIZATIONS
from sun_edge.settings import check_output_file


def add_check_parsers(sub: Any) -> None:
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
    add_openvino_args(p)
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
    add_openvino_args(b)
    b.add_argument("--repeats", type=int, default=3, help="timed repeats per form, after one warm-up (default 3)")
    b.add_argument("--size", type=int, help="image height = width (default: the bundle's, or the model's own: SD1.5 512)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--steps-only", action="store_true", help="time the UNet steps and decoders only, not whole images")
    b.add_argument("--batch", type=int, nargs="+", default=[1], metavar="N",
                   help="batch sizes to time SUN 4 and CFG 25 at, e.g. 1 4 8: images per second at each, side by side "
                        "(a bundle: up to its batch range; default 1)")
    b.add_argument("--only", nargs="+", metavar="FORM",
                   help="time only these forms (fnmatch patterns, e.g. 'unet_*' sun4 'sun4_b*'; the forms are listed "
                        "in the table and in an error for a pattern that names none)")
    b.add_argument("--low-memory", action="store_true",
                   help="hold only the graphs of the form being timed, reloading them between forms (untimed): "
                        "for full-size models, several runtimes side by side on a small machine")
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
    openvino_provider(args)
    openvino = openvino_options(args, [args.runtime])
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
    if any(n < 1 for n in args.batch):
        raise SunEdgeError(f"--batch takes positive whole numbers, got {' '.join(map(str, args.batch))}")
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
        openvino_provider(args)
        names = args.runtime or [None]
        openvino = openvino_options(args, names)
        if args.device != "cpu" and not openvino:
            raise SunEdgeError("--device applies to --model (a torch device) or to --runtime openvino (an OpenVINO device)")
        bundle = open_bundle(args.bundle)
        manifest = bundle.manifest
        if max(args.batch) > int(manifest.batch["max"]):  # before any graph loads; run_bench checks the runtime too
            raise SunEdgeError(f"--batch {max(args.batch)}: bundle {args.bundle} takes at most {manifest.batch['max']} "
                               f"image(s) per UNet call (its manifest's batch range); give --batch up to "
                               f"{manifest.batch['max']}, or re-export with --max-batch {max(args.batch)}")
        size = size or (int(manifest.image["height"]), int(manifest.image["width"]))
        info.update(bundle=str(args.bundle), target=manifest.target, precision=manifest.precision, provider=args.provider)
        if len(names) > 1:
            runtimes = [open_bundle_runtime(bundle, name, provider=args.provider,
                                            **(openvino if name == "openvino" else {})) for name in names]
            infos = [{**info, **{k: v for k, v in r.info.items() if k in ("ov_device", "inference_precision",
                                                                          "precision_reason", "openvino")}}
                     for r in runtimes]
            compared = run_bench_many(runtimes, repeats=args.repeats, height=size[0], width=size[1],
                                      steps_only=args.steps_only, seed=args.seed, infos=infos, batches=args.batch,
                                      only=args.only, low_memory=args.low_memory)
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
                       seed=args.seed, info=info, batches=args.batch, only=args.only, low_memory=args.low_memory)
    print(result.table())
    if args.json:
        _write_json(args.json, result.to_dict())
    return 0


# The CLI's words for the library's fixes (sun_edge.errors.FIXES): the flags to pass.


COMMANDS = {"parity": cmd_parity, "bench": cmd_bench}
