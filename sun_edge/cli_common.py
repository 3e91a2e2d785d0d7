"""What several ``sun-edge`` commands share: the model flags, the default model, the OpenVINO runtime's
flags and the bundle-runtime options a command line gives."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sun_edge.errors import SunEdgeError

DEFAULT_MODEL = "pocket-base"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name or path (default: {DEFAULT_MODEL}; see `sun-edge models`)")
    p.add_argument("--adapter", help="SUN adapter .safetensors (default: the one shipped beside the model, if any)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="merge a kohya/civitai LoRA first (repeatable)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin/.pt checkpoints (they can run code; only for files you trust)")


def add_openvino_args(p: argparse.ArgumentParser) -> None:
    """The OpenVINO runtime's flags (``--device`` names its device: CPU, GPU, NPU, AUTO)."""
    o = p.add_argument_group("openvino runtime (with --bundle --runtime openvino, or --provider openvino)")
    o.add_argument("--ov-precision", choices=["f32", "bf16", "f16"],
                   help="inference precision (default: bf16 on CPUs with AMX or AVX512-BF16, else f32; f16 on GPU/NPU)")
    o.add_argument("--ov-cache-dir", type=Path, help="cache compiled models here: the second start imports them")


def openvino_provider(args: argparse.Namespace) -> None:
    """``--provider openvino`` is ``--runtime openvino``: OpenVINO runs the ONNX bundle itself here."""
    if getattr(args, "provider", None) != "openvino":
        return
    runtimes = args.runtime if isinstance(args.runtime, list) else [args.runtime] if args.runtime else []
    if any(r != "openvino" for r in runtimes):
        raise SunEdgeError(f"--provider openvino runs the bundle with the openvino runtime; drop --runtime {runtimes[0]}")
    args.runtime = ["openvino"] if isinstance(args.runtime, list) or args.command == "bench" else "openvino"
    args.provider = "cpu"


def openvino_options(args: argparse.Namespace, runtimes: Sequence[str | None]) -> dict[str, Any]:
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


def runtime_options(args: argparse.Namespace) -> dict[str, Any]:
    """The bundle-runtime options given on the command line (``open_bundle_runtime`` refuses those that do not apply)."""
    return {"provider": args.provider, "compute_units": getattr(args, "compute_units", "all"),
            "cuda_graphs": not getattr(args, "no_cuda_graphs", False), "vae_decoder": getattr(args, "vae_decoder", "full")}
