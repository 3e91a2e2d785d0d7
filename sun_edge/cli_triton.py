"""The ``sun-edge`` commands for Triton Inference Server: ``export --target triton`` and ``triton``.

``export --target triton`` writes a model repository (``sun_edge.export.triton``) from a bundle or a
model; ``triton --repo REPO`` serves one with the ``nvidia-pytriton`` wheel's tritonserver
(``sun_edge.triton_server``) and prints the NGC container command that serves it on NVIDIA GPUs.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from sun_edge.errors import SunEdgeError

MODEL_FLAGS = ("adapter", "lora", "allow_pickle", "with_baseline", "height", "width", "precision")


def cmd_package(args: argparse.Namespace, packaging: Any) -> int:
    """``export --target <packaging>``: from ``--bundle`` (nothing loaded) or from ``--model``."""
    import importlib

    from sun_edge.cli_common import DEFAULT_MODEL
    from sun_edge.export.targets import target
    from sun_edge.models import parse_lora_arg

    specific = {o.name: getattr(args, o.name) for o in packaging.options if getattr(args, o.name) is not None}
    if args.controlnet is not None:
        raise SunEdgeError(f"--controlnet: the {packaging.name} model serves text-to-image (its requests carry no "
                           "control image); export --target onnx --controlnet FILE and serve that bundle with "
                           "sun-edge serve --bundle")
    module_name, _, cls_name = packaging.options_class.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name)
    if specific.get("bundle") is not None:
        given = [f for f in MODEL_FLAGS if getattr(args, f)] + (["model"] if args.model != DEFAULT_MODEL else [])
        given += ["max_batch"] if args.max_batch != 1 else []
        given += ["vae_decoder"] if args.vae_decoder != "full" else []
        given += ["bundle_target"] if "bundle_target" in specific else []
        if given:
            raise SunEdgeError(f"--{given[0].replace('_', '-')} applies when exporting --model; a bundle's graphs are "
                               "packaged as they are (drop it, or export the model instead of --bundle)")
        options = cls(**specific)
        path = module.export_from_bundle(Path(specific.pop("bundle")), args.output, options, force=args.force)
    else:
        from sun_edge.bundle_parity import export_parity

        inner = specific.get("bundle_target", "onnx")
        if inner not in packaging.bundle_targets:
            raise SunEdgeError(f"--bundle-target {inner!r}: valid: {', '.join(packaging.bundle_targets)}")
        options = cls(precision=args.precision or target(inner).default_precision, height=args.height,
                      width=args.width, with_baseline=args.with_baseline, max_batch=args.max_batch, **specific)
        loras = tuple(parse_lora_arg(text) for text in args.lora)
        path = module.export_model(args.model, args.output, options, adapter=args.adapter, loras=loras,
                                   allow_pickle=args.allow_pickle, force=args.force, parity=export_parity,
                                   vae_decoder=args.vae_decoder)
    print(f"wrote {path}")
    print(f"serve it here: sun-edge triton --repo {path}", file=sys.stderr)
    return 0


def add_triton_parser(sub: Any) -> None:
    t = sub.add_parser("triton", help="serve a model repository (export --target triton) with the tritonserver of the "
                                      "nvidia-pytriton wheel; prints the NGC container command for NVIDIA boxes")
    t.add_argument("--repo", type=Path, required=True, help="the model repository (sun-edge export --target triton)")
    t.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    t.add_argument("--http-port", type=int, default=8000, help="KServe v2 HTTP (default 8000; 0: a free port)")
    t.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 gRPC (default 8001; 0: a free port)")
    t.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics (default 8002; 0: a free port)")
    t.add_argument("--backend-dir", type=Path, help="where to assemble Triton's backends with this Python's stub "
                                                    "(default: <sun-edge home>/triton/backends-<version>-py<X.Y>)")
    t.add_argument("--ready-timeout-s", type=float, default=600.0, help="how long the models may take to load (default 600)")


def cmd_triton(args: argparse.Namespace) -> int:
    from sun_edge.triton_server import TRITON_VERSION, ngc_command, start_local_triton

    for flag in ("http_port", "grpc_port", "metrics_port"):
        if not 0 <= getattr(args, flag) <= 65535:
            raise SunEdgeError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is outside [0, 65535]")
    print(f"starting tritonserver {TRITON_VERSION} on {args.repo} (models load now: up to {args.ready_timeout_s:g} s)",
          file=sys.stderr)
    server = start_local_triton(args.repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                                metrics_port=args.metrics_port, backend_dir=args.backend_dir, wait=args.ready_timeout_s)
    print(f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}")
    print(f"  sun-edge serve --triton {server.http_url}   (A1111, OpenAI and native APIs in front of it)")
    print("on NVIDIA GPUs, the same repository in the NGC container (sun-edge from your wheel or index; a derived "
          "image is better: docs/deploy.md):\n  "
          + ngc_command(args.repo, http_port=server.http_port, grpc_port=server.grpc_port, metrics_port=server.metrics_port))
    sys.stdout.flush()

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        code = server.process.wait()
        print(f"error: tritonserver exited with status {code}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        server.stop()
        print("stopped", file=sys.stderr)
        return 0
