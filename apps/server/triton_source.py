"""``sun-edge serve --triton URL``: the server's ``Source`` backed by a Triton model (``export --target triton``).

The APIs, the page, limits, auth and the engine's queue stay as they are; what changes is who makes
the images. ``TritonPipeline.generate_batch`` (the one method the engine calls) sends each job of a
batch to Triton as its own request, all at once (tritonclient, HTTP or gRPC), so Triton's dynamic
batcher gathers them (with those of every other client) and spreads batches over its instances and
GPUs. Each answer carries the image, the A1111 parameters text and the fields the pipeline recorded,
so responses are those of a local bundle. The bundle's manifest comes from the model's config
(parameter ``sun_edge_manifest``), so requests are validated here exactly as for a local bundle.

Progress is reported once (at the start: Triton does not stream steps), so /sdapi/v1/interrupt and
cancelled requests stop nothing that Triton already runs; their answers are dropped.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np

from sun_edge.errors import SunEdgeError
from sun_edge.pipeline import Generated, Job
from sun_edge.settings import Settings

INSTALL = 'sun-edge serve --triton needs tritonclient: pip install "sun-edge[triton]"'
OUTPUTS = ("image", "parameters", "info")


@dataclass
class RemoteGenerated(Generated):
    """A ``Generated`` made by Triton: its A1111 text is the one the model wrote."""

    remote_parameters: str = ""

    @property
    def parameters(self) -> str:  # type: ignore[override]
        return self.remote_parameters


def parse_url(url: str) -> tuple[str, str]:
    """``http://host:port`` or ``grpc://host:port`` (``host:port``: HTTP) -> (protocol, host:port)."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "grpc") or not parsed.hostname or parsed.port is None or parsed.path not in ("", "/"):
        raise SunEdgeError(f"--triton {url!r}: give http://HOST:PORT (Triton's HTTP port, 8000) or grpc://HOST:PORT (8001)")
    return parsed.scheme, f"{parsed.hostname}:{parsed.port}"


class TritonClient:
    """One tritonclient (HTTP or gRPC) to one model; ``infer_many`` sends requests concurrently."""

    def __init__(self, url: str, model: str, *, timeout_s: float = 600.0, concurrency: int = 8) -> None:
        self.protocol, self.address = parse_url(url)
        self.url, self.model, self.timeout_s = url, model, timeout_s
        try:
            if self.protocol == "http":
                import tritonclient.http as tc

                self.client = tc.InferenceServerClient(self.address, concurrency=max(1, concurrency),
                                                       connection_timeout=timeout_s, network_timeout=timeout_s)
            else:
                import tritonclient.grpc as tc

                self.client = tc.InferenceServerClient(self.address)
        except ImportError as e:
            raise SunEdgeError(f"{INSTALL} ({e.name} is missing)") from e
        self.tc = tc
        from tritonclient.utils import InferenceServerException

        self.error_type = InferenceServerException

    def config(self) -> dict[str, Any]:
        """The model's configuration (JSON form); one line if Triton or the model is not there."""
        try:
            if not self.client.is_model_ready(self.model):
                raise SunEdgeError(f"Triton at {self.url} has no ready model {self.model!r}; check its log, or pass "
                                   "--triton-model NAME")
            if self.protocol == "http":
                return dict(self.client.get_model_config(self.model))
            return dict(self.client.get_model_config(self.model, as_json=True)["config"])
        except self.error_type as e:
            raise SunEdgeError(f"Triton at {self.url}: {e.message()}") from None
        except OSError as e:
            raise SunEdgeError(f"cannot reach Triton at {self.url} ({e}); start it (sun-edge triton --repo REPO) or "
                               "fix --triton") from None

    def _inputs(self, values: dict[str, np.ndarray]) -> list[Any]:
        inputs = []
        for name, array in values.items():
            kind = "BYTES" if array.dtype == object else {"uint64": "UINT64", "int32": "INT32", "float32": "FP32"}[array.dtype.name]
            tensor = self.tc.InferInput(name, list(array.shape), kind)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    def infer_many(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | str]:
        """Send every request at once; each answer is its outputs, or Triton's one-line error."""
        if self.protocol == "http":
            outputs = [self.tc.InferRequestedOutput(n, binary_data=True) for n in OUTPUTS]
            pending = [self.client.async_infer(self.model, self._inputs(r), outputs=outputs) for r in requests]
            answers: list[dict[str, np.ndarray] | str] = []
            for p in pending:
                try:
                    result = p.get_result(timeout=self.timeout_s)
                    answers.append({n: result.as_numpy(n) for n in OUTPUTS})
                except self.error_type as e:
                    answers.append(str(e.message()))
            return answers
        outputs = [self.tc.InferRequestedOutput(n) for n in OUTPUTS]
        results: list[Any] = [None] * len(requests)
        done = threading.Semaphore(0)

        def callback(i: int, result: Any, error: Any) -> None:
            results[i] = error if error is not None else {n: result.as_numpy(n) for n in OUTPUTS}
            done.release()

        for i, r in enumerate(requests):
            self.client.async_infer(self.model, self._inputs(r), functools.partial(callback, i), outputs=outputs,
                                    client_timeout=self.timeout_s)  # called as callback(result=..., error=...)
        for _ in requests:
            if not done.acquire(timeout=self.timeout_s + 5):
                raise SunEdgeError(f"Triton at {self.url} did not answer within {self.timeout_s:g} s")
        return [r if isinstance(r, dict) else str(r.message()) for r in results]


class RemoteRuntime:
    """What the server asks of a runtime (name, info, max_batch, has), for a model Triton runs."""

    name = "triton"

    def __init__(self, manifest: Any, max_batch: int, url: str) -> None:
        self.manifest, self.max_batch = manifest, max_batch
        model, adapter = manifest.model or {}, manifest.adapter or {}
        self.info = {"model": model.get("name"), "model_sha256": model.get("sha256"), "adapter": adapter.get("name"),
                     "adapter_sha256": adapter.get("sha256"), "triton": url}

    def has(self, component: str) -> bool:
        """The components the Triton model uses: text to image (so the APIs refuse edits before queueing them)."""
        return component in self.manifest.components and component not in ("vae_encoder", "controlnet")


class TritonPipeline:
    """``generate_batch`` through Triton: one request per job, all in flight at once."""

    def __init__(self, client: TritonClient, runtime: RemoteRuntime, tokenizer: Any) -> None:
        self.client, self.runtime, self.tokenizer = client, runtime, tokenizer

    def warm_up(self, settings: Settings) -> None:
        """Nothing to warm here: the model warmed itself up when Triton loaded it."""

    @staticmethod
    def request(job: Job, settings: Settings) -> dict[str, np.ndarray]:
        def text(value: str) -> np.ndarray:
            return np.array([[value.encode("utf-8")]], dtype=object)  # [1, 1]

        return {"prompt": text(job.prompt), "negative_prompt": text(job.negative_prompt),
                "seed": np.array([[job.seed]], dtype=np.uint64), "steps": np.array([[settings.steps]], dtype=np.int32),
                "mode": text(settings.mode), "scheduler": text(settings.scheduler),
                "guidance": np.array([[settings.guidance]], dtype=np.float32)}

    def generate_batch(self, jobs: list[Job], *, settings: Settings, progress: Any = None,
                       max_batch: int = 1) -> list[Generated]:
        if settings.spacing != (self.runtime.manifest.scheduler if settings.mode == "sun" else
                                self.runtime.manifest.baseline).get("spacing", settings.spacing):
            raise SunEdgeError("the Triton model samples with its bundle's spacing; ask for no other")
        for job in jobs:  # the Triton model makes images from text (img2img, inpainting, ControlNet: not yet)
            if any(getattr(job, f, None) is not None for f in ("init_image", "mask", "control_image")):
                raise SunEdgeError("this server forwards to Triton, whose sun-edge model makes images from text only; "
                                   "send txt2img requests, or serve the bundle directly for img2img")
        if progress is not None:
            progress(0, len(jobs) * settings.steps)
        answers = self.client.infer_many([self.request(job, settings) for job in jobs])
        results: list[Generated] = []
        for job, answer in zip(jobs, answers):
            if isinstance(answer, str):
                raise SunEdgeError(f"Triton: {answer}")
            info = json.loads(answer["info"][0, 0])
            from PIL import Image

            image = Image.fromarray(np.ascontiguousarray(answer["image"][0]), "RGB")
            results.append(RemoteGenerated(image, job.seed, job.prompt, job.negative_prompt, settings, info["seconds"],
                                           info["unet_calls"], info["unet_seconds"], info["fields"], info["batch"],
                                           remote_parameters=answer["parameters"][0, 0].decode("utf-8")))
        return results


def open_triton_source(url: str, model: str = "sun_edge", *, timeout_s: float = 600.0, concurrency: int = 8) -> Any:
    """The server's ``Source`` for a Triton model: its manifest, sizes and modes from the model's config."""
    from sun_edge.bundle import Manifest
    from sun_edge.tokenizer import CLIPTokenizer
    from sun_edge_server.source import Source

    client = TritonClient(url, model, timeout_s=timeout_s, concurrency=concurrency)
    config = client.config()
    params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
    if "sun_edge_manifest" not in params:
        raise SunEdgeError(f"Triton model {model!r} is not a sun-edge pipeline model (no sun_edge_manifest parameter); "
                           "serve a repository written by sun-edge export --target triton")
    manifest = Manifest.from_dict(json.loads(params["sun_edge_manifest"]), f"the config of Triton model {model!r}")
    groups = config.get("instance_group") or [{}]
    instances = sum(int(g.get("count", 1)) * max(1, len(g.get("gpus") or [])) for g in groups)
    runtime = RemoteRuntime(manifest, max(1, int(config.get("max_batch_size", 1))) * max(1, instances), url)
    size = (int(manifest.image["height"]), int(manifest.image["width"]))
    description = {"triton": url, "triton_model": model, "target": manifest.target, "precision": manifest.precision,
                   "runtime": params.get("runtime", "?")}
    tokenizer = CLIPTokenizer.default()  # for the truncation warnings: bundles carry SD1.5's CLIP vocabulary
    return Source(TritonPipeline(client, runtime, tokenizer), str(manifest.model.get("name") or model), description,
                  size, (size[0], size[0]), size[0], manifest, device="triton")
