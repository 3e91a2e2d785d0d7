"""The Triton python-backend model of a sun-edge repository: ``sun_edge.Pipeline`` on the bundle's runtime.

A repository's ``sun_edge/1/model.py`` imports ``TritonPythonModel`` from here (``sun_edge.export.triton``
writes it). Each model instance is its own stub process: ``initialize`` opens the bundle in the version
folder with the runtime its config names (ONNX Runtime on the CPU, TensorRT on instance's GPU), and
``execute`` gets every request Triton's dynamic batcher gathered:

- each request is read into ``Job``s (one per row: a request may carry several prompts) and its
  ``Settings`` (mode, steps, scheduler, guidance; the bundle's defaults for what it leaves out); a
  request that is wrong (no prompt, text that is not UTF-8, steps out of range, an unknown mode) gets
  its own ``TritonError`` response and is left out;
- the rest are grouped by settings, and each group is ONE ``Pipeline.generate_batch`` call: its jobs
  share every UNet call (batches are independent: image k is the one its seed gives alone), so Triton's
  dynamic batching really batches UNet calls;
- every response carries ``image`` (uint8 [n, H, W, 3]), ``parameters`` (the A1111 text ``sun-edge
  generate`` writes into the PNG) and ``info`` (JSON: the fields, seconds, UNet calls, batch size).

``triton_python_backend_utils`` is imported in ``initialize`` (it exists only inside the stub; tests
pass a stand-in). NumPy core only: no PyTorch.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from sun_edge.errors import SunEdgeError
from sun_edge.settings import Settings

# the inputs (name, Triton type, optional) and outputs of the model; export/triton.py writes them into config.pbtxt
INPUTS: tuple[tuple[str, str, bool], ...] = (
    ("prompt", "TYPE_STRING", False),
    ("negative_prompt", "TYPE_STRING", True),
    ("seed", "TYPE_UINT64", True),
    ("steps", "TYPE_INT32", True),
    ("mode", "TYPE_STRING", True),
    ("scheduler", "TYPE_STRING", True),
    ("guidance", "TYPE_FP32", True),
)
OUTPUTS: tuple[tuple[str, str], ...] = (("image", "TYPE_UINT8"), ("parameters", "TYPE_STRING"), ("info", "TYPE_STRING"))
DEFAULT_GUIDANCE = 8.0  # sun-edge generate's --guidance default (SUN ignores it)


def _text(value: Any, what: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SunEdgeError(f"{what} is not valid UTF-8 (byte {e.start}); send text encoded as UTF-8") from None
    if isinstance(value, str):
        return value
    raise SunEdgeError(f"{what} must be text (TYPE_STRING), got {type(value).__name__}")


class RequestReader:
    """Reads one request's tensors (``get(name) -> np.ndarray | None``) into jobs and settings for a bundle."""

    def __init__(self, manifest: Any, modes: tuple[str, ...], max_steps: int) -> None:
        self.manifest, self.modes, self.max_steps = manifest, modes, max_steps

    def read(self, get: Any) -> tuple[list[Any], Settings]:
        from sun_edge.pipeline import Job
        from sun_edge.settings import check_seeds, check_text

        prompts = get("prompt")
        if prompts is None:
            raise SunEdgeError("input 'prompt' is missing; send the prompt as a TYPE_STRING tensor of shape [n, 1]")
        n = int(prompts.shape[0]) if prompts.ndim else 1

        def column(name: str, default: Any) -> list[Any]:
            array = get(name)
            if array is None:
                return [default] * n
            flat = array.reshape(array.shape[0] if array.ndim else 1, -1)
            if flat.shape[1] != 1 or flat.shape[0] not in (1, n):
                raise SunEdgeError(f"input {name!r} has shape {list(array.shape)}; send [{n}, 1] (one per prompt) or [1, 1]")
            values = [v for v in flat[:, 0]]
            return values * n if len(values) == 1 else values

        texts = [check_text(_text(p, "prompt"), "prompt") for p in column("prompt", "")]
        negatives = [check_text(_text(p, "negative_prompt"), "negative prompt") for p in column("negative_prompt", b"")]
        seeds = [int(s) for s in column("seed", 0)]
        check_seeds(seeds)
        shared = {}
        for name, default, kind in (("mode", b"sun", "text"), ("steps", None, "int"), ("scheduler", None, "text"),
                                    ("guidance", None, "float")):
            values = set(column(name, default))
            if len(values) > 1:
                raise SunEdgeError(f"input {name!r} differs between the rows of one request; send one request per value")
            value = values.pop()
            shared[name] = (None if value is None else _text(value, name) if kind == "text" else
                            int(value) if kind == "int" else float(value))
        mode = shared["mode"]
        if mode not in self.modes:
            raise SunEdgeError(f"mode {mode!r} is not served by this model; served: {', '.join(self.modes)}")
        steps = shared["steps"]
        if steps is not None and not 1 <= steps <= self.max_steps:
            raise SunEdgeError(f"steps {steps} is outside [1, {self.max_steps}] (this model's max_steps parameter)")
        guidance = DEFAULT_GUIDANCE if shared["guidance"] is None or mode == "sun" else shared["guidance"]
        settings = Settings.from_manifest(self.manifest, mode, steps=steps, scheduler=shared["scheduler"],
                                          guidance=guidance, noise="torch")
        settings.validate()
        return [Job(t, neg, s) for t, neg, s in zip(texts, negatives, seeds)], settings


def outputs_of(results: list[Any]) -> dict[str, np.ndarray]:
    """The output tensors of one request from its ``Generated`` images."""
    images = np.stack([np.asarray(g.image.convert("RGB"), dtype=np.uint8) for g in results])  # [n, H, W, 3]
    parameters = np.array([[g.parameters.encode("utf-8")] for g in results], dtype=object)  # [n, 1]
    info = np.array([[json.dumps({"fields": g.fields, "seed": g.seed, "seconds": g.seconds, "unet_calls": g.unet_calls,
                                  "unet_seconds": g.unet_seconds, "batch": g.batch}).encode("utf-8")]
                     for g in results], dtype=object)  # [n, 1]
    return {"image": images, "parameters": parameters, "info": info}


class Failed(str):
    """A request's one-line error; ``invalid``: the request itself is wrong (a client error), else generation failed."""

    invalid = True


class GenerationFailed(Failed):
    invalid = False


def run_requests(pipeline: Any, reader: RequestReader, getters: list[Any]) -> list[dict[str, np.ndarray] | Failed]:
    """Each request's outputs, or its one-line error. Requests with the same settings share one ``generate_batch``."""
    answers: list[dict[str, np.ndarray] | Failed | None] = [None] * len(getters)
    groups: dict[Settings, list[tuple[int, list[Any]]]] = {}
    for i, get in enumerate(getters):
        try:
            jobs, settings = reader.read(get)
        except SunEdgeError as e:
            answers[i] = Failed(e)
            continue
        groups.setdefault(settings, []).append((i, jobs))
    for settings, members in groups.items():
        jobs = [job for _, js in members for job in js]
        try:
            results = pipeline.generate_batch(jobs, settings=settings, max_batch=len(jobs))
        except SunEdgeError as e:
            for i, _ in members:
                answers[i] = GenerationFailed(e)
            continue
        first = 0
        for i, js in members:
            answers[i] = outputs_of(results[first:first + len(js)])
            first += len(js)
    return [a if a is not None else GenerationFailed("internal error: no answer") for a in answers]


class TritonPythonModel:
    """Triton's python-backend interface (``initialize``, ``execute``, ``finalize``)."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        from sun_edge.bundle import open_bundle
        from sun_edge.pipeline import Pipeline

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in (config.get("parameters") or {}).items()}
        folder = Path(args["model_repository"]) / str(args["model_version"]) / params.get("bundle", "bundle")
        runtime_name = params.get("runtime", "onnxruntime")
        options: dict[str, Any] = {}
        if args.get("model_instance_kind") == "GPU":  # one stub process per instance: pin it to its GPU
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args.get("model_instance_device_id", "0"))
        if runtime_name == "onnxruntime":
            options["provider"] = params.get("provider", "cpu")
        from sun_edge.runtimes import open_bundle_runtime

        bundle = open_bundle(folder)
        runtime = open_bundle_runtime(bundle, runtime_name, **options)
        self.pipeline = Pipeline(runtime, runtime.tokenizer())
        modes = tuple(m for m, c in (("sun", "unet"), ("cfg", "unet_plain")) if runtime.has(c))
        self.reader = RequestReader(bundle.manifest, modes, int(params.get("max_steps", "50")))
        if params.get("warm_up", "true") == "true" and modes:
            self.pipeline.warm_up(replace(Settings.from_manifest(bundle.manifest, modes[0]), steps=1))

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb

        def getter(request: Any) -> Any:
            def get(name: str) -> np.ndarray | None:
                tensor = pb.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy()
            return get

        answers = run_requests(self.pipeline, self.reader, [getter(r) for r in requests])
        invalid = getattr(pb.TritonError, "INVALID_ARG", None)  # 400 over HTTP (Triton >= 23.05), else 500

        def error(failed: Failed) -> Any:
            return pb.TritonError(str(failed), invalid) if failed.invalid and invalid is not None else pb.TritonError(str(failed))

        return [pb.InferenceResponse(output_tensors=[], error=error(a)) if isinstance(a, str) else
                pb.InferenceResponse(output_tensors=[pb.Tensor(k, v) for k, v in a.items()]) for a in answers]

    def finalize(self) -> None:
        self.pipeline = None
