"""Prometheus metrics, in a registry of the app's own (``GET /metrics``), and the ASGI layer that counts requests."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sun_edge_server.engine import Observer

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics(Observer):
    def __init__(self, routes: set[str]) -> None:
        self.registry = CollectorRegistry()
        self.routes = routes  # request paths counted by name; any other path counts as "other"
        r = self.registry
        self.requests = Counter("sun_edge_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("sun_edge_request_seconds", "request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter("sun_edge_images", "images generated and returned", registry=r)
        self.cancels = Counter("sun_edge_cancelled", "requests given up before their images", ["reason"], registry=r)
        self.depth = Gauge("sun_edge_queue_depth", "images waiting, not started", registry=r)
        self.batch_size = Histogram("sun_edge_batch_size", "images per UNet call", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
                                    registry=r)
        self.batch_seconds = Histogram("sun_edge_batch_seconds", "one batch: sampling and decoding",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.step = Histogram("sun_edge_unet_step_seconds", "one batched UNet call", buckets=STEP_BUCKETS, registry=r)

    # Observer
    def batch(self, size: int, seconds: float, unet_step_seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.step.observe(unet_step_seconds)

    def queue_depth(self, images: int) -> None:
        self.depth.set(images)

    def images(self, n: int) -> None:
        self.generated.inc(n)

    def cancelled(self, reason: str) -> None:
        self.cancels.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def route(self, path: str) -> str:
        return path if path in self.routes else "other"


class CountRequests:
    """ASGI middleware: every HTTP request's route, status and latency (pure ASGI, so disconnects still reach the app)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = self.metrics.route(scope.get("path", ""))
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
