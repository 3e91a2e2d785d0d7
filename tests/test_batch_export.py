"""Bundles with a batch range (issue 15): ``export --max-batch N`` writes graphs with a free batch
dimension, the manifest records the range, parity measures batch 1 and N, and a batch equals its
items run alone through ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from sun_edge.bundle import open_bundle
from sun_edge.errors import SunEdgeError
from sun_edge.pipeline import Job, Pipeline, Settings

SMALL = Settings(height=64, width=64)
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def batch_bundle(tiny_reference, tmp_path_factory):
    from sun_edge.bundle_parity import export_parity
    from sun_edge.export import ExportOptions
    from sun_edge.export.onnx import export_bundle

    out = tmp_path_factory.mktemp("batch") / "b3"
    return export_bundle(tiny_reference, out, ExportOptions(height=64, width=64, max_batch=3, with_baseline=True),
                         parity=export_parity, progress=False)


def test_the_manifest_records_the_range_and_free_batch_dimensions(batch_bundle):
    m = open_bundle(batch_bundle).manifest
    assert m.batch == {"min": 1, "max": 3}
    assert m.components["unet"].inputs[0].shape == (-1, 4, 8, 8) and m.components["vae_decoder"].inputs[0].shape[0] == -1
    assert m.parity["passed"] and m.parity["inputs"]["batches"] == [1, 3]
    where = [m.parity["components"]["unet"]["inputs"], m.parity["components"]["unet"]["worst_input"]]
    assert where[0] == 4 + 3 * 4  # four batch-1 steps, then four steps of three items


def test_a_batch_equals_each_job_alone_on_onnxruntime(batch_bundle, tiny_reference):
    from sun_edge.parity import psnr
    from sun_edge.runtimes import open_bundle_runtime

    runtime = open_bundle_runtime(open_bundle(batch_bundle))
    assert runtime.max_batch == 3
    pipe = Pipeline(runtime, runtime.tokenizer())
    jobs = [Job("a red circle", "", 3), Job("two blue squares", "red", 11), Job("a circle", "green", 5)]
    together = pipe.generate_batch(jobs, settings=SMALL, max_batch=3)
    alone = [pipe.generate_batch([job], settings=SMALL)[0] for job in jobs]
    assert [g.batch for g in together] == [3, 3, 3]
    for a, b in zip(together, alone):
        assert psnr(np.asarray(b.image, np.float64), np.asarray(a.image, np.float64)) > 40
    x = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    emb = runtime.encode_text(runtime.tokenizer().encode("a circle"))
    both = runtime.unet(x, np.array([499.0], np.float32), np.repeat(emb, 3, 0), np.repeat(emb, 3, 0))
    one = np.concatenate([runtime.unet(x[k:k + 1], np.array([499.0], np.float32), emb, emb) for k in range(3)])
    np.testing.assert_allclose(both, one, atol=1e-5)
    with pytest.raises(SunEdgeError, match="expected shape"):  # the graph takes at most its range... or says why
        runtime.unet(np.zeros((2, 4, 8, 9), np.float32), np.array([1.0], np.float32), np.repeat(emb, 2, 0),
                     np.repeat(emb, 2, 0))


def test_bad_batch_ranges_are_one_line(tiny_reference, tmp_path):
    from sun_edge.export import ExportOptions, export_options

    with pytest.raises(SunEdgeError, match=r"^max batch 0 is outside \[1, 256\]$"):
        ExportOptions(max_batch=0).validate()
    with pytest.raises(SunEdgeError, match=r"^Core ML bundles are batch 1"):
        export_options("coreml", max_batch=4).validate()


@pytest.fixture(scope="module")
def fp16_batch_bundle(tiny_reference, tmp_path_factory):
    from sun_edge.bundle_parity import export_parity
    from sun_edge.export import ExportOptions
    from sun_edge.export.onnx import export_bundle

    out = tmp_path_factory.mktemp("batch16") / "b2"
    return export_bundle(tiny_reference, out, ExportOptions(precision="fp16", height=64, width=64, max_batch=2),
                         parity=export_parity, progress=False)


def test_an_fp16_batch_equals_each_job_alone_within_the_fp16_floors(fp16_batch_bundle):
    """ONNX Runtime on an fp16 --max-batch bundle: image k of a batch is the same seed's image alone, and the UNet's
    batch item k its own call, within the fp16 parity floors (export/targets.py: image 30 dB, UNet 35 dB)."""
    from sun_edge.export.targets import TARGETS
    from sun_edge.parity import psnr
    from sun_edge.runtimes import open_bundle_runtime

    m = open_bundle(fp16_batch_bundle).manifest
    assert m.precision == "fp16" and m.batch == {"min": 1, "max": 2} and m.parity["inputs"]["batches"] == [1, 2]
    runtime = open_bundle_runtime(open_bundle(fp16_batch_bundle))
    pipe = Pipeline(runtime, runtime.tokenizer())
    jobs = [Job("a red circle", "", 3), Job("two blue squares", "red", 11)]
    together = pipe.generate_batch(jobs, settings=SMALL, max_batch=2)
    alone = [pipe.generate_batch([job], settings=SMALL)[0] for job in jobs]
    assert [g.batch for g in together] == [2, 2] and [g.batch for g in alone] == [1, 1]
    floors = TARGETS["onnx"].thresholds["fp16"]
    for a, b in zip(together, alone):
        assert psnr(np.asarray(b.image, np.float64), np.asarray(a.image, np.float64)) >= floors.image
    x = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    emb = runtime.encode_text(runtime.tokenizer().encode("a circle"))
    t = np.array([499.0], np.float32)
    both = runtime.unet(x, t, np.repeat(emb, 2, 0), np.repeat(emb, 2, 0))
    for k in range(2):
        assert psnr(runtime.unet(x[k:k + 1], t, emb, emb)[0], both[k]) >= floors.unet


def test_bench_times_a_batch_bundle_up_to_its_range(batch_bundle, tmp_path, capsys, monkeypatch):
    """bench --batch on a 1..3 bundle: 1 and 3 are timed; 4 is one error line before any graph is opened."""
    import json

    import sun_edge.runtimes as runtimes
    from cli_helpers import error_line, run

    out = tmp_path / "b.json"
    code, _, err = run(capsys, "bench", "--bundle", str(batch_bundle), "--repeats", "1", "--steps-only",
                       "--batch", "1", "3", "--json", str(out))
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["batches"] == [1, 3] and {"unet_sun_b3", "unet_cfg_b6"} <= set(data["seconds"])
    assert set(data["throughput"]) == {"1", "3"} and "unet_sun4_over_batch1" in data["throughput"]["3"]

    def opened(*args, **kwargs):
        raise AssertionError("a runtime was opened")

    monkeypatch.setattr(runtimes, "open_bundle_runtime", opened)
    code, _, err = run(capsys, "bench", "--bundle", str(batch_bundle), "--batch", "1", "4")
    assert code == 2
    assert error_line(err) == (f"error: --batch 4: bundle {batch_bundle} takes at most 3 image(s) per UNet call (its "
                               "manifest's batch range); give --batch up to 3, or re-export with --max-batch 4")
