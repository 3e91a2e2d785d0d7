"""Triton Inference Server (issue 18): ``export --target triton`` on pocket-base, the configs read by Triton's
own ``ModelConfig`` protobuf, the python model's batching and per-request errors (through a stand-in for
``triton_python_backend_utils``), then the real tritonserver of the ``nvidia-pytriton`` wheel on loopback
ports: concurrent requests over HTTP and gRPC give the images ``sun-edge generate`` gives, Triton's
statistics show them batched, bad requests get Triton errors while the server keeps serving, and
``sun-edge serve --triton`` answers the ``webuiapi`` client.

What cannot run here (no GPU, no TensorRT, no NGC container): the NVIDIA variants are generated and
their configs parsed, not served.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
tritonclient = pytest.importorskip("tritonclient", reason="the triton extra is not installed: pip install -e '.[triton]'")

from sun_edge.cli import main  # noqa: E402
from sun_edge.errors import SunEdgeError  # noqa: E402

PROMPT, NEGATIVE = "a red circle on a blue background", "green"
MAX_BATCH = 4


def parse_config(path: Path):
    """``config.pbtxt`` through Triton's own ModelConfig message (tritonclient's generated protobuf)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def config_json(path: Path) -> str:
    """The config as Triton hands it to a python model's ``initialize`` (JSON, proto field names)."""
    from google.protobuf import json_format

    return json.dumps(json_format.MessageToDict(parse_config(path), preserving_proto_field_name=True))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """pocket-base as a Triton repository (ONNX bundle inside, batch range 1..4), through the CLI."""
    out = tmp_path_factory.mktemp("triton") / "repo"
    assert main(["export", "--target", "triton", "--model", "pocket-base", "--max-batch", str(MAX_BATCH),
                 "--queue-delay-us", "400000", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def bundle(repo) -> Path:
    return repo / "sun_edge" / "1" / "bundle"


@pytest.fixture(scope="module")
def generated(tmp_path_factory, bundle):
    """``sun-edge generate --bundle`` for seeds 0-9: (pixels, A1111 parameters text) by seed."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("triton-generate")
    seeds = [str(s) for s in range(10)]
    assert main(["generate", "--bundle", str(bundle), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                 "--seed", *seeds, "-o", str(folder / "g.png")]) == 0
    out = {}
    for s in range(10):
        with Image.open(folder / f"g-s{s}.png") as image:
            out[s] = (np.asarray(image.convert("RGB")), image.text["parameters"])
    return out


def same_image(got: np.ndarray, want: np.ndarray) -> bool:
    """Within one 8-bit level: a batched UNet call's GEMM blocking may move a pixel by one (tests/test_batch.py)."""
    return got.shape == want.shape and int(np.abs(got.astype(int) - want.astype(int)).max()) <= 1


# --- the repository and its configs


def test_the_repository_is_a_triton_python_model_with_batching(repo, bundle):
    from sun_edge.bundle import open_bundle

    config = parse_config(repo / "sun_edge" / "config.pbtxt")
    from tritonclient.grpc import model_config_pb2 as pb

    assert config.name == "sun_edge" and config.backend == "python" and config.max_batch_size == MAX_BATCH
    inputs = {i.name: i for i in config.input}
    assert list(inputs) == ["prompt", "negative_prompt", "seed", "steps", "mode", "scheduler", "guidance"]
    assert inputs["prompt"].data_type == pb.TYPE_STRING and not inputs["prompt"].optional
    assert inputs["negative_prompt"].data_type == pb.TYPE_STRING and inputs["negative_prompt"].optional
    assert inputs["seed"].data_type == pb.TYPE_UINT64 and inputs["steps"].data_type == pb.TYPE_INT32
    assert all(i.optional for name, i in inputs.items() if name != "prompt")
    outputs = {o.name: o for o in config.output}
    assert outputs["image"].data_type == pb.TYPE_UINT8 and list(outputs["image"].dims) == [64, 64, 3]
    assert outputs["parameters"].data_type == pb.TYPE_STRING
    assert config.dynamic_batching.max_queue_delay_microseconds == 400000
    assert list(config.dynamic_batching.preferred_batch_size) == [MAX_BATCH]
    (group,) = config.instance_group
    assert group.kind == pb.ModelInstanceGroup.KIND_CPU and group.count == 1
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["runtime"] == "onnxruntime" and params["provider"] == "cpu" and params["bundle"] == "bundle"
    manifest = open_bundle(bundle).manifest
    assert json.loads(params["sun_edge_manifest"])["batch"] == {"min": 1, "max": MAX_BATCH} == manifest.batch
    assert manifest.target == "onnx" and manifest.model["name"] == "pocket-base"
    assert (repo / "sun_edge" / "1" / "model.py").read_text().count("from sun_edge.export.triton_model import") == 1
    assert json.loads((repo / "sun_edge_repository.json").read_text())["format"] == "sun-edge-triton-repository"


def test_nvidia_variants_are_generated_and_parse(repo, bundle, tmp_path):
    """KIND_GPU around the ONNX bundle (CUDA provider), and around a TensorRT bundle (the TensorRT runtime in the
    python model). Not served here: no GPU, no TensorRT."""
    from tritonclient.grpc import model_config_pb2 as pb

    from sun_edge.export.tensorrt import mark_tensorrt

    gpu = tmp_path / "gpu"
    assert main(["export", "--target", "triton", "--bundle", str(bundle), "--instance-kind", "gpu", "--gpus", "0,1",
                 "--instances", "2", "-o", str(gpu)]) == 0
    config = parse_config(gpu / "sun_edge" / "config.pbtxt")
    (group,) = config.instance_group
    assert group.kind == pb.ModelInstanceGroup.KIND_GPU and group.count == 2 and list(group.gpus) == [0, 1]
    assert config.parameters["provider"].string_value == "cuda" and config.max_batch_size == MAX_BATCH

    trt_bundle = tmp_path / "trt-bundle"
    shutil.copytree(bundle, trt_bundle)
    mark_tensorrt(trt_bundle)
    trt = tmp_path / "trt"
    assert main(["export", "--target", "triton", "--bundle", str(trt_bundle), "--model-name", "sun_edge_trt",
                 "-o", str(trt)]) == 0
    config = parse_config(trt / "sun_edge_trt" / "config.pbtxt")
    assert config.name == "sun_edge_trt" and config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert config.parameters["runtime"].string_value == "tensorrt" and "provider" not in config.parameters
    assert json.loads(config.parameters["sun_edge_manifest"].string_value)["target"] == "tensorrt"
    with pytest.raises(SunEdgeError, match="^a TensorRT bundle runs on NVIDIA GPUs"):
        from sun_edge.export.triton import TritonOptions, export_from_bundle

        export_from_bundle(trt_bundle, tmp_path / "cpu-trt", TritonOptions(instance_kind="cpu"))
    assert not (tmp_path / "cpu-trt").exists()


def test_export_refuses_what_does_not_apply(repo, bundle, tmp_path, capsys):
    cases = [
        (["--bundle", str(bundle), "--max-batch", "2"], "error: --max-batch applies when exporting --model"),
        (["--bundle", str(bundle), "--instance-kind", "cpu", "--gpus", "0"], "error: --gpus applies to --instance-kind gpu"),
        (["--bundle", str(bundle), "--instance-kind", "gpu", "--gpus", "0,x"], "error: --gpus '0,x': give GPU numbers"),
        (["--bundle", str(bundle), "--instances", "0"], "error: --instances 0 is outside [1, 64]"),
        (["--bundle", str(bundle), "--attention", "original"], "error: --attention applies to --target coreml only"),
    ]
    for extra, message in cases:
        assert main(["export", "--target", "triton", *extra, "-o", str(tmp_path / "r")]) == 2
        assert capsys.readouterr().err.splitlines()[-1].startswith(message), extra
    assert not (tmp_path / "r").exists()
    assert main(["export", "--target", "triton", "--bundle", str(bundle), "-o", str(repo)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not sun-edge's")
    assert main(["export", "--target", "triton", "--bundle", str(bundle), "--force", "-o", str(tmp_path / "mine")]) == 2
    assert "is not a model repository sun-edge wrote" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not sun-edge's"


# --- the python model, with a stand-in for triton_python_backend_utils


class FakePbUtils:
    """What the model uses of ``triton_python_backend_utils``."""

    class TritonError:
        INVALID_ARG = 3

        def __init__(self, message: str, code: int | None = None) -> None:
            self.message, self.code = message, code

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self.name, self.array = name, array

        def as_numpy(self) -> np.ndarray:
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors: list, error=None) -> None:
            self.outputs, self.error = {t.name: t.array for t in output_tensors}, error

    @staticmethod
    def get_input_tensor_by_name(request: dict, name: str):
        return FakePbUtils.Tensor(name, request[name]) if name in request else None


def text(*values) -> np.ndarray:
    return np.array([[v if isinstance(v, bytes) else v.encode()] for v in values], dtype=object)  # [n, 1]


@pytest.fixture(scope="module")
def python_model(repo):
    sys.modules["triton_python_backend_utils"] = FakePbUtils  # type: ignore[assignment]
    try:
        from sun_edge.export.triton_model import TritonPythonModel

        model = TritonPythonModel()
        model.initialize({"model_config": config_json(repo / "sun_edge" / "config.pbtxt"),
                          "model_repository": str(repo / "sun_edge"), "model_version": "1",
                          "model_instance_kind": "CPU", "model_instance_device_id": "0"})
        yield model
    finally:
        sys.modules.pop("triton_python_backend_utils", None)


def test_execute_batches_every_good_request_into_one_generate_batch(python_model, generated):
    calls = []
    real = python_model.pipeline.generate_batch

    def spy(jobs, **kw):
        calls.append([job.seed for job in jobs])
        return real(jobs, **kw)

    python_model.pipeline.generate_batch = spy
    try:
        requests = [
            {"prompt": text(PROMPT), "negative_prompt": text(NEGATIVE), "seed": np.array([[3]], np.uint64)},
            {"prompt": text(PROMPT), "steps": np.array([[5000]], np.int32)},  # out of range
            {"negative_prompt": text(NEGATIVE)},  # no prompt
            {"prompt": text(PROMPT, PROMPT), "negative_prompt": text(NEGATIVE),  # two rows, one request
             "seed": np.array([[4], [5]], np.uint64), "steps": np.array([[4]], np.int32)},
            {"prompt": text(b"\xff\xfe"), "seed": np.array([[1]], np.uint64)},  # not UTF-8
            {"prompt": text(PROMPT), "mode": text("cfg")},  # no CFG baseline in this bundle
        ]
        responses = python_model.execute(requests)
    finally:
        python_model.pipeline.generate_batch = real
    assert calls == [[3, 4, 5]]  # one call for every good request; bad ones never reach it
    assert len(responses) == len(requests)
    errors = {i: r.error for i, r in enumerate(responses) if r.error is not None}
    assert sorted(errors) == [1, 2, 4, 5] and all(e.code == FakePbUtils.TritonError.INVALID_ARG for e in errors.values())
    assert errors[1].message == "steps 5000 is outside [1, 50] (this model's max_steps parameter)"
    assert errors[2].message.startswith("input 'prompt' is missing")
    assert "not valid UTF-8" in errors[4].message and "mode 'cfg' is not served" in errors[5].message
    assert responses[0].outputs["image"].shape == (1, 64, 64, 3) and responses[3].outputs["image"].shape == (2, 64, 64, 3)
    got = {3: responses[0], 4: responses[3], 5: responses[3]}
    for seed, response in got.items():
        row = 0 if seed != 5 else 1
        assert same_image(response.outputs["image"][row], generated[seed][0]), seed
        assert response.outputs["parameters"][row, 0].decode() == generated[seed][1]
        info = json.loads(response.outputs["info"][row, 0])
        assert info["batch"] == 3 and info["seed"] == seed and info["unet_calls"] == 4


# --- the real tritonserver (nvidia-pytriton's), one per module


@pytest.fixture(scope="module")
def triton(repo, tmp_path_factory):
    pytest.importorskip("tritonclient.grpc")
    from sun_edge.triton_server import find_install, start_local_triton

    try:
        find_install()
    except SunEdgeError as e:
        pytest.skip(str(e))
    folder = tmp_path_factory.mktemp("tritonserver")
    server = start_local_triton(repo, log_path=folder / "triton.log", backend_dir=folder / "backends", wait=300)
    try:
        yield server
    finally:
        server.stop()


def http_inputs(http, prompt=PROMPT, negative=NEGATIVE, seed=0, steps=None, seed_dtype=np.uint64):
    values = {"prompt": text(prompt), "negative_prompt": text(negative), "seed": np.array([[seed]], seed_dtype)}
    if steps is not None:
        values["steps"] = np.array([[steps]], np.int32)
    kinds = {np.dtype(np.uint64): "UINT64", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32"}
    inputs = []
    for name, array in values.items():
        tensor = http.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else kinds[array.dtype])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def statistics(triton) -> tuple[int, int]:
    import tritonclient.http as http

    with http.InferenceServerClient(f"127.0.0.1:{triton.http_port}") as client:
        stats = client.get_inference_statistics("sun_edge")["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def counted_since(triton, before: tuple[int, int], inferences: int) -> tuple[int, int]:
    """(inferences, executions) since ``before``. Triton updates its statistics after it has sent the answers,
    so poll (bounded: 20 s) until the ``inferences`` just answered show."""
    import time

    deadline = time.monotonic() + 20
    while True:
        delta = tuple(a - b for a, b in zip(statistics(triton), before))
        if delta[0] >= inferences or time.monotonic() > deadline:
            return delta
        time.sleep(0.1)


def test_concurrent_http_requests_are_batched_and_equal_generate(triton, generated):
    import tritonclient.http as http

    before = statistics(triton)
    with http.InferenceServerClient(f"127.0.0.1:{triton.http_port}", concurrency=MAX_BATCH, network_timeout=300) as client:
        pending = {seed: client.async_infer("sun_edge", http_inputs(http, seed=seed)) for seed in range(MAX_BATCH)}
        results = {seed: p.get_result(timeout=300) for seed, p in pending.items()}
    for seed, result in results.items():
        assert same_image(result.as_numpy("image")[0], generated[seed][0]), seed
        assert result.as_numpy("parameters")[0, 0].decode() == generated[seed][1]
    inferences, executions = counted_since(triton, before, MAX_BATCH)
    assert inferences == MAX_BATCH and executions < inferences, (inferences, executions)


def test_concurrent_grpc_requests_through_the_servers_client_equal_generate(triton, generated):
    from sun_edge.pipeline import Job
    from sun_edge.settings import Settings
    from sun_edge_server.triton_source import TritonClient, TritonPipeline

    client = TritonClient(triton.grpc_url, "sun_edge", timeout_s=300)
    settings = Settings()  # pocket-base's SUN defaults: 4 DDIM steps, trailing
    seeds = [6, 7, 8, 9]
    before = statistics(triton)
    answers = client.infer_many([TritonPipeline.request(Job(PROMPT, NEGATIVE, s), settings) for s in seeds])
    for seed, answer in zip(seeds, answers):
        assert isinstance(answer, dict), answer
        assert same_image(answer["image"][0], generated[seed][0]), seed
        assert answer["parameters"][0, 0].decode() == generated[seed][1]
    inferences, executions = counted_since(triton, before, len(seeds))
    assert inferences == len(seeds) and executions < inferences, (inferences, executions)


def test_bad_requests_get_triton_errors_and_the_server_keeps_serving(triton, generated):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    with http.InferenceServerClient(f"127.0.0.1:{triton.http_port}", concurrency=3, network_timeout=300) as client:
        no_prompt = http_inputs(http, seed=1)[1:]
        wrong_dtype = http_inputs(http, seed=1, seed_dtype=np.float32)
        for inputs, words in ((no_prompt, "prompt"), (wrong_dtype, "seed")):
            with pytest.raises(InferenceServerException) as e:
                client.infer("sun_edge", inputs)
            assert words in e.value.message(), e.value.message()
        # out-of-range steps beside two good requests, in flight together: only it fails
        pending = [client.async_infer("sun_edge", http_inputs(http, seed=s, steps=st)) for s, st in ((1, 5000), (2, None), (0, 4))]
        with pytest.raises(InferenceServerException) as e:
            pending[0].get_result(timeout=300)
        assert "steps 5000 is outside [1, 50]" in e.value.message() and e.value.status() == "400"
        for seed, p in zip((2, 0), pending[1:]):
            assert same_image(p.get_result(timeout=300).as_numpy("image")[0], generated[seed][0])
        assert client.is_server_ready() and client.is_model_ready("sun_edge")


def test_serve_triton_answers_webuiapi(triton, generated, tmp_path):
    webuiapi = pytest.importorskip("webuiapi")
    from test_server_support import Server

    server = Server(tmp_path / "serve.log", "--triton", triton.http_url, "--batch-window-ms", "100")
    try:
        server.wait_ready(timeout=120)
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=4, width=64, height=64, steps=4,
                             sampler_name="DDIM", batch_size=2, n_iter=1)
        assert len(result.images) == 2
        for image, seed in zip(result.images, (4, 5)):
            assert same_image(np.asarray(image.convert("RGB")), generated[seed][0]), seed
        assert result.info["infotexts"] == [generated[4][1], generated[5][1]]
        assert result.info["sd_model_name"] == "pocket-base"
        status, info = server.json("GET", "/v1/info")
        assert status == 200 and "triton" in json.dumps(info)
    finally:
        assert server.terminate() == 0, server.log()


def test_triton_command_checks_its_repository_and_prints_the_ngc_command(tmp_path, capsys):
    from sun_edge.triton_server import NGC_IMAGE, ngc_command, server_env, find_install

    assert main(["triton", "--repo", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().endswith("is not a folder; write one with sun-edge export --target triton")
    (tmp_path / "empty").mkdir()
    assert main(["triton", "--repo", str(tmp_path / "empty")]) == 2
    assert "holds no model (no */config.pbtxt)" in capsys.readouterr().err
    assert main(["triton", "--repo", str(tmp_path), "--http-port", "70000"]) == 2
    assert "--http-port 70000 is outside [0, 65535]" in capsys.readouterr().err
    command = ngc_command(tmp_path, http_port=9000)
    assert NGC_IMAGE == "nvcr.io/nvidia/tritonserver:24.10-py3" and NGC_IMAGE in command
    assert f"{tmp_path.resolve()}:/models" in command and "-p 9000:8000" in command and "numpy<2" in command
    try:
        install = find_install()
    except SunEdgeError:
        pytest.skip("nvidia-pytriton is not installed")
    env = server_env(install, {"LD_LIBRARY_PATH": "/x"}, stub_numpy=tmp_path / "np1")
    import sysconfig

    paths = env["LD_LIBRARY_PATH"].split(":")
    assert paths[0] == sysconfig.get_config_var("LIBDIR") and paths[-1] == "/x"  # this Python's libpython first
    assert str(install.libs) in paths and install.libs.is_dir()


def test_serve_triton_flags_are_checked_before_anything_starts(tmp_path, capsys):
    pytest.importorskip("fastapi")
    assert main(["serve", "--triton", "ftp://host:1"]) == 2
    assert "give http://HOST:PORT" in capsys.readouterr().err
    assert main(["serve", "--triton", "http://127.0.0.1:8000", "--bundle", str(tmp_path)]) == 2
    assert "--triton serves the bundle in Triton's model repository" in capsys.readouterr().err
