"""Parity between runtimes, without ONNX: the PyTorch reference against copies, lower precision, wrappers."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from sun_edge import bundle_parity, parity
from sun_edge.adapter import SUNAdapter
from sun_edge.errors import SunEdgeError
from sun_edge.export.targets import ONNX_FP16, ONNX_FP32
from sun_edge.parity import (
    COMPONENTS,
    check_report,
    compare_runtimes,
    max_abs,
    psnr,
    threshold,
)
from sun_edge.bundle_parity import export_parity
from sun_edge.components import COMPONENTS as TABLE
from sun_edge.pipeline import Settings
from sun_edge.runtimes.pytorch import TorchRuntime
from sun_edge.weights import sha256_file

SMALL = Settings(height=64, width=64)


def make_runtime(tiny: dict[str, Any], dtype: torch.dtype = torch.float32, **kwargs: Any) -> TorchRuntime:
    parts = copy.deepcopy(tiny)
    adapter = SUNAdapter.from_unet(parts["unet"]).randomize_(7)
    return TorchRuntime(parts["unet"], parts["text_encoder"], parts["vae"], adapter, dtype=dtype, **kwargs)


@pytest.fixture(scope="module")
def reference(tiny):
    return make_runtime(tiny)


@pytest.fixture(scope="module")
def same(tiny):
    return make_runtime(tiny)


class Wrapped:
    """A runtime seen through overrides; names in ``hide`` look absent."""

    def __init__(self, runtime: Any, hide: tuple[str, ...] = (), **overrides: Any) -> None:
        self._runtime, self._hide = runtime, hide
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        if name in self._hide:
            raise AttributeError(name)
        return getattr(self._runtime, name)

    def has(self, component: str) -> bool:  # a hidden method hides its component
        return TABLE[component].method not in self._hide and self._runtime.has(component)


def noisy(fn, db: float, seed: int = 0):
    """``fn`` with Gaussian noise added at ``db`` below the peak of each output (so PSNR ~ db)."""
    rng = np.random.default_rng(seed)

    def wrapped(*args):
        out = fn(*args)
        sigma = np.abs(out).max() * 10 ** (-db / 20)
        return (out + sigma * rng.standard_normal(out.shape)).astype(np.float32)
    return wrapped


class Recorder(Wrapped):
    """Records the inputs of every ``unet`` call."""

    def __init__(self, runtime: Any) -> None:
        super().__init__(runtime)
        self.calls: list[tuple[np.ndarray, ...]] = []

    def unet(self, latents, t, pos, neg):
        self.calls.append(tuple(np.array(a, copy=True) for a in (latents, t, pos, neg)))
        return self._runtime.unet(latents, t, pos, neg)


def test_psnr_against_a_hand_computation():
    ref = np.array([[1.0, -2.0], [3.0, -4.0]])
    out = ref + np.array([[0.1, 0.0], [0.0, -0.1]])
    rms = math.sqrt((0.1**2 + 0.1**2) / 4)
    assert psnr(ref, out) == pytest.approx(20 * math.log10(4.0 / rms))
    assert psnr(ref, out) == pytest.approx(35.051499783, abs=1e-6)
    assert max_abs(ref, out) == pytest.approx(0.1)
    assert psnr(ref, ref) == math.inf and max_abs(ref, ref) == 0.0
    assert math.isnan(psnr(ref, np.full_like(ref, np.nan)))
    assert psnr(np.zeros(3), np.ones(3)) == -math.inf
    with pytest.raises(SunEdgeError, match=r"shapes \[2, 2\] and \[4\]"):
        psnr(ref, ref.reshape(-1))


def test_thresholds():
    assert threshold("unet", "fp32") == 40.0 and threshold("unet", "fp16") == 35.0
    assert threshold("image", "fp16") == 30.0 and threshold("image", "fp32") > 30.0
    assert "vae_decoder_tiny" in COMPONENTS
    for component in COMPONENTS:
        assert getattr(ONNX_FP32, component) >= getattr(ONNX_FP16, component)
    with pytest.raises(SunEdgeError, match="unknown parity component 'vae'; valid components: text_encoder, unet"):
        threshold("vae", "fp32")
    with pytest.raises(SunEdgeError, match="no parity thresholds for onnx int8; defined: onnx fp32, onnx fp16"):
        threshold("unet", "int8")


def test_identical_runtimes_pass_with_infinite_psnr(reference, same):
    report = compare_runtimes(reference, same, precision="fp32", settings=SMALL, seeds=(0, 1))
    assert report.passed
    assert [r.component for r in report.rows] == ["text_encoder", "unet", "unet_plain", "vae_decoder", "vae_encoder", "image",
                                                  "image_img2img", "image_inpaint"]
    assert all(r.psnr_db == math.inf and r.max_abs == 0.0 for r in report.rows)
    assert report.row("unet").inputs == 8 and report.row("image").inputs == 2 and report.row("text_encoder").inputs == 2
    assert report.skipped == {"vae_decoder_tiny": "candidate has none"}
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))  # strict JSON: inf as a string
    assert data["passed"] is True and data["components"]["unet"]["psnr_db"] == "inf"
    assert data["inputs"]["timesteps"] == [999, 749, 499, 249] and data["inputs"]["seeds"] == [0, 1]
    assert data["inputs"]["prompt"] == parity.DEFAULT_PROMPT and data["inputs"]["steps"] == 4
    assert "reference's own SUN trajectory" in data["inputs"]["note"]
    table = report.table()
    assert table.splitlines()[0].split()[:3] == ["component", "PSNR", "dB"]
    assert "unet" in table and table.rstrip().endswith("PASS")


def test_half_precision_candidate_passes_fp16_thresholds(reference, tiny):
    report = compare_runtimes(reference, make_runtime(tiny, torch.float16), precision="fp16", settings=SMALL)
    assert report.passed, report.table()
    for row in report.rows:
        assert row.threshold_db + 10 < row.psnr_db < math.inf, row  # measurable, with margin
        assert row.passed


def test_perturbed_unet_fails_and_only_the_unet(reference, same):
    candidate = Wrapped(same, unet=noisy(same.unet, 30.0))
    report = compare_runtimes(reference, candidate, precision="fp32", settings=SMALL)
    assert not report.passed
    unet = report.row("unet")
    assert 27.0 < unet.psnr_db < 31.0 and not unet.passed
    assert [r.component for r in report.failures()] == ["unet", "image", "image_img2img", "image_inpaint"]  # made with it
    for name in ("text_encoder", "unet_plain", "vae_decoder", "vae_encoder"):
        assert report.row(name).psnr_db == math.inf
    assert report.table().rstrip().endswith("FAIL (unet, image, image_img2img, image_inpaint)")
    with pytest.raises(SunEdgeError, match=r"parity check failed: unet at 2\d\.\d\d dB is below its onnx fp32 threshold of 40 dB "
                                           r"\(worst input: seed 0, step \d \(t=\d+\)\)"):
        check_report(report)


def test_perturbed_vae_encoder_fails_alone(reference, same):
    candidate = Wrapped(same, encode=noisy(same.encode, 20.0))
    report = compare_runtimes(reference, candidate, precision="fp16", settings=SMALL)
    assert [r.component for r in report.failures()] == ["vae_encoder"]
    assert report.row("vae_encoder").psnr_db == pytest.approx(20.0, abs=1.5)


def test_unet_sees_the_sun_trajectory_and_both_sides_get_the_same_inputs(reference, same):
    ref, cand = Recorder(reference), Recorder(same)
    report = compare_runtimes(ref, cand, precision="fp32", settings=SMALL, components=["unet"])
    assert [r.component for r in report.rows] == ["unet"]
    assert len(ref.calls) == len(cand.calls) == 4
    assert [float(c[1][0]) for c in ref.calls] == [999.0, 749.0, 499.0, 249.0]
    for a, b in zip(ref.calls, cand.calls):
        for x, y in zip(a, b):
            assert x.dtype == y.dtype == np.float32
            np.testing.assert_array_equal(x, y)
    first, second = ref.calls[0][0], ref.calls[1][0]
    assert first.shape == (1, 4, 8, 8) and not np.array_equal(first, second)  # the latents move along the trajectory
    assert report.inputs["timesteps"] == [999, 749, 499, 249]
    ref.calls.clear(), cand.calls.clear()
    compare_runtimes(ref, cand, precision="fp32", settings=SMALL)
    # the candidate also makes its own image; both run img2img (2 of 4 steps) and inpainting (3 of 4)
    assert len(ref.calls) == 4 + 2 + 3 and len(cand.calls) == 8 + 2 + 3


def test_absent_components_are_skipped(reference, same):
    candidate = Wrapped(same, hide=("unet_plain", "encode"))
    report = compare_runtimes(reference, candidate, precision="fp32", settings=SMALL)
    assert "unet_plain" not in [r.component for r in report.rows]
    assert report.skipped["unet_plain"] == "candidate has none" and report.skipped["vae_encoder"] == "candidate has none"
    assert report.passed
    assert "skipped unet_plain: candidate has none" in report.table()


def test_tiny_decoder_compared_when_both_have_it(tiny):
    from test_tiny_decoder import small_taesd

    from sun_edge.taesd import TinyDecoder

    def with_tiny(dtype: torch.dtype) -> TorchRuntime:
        model = small_taesd(seed=5)
        return make_runtime(tiny, dtype, tiny_decoder=TinyDecoder(model.decoder, dict(model.config), "test"))

    report = compare_runtimes(with_tiny(torch.float32), with_tiny(torch.float16), precision="fp16", settings=SMALL,
                              components=["vae_decoder", "vae_decoder_tiny", "image"])
    assert [r.component for r in report.rows] == ["vae_decoder", "vae_decoder_tiny", "image"]
    assert report.passed and math.isfinite(report.row("vae_decoder_tiny").psnr_db)
    # the image row compares full-VAE images although decode() is TAESD on both sides
    plain = compare_runtimes(make_runtime(tiny), make_runtime(tiny, torch.float16), precision="fp16", settings=SMALL,
                             components=["image"])
    assert report.row("image").psnr_db == plain.row("image").psnr_db


def test_bad_arguments(reference, same):
    with pytest.raises(SunEdgeError, match="unknown parity component 'vae'"):
        compare_runtimes(reference, same, precision="fp32", settings=SMALL, components=["vae"])
    with pytest.raises(SunEdgeError, match="settings.mode must be 'sun'"):
        compare_runtimes(reference, same, precision="fp32", settings=Settings.baseline(height=64, width=64))
    with pytest.raises(SunEdgeError, match="pass at least one seed"):
        compare_runtimes(reference, same, precision="fp32", settings=SMALL, seeds=(), components=["unet"])
    no_adapter = Wrapped(reference, hide=("unet",))
    with pytest.raises(SunEdgeError, match="reference runtime pytorch has no SUN adapter"):
        compare_runtimes(no_adapter, same, precision="fp32", settings=SMALL)


def write_manifest(directory, precision: str = "fp16") -> None:
    """A valid manifest as the ONNX exporter writes it, over fake graph files (the runtime is faked)."""
    from bundle_helpers import make_manifest

    from sun_edge.bundle import write_manifest as write

    write(directory, make_manifest(directory, ("text_encoder", "unet", "unet_plain", "vae_decoder", "vae_encoder"),
                                   precision=precision))


def test_export_parity_returns_figures_or_refuses(monkeypatch, reference, same, tmp_path):
    """The exporter's hook: figures for the manifest, or one line that stops the export."""
    opened = []

    def fake_open(bundle, provider="cpu", runtime=None, **options):
        opened.append((bundle.path, provider))
        return candidate

    monkeypatch.setattr(bundle_parity, "open_checked_runtime", fake_open)
    write_manifest(tmp_path, "fp16")
    candidate = same
    figures = export_parity(reference, tmp_path)
    assert opened == [(tmp_path, "cpu")]
    assert figures["passed"] and figures["precision"] == "fp16" and set(figures["components"]) >= {"unet", "image"}
    assert figures["inputs"]["height"] == 64 and figures["inputs"]["timesteps"] == [999, 749, 499, 249]
    assert figures["components"]["unet"]["threshold_db"] == 35.0  # fp16 graph
    assert figures["components"]["vae_decoder"]["threshold_db"] == 45.0  # the bundle keeps its VAE in fp32
    json.dumps(figures, allow_nan=False)
    candidate = Wrapped(same, decode_full=noisy(same.decode_full, 40.0))
    with pytest.raises(SunEdgeError, match=r"parity check failed: vae_decoder at \d\d\.\d\d dB is below its onnx fp32 "
                                           r"threshold of 45 dB \(worst input: seed 0\)"):
        export_parity(reference, tmp_path)


def test_bundle_helpers(tmp_path):
    manifest = SimpleNamespace(image={"height": 64, "width": 96}, scheduler={"name": "ddim", "spacing": "trailing", "steps": 4},
                               model={"name": "m", "sha256": "a" * 64, "path": "/m"}, adapter={"sha256": "b" * 64})
    settings = Settings.from_manifest(manifest)
    assert (settings.height, settings.width, settings.steps, settings.scheduler, settings.mode) == (64, 96, 4, "ddim", "sun")
    assert bundle_parity.reference_mismatches(manifest, {"model_sha256": "a" * 64, "adapter_sha256": "b" * 64}) == ()
    problems = bundle_parity.reference_mismatches(manifest, {"model_sha256": "c" * 64, "adapter_sha256": "b" * 64})
    assert problems == (f"model sha256 {'c' * 12}... differs from the bundle's {'a' * 12}...",)
    with pytest.raises(SunEdgeError, match="records no adapter path; pass --adapter PATH"):
        bundle_parity.reference_for_bundle(manifest)
    manifest.model["loras"] = [{"file": "style.safetensors", "scale": 0.8, "sha256": "d" * 64}]
    with pytest.raises(SunEdgeError, match=r"exported with LoRA\(s\) style.safetensors and its manifest records no path "
                                           r"for them; pass each with --lora"):
        bundle_parity.reference_for_bundle(manifest, adapter="/a")
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"not really a lora")
    info = {"model_sha256": "a" * 64, "adapter_sha256": "b" * 64}
    assert bundle_parity.reference_mismatches(manifest, info, [(lora, 0.8)]) == (
        "the LoRAs given (sha256, scale) differ from those merged at export",)
    manifest.model["loras"][0]["sha256"] = sha256_file(lora)
    assert bundle_parity.reference_mismatches(manifest, info, [(lora, 0.8)]) == ()
    assert bundle_parity.reference_mismatches(manifest, info, [(lora, 1.0)]) != ()


# --- bundles: the ONNX export of the tiny model (conftest's session fixtures), through the CLI


def parity_cli(capsys, *argv):
    from sun_edge.cli import main

    code = main(["parity", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_parity_cli_on_an_fp32_bundle(home_env, onnx_fp32_bundle, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "parity.json"
    code, stdout, err = parity_cli(capsys, "--bundle", str(onnx_fp32_bundle), "--seeds", "2", "--json", str(out))
    assert code == 0, err
    assert "warning" not in err
    data = json.loads(out.read_text())
    assert data["passed"] and data["reference_matches_bundle"] and data["candidate"] == "onnxruntime"
    assert set(data["components"]) == {"text_encoder", "unet", "unet_plain", "vae_decoder", "vae_encoder", "image",
                                       "image_img2img", "image_inpaint"}
    assert all(c["psnr_db"] > 90 for c in data["components"].values())  # fp32 graphs: float32 rounding only
    assert data["inputs"]["seeds"] == [0, 1] and data["inputs"]["height"] == 64
    assert stdout.splitlines()[0].startswith("component") and "onnxruntime vs pytorch" in stdout and "PASS" in stdout


def without_baseline(bundle: Path, dst: Path) -> Path:
    """A copy of ``bundle`` as exported without ``--with-baseline``: no ``unet_plain`` graph."""
    shutil.copytree(bundle, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    (dst / manifest["components"].pop("unet_plain")["file"]).unlink()
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_parity_cli_on_an_fp16_bundle(home_env, onnx_fp16_bundle, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    code, stdout, err = parity_cli(capsys, "--bundle", str(onnx_fp16_bundle))
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in stdout.splitlines()[1:] if line.split()[0] in COMPONENTS}
    assert rows["unet"][2:4] == ["35.0", "fp16"] and rows["unet_plain"][2:4] == ["35.0", "fp16"]
    assert rows["vae_decoder"][2:4] == ["45.0", "fp32"]  # the bundle keeps its VAE graphs in fp32
    code, stdout, err = parity_cli(capsys, "--bundle", str(without_baseline(onnx_fp16_bundle, tmp_path / "b")))
    assert code == 0, err
    assert "skipped unet_plain: candidate has none" in stdout and "\nunet_plain " not in stdout


def test_parity_cli_against_another_adapter_warns_and_fails(home_env, onnx_fp32_bundle, tiny, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from sun_edge.adapter import save_adapter

    other = save_adapter(SUNAdapter.from_unet(copy.deepcopy(tiny["unet"])).randomize_(99), tmp_path / "other.safetensors")
    code, stdout, err = parity_cli(capsys, "--bundle", str(onnx_fp32_bundle), "--adapter", str(other))
    assert code == 1
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "adapter sha256" in warning[0] and "differs from the bundle's" in warning[0]
    assert "FAIL (unet, image, image_img2img, image_inpaint)" in stdout


def test_export_parity_on_a_real_bundle(onnx_fp32_bundle, tiny_reference):
    pytest.importorskip("onnxruntime")
    figures = export_parity(tiny_reference, onnx_fp32_bundle)
    assert figures["passed"] and figures["candidate"] == "onnxruntime" and figures["target"] == "onnx"


def test_parity_cli_bad_bundle(home_env, tmp_path, capsys):
    code, _, err = parity_cli(capsys, "--bundle", str(tmp_path / "none"))
    assert code == 2 and err.startswith("error: bundle") and "does not exist" in err
