"""The component table, the Runtime protocol and the runtime/target registries (sun_edge.components,
sun_edge.runtimes, sun_edge.export.targets)."""

from __future__ import annotations

import pytest

from cli_helpers import error_line, run
from sun_edge.bundle import open_bundle
from sun_edge.components import COMPONENTS, Geometry, Runtime, component
from sun_edge.errors import SunEdgeError
from sun_edge.export.targets import TARGETS, target
from sun_edge.pipeline import Settings
from sun_edge.runtimes import RUNTIMES, open_bundle_runtime, runtime_entry


def test_the_table_is_what_the_onnx_exporter_writes(onnx_fp32_bundle):
    """The exporter builds its graphs independently of the table: every component's I/O must agree."""
    manifest = open_bundle(onnx_fp32_bundle).manifest
    geometry = Geometry.from_manifest(manifest)
    assert (geometry.height, geometry.latent_height, geometry.text_dim) == (64, 8, 32)
    for name, comp in manifest.components.items():
        assert COMPONENTS[name].io(geometry) == (comp.inputs, comp.outputs), name
        assert COMPONENTS[name].precision(manifest.precision) == comp.precision, name
    assert {n for n, c in COMPONENTS.items() if not c.optional} <= set(manifest.components)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(SunEdgeError, match=r"^unknown component 'vae'; valid components: text_encoder, unet, "):
        component("vae")
    with pytest.raises(SunEdgeError, match=r"^unknown runtime 'ort'; valid runtimes: coreml, coreml-mil, onnxruntime, "):
        runtime_entry("ort")
    with pytest.raises(SunEdgeError, match=r"^unknown export target 'tflite'; valid targets: coreml, onnx, openvino, tensorrt$"):
        target("tflite")


def test_every_target_names_registered_runtimes_and_thresholds_for_its_default_precision():
    for t in TARGETS.values():
        assert t.name in RUNTIMES[t.runtime].targets and t.name in RUNTIMES[t.parity_runtime].targets
        assert t.default_precision in t.thresholds
        assert t.threshold("image", t.default_precision) > 0


def test_runtimes_follow_the_protocol_and_say_what_they_have(onnx_fp32_bundle, tiny_reference):
    bundle = open_bundle(onnx_fp32_bundle)
    onnx = open_bundle_runtime(bundle)
    assert isinstance(onnx, Runtime) and isinstance(tiny_reference, Runtime)
    assert onnx.name == "onnxruntime"
    assert [n for n in COMPONENTS if onnx.has(n)] == list(bundle.manifest.components)
    assert tiny_reference.has("unet") and not tiny_reference.has("vae_decoder_tiny")


def test_bundle_dispatch_refuses_what_does_not_apply(onnx_fp32_bundle):
    bundle = open_bundle(onnx_fp32_bundle)
    with pytest.raises(SunEdgeError, match=r"^runtime coreml-mil does not run onnx bundles; onnx bundles run on: "
                                           r"onnxruntime, openvino$"):
        open_bundle_runtime(bundle, "coreml-mil")
    with pytest.raises(SunEdgeError, match=r"^option compute_units applies to the coreml runtime; this onnx bundle runs "
                                           r"on onnxruntime$"):
        open_bundle_runtime(bundle, compute_units="cpu-only")
    with pytest.raises(SunEdgeError, match=r"^unknown runtime option 'threads'"):
        open_bundle_runtime(bundle, threads=2)
    assert open_bundle_runtime(bundle, compute_units="all").name == "onnxruntime"  # defaults are not "given"


def test_settings_for_a_mode_and_from_a_manifest(onnx_fp32_bundle):
    assert Settings.for_mode("sun") == Settings() and Settings.for_mode("cfg") == Settings.baseline()
    assert Settings.for_mode("cfg", steps=10, scheduler=None).steps == 10
    manifest = open_bundle(onnx_fp32_bundle).manifest
    sun, cfg = Settings.from_manifest(manifest), Settings.from_manifest(manifest, "cfg", guidance=5.0)
    assert (sun.mode, sun.height, sun.steps, sun.scheduler, sun.spacing) == ("sun", 64, 4, "ddim", "trailing")
    assert (cfg.mode, cfg.steps, cfg.scheduler, cfg.guidance) == ("cfg", 25, "dpmpp_2m", 5.0)
    with pytest.raises(SunEdgeError, match=r"makes 64x64 images \(its graphs have static shapes\)"):
        Settings.from_manifest(manifest, height=128)


def test_cli_runtime_flag(onnx_fp32_bundle, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--bundle", str(onnx_fp32_bundle), "--runtime", "tensorrt", "--prompt", "x",
                       "-o", str(tmp_path / "x.png"))
    assert code == 2 and error_line(err) == ("error: runtime tensorrt does not run onnx bundles; onnx bundles run on: "
                                             "onnxruntime, openvino")
    assert not (tmp_path / "x.png").exists()
