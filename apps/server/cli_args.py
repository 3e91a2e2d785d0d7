"""The flags of ``sun-edge serve`` and ``sun-edge bench-serve`` (argparse only: no FastAPI at import)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sun_edge.runtimes.torch_speed import OPTIMIZATIONS


def add_serve_parsers(sub: Any, default_model: str) -> None:
    s = sub.add_parser("serve", help="serve images over HTTP: A1111, OpenAI and native APIs, a web page, metrics "
                                     "(needs sun-edge[server])")
    source = s.add_argument_group("what to serve (default: the bundled model)")
    source.add_argument("--bundle", type=Path, help="an exported bundle (ONNX Runtime, TensorRT, Core ML as its target says)")
    source.add_argument("--model", default=default_model, help=f"registry name or path (default: {default_model})")
    source.add_argument("--adapter", help="with --model: SUN adapter (default: the one shipped beside the model)")
    source.add_argument("--controlnet", metavar="FILE|NAME",
                        help="with --model: a ControlNet (file, diffusers folder, or a shipped one: pocket-silhouette) for "
                             "A1111's alwayson_scripts.controlnet (a bundle carries its own: export --controlnet)")
    source.add_argument("--runtime", help="with --bundle: the runtime to run it with (default: the one its target names)")
    source.add_argument("--provider", default="cpu", help="with an ONNX bundle: execution provider cpu (default), cuda, tensorrt")
    source.add_argument("--no-cuda-graphs", action="store_true", help="with a TensorRT bundle: no CUDA graph replay")
    source.add_argument("--device", default="auto", help="with --model: torch device (default: cuda where there is a GPU, else cpu)")
    source.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="with --model (default: fp16 on CUDA, fp32 on CPU)")
    source.add_argument("--optimize", default="auto", choices=["auto", *OPTIMIZATIONS],
                        help="with --model: UNet calls (default: cuda-graph on CUDA, one graph per batch size; none on CPU)")
    source.add_argument("--threads", type=int, help="with --model on CPU: torch threads (default: torch's own)")
    source.add_argument("--triton", metavar="URL", help="forward generation to a Triton Inference Server serving a "
                        "repository from sun-edge export --target triton: http://HOST:8000 or grpc://HOST:8001 (needs sun-edge[triton])")
    source.add_argument("--triton-model", default="sun_edge", help="with --triton: the model's name (default sun_edge)")
    net = s.add_argument_group("network and limits")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    net.add_argument("--port", type=int, default=7860, help="port (default 7860, A1111's)")
    net.add_argument("--api-key", help="require Authorization: Bearer KEY on every route but /healthz and / "
                                       "(default: $SUN_EDGE_API_KEY; unset: no auth)")
    net.add_argument("--max-batch", type=int, default=8, metavar="N", help="images per UNet call (default 8)")
    net.add_argument("--batch-window-ms", type=float, default=20.0, metavar="MS",
                     help="how long a request waits for others to share its batch (default 20)")
    net.add_argument("--queue", type=int, default=64, metavar="N", help="images waiting before 429 (default 64)")
    net.add_argument("--timeout-s", type=float, default=120.0, metavar="S", help="per request, queue included: 504 past it (default 120)")
    net.add_argument("--drain-timeout-s", type=float, default=30.0, metavar="S",
                     help="on SIGTERM: how long queued and running requests may take to finish (default 30)")
    net.add_argument("--max-steps", type=int, default=50, help="most sampling steps a request may ask (default 50)")
    net.add_argument("--max-images", type=int, default=8, help="most images per request (default 8)")
    net.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    b = sub.add_parser("bench-serve", help="load-test a running sun-edge server on this machine: N requests at "
                                           "concurrency C; lost, duplicated and invalid answers, latency, images/s")
    b.add_argument("--url", default="http://127.0.0.1:7860", help="the server (loopback only; default http://127.0.0.1:7860)")
    b.add_argument("--requests", type=int, default=24, metavar="N", help="requests to send (default 24, at most 10000)")
    b.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], metavar="C", help="one run per value (default 1 4 8)")
    b.add_argument("--duration-s", type=float, default=300.0, help="stop a run after this long (default 300)")
    b.add_argument("--steps", type=int, help="steps per request (default: the server's)")
    b.add_argument("--api-key", help="Bearer key (default: $SUN_EDGE_API_KEY)")
    b.add_argument("--check", action="store_true", help="also check every image equals its seed's image made alone")
    b.add_argument("--json", type=Path, help="also write the figures to this file")


def positive(value: float, flag: str) -> None:
    from sun_edge.errors import SunEdgeError

    if not value > 0:
        raise SunEdgeError(f"{flag} must be positive, got {value:g}")


def check_serve_args(args: argparse.Namespace) -> None:
    """Everything that needs no model, before loading one."""
    from sun_edge.errors import SunEdgeError

    for flag in ("max_batch", "queue", "max_steps", "max_images"):
        positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    for flag in ("timeout_s", "drain_timeout_s"):
        positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.batch_window_ms < 0:
        raise SunEdgeError(f"--batch-window-ms must be 0 or more, got {args.batch_window_ms:g}")
    if not 0 <= args.port <= 65535:
        raise SunEdgeError(f"--port {args.port} is outside [0, 65535]")
    if args.bundle is not None and args.adapter:
        raise SunEdgeError("--adapter is fused into a bundle at export; drop it with --bundle")
    if args.bundle is not None and getattr(args, "controlnet", None):
        raise SunEdgeError("--controlnet is exported into a bundle (sun-edge export --controlnet FILE); drop it with --bundle")
    if args.triton is not None and (args.bundle is not None or args.adapter):
        raise SunEdgeError("--triton serves the bundle in Triton's model repository; drop --bundle and --adapter")
    if args.triton is not None:
        from sun_edge_server.triton_source import parse_url

        parse_url(args.triton)
