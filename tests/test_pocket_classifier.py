"""The pocket attribute classifier: shapes, a short training, save/load, and the Fréchet distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sun_edge.errors import SunEdgeError
from sun_edge.pocket.classifier import (VALUES, AttributeClassifier, ClassifierConfig, accuracy, extract_features,
                                        frechet_distance, frechet_from_moments, load_classifier, predict,
                                        save_classifier, to_input, train_classifier)
from sun_edge.pocket.world import ATTRIBUTES, scene_batch


def test_frechet_matches_the_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_from_moments(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_is_rotation_invariant_and_zero_for_equal_gaussians():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(8, 8))
    cov = a @ a.T + 0.1 * np.eye(8)  # full, not diagonal
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    mu = rng.normal(size=8)
    assert frechet_from_moments(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)
    s1, s2 = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    expected = np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2) + 4.0
    rotated = frechet_from_moments(q @ mu, q @ np.diag(s1) @ q.T, q @ (mu + [2, 0, 0, 0, 0, 0, 0, 0]),
                                   q @ np.diag(s2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_samples_approaches_the_closed_form():
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, (20000, 4))
    b = rng.normal(1.0, 2.0, (20000, 4))
    assert frechet_distance(a, b) == pytest.approx(4 * 1.0 + 4 * (2.0 - 1.0) ** 2, rel=0.03)
    with pytest.raises(SunEdgeError, match="feature sets"):
        frechet_distance(a[:, :3], b)


def test_shapes_of_inputs_outputs_and_features():
    model = AttributeClassifier().eval()
    assert sum(p.numel() for p in model.parameters()) < 400_000
    images, _ = scene_batch(5, seed=0)
    x = to_input(images)
    assert x.shape == (5, 3, 64, 64) and x.dtype == torch.float32 and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    logits = model(x)
    assert {a: tuple(v.shape) for a, v in logits.items()} == {a: (5, len(VALUES[a])) for a in ATTRIBUTES}
    assert extract_features(model, images).shape == (5, model.config.features)
    pred = predict(model, images)
    assert set(pred["count"]) <= {1, 2, 3} and pred["shape"].dtype == np.int64
    with pytest.raises(SunEdgeError, match="uint8 images"):
        to_input(images.astype(np.float32))


@pytest.fixture(scope="module")
def quick_model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network: one thread is as fast, and spins on no busy neighbour
    try:
        yield train_classifier(steps=120, batch_size=32, seed=0, pool=1024, progress=False,
                               config=ClassifierConfig(widths=(8, 16, 32, 64), features=64))
    finally:
        torch.set_num_threads(threads)


def test_short_training_beats_chance(quick_model):
    images, scenes = scene_batch(200, seed=123, style="toon")
    acc = accuracy(quick_model, images, scenes)
    chance = {a: 1.0 / len(VALUES[a]) for a in ATTRIBUTES}
    assert acc["colour"] > 0.5 and acc["background"] > 0.5, acc  # the easy ones, well learned already
    assert np.mean([acc[a] - chance[a] for a in ATTRIBUTES]) > 0.2, acc


def test_save_load_roundtrip(quick_model, tmp_path):
    path = save_classifier(quick_model, tmp_path / "c.safetensors")
    loaded = load_classifier(path)
    assert loaded.config == quick_model.config
    images, _ = scene_batch(6, seed=9)
    with torch.no_grad():
        a, b = quick_model(to_input(images)), loaded(to_input(images))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SunEdgeError, match="not found"):
        load_classifier(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SunEdgeError, match="cannot read pocket classifier"):
        load_classifier(tmp_path / "bad.safetensors")
