"""The pocket world: scenes, captions, rendering, the toon style, datasets on disk, eval prompts."""

from __future__ import annotations

import colorsys
from collections import Counter

import numpy as np
import pytest

from sun_edge.errors import SunEdgeError
from sun_edge.pocket import world
from sun_edge.pocket.world import (ATTRIBUTES, BACKGROUNDS, COLOURS, OPTIONAL, RGB, Scene, eval_prompts,
                                   make_example, object_mask, parse_caption, render, sample_mention, sample_scene,
                                   scene_batch, toonify, write_dataset)


def components(mask: np.ndarray) -> list[int]:
    """Sizes of the 8-connected components of a bool [H, W] mask."""
    seen = np.zeros_like(mask)
    sizes = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x], stack, size = True, [(y, x)], 0
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny in range(max(cy - 1, 0), min(cy + 2, mask.shape[0])):
                for nx in range(max(cx - 1, 0), min(cx + 2, mask.shape[1])):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        sizes.append(size)
    return sizes


def test_captions_read_naturally():
    assert Scene("circle", "red", "small", 2, "blue").caption() == "two small red circles on a blue background"
    assert Scene("square", "green", "large", 1, "white").caption() == "a large green square on a white background"
    assert Scene("circle", "red", "small", 1, "blue").caption(frozenset()) == "a circle"
    assert Scene("square", "red", "small", 3, "blue").caption(frozenset({"colour"})) == "red squares"
    assert Scene("star", "orange", "small", 1, "grey").caption(frozenset({"colour"})) == "an orange star"
    with pytest.raises(SunEdgeError, match="cannot mention"):
        Scene("star", "orange", "small", 1, "grey").caption(frozenset({"shape"}))


def test_captions_mention_exactly_the_chosen_attributes_and_parse_back():
    rng = np.random.default_rng(0)
    for _ in range(500):
        scene, mention = sample_scene(rng), sample_mention(rng, 0.5)
        stated = {a: getattr(scene, a) for a in ATTRIBUTES if a in mention | {"shape"}}
        if scene.count == 1:
            stated["count"] = 1  # "a ..." always says one
        assert parse_caption(scene.caption(mention)) == stated


def test_scenes_are_valid_and_cover_the_vocabulary():
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng) for _ in range(3000)]
    assert all(s.colour != s.background for s in scenes)
    assert {s.colour for s in scenes} == set(COLOURS) and {s.background for s in scenes} == set(BACKGROUNDS)
    with pytest.raises(SunEdgeError, match="cannot sit on"):
        Scene("circle", "blue", "small", 1, "blue")
    dropped = Counter(a for _ in range(2000) for a in OPTIONAL - sample_mention(rng, 0.25))
    assert all(350 < dropped[a] < 650 for a in OPTIONAL)  # each dropped about a quarter of the time


def test_examples_are_deterministic_and_independent_of_other_indices():
    a, b = make_example(5, seed=3), make_example(5, seed=3)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.scene == b.scene
    assert a.image.dtype == np.uint8 and a.image.shape == (64, 64, 3)
    assert not np.array_equal(make_example(6, seed=3).image, a.image)
    toon = make_example(5, seed=3, style="toon")
    assert toon.scene == a.scene and toon.caption == a.caption  # same scene and words, other look
    images, scenes = scene_batch(8, seed=3)
    assert images.shape == (8, 64, 64, 3) and scenes[5] == a.scene and np.array_equal(images[5], a.image)
    with pytest.raises(SunEdgeError, match="unknown style"):
        make_example(0, seed=0, style="neon")


def test_counts_and_sizes_are_visible():
    rng = np.random.default_rng(2)
    areas = {"small": [], "large": []}
    for i in range(120):
        scene = sample_scene(rng)
        image = render(scene, rng)
        blobs = [s for s in components(object_mask(image)) if s >= 6]  # ignore stray noise pixels
        assert len(blobs) == scene.count, (i, scene)
        areas[scene.size] += blobs
    assert np.median(areas["large"]) > 2.2 * np.median(areas["small"])
    assert max(areas["small"]) < min(areas["large"]) * 1.1  # the sizes barely overlap across shapes


def test_object_colour_stands_out_from_the_background():
    gaps = [np.linalg.norm(np.subtract(RGB[c], RGB[b])) for c in COLOURS for b in BACKGROUNDS if c != b]
    assert min(gaps) > 90


def hue_of(rgb: np.ndarray) -> float:
    return colorsys.rgb_to_hsv(*(np.asarray(rgb, float) / 255.0))[0] * 360.0


def test_toonify_changes_the_look_but_keeps_the_object_hue():
    chromatic = {"red", "green", "blue", "yellow", "purple", "orange"}
    checked = 0
    for i in range(60):
        ex = make_example(i, seed=4)
        toon = toonify(ex.image)
        assert toon.shape == ex.image.shape and toon.dtype == np.uint8
        assert np.abs(toon.astype(int) - ex.image).mean() > 10  # a different look
        assert np.array_equal(toonify(ex.image), toon)  # deterministic
        if ex.scene.colour in chromatic:
            inner = object_mask(ex.image) & object_mask(toon)
            plain_hue, toon_hue = hue_of(np.median(ex.image[inner], 0)), hue_of(np.median(toon[inner], 0))
            assert min(abs(plain_hue - toon_hue), 360 - abs(plain_hue - toon_hue)) < 30, (i, ex.scene)
            checked += 1
    assert checked > 20


def test_write_dataset_is_readable_by_training(tmp_path):
    from sun_edge.train.data import load_image, open_records

    folder = write_dataset(tmp_path / "world", 12, seed=5, style="toon", progress=False)
    records = open_records(folder)
    assert len(records) == 12
    assert records[3].caption == make_example(3, seed=5, style="toon").caption
    assert np.array_equal(np.asarray(load_image(records[3].image)), make_example(3, seed=5, style="toon").image)
    lines = (folder / "scenes.jsonl").read_text().splitlines()
    assert len(lines) == 12 and '"file": "00003.png"' in lines[3]
    with pytest.raises(SunEdgeError, match="already exists"):
        write_dataset(folder, 2, seed=5, progress=False)


def test_write_dataset_leaves_nothing_on_error(tmp_path, monkeypatch):
    def broken(index, *args, **kwargs):
        if index == 3:
            raise RuntimeError("disk full")
        return make_example(index, *args, **kwargs)

    monkeypatch.setattr(world, "make_example", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_dataset(tmp_path / "world", 6, seed=0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_eval_prompts_are_deterministic_and_balanced():
    prompts = eval_prompts(96, seed=0)
    assert prompts == eval_prompts(96, seed=0) and prompts != eval_prompts(96, seed=1)
    assert all(mention == OPTIONAL for _, mention in prompts)
    for attr in ("shape", "size", "count"):
        counts = Counter(getattr(s, attr) for s, _ in prompts)
        assert max(counts.values()) - min(counts.values()) <= 1
    assert {s.colour for s, _ in prompts} == set(COLOURS) and {s.background for s, _ in prompts} == set(BACKGROUNDS)


def test_negative_phrases_are_a_valid_pool_of_the_worlds_own_words():
    from sun_edge.pocket.world import make_example, negative_phrases
    from sun_edge.train.negatives import parse_pool

    phrases = parse_pool("\n".join(negative_phrases()), "world")
    vocabulary = {w for i in range(400) for w in make_example(i, 0, drop=0.5).caption.split()}
    assert {w for p in phrases for w in p.split()} <= vocabulary | {"on", "a", "background"}
    assert "red" in phrases and "on a grey background" in phrases


def test_attribute_negatives_are_one_attribute_each():
    from sun_edge.pocket.world import attribute_negatives
    from sun_edge.train.negatives import parse_pool

    phrases = parse_pool("\n".join(attribute_negatives()), "attributes")
    assert set(COLOURS) <= set(phrases) and {f"on a {b} background" for b in BACKGROUNDS} <= set(phrases)
    assert {"circle", "stars", "small", "large", "two", "three"} <= set(phrases)
    assert len(phrases) == 26 and not any(" " in p and not p.startswith("on a ") for p in phrases)
