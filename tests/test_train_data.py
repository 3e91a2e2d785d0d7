"""Training data: the four input kinds, unreadable images, the negative phrase pool, the data order."""

from __future__ import annotations

import json

import numpy as np
import pytest
from train_helpers import write_folder

from sun_edge.errors import SunEdgeError
from sun_edge.train.data import DrawSampler, TrainDataset, center_crop, collate, load_image, open_records
from sun_edge.train.negatives import load_pool, parse_pool, sample_negative


def dataset(records, **kw) -> TrainDataset:
    return TrainDataset(records, load_pool(), resolution=kw.pop("resolution", 64), seed=0, max_negative_phrases=100, **kw)


def test_folder_pairs_images_with_captions(tmp_path):
    root = write_folder(tmp_path / "d", 6, uncaptioned=2)
    (root / "sub").mkdir()
    write_folder(root / "sub", 2)
    records = open_records(root)
    assert len(records) == 8  # uncaptioned images are left out; subfolders are searched
    assert records[0].caption.startswith("a square of colour")
    item = dataset(records)[(0, 3)]
    assert item["pixels"].shape == (3, 64, 64) and item["pixels"].dtype == np.float32
    assert item["ids"].shape == (77,) and item["neg_ids"].shape == (77,)


def test_jsonl_manifest_with_relative_paths_and_negatives(tmp_path):
    write_folder(tmp_path / "imgs", 3)
    lines = [{"image": "imgs/img00.png", "caption": "first", "negative_prompt": "blurry, text"},
             {"image": str(tmp_path / "imgs/img01.png"), "text": "second"},
             {"image": "imgs/img02.png", "caption": "third", "negative_prompt": ""}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    records = open_records(manifest)
    assert [r.caption for r in records.records] == ["first", "second", "third"]
    data = dataset(records)
    assert data.negative_prompt((0, 0)) == "blurry, text"
    assert data.negative_prompt((0, 1)) == data.negative_prompt((0, 1))  # sampled, but deterministic
    assert data[(0, 1)]["pixels"].shape == (3, 64, 64)


def test_csv_manifest(tmp_path):
    write_folder(tmp_path / "imgs", 2)
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,text,negative_prompt\nimgs/img00.png,one,ugly\nimgs/img01.png,\"two, with comma\",\n")
    records = open_records(manifest)
    assert [(r.caption, r.negative_prompt) for r in records.records] == [("one", "ugly"), ("two, with comma", None)]
    assert dataset(records)[(0, 0)]["pixels"].shape == (3, 64, 64)


def test_datasets_folder(tmp_path):
    import datasets

    root = write_folder(tmp_path / "imgs", 4)
    paths = sorted(str(p) for p in root.glob("*.png"))
    ds = datasets.Dataset.from_dict({"image": paths, "caption": [f"c{i}" for i in range(4)]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf-dict"))
    for where in ("hf", "hf-dict"):
        records = open_records(tmp_path / where)
        assert len(records) == 4 and records[2].caption == "c2"
        assert dataset(records)[(0, 2)]["pixels"].shape == (3, 64, 64)


def test_unreadable_image_is_skipped_and_named(tmp_path):
    root = write_folder(tmp_path / "d", 2, corrupt=1)
    records = open_records(root)
    data = dataset(records)
    names = [records[i].name for i in range(len(records))]
    bad = names.index("bad0.png")
    items = [data[(0, i)] for i in range(len(records))]
    assert items[bad]["skipped"][0] == "bad0.png"
    batch = collate(items)
    assert batch["drawn"] == 3 and batch["pixels"].shape[0] == 2
    assert [name for name, _ in batch["skipped"]] == ["bad0.png"]


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "absent", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no image-caption pairs"),
    (lambda p: write_folder(p / "nocap", 0, uncaptioned=2), "no captions"),
    (lambda p: (p / "m.csv").write_text("image,label\na.png,x\n") and p / "m.csv", "no caption column"),
    (lambda p: (p / "m.txt").write_text("x") and p / "m.txt", "expected a folder"),
])
def test_bad_data_paths_are_one_line_errors(tmp_path, make, message):
    with pytest.raises(SunEdgeError, match=message) as err:
        open_records(make(tmp_path))
    assert "\n" not in str(err.value)


def test_center_crop_resizes_the_shortest_side(tmp_path):
    from PIL import Image

    image = np.zeros((100, 60, 3), np.uint8)
    image[:, :, 0] = np.arange(100)[:, None]  # a vertical ramp in red
    path = tmp_path / "r.png"
    Image.fromarray(image).save(path)
    out = center_crop(load_image(path), 32)
    assert out.shape == (3, 32, 32) and out.min() >= -1.0 and out.max() <= 1.0
    red = (out[0, :, 16] + 1) * 127.5  # the centre column keeps the middle of the ramp
    assert 15 < red[0] < 25 and 75 < red[-1] < 85  # rows 10..42 of 53 after the resize: 19..79 of 100


def test_negative_pool_is_large_distinct_and_clean():
    pool = load_pool()
    assert len(pool) >= 400
    assert len(set(pool)) == len(pool)
    assert all(p == p.strip().lower() and p and "," not in p for p in pool)


def test_pool_files_are_checked(tmp_path):
    assert parse_pool("# comment\nblurry\n\nugly\n", "x") == ("blurry", "ugly")
    with pytest.raises(SunEdgeError, match="repeats 1"):
        parse_pool("blurry\nugly\nblurry\n", "x")
    with pytest.raises(SunEdgeError, match="comma"):
        parse_pool("blurry, ugly\n", "x")
    with pytest.raises(SunEdgeError, match="does not exist"):
        load_pool(tmp_path / "none.txt")


def test_negative_sampling_counts_are_uniform_in_0_to_100():
    pool = load_pool()
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(3000):
        text = sample_negative(pool, rng, 100)
        phrases = text.split(", ") if text else []
        assert len(set(phrases)) == len(phrases) and set(phrases) <= set(pool)
        counts.append(len(phrases))
    assert min(counts) == 0 and max(counts) == 100
    assert 45 < np.mean(counts) < 55
    assert sample_negative(("a", "b"), rng, 100).count(", ") <= 1  # capped by the pool


def test_draw_sampler_resumes_and_shards():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    full = take(DrawSampler(10, seed=3), 35)
    assert sorted(i for e, i in full if e == 0) == list(range(10))
    assert [i for _, i in full[:10]] != [i for _, i in full[10:20]]
    assert take(DrawSampler(10, seed=3, start=13), 22) == full[13:]
    shards = [take(DrawSampler(10, seed=3, rank=r, world=3), 4) for r in range(3)]
    firsts = [i for shard in shards for e, i in shard if e == 0]
    assert sorted(firsts) == list(range(10))
    with pytest.raises(SunEdgeError, match="fewer than"):
        DrawSampler(2, seed=0, world=4)
