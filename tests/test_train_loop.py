"""The training loop end to end on the tiny random model: loss, resume, frozen weights, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import state_sha256, write_folder

from sun_edge.errors import SunEdgeError
from sun_edge.train import TrainConfig, train
from sun_edge.train.logs import CSV_FILE, read_csv_log
from sun_edge.train.step import check_frozen

FAST = {"resolution": 64, "teacher_substeps": 1, "progress": False}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("squares"), 16)


def test_loss_falls(home_env, squares, tmp_path):
    """Paper defaults but a CFG scale of 2, which a tiny random teacher's adapter can follow closely."""
    config = TrainConfig(model="tiny-random", data=squares, output=tmp_path / "a.safetensors", max_steps=30,
                         batch_size=4, learning_rate=3e-3, guidance=2.0, checkpoint_every=100, **FAST)
    result = train(config)
    losses = [h.loss for h in result.history]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert any(h.msc_fraction > 0 for h in result.history)  # MSC replacement is part of the run
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, (first, last, losses)


def test_resumed_run_equals_straight_run(home_env, tmp_path):
    data = write_folder(tmp_path / "data", 6, corrupt=1)
    common = dict(model="tiny-random", data=data, batch_size=2, gradient_accumulation_steps=2, msc_probability=0.5,
                  teacher_substeps=2, learning_rate=1e-3, checkpoint_every=2, resolution=64, progress=False)
    straight = train(TrainConfig(output=tmp_path / "straight.safetensors", max_steps=4, **common))
    part = TrainConfig(output=tmp_path / "split.safetensors", max_steps=2, **common)
    first = train(part)
    assert first.steps == 2 and first.start_step == 0
    # as if killed after logging step 3 and while saving its checkpoint
    with open(first.checkpoint_dir / CSV_FILE, "a") as log:
        log.write("3,0.5,99.0,99.0,99.0,0.0,0.001,1.0,1.0\n")
    (first.checkpoint_dir / ".tmp-step-00000003-12345").mkdir()
    second = train(TrainConfig(**{**part.__dict__, "max_steps": 4}))
    assert second.start_step == 2 and second.steps == 4 and len(second.history) == 2

    rows = {name: read_csv_log(Path(cfg) / CSV_FILE) for name, cfg in
            (("straight", straight.checkpoint_dir), ("split", second.checkpoint_dir))}
    assert [r["step"] for r in rows["split"]] == [1, 2, 3, 4]
    assert not list(second.checkpoint_dir.glob(".tmp-*"))
    for key in ("loss", "loss_cfg", "loss_msc", "msc_fraction", "epoch"):
        np.testing.assert_allclose([r[key] for r in rows["split"]], [r[key] for r in rows["straight"]], rtol=0, atol=1e-6)
    assert any(r["msc_fraction"] > 0 for r in rows["straight"])  # MSC replacement happened
    from safetensors.torch import load_file

    a, b = load_file(straight.output), load_file(second.output)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a)
    # the unreadable image was skipped, counted and remembered across the resume
    assert straight.skipped.keys() == {"bad0.png"} and second.skipped.keys() == {"bad0.png"}
    assert second.skipped_count == straight.skipped_count >= 1


def test_frozen_weights_do_not_change(home_env, squares, tmp_path):
    from sun_edge.adapter import SUNAdapter, load_adapter
    from sun_edge.models import load_model

    loaded = load_model("tiny-random")
    before = {name: state_sha256(getattr(loaded, name)) for name in ("unet", "text_encoder", "vae")}
    result = train(TrainConfig(model="tiny-random", data=squares, output=tmp_path / "a.safetensors", max_steps=3,
                               batch_size=2, learning_rate=1e-2, **FAST), model=loaded)
    after = {name: state_sha256(getattr(loaded, name)) for name in ("unet", "text_encoder", "vae")}
    assert before == after
    torch.manual_seed(0)
    fresh = SUNAdapter.from_unet(loaded.unet)
    trained = load_adapter(result.output, loaded.unet.config)
    assert not torch.equal(trained.layers[0].to_k_neg_alpha, fresh.layers[0].to_k_neg_alpha)


def test_check_frozen_rejects_a_trainable_unet_or_a_wrong_optimizer(tiny):
    import copy

    from sun_edge.adapter import SUNAdapter

    unet = copy.deepcopy(tiny["unet"]).requires_grad_(False)
    adapter = SUNAdapter.from_unet(unet)
    good = torch.optim.AdamW(adapter.parameters())
    check_frozen({"unet": unet}, adapter, good)
    with pytest.raises(SunEdgeError, match="the optimizer must hold exactly"):
        check_frozen({"unet": unet}, adapter, torch.optim.AdamW([*adapter.parameters(), *unet.conv_in.parameters()]))
    with pytest.raises(SunEdgeError, match="the optimizer must hold exactly"):
        check_frozen({"unet": unet}, adapter, torch.optim.AdamW(list(adapter.parameters())[1:]))
    unet.conv_in.weight.requires_grad_(True)
    with pytest.raises(SunEdgeError, match="unet must be frozen.*conv_in.weight"):
        check_frozen({"unet": unet}, adapter, good)


def test_cli_trains_and_writes_a_loadable_adapter(home_env, squares, tmp_path, capsys):
    from sun_edge.adapter import load_adapter
    from sun_edge.cli import main
    from sun_edge.models import load_model

    out = tmp_path / "cli.safetensors"
    rc = main(["train", "--model", "tiny-random", "--data", str(squares), "-o", str(out), "--max-steps", "2",
               "--resolution", "64", "--teacher-substeps", "1", "--batch-size", "2", "--log", "tensorboard",
               "--no-progress", "--save-precision", "fp16"])
    assert rc == 0
    assert f"wrote {out} after 2 steps" in capsys.readouterr().out
    adapter = load_adapter(out, load_model("tiny-random").unet.config)
    assert len(adapter.specs) == 16
    assert list((tmp_path / "cli.checkpoints" / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in (tmp_path / "cli.checkpoints").glob("step-*")] == ["step-00000002"]


def test_max_seconds_stops_early_with_a_checkpoint_and_the_adapter(home_env, squares, tmp_path, capsys):
    """A time-boxed run (a GPU lease) stops at the first step past the limit and saves both."""
    from sun_edge.cli import main

    out = tmp_path / "boxed.safetensors"
    rc = main(["train", "--model", "tiny-random", "--data", str(squares), "-o", str(out), "--max-steps", "1000",
               "--max-seconds", "1e-6", "--resolution", "64", "--teacher-substeps", "1", "--batch-size", "2",
               "--no-progress"])
    assert rc == 0
    assert f"wrote {out} after 1 steps" in capsys.readouterr().out
    assert out.is_file()
    assert [p.name for p in (tmp_path / "boxed.checkpoints").glob("step-*")] == ["step-00000001"]
    with pytest.raises(SunEdgeError, match="max seconds must be positive"):
        TrainConfig(model="tiny-random", data=squares, output=out, max_seconds=0)


def test_bf16_mixed_precision_runs(home_env, squares, tmp_path):
    result = train(TrainConfig(model="tiny-random", data=squares, output=tmp_path / "bf16.safetensors", max_steps=1,
                               batch_size=2, mixed_precision="bf16", cpu=True, **FAST))
    assert np.isfinite(result.history[0].loss)


@pytest.mark.parametrize("extra, message", [
    (["--data", "{tmp}/absent"], "training data .*absent does not exist"),
    (["--data", "{tmp}/empty"], "holds no image-caption pairs"),
    (["--data", "{squares}", "--mixed-precision", "fp8"], "unknown mixed precision 'fp8'; choose one of: no, fp16, bf16"),
    (["--data", "{squares}", "--log", "wandb"], "unknown log kind"),
    (["--data", "{squares}", "--batch-size", "0"], "batch-size must be a positive integer"),
    (["--data", "{squares}", "--resume"], "--resume: no checkpoint in"),
])
def test_cli_bad_inputs_are_one_error_line(home_env, squares, tmp_path, capsys, extra, message):
    from sun_edge.cli import main

    (tmp_path / "empty").mkdir()
    args = [a.format(tmp=tmp_path, squares=squares) for a in extra]
    rc = main(["train", "--model", "tiny-random", "-o", str(tmp_path / "x.safetensors"), *args, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and err.startswith("error: ")
    import re

    assert re.search(message, err), err


def test_output_must_be_safetensors(tmp_path):
    with pytest.raises(SunEdgeError, match=r"must end in \.safetensors"):
        TrainConfig(model="tiny-random", data=tmp_path, output=tmp_path / "a.pt")


def test_module_entry_point_for_accelerate_launch():
    run = subprocess.run([sys.executable, "-m", "sun_edge.train", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0
    assert "--teacher-substeps" in run.stdout and "--mixed-precision" in run.stdout
