"""``sun-edge serve``: uvicorn in front of the app, with a graceful shutdown.

The port is bound at once, so ``/healthz`` answers while the model loads in the engine's thread;
``/readyz`` turns 200 once it is loaded and warmed up. On SIGTERM (or Ctrl-C) ``/readyz`` turns 503,
new requests get 503, queued and running ones finish (at most ``--drain-timeout-s``), then the process
exits 0. A second signal stops at once. A model that fails to load stops the server with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import warnings
from types import FrameType

import uvicorn

from sun_edge.errors import SunEdgeError
from sun_edge.tokenizer import PromptTruncatedWarning
from sun_edge_server.app import AppConfig, create_app
from sun_edge_server.cli_args import check_serve_args
from sun_edge_server.engine import Engine, EngineConfig
from sun_edge_server.limits import Limits
from sun_edge_server.source import SourceOptions, open_source

log = logging.getLogger("sun_edge_server")


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains the engine before uvicorn's own shutdown (and exits 0)."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.engine, self.drain_timeout_s, self.draining, self.exit_code = engine, drain_timeout_s, False, 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:  # not recorded: uvicorn would re-raise it
        if self.draining:
            log.warning("second signal: stopping now")
            self.should_exit = self.force_exit = True
            return
        self.draining = True
        self.engine.begin_drain()
        log.info("signal %s: draining (up to %g s), then exiting", signal.Signals(sig).name, self.drain_timeout_s)
        threading.Thread(target=self._drain, name="sun-edge-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while not self.engine.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.engine.idle():
            log.warning("drain timeout: %d image(s) unfinished; their requests get 503", self.engine.jobs_in_flight())
            self.engine.abort()
            time.sleep(0.5)  # their handlers answer before uvicorn closes the connections
        self.should_exit = True

    def watch_load(self) -> None:
        """Stop (status 2) if the model fails to load: an orchestrator should see a dead process, not a stuck one."""
        while not self.engine.ready and not self.should_exit:
            if self.engine.failed:
                print(f"error: {self.engine.failed}", file=sys.stderr)
                self.exit_code, self.should_exit = 2, True
                return
            time.sleep(0.1)


def cmd_serve(args: argparse.Namespace) -> int:
    check_serve_args(args)
    if args.bundle is not None and not args.bundle.is_dir():
        raise SunEdgeError(f"bundle {args.bundle} is not a folder; give the folder `sun-edge export` wrote")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=PromptTruncatedWarning)  # each response says what was cut
    key = args.api_key or os.environ.get("SUN_EDGE_API_KEY") or None
    source = SourceOptions(bundle=args.bundle, model=args.model, adapter=args.adapter, controlnet=args.controlnet,
                           runtime=args.runtime,
                           provider=args.provider, cuda_graphs=not args.no_cuda_graphs, device=args.device,
                           precision=args.precision, optimize=args.optimize, threads=args.threads)
    engine = Engine(EngineConfig(max_batch=args.max_batch, batch_window_s=args.batch_window_ms / 1000, queue=args.queue))
    limits = Limits(max_steps=args.max_steps, max_images=args.max_images)
    app = create_app(engine, AppConfig(api_key=key, limits=limits, timeout_s=args.timeout_s))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = DrainingServer(config, engine, args.drain_timeout_s)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: reachable from other machines%s", args.host,
                    "" if key else "; no --api-key set, so anyone who reaches it can generate")
    if args.triton is not None:  # Triton makes the images; this process keeps the APIs, queue, limits and metrics
        from sun_edge_server.triton_source import open_triton_source

        engine.start(lambda: open_triton_source(args.triton, args.triton_model, timeout_s=args.timeout_s,
                                                concurrency=args.max_batch))
    else:
        engine.start(lambda: open_source(source))
    threading.Thread(target=server.watch_load, name="sun-edge-load-watch", daemon=True).start()
    server.run()
    engine.abort()  # a forced exit (second signal) leaves work behind: stop it before the interpreter does
    engine.stop(timeout=30)
    if server.exit_code == 0 and not server.started:
        raise SunEdgeError(f"could not listen on {args.host}:{args.port} (in use, or not an address of this machine)")
    log.info("stopped")
    return server.exit_code
