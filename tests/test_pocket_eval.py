"""``sun-edge eval``: metrics against hand computations, Fig. 5's counting, and a whole run on the tiny model."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from sun_edge.cli import main
from sun_edge.pocket.classifier import VALUES, load_classifier, predict
from sun_edge.pocket.eval import adherence, image_psnr, methods, negative_steering, shape_visible, table2_prompts
from sun_edge.pocket.eval import Scores
from sun_edge.pocket.report import EvalRequest, spread
from sun_edge.pocket.world import COLOURS, RGB, STYLES, Scene, make_example, render


def test_image_psnr_by_hand():
    ref = np.zeros((4, 4, 3), np.uint8)
    out = ref.copy()
    out[0, 0, 0] = 16  # mse = 256 / 48
    assert image_psnr(ref, out) == pytest.approx(10 * math.log10(255**2 * 48 / 256))
    assert image_psnr(ref, ref) == math.inf


def test_adherence_counts_each_attribute_and_all_right():
    scenes = [Scene("circle", "red", "small", 1, "blue"), Scene("star", "green", "large", 3, "white")]
    pred = {a: np.array([VALUES[a].index(getattr(s, a)) if a != "count" else s.count for s in scenes])
            for a in ("shape", "colour", "size", "count", "background")}
    pred["colour"] = np.array([VALUES["colour"].index("red"), VALUES["colour"].index("blue")])  # second wrong
    got = adherence(pred, scenes)
    assert got["colour"] == 0.5 and got["shape"] == 1.0
    assert got["mean"] == pytest.approx((4 + 0.5) / 5)
    assert got["all"] == 0.5


def test_adherence_does_not_read_a_colour_where_no_shape_is_seen():
    scenes = [Scene("circle", "green", "small", 1, "blue")] * 2
    pred = {a: np.zeros(2, np.int64) for a in ("shape", "size", "background")}
    pred.update(colour=np.full(2, VALUES["colour"].index("green")), count=np.ones(2, np.int64))
    assert adherence(pred, scenes)["colour"] == 1.0
    got = adherence(pred, scenes, visible=np.array([True, False]))
    assert got["colour"] == 0.5 and got["shape"] == 1.0  # only the colour needs the shape seen


def test_every_world_render_shows_a_shape_and_a_flat_background_none():
    """The visibility thresholds come from the world's geometry (eval.py); they must pass every render of either
    style, the smallest shapes included, and fail a flat image of any palette colour, which the classifier
    would read as a colour (green, mostly)."""
    for style in STYLES:
        images = np.stack([make_example(i, 5, style).image for i in range(600)])
        assert shape_visible(images).all(), style
    flat = np.stack([np.full((64, 64, 3), rgb, np.uint8) for rgb in RGB.values()])
    assert not shape_visible(flat).any()
    faint = flat[[list(RGB).index("yellow")]].copy()
    faint[0, 20:30, 20:30] = (250, 200, 30)  # a yellow-orange square on yellow, 20 units from it: not seen
    assert not shape_visible(faint)[0]
    faint[0, 20:30, 20:30] = RGB["orange"]  # the world's closest pair, orange on yellow: seen
    assert shape_visible(faint)[0]


def test_methods_are_the_papers_table2_rows():
    table = methods(64)
    assert table["cfg25"].settings.steps == 25 and table["cfg25"].settings.scheduler == "dpmpp_2m"
    assert table["cfg25"].settings.mode == "cfg" and table["cfg25"].settings.guidance == 8.0
    assert {n: (m.settings.mode, m.settings.steps, m.settings.scheduler) for n, m in table.items() if n != "cfg25"} == {
        "ddim4": ("cfg", 4, "ddim"), "dpmpp4": ("cfg", 4, "dpmpp_2m"), "sun4": ("sun", 4, "ddim")}
    assert all(m.settings.height == m.settings.width == 64 for m in table.values())


def test_table2_prompts_are_fixed_and_fully_specified():
    a, b = table2_prompts(12), table2_prompts(12)
    assert a == b
    prompts, scenes, seeds = a
    assert seeds == list(range(12))
    assert all(s.colour in p and s.shape in p and s.background in p for p, s in zip(prompts, scenes))


@dataclass
class _Result:
    image: Image.Image


class _ColourPipe:
    """World renders instead of a model: red shapes, blue when the negative prompt is 'red'; stars always green."""

    def generate(self, prompt, negative, seeds, settings):
        shape = prompt.removeprefix("a ")
        colour = "green" if shape == "star" else ("blue" if negative == "red" else "red")
        image = render(Scene(shape, colour, "large", 1, "white"), np.random.default_rng(seeds[0]))
        return [_Result(Image.fromarray(image))]


def test_negative_steering_counts_shares_per_colour():
    steer = negative_steering(_ColourPipe(), load_classifier(), methods(64)["sun4"].settings, seeds_per_shape=2,
                              colours=("red", "green"))
    assert steer.without == {"red": 0.75, "green": 0.25}  # 3 of 4 shapes red, stars green
    assert steer.with_negative == {"red": 0.0, "green": 0.25}  # 'red' steered to blue; 'green' ignored by the fake
    assert steer.mean() == (0.5, 0.125)
    assert steer.fall() == pytest.approx(0.75)  # 1 - 0.125 / 0.5
    assert steer.hits_without["red"] == [True] * 6 + [False] * 2  # circle, square, triangle x 2 seeds; stars green
    assert 0.0 <= steer.fall_sd() < 0.5
    assert steer.to_dict()["fall"] == pytest.approx(0.75)


class _WipingPipe(_ColourPipe):
    """As _ColourPipe, but the negative 'green' wipes the shape out: a flat green image, which the classifier
    reads as green."""

    def generate(self, prompt, negative, seeds, settings):
        if negative == "green":
            return [_Result(Image.fromarray(np.full((64, 64, 3), RGB["green"], np.uint8)))]
        return super().generate(prompt, negative, seeds, settings)


def test_negative_steering_counts_an_image_without_a_shape_as_no_colour():
    steer = negative_steering(_WipingPipe(), load_classifier(), methods(64)["sun4"].settings, seeds_per_shape=2,
                              colours=("red", "green"))
    assert steer.without == {"red": 0.75, "green": 0.25}
    assert steer.with_negative["green"] == 0.0  # no shape: not green, though the classifier says green
    flat_green = np.full((1, 64, 64, 3), RGB["green"], np.uint8)
    assert COLOURS[predict(load_classifier(), flat_green)["colour"][0]] == "green"  # what the check is there for


def test_eval_on_the_tiny_model_writes_tables_grids_and_json(home_env, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--model", "tiny-random", "--prompts", "2", "--negative-seeds", "0", "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    data = json.loads((out / "eval.json").read_text())
    rows = data["table2"]["tiny-random"]
    assert set(rows) == {"cfg25", "ddim4", "dpmpp4", "sun4"}
    assert rows["cfg25"]["psnr"] is None and all(len(rows[m]["psnr_per_image"]) == 2 for m in ("ddim4", "dpmpp4", "sun4"))
    assert all(0.0 <= rows[m]["adherence"]["mean"] <= 1.0 and rows[m]["fd"] >= 0.0 for m in rows)
    assert rows["cfg25"]["fd_reference"] is None and all(rows[m]["fd_reference"] >= 0.0 for m in ("ddim4", "sun4"))
    assert "### Table 2" in text and "| tiny-random | SUN 4 steps" in text and "FD to the reference" in text
    assert data["request"]["command"].startswith("sun-edge eval --model tiny-random")
    grid = Image.open(out / "grid-tiny-random.png")
    assert grid.width > 4 * 128 and grid.height > 2 * 128  # 4 methods x 2 prompts, 64 px scaled twice


def test_bad_msc_adapter_is_one_line(home_env, tmp_path, capsys):
    code = main(["eval", "--model", "tiny-random", "--msc-adapter", "nolabel", "-o", str(tmp_path / "e")])
    assert code == 2
    assert "bad --msc-adapter 'nolabel'" in capsys.readouterr().err


def test_styles_default_by_model_name():
    request = EvalRequest(models=("pocket-base", "pocket-toon"))
    assert request.style("pocket-base") == "plain" and request.style("pocket-toon") == "toon"
    assert EvalRequest(models=("x",), styles=(("x", "toon"),)).style("x") == "toon"
    assert len(COLOURS) == 8


def test_fd_to_the_reference_is_zero_for_the_reference_images_and_grows_away_from_them():
    from sun_edge.pocket.classifier import extract_features
    from sun_edge.pocket.eval import real_images, score, table2_prompts

    classifier = load_classifier()
    _, scenes, _ = table2_prompts(16)
    ref = real_images(scenes, 3, "plain", 64)
    ref_feats = extract_features(classifier, ref)
    same = score(classifier, ref, scenes, ref_feats, ref, ref_feats)
    assert abs(same.fd_reference) < 1e-3 and same.psnr == float("inf")  # float noise of a rank-16 covariance
    other = score(classifier, real_images(scenes, 4, "toon", 64), scenes, ref_feats, ref, ref_feats)
    assert other.fd_reference > 1.0 and other.fd_reference == pytest.approx(other.fd)  # real = reference here
    assert 0.0 < other.fd_reference_sd < other.fd_reference  # bootstrap spread over the 16 prompts
    assert other.psnr_se > 0.0 and other.to_dict()["psnr_se"] == other.psnr_se


def test_table4_spread_over_training_seeds_by_hand():
    runs = [Scores({"mean": 0.8, "colour": 0.5, "all": 0.3}, fd=200.0, psnr=20.0, fd_reference=10.0),
            Scores({"mean": 0.6, "colour": 0.7, "all": 0.1}, fd=220.0, psnr=22.0, fd_reference=30.0)]
    got = spread(runs)
    assert got["adherence (colour)"] == pytest.approx((0.6, math.sqrt(0.02)))  # s.d. with ddof 1: |a - b| / sqrt 2
    assert got["fd_reference"] == pytest.approx((20.0, math.sqrt(200.0)))
    assert got["psnr"] == pytest.approx((21.0, math.sqrt(2.0)))
    assert list(got) == ["adherence (mean)", "adherence (colour)", "adherence (all)", "fd_reference", "fd", "psnr"]


def test_eval_table4_with_a_label_given_twice_reports_each_and_their_spread(home_env, tmp_path, capsys):
    adapter = home_env / "models" / "tiny-random" / "sun-adapter.safetensors"
    out = tmp_path / "eval"
    code = main(["eval", "--model", "tiny-random", "--prompts", "2", "--negative-seeds", "0", "--msc-adapter",
                 f"p=0:{adapter}", "--msc-adapter", f"p=0:{adapter}", "--msc-adapter", f"p=1:{adapter}", "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    data = json.loads((out / "eval.json").read_text())
    assert [len(data["table4"][k]) for k in ("p=0", "p=1")] == [2, 1]
    assert data["table4"]["p=0"][0] == data["table4"]["p=0"][1]  # the same adapter twice: the same figures
    mean, sd = data["table4_spread"]["p=0"]["psnr"]
    assert mean == pytest.approx(data["table4"]["p=0"][0]["psnr"]) and sd == 0.0 and "p=1" not in data["table4_spread"]
    assert "| p=0, run 2 of 2 |" in text and "| p=0: mean ± s.d. over its 2 runs |" in text
    assert "| p=1 |" in text
