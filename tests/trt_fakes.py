"""Fake ``tensorrt`` and cuda-python runtime modules that record calls (no GPU, no TensorRT).

The fake builder writes an "engine" that is JSON naming the graph's I/O tensors; the fake
engine's execution writes ``2 * first input`` into the output buffer (as many elements as the
first input's shape set on the context holds; the whole buffer for a static engine), so a test
can check that inputs reach the device, the engine runs on them and the output comes back.
A capture records the executions made while capturing, with the context's input shapes then, into
its own ``FakeGraph``; a launch replays that graph's executions at *their* shapes and is logged in
``cudart.launched``, so replaying a graph captured for another batch shows up as a wrong output.
"""

from __future__ import annotations

import ctypes
import json
import sys
import types
from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx


class FakeGraph:
    """A captured stream: the executions recorded (each at the shapes set when it was captured)."""

    def __init__(self, runs: list[Any], shapes: list[dict[str, tuple]]) -> None:
        self.runs, self.shapes, self.instantiated, self.destroyed = runs, shapes, 0, False


class FakeGraphExec:
    def __init__(self, graph: FakeGraph) -> None:
        self.graph, self.destroyed = graph, False


class FakeCudart:
    """The subset of ``cuda.bindings.runtime`` the runtime uses; device memory is bytearrays."""

    class cudaMemcpyKind:  # noqa: N801 - cuda-python's names
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStreamCaptureMode:  # noqa: N801
        cudaStreamCaptureModeGlobal = 0

    def __init__(self, major: int = 8, minor: int = 6, name: bytes = b"Fake RTX") -> None:
        self.props = SimpleNamespace(name=name, major=major, minor=minor)
        self.calls: Counter[str] = Counter()
        self.memory: dict[int, bytearray] = {}
        self.capturing = False
        self.captured: list[Any] = []  # executions recorded by the capture in progress
        self.captured_shapes: list[dict[str, tuple]] = []
        self.graphs: list[FakeGraph] = []  # every graph captured, in order
        self.launched: list[FakeGraphExec] = []  # every launch, in order

    def _call(self, name: str) -> None:
        self.calls[name] += 1

    def cudaGetDeviceCount(self) -> tuple[int, int]:
        return 0, 1

    def cudaSetDevice(self, device: int) -> tuple[int]:
        return (0,)

    def cudaGetDeviceProperties(self, device: int) -> tuple[int, Any]:
        return 0, self.props

    def cudaStreamCreate(self) -> tuple[int, int]:
        self._call("cudaStreamCreate")
        return 0, 7  # cuda-python's cudaStream_t converts to int like this

    def cudaMalloc(self, nbytes: int) -> tuple[int, int]:
        self._call("cudaMalloc")
        pointer = 4096 * (len(self.memory) + 1)
        self.memory[pointer] = bytearray(nbytes)
        return 0, pointer

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> tuple[int]:
        self._call("cudaMemcpyAsync")
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.memory[dst][:nbytes] = ctypes.string_at(src, nbytes)
        else:
            ctypes.memmove(dst, bytes(self.memory[src][:nbytes]), nbytes)
        return (0,)

    def cudaStreamSynchronize(self, stream: int) -> tuple[int]:
        self._call("cudaStreamSynchronize")
        return (0,)

    def cudaStreamBeginCapture(self, stream: int, mode: int) -> tuple[int]:
        self._call("cudaStreamBeginCapture")
        assert not self.capturing, "capture begun inside a capture"
        self.capturing, self.captured, self.captured_shapes = True, [], []
        return (0,)

    def cudaStreamEndCapture(self, stream: int) -> tuple[int, FakeGraph]:
        self._call("cudaStreamEndCapture")
        self.capturing = False
        graph = FakeGraph(self.captured, self.captured_shapes)
        self.graphs.append(graph)
        return 0, graph

    def cudaGraphInstantiate(self, graph: FakeGraph, flags: int) -> tuple[int, FakeGraphExec]:
        self._call("cudaGraphInstantiate")
        graph.instantiated += 1
        return 0, FakeGraphExec(graph)

    def cudaGraphLaunch(self, graph_exec: FakeGraphExec, stream: int) -> tuple[int]:
        self._call("cudaGraphLaunch")
        assert not graph_exec.destroyed, "launched a destroyed graph"
        self.launched.append(graph_exec)
        for run in graph_exec.graph.runs:
            run()
        return (0,)

    def cudaFree(self, pointer: int) -> tuple[int]:
        self._call("cudaFree")
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec: FakeGraphExec) -> tuple[int]:
        self._call("cudaGraphExecDestroy")
        graph_exec.destroyed = True
        return (0,)

    def cudaGraphDestroy(self, graph: FakeGraph) -> tuple[int]:
        self._call("cudaGraphDestroy")
        graph.destroyed = True
        return (0,)

    def cudaStreamDestroy(self, stream: int) -> tuple[int]:
        self._call("cudaStreamDestroy")
        return (0,)


def fake_tensorrt(version: str, cudart: FakeCudart) -> types.ModuleType:
    """A ``tensorrt`` module: builder API (records the config it was given) and runtime API."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = Counter()
    trt.configs = []

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.io = flags, {}

    class Parser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path: str) -> bool:
            model = onnx.load(path, load_external_data=False)
            self.network.io = {"inputs": [v.name for v in model.graph.input],
                               "outputs": [v.name for v in model.graph.output], "source": path.rsplit("/", 1)[-1]}
            return True

    class Cache:
        def serialize(self) -> bytes:
            return b"timing-cache"

    class Profile:
        def __init__(self) -> None:
            self.shapes = {}

        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Config:
        def __init__(self) -> None:
            self.builder_optimization_level, self.pools, self.profiles, self.cache = None, {}, [], None

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            self.pools[pool] = size

        def add_optimization_profile(self, profile: Profile) -> None:
            self.profiles.append(profile)

        def create_timing_cache(self, blob: bytes) -> Cache:
            self.cache_blob = blob
            return Cache()

        def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> None:
            self.cache = cache

        def get_timing_cache(self) -> Cache:
            return self.cache

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            trt.calls["build_serialized_network"] += 1
            trt.configs.append((network, config))
            return json.dumps(network.io).encode()

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine, self.addresses, self.shapes = engine, {}, {}

        def set_tensor_address(self, name: str, pointer: int) -> None:
            trt.calls["set_tensor_address"] += 1
            self.addresses[name] = pointer

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            trt.calls["set_input_shape"] += 1
            self.shapes[name] = tuple(shape)
            return True

        def _compute(self, shapes: dict[str, tuple]) -> None:
            first, out = self.engine.io["inputs"][0], self.engine.io["outputs"][0]
            src, dst = cudart.memory[self.addresses[first]], cudart.memory[self.addresses[out]]
            values = np.frombuffer(bytes(src), dtype=np.float32) if len(src) % 4 == 0 else np.zeros(1, np.float32)
            n = int(np.prod(shapes[first])) if first in shapes else len(dst) // 4  # elements at the set shape
            dst[:4 * n] = (2 * np.resize(values, n)).astype(np.float32).tobytes()

        def execute_async_v3(self, stream: int) -> bool:
            trt.calls["execute_async_v3"] += 1
            shapes = dict(self.shapes)
            if cudart.capturing:
                cudart.captured.append(lambda: self._compute(shapes))
                cudart.captured_shapes.append(shapes)
            else:
                self._compute(shapes)
            return True

    class Engine:
        def __init__(self, io: dict) -> None:
            self.io = io
            self.names = [*io["inputs"], *io["outputs"]]
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def create_execution_context(self) -> Context:
            trt.calls["create_execution_context"] += 1
            return Context(self)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Engine:
            trt.calls["deserialize_cuda_engine"] += 1
            return Engine(json.loads(data))

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, Parser, Runtime
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=0)
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    return trt


def install(monkeypatch: Any, version: str = "10.4.0", major: int = 8, minor: int = 6) -> tuple[Any, FakeCudart]:
    """Put the fakes in ``sys.modules`` (undone by ``monkeypatch``); returns (trt, cudart)."""
    cudart = FakeCudart(major, minor)
    trt = fake_tensorrt(version, cudart)
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, cudart
    for name, module in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, module)
    return trt, cudart
