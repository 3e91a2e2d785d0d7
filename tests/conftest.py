"""Shared fixtures: tiny random SD1.5-architecture models, made once per session.

Under pytest-xdist (the README's test command runs ``-n auto --dist loadfile``), what several test files share
on disk, the tiny model's home and its ONNX exports, is made once per run by the first worker that asks and
reused by the others (``_shared``), so every worker tests the same files and no export runs twice.
"""

from __future__ import annotations

import copy
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # share the cores between workers: OpenMP threads spin, and crawl on a busy neighbour's core
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


def _shared(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder ``make`` fills once per test run.

    Alone, this process makes it. Under pytest-xdist, the first worker to ask makes it in the run's shared temp
    folder while holding a file lock (kept in a folder of its own, so the made folder holds only what ``make``
    wrote); the others wait on the lock and reuse it, or fail with the first worker's error if it failed.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        path = tmp_path_factory.mktemp(name)
        make(path)
        return path
    run = tmp_path_factory.getbasetemp().parent  # pytest-of-<user>/pytest-<N>: every worker's basetemp is in it
    path, locks = run / "shared" / name, run / "shared-locks"
    locks.mkdir(exist_ok=True)
    state = locks / f"{name}.state"
    with open(locks / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if state.exists():
            said = state.read_text()
            if said != "done":
                pytest.fail(f"{name}: the worker that made it failed: {said}")
            return path
        try:
            path.mkdir(parents=True)
            make(path)
        except BaseException as e:  # pytest.fail's Failed included
            state.write_text(f"{type(e).__name__}: {e}"[-3000:])
            raise
        state.write_text("done")
    return path


def _one_torch_thread():
    """Tiny models run as fast on one thread, and two OpenMP threads crawl when other processes share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


one_thread = pytest.fixture(_one_torch_thread, name="one_thread")
one_thread_module = pytest.fixture(_one_torch_thread, name="one_thread_module", scope="module")


@pytest.fixture(scope="session")
def tiny():
    """The tiny UNet, text encoder and VAE (do not mutate: copy first)."""
    from sun_edge.tiny import build_tiny_components

    return build_tiny_components()


@pytest.fixture()
def tiny_sun_unet(tiny):
    """A SUNUNet over a copy of the tiny UNet with a seeded random adapter."""
    from sun_edge.adapter import SUNAdapter
    from sun_edge.unet import SUNUNet

    unet = copy.deepcopy(tiny["unet"])
    return SUNUNet(unet, SUNAdapter.from_unet(unet).randomize_(3)).eval()


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory) -> Path:
    """A models home holding the generated tiny-random model (and its adapter)."""
    from sun_edge.tiny import ensure_tiny_random

    return _shared(tmp_path_factory, "sun-edge-home", lambda home: ensure_tiny_random(home / "models"))


@pytest.fixture(scope="session")
def control_files(tiny, tmp_path_factory):
    """The tiny random ControlNet (tests/controlnet_helpers.py) as a diffusers folder and two single files; the
    exports use its original ControlNet/LDM-layout file."""
    from controlnet_helpers import save_layouts, tiny_controlnet

    return save_layouts(tiny_controlnet(tiny["unet"]), tiny["unet"], tmp_path_factory.mktemp("controlnet-files"))


@pytest.fixture(scope="session")
def inpaint_model(tiny, tmp_path_factory):
    """tests/inpaint_helpers.py: a tiny random 9-channel UNet as a diffusers folder (with an adapter) and a single
    file (do not modify: copy first)."""
    from inpaint_helpers import make_inpaint_model

    return make_inpaint_model(tmp_path_factory.mktemp("inpaint"), tiny)


@pytest.fixture()
def home_env(tiny_home, monkeypatch) -> Path:
    """SUN_EDGE_HOME pointed at the session's tiny home."""
    monkeypatch.setenv("SUN_EDGE_HOME", str(tiny_home))
    return tiny_home


# --- ONNX bundles of the tiny model, exported once per session (tests/test_export_onnx.py, test_onnxruntime.py)

ONNX_SIZE = 64  # image side of the test bundles: latents [1, 4, 8, 8]


@pytest.fixture(scope="session")
def tiny_reference(tiny_home):
    """The PyTorch reference runtime of the tiny model (float32), loaded as ``export`` loads it."""
    from sun_edge.runtimes.pytorch import TorchRuntime

    return TorchRuntime.load(str(tiny_home / "models" / "tiny-random"))


def _export_both(root: Path, home: Path) -> None:
    """Both test exports at once, each through the CLI in its own process, into ``root/<precision>/bundle``.

    The dynamo exporter is single-threaded Python, so two processes take about the wall time of one.
    """
    import subprocess
    import sys

    env = {**os.environ, "SUN_EDGE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    jobs = {}
    try:
        for precision in ("fp32", "fp16"):
            (root / precision).mkdir()
            log = root / f"{precision}.log"
            cmd = [sys.executable, "-m", "sun_edge.cli", "export", "--model", "tiny-random", "--target", "onnx",
                   "--precision", precision,
                   "--height", str(ONNX_SIZE), "--width", str(ONNX_SIZE), "--with-baseline",
                   "-o", str(root / precision / "bundle")]
            with log.open("w") as stream:
                jobs[precision] = (log, subprocess.Popen(cmd, env=env, stdout=stream, stderr=subprocess.STDOUT))
        for precision, (log, process) in jobs.items():
            if process.wait(timeout=1200):
                pytest.fail(f"sun-edge export --precision {precision} failed:\n{log.read_text()[-3000:]}")
    finally:
        for _, process in jobs.values():
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def _onnx_exports(tmp_path_factory, tiny_home) -> Path:
    """The folder holding ``fp32/bundle`` and ``fp16/bundle``, made once per run."""
    return _shared(tmp_path_factory, "onnx", lambda root: _export_both(root, tiny_home))


@pytest.fixture(scope="session")
def onnx_fp32_bundle(_onnx_exports) -> Path:
    """The tiny model exported to ONNX in fp32 at 64x64, with the CFG baseline UNet (do not modify: copy first)."""
    return _onnx_exports / "fp32" / "bundle"


@pytest.fixture(scope="session")
def onnx_fp16_bundle(_onnx_exports) -> Path:
    """The tiny model exported to ONNX in fp16 at 64x64, with the CFG baseline UNet (do not modify: copy first)."""
    return _onnx_exports / "fp16" / "bundle"
