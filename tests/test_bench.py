"""``sun-edge bench`` on the tiny model: structure, UNet call counts and ratio arithmetic (never wall-clock times)."""

from __future__ import annotations

import copy
import json
import statistics

import numpy as np
import pytest

from sun_edge.adapter import SUNAdapter
from sun_edge.bench import RATIOS, BenchResult, run_bench
from sun_edge.errors import SunEdgeError
from sun_edge.runtimes.pytorch import TorchRuntime
from cli_helpers import error_line, run

SMALL = ["--size", "64", "--repeats", "1"]


def check_ratios(data: dict) -> None:
    """Every ratio equals the one computed here from the medians, which are the medians of the per-repeat figures."""
    med = data["median_seconds"]
    for form, values in data["seconds"].items():
        assert med[form] == pytest.approx(statistics.median(values))
    for name, (a, b, _) in RATIOS.items():
        if a in med and b in med:
            assert data["ratios"][name] == pytest.approx(med[a] / med[b])
        else:
            assert name not in data["ratios"]
    want = 25 * med["unet_cfg_b2"] / (4 * med["unet_sun_b1"])
    assert data["ratios"]["unet_time_cfg25_over_sun4"] == pytest.approx(want)


class Counting:
    """Counts UNet calls (and the batch they were made with) on the way to a runtime."""

    def __init__(self, runtime: TorchRuntime) -> None:
        self._runtime, self.calls = runtime, []

    def unet(self, latents, t, pos, neg):
        self.calls.append(("sun", latents.shape[0]))
        return self._runtime.unet(latents, t, pos, neg)

    def unet_plain(self, latents, t, emb):
        self.calls.append(("plain", latents.shape[0]))
        return self._runtime.unet_plain(latents, t, emb)

    def __getattr__(self, name):
        return getattr(self._runtime, name)


def test_bench_cli_writes_every_figure(home_env, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, err = run(capsys, "bench", "--model", "tiny-random", *SMALL, "--json", str(out))
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["runtime"] == "pytorch" and data["model"] == "tiny-random"
    assert (data["height"], data["width"], data["repeats"]) == (64, 64, 1)
    assert set(data["seconds"]) == {"text_encode", "unet_sun_b1", "unet_plain_b1", "unet_cfg_b2", "vae_decode", "sun4", "cfg25"}
    assert all(len(v) == 1 and v[0] > 0 for v in data["seconds"].values())
    assert data["unet_calls"] == {"sun4": 4, "cfg25": 25} and data["steps"] == {"sun4": 4, "cfg25": 25}
    assert set(data["ratios"]) == {"sun_over_plain", "cfg_batch2_over_plain", "unet_time_cfg25_over_sun4",
                                   "end_to_end_cfg25_over_sun4", "decode_share_of_sun4"}
    check_ratios(data)
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["torch_threads"] >= 1
    assert "onnxruntime" not in data["machine"] or data["machine"]["onnxruntime"]
    memory = data["memory"]
    assert 0 < memory["peak_rss_mib_after_load"] <= memory["peak_rss_mib_after_warmup"] <= memory["peak_rss_mib_after_runs"]
    lines = stdout.splitlines()
    assert lines[0].startswith("pytorch at 64x64, 1 repeat(s)")
    assert lines[1].split() == ["form", "median", "s", "min", "s", "max", "s", "note"]
    assert any(line.startswith("cfg25") and line.endswith("25 UNet calls") for line in lines)
    assert any(line.startswith("sun4") and line.endswith("4 UNet calls") for line in lines)
    assert any("(unet_time_cfg25_over_sun4)" in line for line in lines)
    assert lines[-2].startswith("peak RSS") and lines[-1] == f"wrote {out}"


def test_steps_only(home_env, tmp_path, capsys):
    out = tmp_path / "steps.json"
    code, stdout, err = run(capsys, "bench", "--model", "tiny-random", *SMALL, "--steps-only", "--json", str(out))
    assert code == 0, err
    data = json.loads(out.read_text())
    assert "sun4" not in data["seconds"] and "cfg25" not in data["seconds"] and data["unet_calls"] == {}
    assert set(data["ratios"]) == {"sun_over_plain", "cfg_batch2_over_plain", "unet_time_cfg25_over_sun4"}
    check_ratios(data)


def test_with_the_tiny_decoder(home_env, tmp_path, capsys):
    from test_tiny_decoder import small_taesd

    taesd = tmp_path / "taesd"
    small_taesd().save_pretrained(taesd)
    out = tmp_path / "tiny.json"
    code, _, err = run(capsys, "bench", "--model", "tiny-random", *SMALL, "--vae-decoder", f"tiny:{taesd}", "--json", str(out))
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["unet_calls"] == {"sun4": 4, "cfg25": 25, "sun4_tiny": 4}
    assert {"vae_decode", "vae_decode_tiny"} <= set(data["seconds"])
    assert {"end_to_end_cfg25_full_over_sun4_tiny", "tiny_decode_speedup"} <= set(data["ratios"])
    check_ratios(data)


def test_run_bench_calls_the_unet_as_it_says(tiny):
    """Per repeat: one call of each step form, 4 SUN calls (batch 1) per SUN image, 25 CFG calls (batch 2) per CFG image."""
    parts = copy.deepcopy(tiny)
    runtime = Counting(TorchRuntime(parts["unet"], parts["text_encoder"], parts["vae"],
                                    SUNAdapter.from_unet(parts["unet"]).randomize_(1)))
    result = run_bench(runtime, repeats=2, height=64, width=64)
    assert isinstance(result, BenchResult)
    warmup = [("sun", 1), ("plain", 1), ("plain", 2)]
    repeat = [("sun", 1), ("plain", 1), ("plain", 2)] + [("sun", 1)] * 4 + [("plain", 2)] * 25
    assert runtime.calls == warmup + repeat * 2
    assert result.unet_calls == {"sun4": 4, "cfg25": 25}
    assert all(len(v) == 2 for v in result.seconds.values())
    check_ratios(result.to_dict())
    assert "sun4" in result.table()


def test_runtime_without_the_plain_unet(tiny):
    parts = copy.deepcopy(tiny)
    real = TorchRuntime(parts["unet"], parts["text_encoder"], parts["vae"], SUNAdapter.from_unet(parts["unet"]).randomize_(1))

    class SunOnly:  # the Runtime protocol with the SUN UNet and no plain UNet
        name, info, latent_channels, vae_scale_factor, max_batch = "sun-only", {}, 4, 8, 1
        encode_text, unet, decode, decode_full = real.encode_text, real.unet, real.decode, real.decode

        def has(self, component):
            return component in ("text_encoder", "unet", "vae_decoder")

    result = run_bench(SunOnly(), repeats=1, height=64, width=64)
    assert set(result.seconds) == {"text_encode", "unet_sun_b1", "vae_decode", "sun4"}
    assert set(result.ratios()) == {"decode_share_of_sun4"}
    assert np.isfinite(result.ratios()["decode_share_of_sun4"])


@pytest.mark.parametrize("args,message", [
    (["--repeats", "0", "--size", "64"], "error: repeats must be at least 1, got 0"),
    (["--size", "60"], "error: height 60 is not a positive multiple of 8"),
    (["--bundle", "{tmp}/b", "--adapter", "x.safetensors"], "error: --adapter and --vae-decoder apply to --model"),
    (["--bundle", "{tmp}/none"], "error: bundle {tmp}/none does not exist"),
    (["--size", "64", "--json", "{tmp}/no/dir.json"], "error: folder {tmp}/no for --json does not exist"),
])
def test_bad_bench_input_is_one_line(home_env, tmp_path, capsys, args, message):
    code, _, err = run(capsys, "bench", *[a.format(tmp=tmp_path) for a in args])
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message.format(tmp=tmp_path)), err


def test_run_bench_refuses_zero_repeats(tiny):
    with pytest.raises(SunEdgeError, match="repeats must be at least 1"):
        run_bench(object(), repeats=0)


def test_bench_a_bundle_steps_only(onnx_fp32_bundle, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "bundle.json"
    code, stdout, err = run(capsys, "bench", "--bundle", str(onnx_fp32_bundle), "--repeats", "1", "--steps-only",
                            "--json", str(out))
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["runtime"] == "onnxruntime" and data["bundle"] == str(onnx_fp32_bundle) and data["provider"] == "cpu"
    assert (data["height"], data["width"], data["precision"]) == (64, 64, "fp32")  # the bundle's size by default
    assert set(data["seconds"]) == {"text_encode", "unet_sun_b1", "unet_plain_b1", "unet_cfg_b2", "vae_decode"}
    assert data["machine"]["onnxruntime"]
    check_ratios(data)
    assert stdout.startswith("onnxruntime at 64x64")


def test_bench_a_bundle_without_the_baseline(onnx_fp16_bundle, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from test_parity import without_baseline

    bundle = without_baseline(onnx_fp16_bundle, tmp_path / "b")
    code, stdout, err = run(capsys, "bench", "--bundle", str(bundle), "--repeats", "1")
    assert code == 0, err
    forms = [line.split()[0] for line in stdout.splitlines()[2:] if line[:1].isalpha() and "(" not in line]
    assert forms[:3] == ["text_encode", "unet_sun_b1", "vae_decode"] and "sun4" in forms and "cfg25" not in forms
    assert "(decode_share_of_sun4)" in stdout and "(end_to_end_cfg25_over_sun4)" not in stdout


def test_bench_a_bundle_without_torch(onnx_fp32_bundle, tmp_path):
    """Timing a bundle needs no PyTorch: torch, diffusers and transformers cannot even be imported."""
    pytest.importorskip("onnxruntime")
    from no_torch import run_without_torch

    out = tmp_path / "b.json"
    run_without_torch(f"""
        from sun_edge.cli import main
        assert main(["bench", "--bundle", {str(onnx_fp32_bundle)!r}, "--repeats", "1", "--steps-only",
                     "--json", {str(out)!r}]) == 0
    """, capture_output=True, timeout=300)
    data = json.loads(out.read_text())
    assert "torch" not in data["machine"] and data["machine"]["onnxruntime"]


def test_batches_call_the_unet_at_each_batch_size(tiny):
    """--batch 1 3: per repeat, each step form once at its batch, 4 SUN calls of 3 and 25 CFG calls of 6 per
    3-image run; the warm-up calls every step form once; unet_calls per run and the throughput keys follow."""
    parts = copy.deepcopy(tiny)
    runtime = Counting(TorchRuntime(parts["unet"], parts["text_encoder"], parts["vae"],
                                    SUNAdapter.from_unet(parts["unet"]).randomize_(1)))
    result = run_bench(runtime, repeats=1, height=64, width=64, batches=(3, 1, 3))
    steps = [("sun", 1), ("plain", 1), ("plain", 2), ("sun", 3), ("plain", 6)]
    images = [("sun", 1)] * 4 + [("plain", 2)] * 25 + [("sun", 3)] * 4 + [("plain", 6)] * 25
    assert runtime.calls == steps + steps + images
    assert list(result.seconds) == ["text_encode", "unet_sun_b1", "unet_plain_b1", "unet_cfg_b2", "unet_sun_b3",
                                    "unet_cfg_b6", "vae_decode", "sun4", "cfg25", "sun4_b3", "cfg25_b3"]
    assert result.unet_calls == {"sun4": 4, "cfg25": 25, "sun4_b3": 4, "cfg25_b3": 25}
    assert result.info["batches"] == [1, 3]
    data = result.to_dict()
    assert set(data["throughput"]) == {"1", "3"}
    assert set(data["throughput"]["3"]) == {
        "sun4_images_per_s", "cfg25_images_per_s", "sun4_over_cfg25", "sun4_over_batch1", "cfg25_over_batch1",
        "unet_sun4_images_per_s", "unet_cfg25_images_per_s", "unet_sun4_over_cfg25", "unet_sun4_over_batch1",
        "unet_cfg25_over_batch1"}
    assert "sun4_over_batch1" not in data["throughput"]["1"]
    med = result.medians()
    assert data["ratios"]["unet_time_cfg25_over_sun4_b3"] == pytest.approx(25 * med["unet_cfg_b6"] / (4 * med["unet_sun_b3"]))
    table = result.table()
    assert "sun4_b3" in table and "4 UNet calls for 3 images" in table and "images per second by batch size" in table


def test_throughput_arithmetic():
    """Images per second and the ratios from chosen medians (3 repeats each), not from a clock."""
    seconds = {"unet_sun_b1": [1.0, 0.5, 9.0], "unet_cfg_b2": [2.0, 2.0, 2.0], "unet_sun_b4": [2.0, 2.0, 2.0],
               "unet_cfg_b8": [8.0, 8.0, 8.0], "sun4": [5.0, 5.0, 5.0], "cfg25": [50.0, 50.0, 50.0],
               "sun4_b4": [10.0, 10.0, 10.0]}
    result = BenchResult(seconds, {}, {}, {"batches": [1, 4]})
    tp = result.throughput()
    one, four = tp["1"], tp["4"]
    assert one["sun4_images_per_s"] == pytest.approx(0.2) and one["cfg25_images_per_s"] == pytest.approx(0.02)
    assert one["sun4_over_cfg25"] == pytest.approx(10.0)
    assert one["unet_sun4_images_per_s"] == pytest.approx(1 / 4)  # median 1.0 s, 4 steps
    assert one["unet_cfg25_images_per_s"] == pytest.approx(1 / 50) and one["unet_sun4_over_cfg25"] == pytest.approx(12.5)
    assert four["sun4_images_per_s"] == pytest.approx(0.4) and four["sun4_over_batch1"] == pytest.approx(2.0)
    assert "cfg25_images_per_s" not in four and "sun4_over_cfg25" not in four  # cfg25_b4 not timed
    assert four["unet_sun4_images_per_s"] == pytest.approx(4 / 8) and four["unet_sun4_over_batch1"] == pytest.approx(2.0)
    assert four["unet_cfg25_images_per_s"] == pytest.approx(4 / 200) and four["unet_cfg25_over_batch1"] == pytest.approx(1.0)
    assert result.ratios()["unet_time_cfg25_over_sun4_b4"] == pytest.approx(25 * 8.0 / (4 * 2.0))
    assert BenchResult({"sun4": [1.0]}, {}, {}, {}).throughput() == {"1": {"sun4_images_per_s": 1.0}}


def test_only_times_the_chosen_forms_and_warms_what_they_use(tiny):
    parts = copy.deepcopy(tiny)
    runtime = Counting(TorchRuntime(parts["unet"], parts["text_encoder"], parts["vae"],
                                    SUNAdapter.from_unet(parts["unet"]).randomize_(1)))
    result = run_bench(runtime, repeats=2, height=64, width=64, batches=(1, 2), only=["unet_sun_*", "sun4_b*"])
    assert list(result.seconds) == ["unet_sun_b1", "unet_sun_b2", "sun4_b2"]
    assert runtime.calls == [("sun", 1), ("sun", 2)] + ([("sun", 1), ("sun", 2)] + [("sun", 2)] * 4) * 2
    assert result.info["only"] == ["unet_sun_*", "sun4_b*"]
    assert set(result.throughput()["2"]) == {"sun4_images_per_s", "unet_sun4_images_per_s", "unet_sun4_over_batch1"}
    with pytest.raises(SunEdgeError, match=r"^--only cfg4 names none of the forms timed here: text_encode, unet_sun_b1"):
        run_bench(runtime, repeats=1, height=64, width=64, only=["cfg4"])


def test_a_batch_above_the_runtimes_limit_is_refused_before_any_call(tiny):
    parts = copy.deepcopy(tiny)
    runtime = Counting(TorchRuntime(parts["unet"], parts["text_encoder"], parts["vae"],
                                    SUNAdapter.from_unet(parts["unet"]).randomize_(1)))
    runtime.max_batch = 2
    runtime.name = "capped"
    with pytest.raises(SunEdgeError, match=r"^--batch 4: runtime capped takes at most 2 image\(s\) per UNet call"):
        run_bench(runtime, repeats=1, height=64, width=64, batches=(1, 4))
    for bad in ((), (0, 1), (True,)):
        with pytest.raises(SunEdgeError, match="^--batch takes positive whole numbers"):
            run_bench(runtime, repeats=1, height=64, width=64, batches=bad)
    assert runtime.calls == []


def test_bench_cli_batches(home_env, tmp_path, capsys):
    out = tmp_path / "batch.json"
    code, stdout, err = run(capsys, "bench", "--model", "tiny-random", *SMALL, "--batch", "1", "2", "--steps-only",
                            "--json", str(out))
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["batches"] == [1, 2]
    assert set(data["seconds"]) == {"text_encode", "unet_sun_b1", "unet_plain_b1", "unet_cfg_b2", "unet_sun_b2",
                                    "unet_cfg_b4", "vae_decode"}
    assert set(data["throughput"]["2"]) == {"unet_sun4_images_per_s", "unet_cfg25_images_per_s", "unet_sun4_over_cfg25",
                                            "unet_sun4_over_batch1", "unet_cfg25_over_batch1"}
    lines = stdout.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("images per second by batch size")))
    assert lines[head + 1].split()[:3] == ["batch", "SUN4/s", "CFG25/s"]
    assert lines[head + 2].split()[0] == "1" and lines[head + 3].split()[0] == "2"
    assert lines[head + 3].split()[1:6] == ["-"] * 5  # whole images not timed
    code, _, err = run(capsys, "bench", "--model", "tiny-random", *SMALL, "--batch", "0")
    assert code == 2 and error_line(err) == "error: --batch takes positive whole numbers, got 0"


class Holding(Counting):
    """Counting, and which components are held: a call loads its component, ``release`` drops it."""

    def __init__(self, runtime: TorchRuntime) -> None:
        super().__init__(runtime)
        self.held, self.most, self.released = set(), [], []

    def _use(self, component):
        self.held.add(component)
        self.most.append(frozenset(self.held))

    def unet(self, latents, t, pos, neg):
        self._use("unet")
        return super().unet(latents, t, pos, neg)

    def unet_plain(self, latents, t, emb):
        self._use("unet_plain")
        return super().unet_plain(latents, t, emb)

    def encode_text(self, ids):
        self._use("text_encoder")
        return self._runtime.encode_text(ids)

    def decode_full(self, latents):
        self._use("vae_decoder")
        return self._runtime.decode_full(latents)

    def release(self, component):
        self.released.append(component)
        self.held.discard(component)


def test_low_memory_holds_only_the_graphs_of_the_form_being_timed(tiny):
    """--low-memory: at every call the runtime holds at most one form's components (a UNet never beside the
    other); each form is still timed once per repeat, warm (an untimed call after every reload)."""
    parts = copy.deepcopy(tiny)
    runtime = Holding(TorchRuntime(parts["unet"], parts["text_encoder"], parts["vae"],
                                   SUNAdapter.from_unet(parts["unet"]).randomize_(1)))
    result = run_bench(runtime, repeats=2, height=64, width=64, low_memory=True)
    forms = {frozenset({"text_encoder"}), frozenset({"unet"}), frozenset({"unet_plain"}), frozenset({"vae_decoder"}),
             frozenset({"text_encoder", "unet", "vae_decoder"}), frozenset({"text_encoder", "unet_plain", "vae_decoder"})}
    assert runtime.most and all(any(held <= f for f in forms) for held in runtime.most)
    assert not any({"unet", "unet_plain"} <= held for held in runtime.most)
    assert {form: len(v) for form, v in result.seconds.items()} == {
        "text_encode": 2, "unet_sun_b1": 2, "unet_plain_b1": 2, "unet_cfg_b2": 2, "vae_decode": 2, "sun4": 2, "cfg25": 2}
    assert "unet" in runtime.released and "unet_plain" in runtime.released and result.info["low_memory"] is True
    sun_calls = [c for c in runtime.calls if c[0] == "sun"]
    # per repeat: the SUN step (reloaded: warm + timed) and the 4-step image (reloaded: one warm step + 4)
    assert len(sun_calls) == 2 * ((1 + 1) + (1 + 4))
    normal = Holding(TorchRuntime(parts["unet"], parts["text_encoder"], parts["vae"],
                                  SUNAdapter.from_unet(parts["unet"]).randomize_(1)))
    run_bench(normal, repeats=1, height=64, width=64, steps_only=True)
    assert normal.released == [] and {"unet", "unet_plain"} <= normal.held  # without it, everything stays loaded


def test_bench_a_bundle_low_memory(onnx_fp32_bundle, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "lean.json"
    code, _, err = run(capsys, "bench", "--bundle", str(onnx_fp32_bundle), "--repeats", "2", "--steps-only",
                       "--low-memory", "--json", str(out))
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["low_memory"] is True and all(len(v) == 2 for v in data["seconds"].values())
    check_ratios(data)
