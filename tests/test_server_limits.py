"""Limits that keep one request from hurting the others: 429 on a full queue, 504 past the timeout, a client
that leaves frees its slot, and SIGTERM drains (requests in flight all answered, exit 0)."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_server_support import Server, one_line_error, pixels

SLOW = {"prompt": "slow", "steps": 400, "width": 128, "height": 128}  # far longer than the 5 s timeout
TIMEOUT_S = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-limits")
    s = Server(folder / "serve.log", "--queue", "1", "--max-batch", "1", "--batch-window-ms", "0",
               "--timeout-s", str(TIMEOUT_S), "--max-steps", "400", "--threads", "1")
    try:
        yield s.wait_ready()
    finally:
        assert s.terminate() == 0, s.log()


def jobs(server) -> int:
    return server.json("GET", "/sdapi/v1/progress")[1]["state"]["job_count"]


def wait_for(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def cancelled(server, reason: str) -> float:
    text = server.request("GET", "/metrics")[2].decode()
    prefix = f'sun_edge_cancelled_total{{reason="{reason}"}}'
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def test_full_queue_gets_429_and_slow_requests_504(server):
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(server.request, "POST", "/v1/generate", SLOW)
        wait_for(lambda: jobs(server) == 1, what="the first request to start")
        waiting = pool.submit(server.request, "POST", "/v1/generate", SLOW)
        wait_for(lambda: jobs(server) == 2, what="the second request to queue")
        status, headers, data = server.request("POST", "/v1/generate", {"prompt": "x"})
        assert status == 429 and int(headers["retry-after"]) >= 1
        one_line_error(data, "queue is full", "retry in")
        for future in (running, waiting):
            status, _, data = future.result()
            assert status == 504, data
            one_line_error(data, f"timeout of {TIMEOUT_S} s")
    wait_for(lambda: jobs(server) == 0, what="the abandoned batches to stop")
    status, _, data = server.request("POST", "/v1/generate", {"prompt": "x", "seed": 1})
    assert status == 200 and pixels(data).shape == (64, 64, 3)  # still serving


def _send(server, body: dict) -> socket.socket:
    """A client that sends its request and reads nothing (yet)."""
    data = json.dumps(body).encode()
    connection = socket.create_connection(("127.0.0.1", server.port))
    connection.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return connection


def test_a_client_that_disconnects_frees_its_slot(server):
    before = cancelled(server, "disconnect")
    running = _send(server, SLOW)
    wait_for(lambda: jobs(server) == 1, what="the first request to start")
    waiting = _send(server, SLOW)
    wait_for(lambda: jobs(server) == 2, what="the second request to queue (the queue is full now)")
    waiting.close()  # this client goes away while its request waits
    wait_for(lambda: jobs(server) == 1, timeout=3, what="the slot of the client that left to free")
    assert cancelled(server, "disconnect") == before + 1
    with ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(server.request, "POST", "/v1/generate", {"prompt": "x", "seed": 2})
        wait_for(lambda: jobs(server) == 2, what="a new request to take the freed slot")
        running.close()  # the running request's client leaves too: its batch stops at the next step
        status, _, data = accepted.result()
        assert status == 200, data  # it got the freed slot, not a 429, and ran once the abandoned batch stopped
    assert cancelled(server, "disconnect") == before + 2


def test_a1111_interrupt_stops_the_running_request(server):
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(server.request, "POST", "/sdapi/v1/txt2img", {**SLOW, "sampler_name": "DDIM"})
        wait_for(lambda: jobs(server) == 1, what="the request to start")
        start = time.monotonic()
        assert server.json("POST", "/sdapi/v1/interrupt") == (200, {})
        status, _, data = running.result()
        assert status == 409 and time.monotonic() - start < TIMEOUT_S, data
        one_line_error(data, "interrupted")
    wait_for(lambda: jobs(server) == 0, what="the interrupted batch to stop")


def test_sigterm_drains_requests_in_flight(tmp_path):
    s = Server(tmp_path / "serve.log", "--max-batch", "4", "--batch-window-ms", "50", "--drain-timeout-s", "120",
               "--threads", "1")
    try:
        s.wait_ready()
        bodies = [{"prompt": f"request {i}", "seed": 100 + i, "steps": 30} for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(s.request, "POST", "/v1/generate", b) for b in bodies]
            wait_for(lambda: jobs(s) == 6, what="all six requests to be accepted")
            s.process.terminate()  # SIGTERM
            wait_for(lambda: s.json("GET", "/readyz") == (503, {"ready": False, "reason": "draining"}), timeout=10,
                     what="/readyz to turn 503")
            status, _, data = s.request("POST", "/v1/generate", {"prompt": "late"})
            assert status == 503
            one_line_error(data, "shutting down")
            for body, future in zip(bodies, futures):
                status, headers, data = future.result()
                assert status == 200 and headers["x-seed"] == str(body["seed"]), data  # none lost
                assert pixels(data).shape == (64, 64, 3)
        assert s.process.wait(60) == 0, s.log()
        assert "draining" in s.log()
    finally:
        s.terminate()
