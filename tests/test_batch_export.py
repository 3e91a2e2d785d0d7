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
