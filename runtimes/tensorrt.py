"""The TensorRT runtime: the runtime protocol over a TensorRT bundle's engines, without PyTorch.

    from sun_edge import Pipeline
    from sun_edge.runtimes.tensorrt import TensorRTRuntime

    runtime = TensorRTRuntime.open("toonyou-trt")          # after: sun-edge build-engines --bundle toonyou-trt
    images = Pipeline(runtime, runtime.tokenizer()).generate("a cat", "blurry")

Opening checks, before anything runs, that TensorRT suits this GPU (``tensorrt_rules.RULES``)
and that every component has an engine built with this TensorRT for this compute capability;
otherwise one line says ``run sun-edge build-engines --bundle DIR``. Engines are deserialized on
first use; each gets its execution context and one device buffer per I/O tensor, allocated and
bound (``set_tensor_address``) once. A call copies inputs host->device on the runtime's stream,
runs ``execute_async_v3``, copies the output back and synchronizes. With ``cuda_graphs`` the UNets'
steps (SUN, and the CFG baseline's) run as CUDA graphs, one per input shapes (a batch-range bundle:
one per batch size): the first call at a set of shapes runs eagerly (TensorRT settles its shape
work), the second captures a graph for exactly those shapes, and later calls at them replay it. A
call at other shapes never replays a graph captured for different ones; it gets its own. The
buffers are allocated once for the largest batch, so every graph reads and writes the same
addresses. CUDA comes from cuda-python (``tensorrt_rules.cuda_runtime``), not PyCUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sun_edge.bundle import Bundle, open_bundle
from sun_edge.components import Geometry, unet_in_channels
from sun_edge.errors import SunEdgeError
from sun_edge.runtimes import check_input
from sun_edge.runtimes import tensorrt_rules as rules
from sun_edge.runtimes.base import GraphRuntime

TARGETS = (rules.TARGET,)  # the bundle targets this runtime runs
GRAPH_COMPONENTS = ("unet", "unet_plain")  # captured as CUDA graphs, one per input shapes (called once per step)


def _cuda(result: Any, what: str) -> Any:
    """Unpack a cuda-python call's ``(err, *values)``; a non-zero error is one line."""
    result = result if isinstance(result, tuple) else (result,)
    if int(result[0]) != 0:
        raise SunEdgeError(f"CUDA {what} failed: {result[0]}")
    return result[1] if len(result) == 2 else result[1:] or None


Shapes = tuple[tuple[int, ...], ...]  # one call's input shapes, in manifest order


class _Engine:
    """One deserialized engine with its context, device buffers (allocated once, for the largest batch), and
    its CUDA graphs: ``graphs[input shapes] = (graph, graph_exec)``, ``runs[input shapes]`` = calls made at them."""

    def __init__(self, engine: Any, context: Any, buffers: dict[str, int], bindings: tuple[rules.Binding, ...]) -> None:
        self.engine, self.context, self.buffers, self.bindings = engine, context, buffers, bindings
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.graphs: dict[Shapes, tuple[Any, Any]] = {}
        self.runs: dict[Shapes, int] = {}


class TensorRTRuntime(GraphRuntime):
    """Runtime protocol (``encode_text``, ``unet``, ``unet_plain``, ``decode``, ``encode``) over TensorRT engines."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, *, cuda_graphs: bool = True, device: int = 0) -> None:
        manifest = bundle.manifest
        if manifest.target not in TARGETS:
            raise SunEdgeError(f"bundle {bundle.path} is a {manifest.target} bundle; the tensorrt runtime runs "
                               f"{', '.join(TARGETS)} bundles")
        self.bundle, self.cuda_graphs, self.device = bundle, cuda_graphs, device
        self._trt, self._cudart = rules.import_tensorrt(), rules.cuda_runtime()
        _cuda(self._cudart.cudaSetDevice(device), "cudaSetDevice")
        self.gpu, self.compute = rules.gpu(device)
        rules.check_compatible(self._trt.__version__, self.compute)
        self._records = rules.engine_records(manifest)
        for component in manifest.components:
            reason = rules.rebuild_reason(self._records.get(component), self._trt.__version__, self.compute, bundle.path)
            if reason is not None:
                raise SunEdgeError(f"bundle {bundle.path}: {component}: {reason}; "
                                   f"run sun-edge build-engines --bundle {bundle.path}")
        self._stream = _cuda(self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._engines: dict[str, _Engine] = {}
        self._trt_runtime: Any = None
        self.geometry = Geometry.from_manifest(manifest)  # every shape the base class computes (ControlNet residuals)
        self.latent_channels = int(manifest.latent["channels"])
        self.unet_in_channels = unet_in_channels(manifest.latent)  # 9: an inpainting UNet
        self.vae_scale_factor = int(manifest.image["height"]) // int(manifest.latent["height"])
        self.scaling_factor = float(manifest.latent["scaling_factor"])
        self.text_tokens, self.text_dim = int(manifest.text["tokens"]), int(manifest.text["dim"])
        self.info = self.manifest_info(gpu=self.gpu, sm=self.compute, tensorrt=self._trt.__version__,
                                       cuda_graphs=self.cuda_graphs)

    @classmethod
    def open(cls, path: Path | str, *, cuda_graphs: bool = True, device: int = 0) -> TensorRTRuntime:
        """Open and check a bundle directory (engines are deserialized on first use)."""
        return cls(open_bundle(path), cuda_graphs=cuda_graphs, device=device)

    def engine(self, component: str) -> _Engine:
        """The component's engine, deserialized on first use, with its buffers allocated and bound once."""
        if component in self._engines:
            return self._engines[component]
        comp = self._component(component)
        record = self._records[component]
        trt, path = self._trt, self.bundle.path / record.file
        if self._trt_runtime is None:
            self._trt_runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = self._trt_runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise SunEdgeError(f"TensorRT cannot load {path}; run sun-edge build-engines --bundle {self.bundle.path} --force")
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        bindings = rules.binding_plan(comp, rules.free_batch_max(self.manifest, component))
        if names != {b.name for b in bindings}:
            raise SunEdgeError(f"{record.file} has tensors {', '.join(sorted(names))}, the manifest says "
                               f"{', '.join(b.name for b in bindings)}; run sun-edge build-engines --bundle "
                               f"{self.bundle.path} --force")
        context = engine.create_execution_context()
        buffers = {}
        for b in bindings:
            buffers[b.name] = _cuda(self._cudart.cudaMalloc(b.nbytes), f"cudaMalloc({b.nbytes}) for {b.name}")
            context.set_tensor_address(b.name, int(buffers[b.name]))
        state = _Engine(engine, context, buffers, bindings)
        self._engines[component] = state
        return state

    def run(self, component: str, *arrays: np.ndarray) -> np.ndarray:
        """Check ``arrays`` against the component's inputs (manifest order), run its engine, return its first output."""
        return self.run_outputs(component, *arrays)[0]

    def run_outputs(self, component: str, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """As ``run``, returning every output in manifest order."""
        comp = self._component(component)
        checked = []
        for spec, array in zip(comp.inputs, arrays, strict=True):
            shape = [None if d < 0 else d for d in spec.shape]
            array = check_input(f"{component} input {spec.name}", array, shape, np.dtype(spec.dtype))
            checked.append(np.ascontiguousarray(array))
        state, cudart = self.engine(component), self._cudart
        static = all(d >= 0 for s in comp.inputs for d in s.shape)
        for spec, array in zip(comp.inputs, checked):
            if not static and state.shapes.get(spec.name) != array.shape:
                state.context.set_input_shape(spec.name, array.shape)
                state.shapes[spec.name] = array.shape
            _cuda(cudart.cudaMemcpyAsync(state.buffers[spec.name], array.ctypes.data, array.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream), "cudaMemcpyAsync")
        key = tuple(array.shape for array in checked)
        if self.cuda_graphs and component in GRAPH_COMPONENTS and state.runs.get(key, 0) >= 1:
            if key not in state.graphs:
                state.graphs[key] = self._capture(state)
            _cuda(cudart.cudaGraphLaunch(state.graphs[key][1], self._stream), "cudaGraphLaunch")
        elif not state.context.execute_async_v3(int(self._stream)):
            raise SunEdgeError(f"TensorRT failed running {self._records[component].file}")
        state.runs[key] = state.runs.get(key, 0) + 1
        batch = checked[0].shape[0]
        outs = []
        for spec in comp.outputs:
            out = np.empty(tuple(batch if d < 0 else d for d in spec.shape), dtype=np.dtype(spec.dtype))
            _cuda(cudart.cudaMemcpyAsync(out.ctypes.data, state.buffers[spec.name], out.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream), "cudaMemcpyAsync")
            outs.append(out)
        _cuda(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return tuple(outs)

    def graph_shapes(self, component: str) -> list[Shapes]:
        """The input shapes ``component`` has a captured CUDA graph for, in capture order (none before use)."""
        state = self._engines.get(component)
        return list(state.graphs) if state is not None else []

    def _capture(self, state: _Engine) -> tuple[Any, Any]:
        """Record one ``execute_async_v3`` at the context's current input shapes as a CUDA graph (after a warm-up
        call at them); returns (graph, instantiated graph)."""
        cudart = self._cudart
        _cuda(cudart.cudaStreamBeginCapture(self._stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal),
              "cudaStreamBeginCapture")
        ok = state.context.execute_async_v3(int(self._stream))
        graph = _cuda(cudart.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
        if not ok:
            cudart.cudaGraphDestroy(graph)
            raise SunEdgeError("TensorRT failed while capturing the UNet step as a CUDA graph; rerun with CUDA graphs off")
        return graph, _cuda(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")

    def close(self) -> None:
        """Free the device buffers, CUDA graphs and the stream (the runtime is unusable afterwards)."""
        cudart = self._cudart
        for state in self._engines.values():
            for graph, graph_exec in state.graphs.values():
                cudart.cudaGraphExecDestroy(graph_exec)
                cudart.cudaGraphDestroy(graph)
            state.graphs.clear()
            for pointer in state.buffers.values():
                cudart.cudaFree(pointer)
        self._engines.clear()
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

