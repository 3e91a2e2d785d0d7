"""A local Triton Inference Server from the ``nvidia-pytriton`` wheel, for development, tests and single boxes.

The wheel ships a real ``tritonserver`` binary (Triton 2.51.0, the NGC 24.10 release) with the Python
backend, but two things must be arranged before it serves a python-backend model:

- the backend directory's ``python/`` folder needs the stub built for this Python
  (``pytriton/tritonserver/python_backend_stubs/<major.minor>/triton_python_backend_stub``). The
  backends are copied into a folder of sun-edge's own (``<sun-edge home>/triton/backends-...``, or the
  one given) with that stub beside ``libtriton_python.so``; site-packages is never edited;
- the stub links ``libpython<major.minor>.so``: ``LD_LIBRARY_PATH`` starts with this interpreter's
  ``LIBDIR`` (a pyenv or venv Python otherwise meets the system's libpython of the same version and
  fails with ``'_thread.RLock' object has no attribute '_recursion_count'``), then the wheel's own
  libraries (the copied stub's relative RPATH no longer reaches them);
- the stub is built against NumPy 1's ABI: under NumPy 2 every tensor it hands the model is garbage
  (BYTES inputs crash it in ``deserialize_bytes_tensor``, numbers arrive empty). So the stub imports
  NumPy ``STUB_NUMPY`` from a folder of its own (``pip install --no-deps --target``, once, under the
  sun-edge home), then this interpreter's site-packages: ``SUN_EDGE_TRITON_SITE`` lists them, and
  the repository's ``model.py`` puts them first on ``sys.path`` so that it imports the same sun-edge
  and ONNX Runtime as this interpreter.

``start_local_triton`` binds 127.0.0.1 on free ports (or the ones given), waits for
``/v2/health/ready`` and returns a ``LocalTriton`` that stops the server (``stop()`` or ``with``).
``ngc_command`` is the equivalent ``docker run`` of the NGC tritonserver container for NVIDIA boxes.
Standard library only.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sun_edge.errors import SunEdgeError

TRITON_VERSION = "2.51.0"  # what nvidia-pytriton 0.7.0 ships
NGC_RELEASE = "24.10"  # the NGC container release of that Triton (nvcr.io/nvidia/tritonserver:24.10-py3)
NGC_IMAGE = f"nvcr.io/nvidia/tritonserver:{NGC_RELEASE}-py3"
SITE_ENV = "SUN_EDGE_TRITON_SITE"  # os.pathsep-separated site-packages the repository's model.py adds
STUB = "triton_python_backend_stub"
STUB_NUMPY = "1.26.4"  # the last NumPy 1 (cp38-cp312 wheels); ONNX Runtime and sun-edge's core run on it
INSTALL = 'pip install --no-deps "nvidia-pytriton==0.7.0" (its numpy<2 pin is not needed: sun-edge uses only its tritonserver)'


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel's server, backends and stubs are."""

    root: Path  # .../site-packages/pytriton/tritonserver

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "backends"

    @property
    def libs(self) -> Path:
        """The wheel's bundled libraries (libcudart, ...): the stubs find them by a relative RPATH, lost in the copy."""
        return self.root.parent.parent / "nvidia_pytriton.libs"

    def stub(self, version: str | None = None) -> Path:
        version = version or f"{sys.version_info.major}.{sys.version_info.minor}"
        return self.root / "python_backend_stubs" / version / STUB


def find_install() -> TritonInstall:
    """The ``nvidia-pytriton`` wheel's tritonserver (found without importing pytriton), or one line saying how to install it."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise SunEdgeError(f"sun-edge triton needs the tritonserver of the nvidia-pytriton wheel: {INSTALL}")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    install = TritonInstall(root)
    if not install.binary.is_file():
        raise SunEdgeError(f"{install.binary} is missing: the nvidia-pytriton wheel has no tritonserver; reinstall it: {INSTALL}")
    if not install.stub().is_file():
        raise SunEdgeError(f"nvidia-pytriton has no Python backend stub for Python {sys.version_info.major}."
                           f"{sys.version_info.minor} ({install.stub()}); run sun-edge with Python 3.8-3.13")
    return install


def prepare_backends(install: TritonInstall, directory: Path | None = None) -> Path:
    """A backend directory of our own: the wheel's backends, with this Python's stub in ``python/``.

    Reused when it is already complete and current (same file sizes as the wheel's); written to a
    partial folder and renamed into place otherwise, so a crash never leaves a half directory.
    """
    from sun_edge.files import atomic_directory
    from sun_edge.models import models_home

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    directory = directory or models_home() / "triton" / f"backends-{TRITON_VERSION}-py{version}"
    wanted = {p.relative_to(install.backends): p.stat().st_size for p in install.backends.rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    wanted[Path("python") / STUB] = install.stub().stat().st_size
    if directory.is_dir() and all((directory / rel).is_file() and (directory / rel).stat().st_size == size
                                  for rel, size in wanted.items()):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.exists() and not (directory / "python" / STUB).exists():
        raise SunEdgeError(f"{directory} exists and is not a backend directory sun-edge wrote; remove it or choose "
                           "another --backend-dir")
    with atomic_directory(directory, replace=directory.exists()) as tmp:
        shutil.copytree(install.backends, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(install.stub(), tmp / "python" / STUB)
    return directory


def prepare_stub_numpy(directory: Path | None = None) -> Path | None:
    """A folder holding NumPy ``STUB_NUMPY`` for the stub (None when this interpreter's NumPy is already 1.x)."""
    from sun_edge.files import atomic_directory
    from sun_edge.models import models_home

    try:
        import numpy
    except ImportError:
        return None
    if int(numpy.__version__.split(".")[0]) < 2:
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    directory = directory or models_home() / "triton" / f"numpy-{STUB_NUMPY}-py{version}"
    if (directory / "numpy" / "__init__.py").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(directory) as tmp:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary", ":all:",
               "--target", str(tmp), f"numpy=={STUB_NUMPY}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SunEdgeError(f"the Python backend's stub needs NumPy 1 and pip could not fetch numpy=={STUB_NUMPY} "
                               f"({_last_error(done.stderr)}); run: {shlex.join(cmd[:-3] + ['--target', str(directory), cmd[-1]])}")
    return directory


def server_env(install: TritonInstall, base: dict[str, str] | None = None, stub_numpy: Path | None = None) -> dict[str, str]:
    """The environment the server and its stubs need: this Python's libpython first, then the wheel's
    libraries (the copied stub's relative RPATH no longer reaches them), its site-packages named."""
    import site

    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(install.libs), env.get("LD_LIBRARY_PATH", "")) if p)
    sites = [*([str(stub_numpy)] if stub_numpy else []), *site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    env[SITE_ENV] = os.pathsep.join(dict.fromkeys(p for p in sites if Path(p).is_dir()))
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class LocalTriton:
    """A running tritonserver process and where it listens."""

    process: subprocess.Popen
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path | None = None
    _log: IO[str] | None = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def log(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path and self.log_path.exists() else ""

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout: float = 300.0) -> "LocalTriton":
        """Poll ``/v2/health/ready`` until 200; the server's exit, or the timeout, is one error line (and the log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SunEdgeError(f"tritonserver exited with status {self.process.returncode} before it was ready; "
                                   f"its log ends: {_last_error(self.log())}")
            if self.ready():
                return self
            time.sleep(0.25)
        raise SunEdgeError(f"tritonserver was not ready after {timeout:g} s; its log ends: {_last_error(self.log())}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (Triton unloads its models and exits), SIGKILL after ``timeout``; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
        return int(self.process.returncode)

    def __enter__(self) -> "LocalTriton":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _last_error(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if line[:1] == "E" or "error" in line.lower()]
    return (errors or lines or ["(empty)"])[-1][:600]


def server_command(install: TritonInstall, repo: Path, backends: Path, *, host: str, http_port: int, grpc_port: int,
                   metrics_port: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [str(install.binary), "--model-repository", str(repo), "--backend-directory", str(backends),
            "--http-address", host, "--http-port", str(http_port), "--grpc-address", host,
            "--grpc-port", str(grpc_port), "--metrics-address", host, "--metrics-port", str(metrics_port),
            "--allow-metrics", "true", "--allow-gpu-metrics", "false", "--disable-auto-complete-config",
            "--exit-on-error", "true", "--strict-readiness", "true", "--exit-timeout-secs", "10", "--log-verbose", "0", *extra]


def check_repository(repo: Path) -> None:
    if not repo.is_dir():
        raise SunEdgeError(f"model repository {repo} is not a folder; write one with sun-edge export --target triton")
    if not any((p / "config.pbtxt").is_file() for p in repo.iterdir() if p.is_dir()):
        raise SunEdgeError(f"{repo} holds no model (no */config.pbtxt); write one with sun-edge export --target triton")


def start_local_triton(repo: Path | str, *, host: str = "127.0.0.1", http_port: int = 0, grpc_port: int = 0,
                       metrics_port: int = 0, log_path: Path | None = None, backend_dir: Path | None = None,
                       wait: float | None = 300.0, extra: tuple[str, ...] = ()) -> LocalTriton:
    """Start tritonserver on ``repo`` (ports 0: free ones); wait for readiness unless ``wait`` is None."""
    repo = Path(repo).resolve()
    check_repository(repo)
    install = find_install()
    backends = prepare_backends(install, backend_dir)
    stub_numpy = prepare_stub_numpy()
    ports = [p or free_port(host) for p in (http_port, grpc_port, metrics_port)]
    cmd = server_command(install, repo, backends, host=host, http_port=ports[0], grpc_port=ports[1],
                         metrics_port=ports[2], extra=extra)
    stream = log_path.open("w") if log_path is not None else None
    process = subprocess.Popen(cmd, stdout=stream or None, stderr=subprocess.STDOUT if stream else None,
                               env=server_env(install, stub_numpy=stub_numpy), start_new_session=True)
    server = LocalTriton(process, host, *ports, log_path=log_path, _log=stream)
    if wait is not None:
        try:
            server.wait_ready(wait)
        except BaseException:
            server.stop()
            raise
    return server


def ngc_command(repo: Path | str, *, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                gpus: str = "all", packages: str = "sun-edge[tensorrt]") -> str:
    """The ``docker run`` that serves ``repo`` in the NGC tritonserver container (same Triton release) on NVIDIA GPUs.

    ``numpy<2``: the container's Python backend stub has NumPy 1's ABI too (module docstring)."""
    repo = Path(repo).resolve()
    inner = (f'pip install "{packages}" "numpy<2" && tritonserver --model-repository /models '
             '--disable-auto-complete-config --strict-readiness true')
    return shlex.join(["docker", "run", "--rm", f"--gpus={gpus}", "--shm-size=1g",
                       "-p", f"{http_port}:8000", "-p", f"{grpc_port}:8001", "-p", f"{metrics_port}:8002",
                       "-v", f"{repo}:/models", NGC_IMAGE, "bash", "-c", inner])
