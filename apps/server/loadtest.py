"""``sun-edge bench-serve``: a bounded load test of a running server, on this machine only.

N requests (``POST /v1/generate``, one image each, each its own seed, four prompts in turn) at
concurrency C, stopped after ``duration_s``. Counts answers lost (no 200), duplicated (the image of
another request's seed), invalid (not a PNG of the right size and seed), and with ``check`` the ones
that differ from the image the same request gives alone (made first, one at a time) by more than one
8-bit level (a batched UNet call's GEMM blocking may move a pixel by one level; see tests/test_batch.py). Reports p50,
p95 and p99 latency and images per second. Standard library only (plus Pillow), so any machine with
sun-edge can run it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

from PIL import Image

from sun_edge.errors import SunEdgeError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
PROMPTS = ("a red circle", "a blue square on white", "two green triangles", "a yellow star, dark background")
MAX_REQUESTS, MAX_CONCURRENCY, MAX_DURATION_S = 10000, 256, 3600.0


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    ok: int
    lost: int
    duplicated: int
    invalid: int
    mismatched: int | None  # None: not checked
    p50_s: float
    p95_s: float
    p99_s: float
    images_per_s: float
    wall_s: float
    server_max_batch: int | None = None
    runtime: str | None = None


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        host = urlparse(url).hostname
        if host not in LOOPBACK:
            raise SunEdgeError(f"bench-serve loads servers on this machine only (127.0.0.1, localhost, ::1), not {host}")
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def get(self, path: str) -> dict[str, Any]:
        request = urllib.request.Request(self.url + path, headers=self.headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def generate(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.url + "/v1/generate", data=json.dumps(body).encode(), headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()


def _body(i: int, seed0: int, steps: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": PROMPTS[i % len(PROMPTS)], "negative_prompt": "blurry" if i % 2 else "",
                            "seed": seed0 + i, "response_format": "png"}
    if steps is not None:
        body["steps"] = steps
    return body


def _pixels(png: bytes) -> tuple[tuple[int, int], bytes]:
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        return image.size, image.convert("RGB").tobytes()


def _close(want: bytes | None, got: bytes) -> bool:
    """Equal to within one 8-bit level per channel."""
    import numpy as np

    if want is None or len(want) != len(got):
        return False
    a, b = np.frombuffer(want, np.uint8).astype(np.int16), np.frombuffer(got, np.uint8).astype(np.int16)
    return int(np.abs(a - b).max()) <= 1


def references(client: Client, n: int, seed0: int = 1000, steps: int | None = None) -> dict[int, bytes]:
    """The image of each request made alone (one at a time): RGB pixels by request index."""
    out = {}
    for i in range(n):
        status, _, data = client.generate(_body(i, seed0, steps))
        if status != 200:
            raise SunEdgeError(f"reference request {i} failed with HTTP {status}: {data[:200]!r}")
        out[i] = _pixels(data)[1]
    return out


def run_load(client: Client, *, requests: int, concurrency: int, duration_s: float = 300.0, steps: int | None = None,
             seed0: int = 1000, expected: dict[int, bytes] | None = None) -> LoadResult:
    """``requests`` requests at ``concurrency``; none is started after ``duration_s``."""
    if not 1 <= requests <= MAX_REQUESTS:
        raise SunEdgeError(f"--requests {requests} is outside [1, {MAX_REQUESTS}]")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise SunEdgeError(f"--concurrency {concurrency} is outside [1, {MAX_CONCURRENCY}]")
    if not 0 < duration_s <= MAX_DURATION_S:
        raise SunEdgeError(f"--duration-s {duration_s:g} is outside (0, {MAX_DURATION_S:g}]")
    info = client.get("/v1/info")
    size = (info["default_size"]["width"], info["default_size"]["height"])
    stop_at = time.monotonic() + duration_s
    latencies: list[float] = []
    answers: dict[int, tuple[int, dict[str, str], bytes] | None] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        if time.monotonic() > stop_at:
            return
        start = time.perf_counter()
        try:
            answer = client.generate(_body(i, seed0, steps))
        except (OSError, urllib.error.URLError):
            answer = None
        with lock:
            answers[i] = answer
            if answer is not None and answer[0] == 200:
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    ok = invalid = mismatched = 0
    digests: dict[bytes, set[int]] = {}
    for i in range(requests):
        answer = answers.get(i)
        if answer is None or answer[0] != 200:
            continue
        _, headers, data = answer
        try:
            got_size, pixels = _pixels(data)
        except OSError:
            invalid += 1
            continue
        seed = {k.lower(): v for k, v in headers.items()}.get("x-seed")
        if got_size != size or seed != str(seed0 + i):
            invalid += 1
            continue
        ok += 1
        digest = hashlib.sha256(pixels).digest()
        digests.setdefault(digest, set()).add(i)
        if expected is not None and not _close(expected.get(i), pixels):
            mismatched += 1
    duplicated = sum(len(ids) - 1 for ids in digests.values())
    lost = requests - sum(1 for a in answers.values() if a is not None and a[0] == 200)
    return LoadResult(concurrency, requests, ok, lost, duplicated, invalid, mismatched if expected is not None else None,
                      _percentile(latencies, 50), _percentile(latencies, 95), _percentile(latencies, 99),
                      ok / wall if wall > 0 else 0.0, wall, info["batch"]["max"], info["runtime"].get("runtime"))


def table(results: list[LoadResult]) -> str:
    head = "| runtime | max batch | concurrency | requests | ok | lost | dup | invalid | mismatched | p50 s | p95 s | p99 s | images/s |"
    rows = [head, "|" + "---|" * 13]
    for r in results:
        rows.append(f"| {r.runtime} | {r.server_max_batch} | {r.concurrency} | {r.requests} | {r.ok} | {r.lost} | "
                    f"{r.duplicated} | {r.invalid} | {'-' if r.mismatched is None else r.mismatched} | {r.p50_s:.3f} | "
                    f"{r.p95_s:.3f} | {r.p99_s:.3f} | {r.images_per_s:.2f} |")
    return "\n".join(rows)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    client = Client(args.url, args.api_key or os.environ.get("SUN_EDGE_API_KEY"))
    expected = references(client, args.requests, steps=args.steps) if args.check else None
    results = [run_load(client, requests=args.requests, concurrency=c, duration_s=args.duration_s, steps=args.steps,
                        expected=expected) for c in args.concurrency]
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
        print(f"wrote {args.json}")
    bad = any(r.lost or r.duplicated or r.invalid or r.mismatched for r in results)
    return 1 if bad else 0
