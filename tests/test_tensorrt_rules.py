"""TensorRT's pure rules: versions per GPU, engine names, profiles, build plans, rebuilds, bindings."""

from __future__ import annotations

from pathlib import Path

import pytest

from sun_edge.bundle import Component, Manifest, TensorSpec
from sun_edge.errors import SunEdgeError
from sun_edge.export import tensorrt as trt_target
from sun_edge.runtimes import tensorrt_rules as rules

EMB = (1, 77, 768)


def manifest(precision: str = "fp16") -> Manifest:
    f32 = "float32"
    unet = Component("unet.onnx", (TensorSpec("sample", f32, (1, 4, 64, 64)), TensorSpec("timestep", f32, (1,)),
                                   TensorSpec("encoder_hidden_states", f32, EMB),
                                   TensorSpec("negative_encoder_hidden_states", f32, EMB)),
                     (TensorSpec("noise_pred", f32, (1, 4, 64, 64)),), precision)
    plain = Component("unet_plain.onnx", (TensorSpec("sample", f32, (-1, 4, 64, 64)), TensorSpec("timestep", f32, (1,)),
                                          TensorSpec("encoder_hidden_states", f32, (-1, 77, 768))),
                      (TensorSpec("noise_pred", f32, (-1, 4, 64, 64)),), precision)
    text = Component("text_encoder.onnx", (TensorSpec("input_ids", "int64", (1, 77)),),
                     (TensorSpec("last_hidden_state", f32, EMB),), precision)
    vae = Component("vae_decoder.onnx", (TensorSpec("latent_sample", f32, (1, 4, 64, 64)),),
                    (TensorSpec("sample", f32, (1, 3, 512, 512)),), "fp32")
    return Manifest("tensorrt", precision, {"height": 512, "width": 512},
                    {"channels": 4, "height": 64, "width": 64, "scaling_factor": 0.18215}, {"tokens": 77, "dim": 768},
                    {"text_encoder": text, "unet": unet, "unet_plain": plain, "vae_decoder": vae}, {}, None, {}, {}, {}, "0")


@pytest.mark.parametrize("trt, cc, ok", [
    ("10.4.0", 70, True), ("10.0.1.6", 70, True), ("10.5.0", 70, False), ("10.8.0", 70, False), ("11.0.0", 70, False),
    ("10.8.0", 75, True), ("11.0.0", 75, True), ("11.1.0", 90, True), ("10.13.3.9", 89, True),
    ("8.6.1", 86, False), ("10.4.0", 61, False),
])
def test_version_rules(trt, cc, ok):
    assert (rules.violations(trt, cc) == []) is ok


def test_version_rule_messages_are_one_clear_line():
    with pytest.raises(SunEdgeError, match=r"V100/Volta \(sm70\) needs TensorRT 10.4 or older \(Volta support was removed in 10.5\)"):
        rules.check_compatible("10.5.0", 70)
    with pytest.raises(SunEdgeError, match=r"TensorRT 11.0.0 needs Turing \(sm75\) or newer"):
        rules.check_compatible("11.0.0", 72, rules.RULES[-1:])
    with pytest.raises(SunEdgeError, match="needs TensorRT 10.0 or newer"):
        rules.check_compatible("8.6.1", 86)
    assert all("\n" not in r.message for r in rules.RULES)


def test_a_rule_table_is_data():
    table = (rules.Rule(80, 90, (10, 2), rules.NO_LIMIT, "sm{sm} needs TensorRT 10.2+, found {trt}"),)
    assert rules.violations("10.1.0", 86, table) == ["sm86 needs TensorRT 10.2+, found 10.1.0"]
    assert rules.violations("10.1.0", 90, table) == []
    with pytest.raises(Exception):
        table[0].min_sm = 1  # frozen


def test_versions_and_engine_names():
    assert rules.parse_version("10.4.0.26") == (10, 4, 0, 26)
    assert rules.parse_version("10.0.0b6") == (10, 0, 0)
    assert rules.short_version("11") == "11.0.0"
    assert rules.sm(8, 6) == 86
    assert rules.engine_file("unet", "10.4.0.26", 70) == "unet.trt10.4.0.sm70.plan"
    with pytest.raises(SunEdgeError, match="cannot read TensorRT version"):
        rules.parse_version("latest")


def test_profiles_are_static_with_batch_one():
    m = manifest()
    unet = rules.profile_shapes(m.components["unet"])
    assert unet["encoder_hidden_states"] == unet["negative_encoder_hidden_states"] == {"min": EMB, "opt": EMB, "max": EMB}
    assert all(p["min"] == p["opt"] == p["max"] and p["min"][0] == 1 for p in unet.values())
    plain = rules.profile_shapes(m.components["unet_plain"])["sample"]
    assert plain == {"min": (1, 4, 64, 64), "opt": (2, 4, 64, 64), "max": (2, 4, 64, 64)}
    extra = trt_target.tensorrt_extra(m)
    assert extra["engines"] == {} and extra["batch"] == 1 and extra["text_tokens"] == 77 and extra["static_shapes"]
    assert extra["profile"]["unet"]["opt"]["sample"] == [1, 4, 64, 64]


def test_build_plan():
    m = manifest()
    plan = trt_target.build_plan(m, "unet", "10.8.0", 86, opt_level=5, workspace_gb=2, timing_cache="cache.bin")
    assert (plan.onnx_file, plan.engine_file, plan.opt_level, plan.strongly_typed, plan.volta) == \
        ("unet.onnx", "unet.trt10.8.0.sm86.plan", 5, True, False)
    assert plan.workspace_bytes == 2 << 30 and plan.timing_cache == Path("cache.bin")
    assert plan.profile["sample"]["max"] == (1, 4, 64, 64)
    volta = trt_target.build_plan(m, "unet", "10.4.0", 70)
    assert volta.volta and volta.onnx_file == "unet.volta.onnx" and volta.opt_level == rules.DEFAULT_OPT_LEVEL
    assert trt_target.build_plan(m, "unet_plain", "10.4.0", 70).onnx_file == "unet_plain.volta.onnx"
    assert not trt_target.build_plan(m, "vae_decoder", "10.4.0", 70).volta  # fp32 graph: nothing to widen
    assert not trt_target.build_plan(manifest("fp32"), "unet", "10.4.0", 70).volta
    assert trt_target.build_plan(m, "unet", "10.4.0", 75).onnx_file == "unet.onnx"
    for kwargs, message in (({"opt_level": 6}, "out of range"), ({"workspace_gb": 0}, "must be positive")):
        with pytest.raises(SunEdgeError, match=message):
            trt_target.build_plan(m, "unet", "10.8.0", 86, **kwargs)
    with pytest.raises(SunEdgeError, match="has no vae_encoder component"):
        trt_target.build_plan(m, "vae_encoder", "10.8.0", 86)
    with pytest.raises(SunEdgeError, match="Volta"):
        trt_target.build_plan(m, "unet", "10.5.0", 70)


def test_rebuild_decision(tmp_path):
    record = rules.EngineRecord("unet.trt10.4.0.sm70.plan", "10.4.0.26", 70, "Tesla V100", 5, "x", 1.0, 3, "unet.volta.onnx")
    assert rules.rebuild_reason(None, "10.4.0", 70) == "no engine is built"
    assert rules.rebuild_reason(record, "10.4.0.99", 70) is None  # same major.minor.patch
    assert "TensorRT 10.4.0.26" in rules.rebuild_reason(record, "10.3.0", 70)
    assert "sm70 (Tesla V100), this GPU is sm80" in rules.rebuild_reason(record, "10.4.0", 80)
    assert "missing or changed" in rules.rebuild_reason(record, "10.4.0", 70, tmp_path)
    (tmp_path / record.file).write_bytes(b"12345")
    assert rules.rebuild_reason(record, "10.4.0", 70, tmp_path) is None
    assert rules.EngineRecord.from_dict(record.__dict__) == record


def test_binding_plan_sizes():
    m = manifest()
    unet = {b.name: b for b in rules.binding_plan(m.components["unet"])}
    assert unet["sample"].nbytes == 4 * 4 * 64 * 64 and unet["timestep"].nbytes == 4
    assert unet["negative_encoder_hidden_states"].nbytes == 77 * 768 * 4 and unet["noise_pred"].is_input is False
    text = rules.binding_plan(m.components["text_encoder"])
    assert (text[0].dtype, text[0].nbytes, text[0].is_input) == ("int64", 77 * 8, True)
    plain = {b.name: b for b in rules.binding_plan(m.components["unet_plain"])}
    assert plain["sample"].shape == (2, 4, 64, 64) and plain["noise_pred"].nbytes == 2 * 4 * 64 * 64 * 4
