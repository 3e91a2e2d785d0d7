"""The ONNX Runtime runtime: the runtime protocol over an ONNX bundle's graphs, without PyTorch.

    from sun_edge import Pipeline
    from sun_edge.runtimes.onnxruntime import OnnxRuntime

    runtime = OnnxRuntime.open("toonyou-onnx", provider="cpu")  # vae_decoder="tiny": TAESD, if exported
    images = Pipeline(runtime, runtime.tokenizer()).generate("a cat", "blurry")

Sessions are created per component on first use, with the execution provider chosen by name
(``PROVIDERS``). Each session's declared inputs and outputs are checked against the manifest
when it is created, and every input against the manifest on every call (name, dtype, shape),
so a bundle whose manifest was edited, or a caller passing the wrong array, gets one precise
line instead of an ONNX Runtime stack trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnxruntime as ort

from sun_edge.bundle import Bundle, TensorSpec, open_bundle
from sun_edge.errors import SunEdgeError, first_line
from sun_edge.runtimes import check_input
from sun_edge.runtimes.base import Decoder, GraphRuntime, return_freed_memory

PROVIDERS = MappingProxyType({
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
})
_ORT_DTYPES = MappingProxyType({"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
                                "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"})


def execution_providers(provider: str) -> list[str]:
    """ONNX Runtime's provider list for a provider name, CPU as the fallback; clear errors if unavailable."""
    if provider not in PROVIDERS:
        raise SunEdgeError(f"unknown provider {provider!r}; valid providers: {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    wanted = PROVIDERS[provider]
    if wanted not in available:
        ours = {v: k for k, v in PROVIDERS.items()}
        names = ", ".join(f"{ours[p]} ({p})" if p in ours else p for p in available)
        raise SunEdgeError(f"provider {provider} ({wanted}) is not available in this onnxruntime {ort.__version__}; "
                           f"available: {names}")
    return [wanted] if wanted == PROVIDERS["cpu"] else [wanted, PROVIDERS["cpu"]]


def _declared(args: Sequence[Any]) -> tuple[TensorSpec, ...]:
    """What a session says its inputs or outputs are, as manifest specs (free dimensions -1)."""
    return tuple(TensorSpec(a.name, _ORT_DTYPES.get(a.type, a.type), tuple(d if isinstance(d, int) else -1 for d in a.shape))
                 for a in args)




class OnnxRuntime(GraphRuntime):
    """Runtime protocol (``encode_text``, ``unet``, ``unet_plain``, ``decode``, ``encode``) over an ONNX bundle.

    ``vae_decoder``: what ``decode`` runs, ``full`` (the model's VAE) or ``tiny`` (the bundle's TAESD
    graph, ``vae_decoder_tiny``); ``decode_full`` and ``decode_tiny`` run either.
    """

    name = "onnxruntime"
    TARGETS = ("onnx",)

    def __init__(self, bundle: Bundle, provider: str = "cpu", vae_decoder: Decoder = "full") -> None:
        self._open_bundle(bundle)
        self.provider = provider
        self._providers = execution_providers(provider)  # before any session: a bad name fails at once
        self._sessions: dict[str, ort.InferenceSession] = {}
        self.info = self.manifest_info(provider=self.provider)
        self.use_decoder(vae_decoder)

    @classmethod
    def open(cls, path: Path | str, provider: str = "cpu", vae_decoder: Decoder = "full") -> OnnxRuntime:
        """Open and check a bundle directory (sessions are created on first use)."""
        return cls(open_bundle(path), provider, vae_decoder)

    def session(self, component: str) -> ort.InferenceSession:
        """The component's session, created on first use; its declared I/O must match the manifest."""
        if component in self._sessions:
            return self._sessions[component]
        path = self.bundle.file(component)
        self.make_room(component, self._sessions)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: node placement notes are not the user's concern
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=self._providers)
        except Exception as e:  # onnxruntime raises its own pybind exception types
            raise SunEdgeError(f"cannot load {path} with onnxruntime ({self.provider}): {first_line(e)}") from e
        self.check_declared(component, _declared(session.get_inputs()), _declared(session.get_outputs()))
        self._sessions[component] = session
        return session

    def release(self, component: str) -> None:
        """Drop the component's session (and its weights and memory arena); the next call opens it again."""
        if self._sessions.pop(component, None) is not None:
            return_freed_memory()

    def run(self, component: str, *arrays: np.ndarray) -> np.ndarray:
        """Check ``arrays`` against the component's inputs (in manifest order), run it, return its first output."""
        return self.run_outputs(component, *arrays)[0]

    def run_outputs(self, component: str, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """As ``run``, returning every output in manifest order."""
        comp = self._component(component)
        feeds = {}
        for spec, array in zip(comp.inputs, arrays, strict=True):
            shape = [None if d < 0 else d for d in spec.shape]
            feeds[spec.name] = check_input(f"{component} input {spec.name}", array, shape, np.dtype(spec.dtype))
        session = self.session(component)
        try:
            return tuple(session.run([o.name for o in comp.outputs], feeds))
        except Exception as e:
            raise SunEdgeError(f"onnxruntime failed running {comp.file}: {first_line(e)}") from e
