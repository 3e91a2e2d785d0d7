"""Issue 13, training: a bad output path is refused before any work, a failed run leaves no checkpoints
folder of its own, and images smaller than the resolution are trained on with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from train_helpers import write_folder

from cli_helpers import error_line, run

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--resolution", "64", "--teacher-substeps", "1", "--batch-size", "2", "--no-progress"]


@pytest.mark.parametrize("output,message", [
    ("/proc/adapter.safetensors", "cannot write in /proc"),
    ("{tmp}", "is a folder; give a file path inside it"),
    ("{tmp}/missing/a.safetensors", "does not exist; create it first"),
])
def test_bad_train_outputs_are_refused_before_training(home_env, tmp_path, capsys, monkeypatch, output, message):
    from sun_edge.train import loop

    monkeypatch.setattr(loop, "train", lambda config: pytest.fail("training started before the output was checked"))
    data = write_folder(tmp_path / "data", 2)
    code, _, err = run(capsys, "train", "--model", "tiny-random", "--data", str(data),
                       "-o", output.format(tmp=tmp_path), *FAST)
    assert code == 2 and message in error_line(err)


def test_a_failed_run_leaves_no_checkpoint_folder(home_env, tmp_path, capsys):
    data = tmp_path / "broken"
    write_folder(data, 0, corrupt=3)  # captioned, but none can be read
    out = tmp_path / "a.safetensors"
    code, _, err = run(capsys, "train", "--model", "tiny-random", "--data", str(data), "-o", str(out),
                       "--max-steps", "2", *FAST)
    assert code == 2 and "no readable image" in error_line(err)
    assert not out.exists() and not (tmp_path / "a.checkpoints").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_a_failed_run_keeps_a_folder_it_did_not_make(home_env, tmp_path, capsys):
    data = tmp_path / "broken"
    write_folder(data, 0, corrupt=2)
    mine = tmp_path / "my-checkpoints"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code, _, _ = run(capsys, "train", "--model", "tiny-random", "--data", str(data), "-o", str(tmp_path / "a.safetensors"),
                     "--checkpoint-dir", str(mine), "--max-steps", "1", *FAST)
    assert code == 2 and (mine / "notes.txt").read_text() == "mine"


def test_small_images_are_trained_on_with_a_warning(home_env, tmp_path, capsys, caplog):
    from PIL import Image

    data = write_folder(tmp_path / "data", 2)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(data / "dot.png")
    (data / "dot.txt").write_text("a red dot")
    with caplog.at_level(logging.WARNING):
        code, _, err = run(capsys, "train", "--model", "tiny-random", "--data", str(data),
                           "-o", str(tmp_path / "a.safetensors"), "--max-steps", "3", *FAST)
    assert code == 0, err
    warned = [r.getMessage() for r in caplog.records if "smaller than the training resolution" in r.getMessage()]
    assert warned == ["image dot.png is 1x1, smaller than the training resolution 64: upscaled to it (blurry examples "
                      "teach blur; use larger images or a lower --resolution)"], warned  # once, though drawn twice
    assert Path(tmp_path / "a.safetensors").is_file()
