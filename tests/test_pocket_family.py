"""Pocket SD family: architecture and budget, the training stages, and scripts/train_pocket.py --quick."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sun_edge.pocket import family  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "train_pocket.py"


def load_script():
    spec = importlib.util.spec_from_file_location("train_pocket", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def components():
    return family.build_components(0)


@pytest.fixture()
def one_thread():
    """Tiny models run fastest, and steadiest on a shared machine, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_architecture_and_budget(components):
    counts = family.parameter_counts(components)
    assert counts["total"] <= family.MAX_MODEL_PARAMETERS  # <= 8.4 MB of fp16 weights
    low, high = family.UNET_PARAMETER_RANGE
    assert low <= counts["unet"] <= high
    embed = components["text_encoder"].get_input_embeddings().weight
    assert tuple(embed.shape) == (49408, family.TEXT_HIDDEN)
    assert embed.numel() > 0.9 * counts["text_encoder"]  # the vocabulary dominates the text encoder
    unet = components["unet"]
    assert unet.config.cross_attention_dim == components["text_encoder"].config.hidden_size
    cross = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    assert len(cross) == family.CROSS_ATTENTION_LAYERS
    assert "total:" in family.describe(components)


def test_shapes_end_to_end(components, one_thread):
    vae, unet, te = components["vae"], components["unet"], components["text_encoder"]
    with torch.no_grad():
        image = torch.zeros(2, 3, family.RESOLUTION, family.RESOLUTION)  # [2, 3, 64, 64]
        z = vae.encode(image).latent_dist.mean  # [2, 4, 16, 16]
        assert tuple(z.shape) == (2, family.LATENT_CHANNELS, family.LATENT_SIZE, family.LATENT_SIZE)
        assert tuple(vae.decode(z).sample.shape) == tuple(image.shape)
        emb = te(torch.full((2, 77), 49407), return_dict=False)[0]  # [2, 77, 32]
        eps = unet(z, torch.tensor([999, 0]), emb).sample  # [2, 4, 16, 16]
    assert eps.shape == z.shape


def test_training_schedule_is_sd15s():
    from sun_edge.pocket.train_family import sd15_noise_scheduler
    from sun_edge.sampling import SD15

    scheduler = sd15_noise_scheduler()
    np.testing.assert_allclose(scheduler.alphas_cumprod.double().numpy(), SD15.alphas_cumprod(), rtol=1e-5)


def test_stage_config_rejects_bad_values():
    from sun_edge.errors import SunEdgeError
    from sun_edge.pocket.train_family import StageConfig

    with pytest.raises(SunEdgeError, match="precision"):
        StageConfig(steps=1, batch_size=1, learning_rate=1e-3, precision="fp16")
    with pytest.raises(SunEdgeError, match="positive"):
        StageConfig(steps=0, batch_size=1, learning_rate=1e-3)


def test_write_model_refuses_existing(tmp_path, components):
    from sun_edge.errors import SunEdgeError

    (tmp_path / "m").mkdir()
    with pytest.raises(SunEdgeError, match="already exists"):
        family.write_model(components, tmp_path / "m")


def test_quick_family_run_writes_loadable_models_and_resumes(tmp_path, one_thread, capsys):
    from sun_edge.models import load_model

    script = load_script()
    out = tmp_path / "pocket"
    stages = ["data", "vae", "base", "toon", "classifier", "sun"]
    assert script.main([str(out), "--quick", "--no-progress", "--stages", *stages]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["stage"] for entry in log] == stages
    for entry in log:
        assert entry["total_seconds"] >= 0 and "steps" in entry or entry["stage"] == "data"

    vae_entry = next(e for e in log if e["stage"] == "vae")
    scale = vae_entry["extra"]["scaling_factor"]
    assert scale != 1.0 and np.isfinite(scale)
    for name in family.POCKET_MODELS:
        loaded = load_model(str(out / name))
        assert loaded.vae.config.scaling_factor == pytest.approx(scale)
        assert loaded.unet.dtype == torch.float32  # stored fp16, loaded as float32
        assert (out / name / "sun-adapter.safetensors").is_file()
        assert family.read_pocket_info(out / name)["stage"] in ("base", "toon")
    assert (out / "classifier.safetensors").is_file()
    assert (out / "adapters" / "sun-p0.1.safetensors").is_file()
    base_bytes = sum(f.stat().st_size for f in (out / "pocket-base").rglob("*.safetensors") if f.parent.name != "pocket-base")
    assert base_bytes < 8.5e6  # fp16 weights of unet + text encoder + vae

    capsys.readouterr()
    assert script.main([str(out), "--quick", "--no-progress", "--stages", *stages]) == 0
    assert "skipped" in capsys.readouterr().err
    assert len((out / "log.jsonl").read_text().splitlines()) == len(stages)  # nothing re-ran


def test_generate_cfg_runs_on_a_pocket_model(tmp_path, one_thread):
    """``sun-edge generate --mode cfg`` on a freshly written (untrained) pocket model folder."""
    from sun_edge.cli import main

    components = family.build_components(1)
    family.write_model(components, tmp_path / "m")
    out = tmp_path / "x.png"
    assert main(["generate", "--model", str(tmp_path / "m"), "--mode", "cfg", "--prompt", "a red star",
                 "--height", "64", "--width", "64", "--steps", "2", "-o", str(out)]) == 0
    assert out.is_file()


def test_unknown_stage_is_refused(tmp_path, capsys):
    assert load_script().main([str(tmp_path), "--stages", "vea"]) == 2
    assert "unknown stage 'vea'" in capsys.readouterr().err


def test_scale_multiplies_every_stages_steps():
    script = load_script()
    plan = script.scaled(script.FULL, 10)
    assert plan.base == (script.FULL.base[0] * 10, script.FULL.base[1])
    assert plan.adapter[0] == script.FULL.adapter[0] * 10 and plan.plain_images == script.FULL.plain_images
    assert script.scaled(script.QUICK, 0.01).vae[0] == 1


def test_max_seconds_stops_a_stage_and_says_so(one_thread):
    from sun_edge.pocket.family import build_components
    from sun_edge.pocket.train_family import ImageCaptions, StageConfig, train_vae

    data = ImageCaptions.render(16, seed=3)
    config = StageConfig(steps=100_000, batch_size=2, learning_rate=1e-3, max_seconds=0.5, progress=False)
    result = train_vae(build_components(0)["vae"], data, config, calibration_samples=8)
    assert 1 <= result.steps < 100_000
    assert result.extra["planned_steps"] == 100_000 and result.extra["stopped_by"] == "max_seconds=0.5"
    assert result.seconds_per_step == pytest.approx(result.seconds / result.steps, rel=0.01)
