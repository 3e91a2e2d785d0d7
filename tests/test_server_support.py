"""Helpers for the server tests: a ``sun-edge serve`` process on a free loopback port (no tests here)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install -e '.[server]'")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``sun-edge serve ARGS`` on 127.0.0.1 and a free port, its log in ``log_path``."""

    def __init__(self, log_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "sun_edge.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        if "SUN_EDGE_API_KEY" not in (env or {}):
            environment.pop("SUN_EDGE_API_KEY", None)  # auth as each test says, whatever this shell has
        self._log = log_path.open("w")
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=environment,
                                        cwd=log_path.parent)

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def wait_ready(self, timeout: float = 300.0, headers: dict[str, str] | None = None) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"sun-edge serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                status, _, _ = self.request("GET", "/readyz", headers=headers, timeout=5)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"sun-edge serve not ready after {timeout:g} s:\n{self.log()}")

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 120.0) -> tuple[int, dict[str, str], bytes]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def json(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, _, data = self.request(method, path, body, **kw)
        return status, json.loads(data) if data else None

    def terminate(self, timeout: float = 120.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def pixels(png: bytes) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def one_line_error(data: bytes, *words: str) -> str:
    """The error message of a JSON error answer: one line, no traceback, no file path, naming ``words``."""
    body = json.loads(data)
    message = body["error"]["message"] if isinstance(body.get("error"), dict) else body["detail"]
    assert isinstance(message, str) and "\n" not in message, body
    assert "Traceback" not in data.decode() and "/work/" not in data.decode() and ".py" not in message, body
    for word in words:
        assert word in message, (word, message)
    return message


def same_image(got: Any, want: Any) -> bool:
    """Equal to within one 8-bit level: a batched UNet call's GEMM blocking may move a pixel by one level
    (``tests/test_batch.py``); an image made alone (batch 1) is bit-exact, and tests check that with ``array_equal``."""
    import numpy as np

    return got.shape == want.shape and int(np.abs(got.astype(int) - want.astype(int)).max()) <= 1
