"""Pocket SD family: architecture and budget, the training stages, and scripts/train_pocket.py --quick."""

from __future__ import annotations

import importlib.util
import json
import shutil
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
    with pytest.raises(SunEdgeError, match="CUDA graphs need a CUDA device"):
        StageConfig(steps=1, batch_size=1, learning_rate=1e-3, cuda_graph=True)


def _tiny_diffusion_run(config, text_encoder_lr=None):
    """A few diffusion steps of a fresh family on 8 rendered images; (modules, result, text encoder before)."""
    import copy

    from sun_edge.pocket.train_family import ImageCaptions, train_diffusion

    comps = family.build_components(0)
    before = copy.deepcopy(comps["text_encoder"])
    data = ImageCaptions.render(8, seed=5)
    modules, result = train_diffusion(comps["unet"], comps["text_encoder"], comps["vae"], data, config,
                                      ema_decay=None, text_encoder_lr=text_encoder_lr)
    return modules, result, before


def test_text_encoder_learning_rate_is_its_own(one_thread):
    """With a text-encoder rate 100x the UNet's, its first AdamW steps move its weights ~100x as far."""
    from sun_edge.pocket.train_family import StageConfig

    config = StageConfig(steps=3, batch_size=2, learning_rate=1e-5, warmup_steps=1, weight_decay=0.0, progress=False)
    modules, result, before = _tiny_diffusion_run(config, text_encoder_lr=1e-3)
    assert result.extra["text_encoder_lr"] == 1e-3 and result.steps == 3
    after = dict(modules["text_encoder"].named_parameters())
    moved = max((after[name] - p).abs().max().item() for name, p in before.named_parameters())
    unet_before = family.build_components(0)["unet"]  # the same seed: the UNet's starting weights
    unet_after = dict(modules["unet"].named_parameters())
    unet_moved = max((unet_after[name] - p).abs().max().item() for name, p in unet_before.named_parameters())
    # AdamW's first steps move each weight by at most about lr per step, whatever its gradient's size
    assert 1e-3 < moved <= 3.5e-3 and 1e-5 < unet_moved <= 3.5e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_graphed_step_replays_the_eager_step():
    """Two copies of a model and AdamW, the same batches: eager steps and graph replays end equal."""
    from sun_edge.pocket.train_family import _GraphedStep

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.SiLU(), torch.nn.Linear(32, 1)).cuda()]
    nets.append(__import__("copy").deepcopy(nets[0]))
    opts = [torch.optim.AdamW(n.parameters(), lr=1e-2, fused=True, capturable=True) for n in nets]
    batches = [(torch.randn(64, 8, device="cuda"), torch.randn(64, 1, device="cuda")) for _ in range(6)]

    def stepper(net, opt):
        def step(x, y):
            loss = torch.nn.functional.mse_loss(net(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(net.parameters()), 1.0)
            opt.step()
            return loss.detach()
        return step

    eager = stepper(nets[0], opts[0])
    eager_losses = []
    for x, y in [batches[0]] * 3 + batches[1:]:  # the capture trains 3 steps on the batch it is given
        opts[0].zero_grad(set_to_none=True)
        eager_losses.append(eager(x, y).item())
    graphed = _GraphedStep(stepper(nets[1], opts[1]), batches[0], opts[1])
    graph_losses = [graphed(x, y).item() for x, y in batches[1:]]
    np.testing.assert_allclose(graph_losses, eager_losses[3:], rtol=1e-5)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_training_runs_the_family():
    """The family's UNet and text encoder capture as one graph after the warm-up, and train."""
    from sun_edge.pocket.train_family import StageConfig

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    runs = {}
    for graph in (False, True):
        config = StageConfig(steps=40, batch_size=16, learning_rate=1e-3, warmup_steps=50, device="cuda",
                             cuda_graph=graph, progress=False)  # warm-up: 4 steps (a tenth), then the graph
        modules, result, _ = _tiny_diffusion_run(config)
        runs[graph] = (modules, result)
    eager, graphed = runs[False][1], runs[True][1]
    assert graphed.extra["cuda_graph"] == "captured at step 4", graphed.extra["cuda_graph"]
    assert eager.extra["cuda_graph"] == "off"
    # the capture's three warm-up steps train on one batch, so the runs part after step 4
    np.testing.assert_allclose(graphed.extra["loss_first"], eager.extra["loss_first"], rtol=0.5)
    first_eager = eager.extra["loss_first"]
    assert graphed.final_loss < first_eager and eager.final_loss < first_eager


def test_decoder_fine_tune_keeps_the_encoder_and_the_latent_scale(one_thread):
    """finetune_vae_decoder trains post_quant_conv + decoder only: the encoder (so the latent space every UNet was
    trained on) and scaling_factor stay bit for bit; the decoder moves and its reconstruction loss falls."""
    from sun_edge.pocket.train_family import ImageCaptions, StageConfig, finetune_vae_decoder

    vae = family.build_components(0)["vae"]
    vae.register_to_config(scaling_factor=0.5)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    data = ImageCaptions.render(16, seed=3)
    result = finetune_vae_decoder(vae, data, StageConfig(steps=30, batch_size=8, learning_rate=3e-3, seed=0,
                                                         progress=False, warmup_steps=1))
    after = vae.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained and len(frozen) + len(trained) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert sum(not torch.equal(before[k], after[k]) for k in trained) > len(trained) // 2
    assert vae.config.scaling_factor == 0.5
    assert result.extra["loss_first"] > result.final_loss
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_write_model_refuses_existing(tmp_path, components):
    from sun_edge.errors import SunEdgeError

    (tmp_path / "m").mkdir()
    with pytest.raises(SunEdgeError, match="already exists"):
        family.write_model(components, tmp_path / "m")


def test_quick_family_run_writes_loadable_models_and_resumes(tmp_path, one_thread, capsys):
    from sun_edge.models import load_model

    script = load_script()
    out = tmp_path / "pocket"
    stages = ["data", "vae", "base", "toon", "decoder", "classifier", "sun"]
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
        assert family.read_pocket_info(out / name)["vae_decoder"]["steps"] == 2  # the decoder stage's VAE is in
        assert (out / name / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
            out / "vae-decoder" / "diffusion_pytorch_model.safetensors").read_bytes()
        assert not list((out / name).glob(".vae.*"))
    assert (out / "classifier.safetensors").is_file()
    assert (out / "adapters" / "sun-p0.1.safetensors").is_file()
    base_bytes = sum(f.stat().st_size for f in (out / "pocket-base").rglob("*.safetensors") if f.parent.name != "pocket-base")
    assert base_bytes < 8.5e6  # fp16 weights of unet + text encoder + vae

    capsys.readouterr()
    assert script.main([str(out), "--quick", "--no-progress", "--stages", *stages]) == 0
    assert "skipped" in capsys.readouterr().err
    assert len((out / "log.jsonl").read_text().splitlines()) == len(stages)  # nothing re-ran

    # --adapter-init: the adapter stage again, as a fine-tune of the adapter it wrote (a fresh AdamW, step 0 on)
    from safetensors.torch import load_file

    trained = tmp_path / "trained.safetensors"
    shutil.move(out / "adapters" / "sun-p0.1.safetensors", trained)
    shutil.rmtree(out / "adapters" / "sun-p0.1.checkpoints")
    assert script.main([str(out), "--stages", "sun", "--adapter-init", str(tmp_path / "nope.safetensors")]) == 2
    assert capsys.readouterr().err.strip().endswith("is not a file; give a .safetensors adapter")
    assert script.main([str(out), "--stages", "sun", "--adapter-batch", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --adapter-batch must be at least 1, got 0"
    assert script.main([str(out), "--quick", "--no-progress", "--stages", "sun", "--adapter-init", str(trained),
                        "--adapter-lr", "1e-12", "--adapter-batch", "2"]) == 0
    entry = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert entry["stage"] == "sun" and entry["init"] == str(trained) and entry["start_step"] == 0
    assert entry["batch_size"] == 2  # the quick plan's is 1
    before, after = load_file(trained), load_file(out / "adapters" / "sun-p0.1.safetensors")
    assert before.keys() == after.keys()  # learning rate 1e-12: the fine-tune keeps the weights it started from
    for name in before:
        torch.testing.assert_close(after[name].float(), before[name].float(), rtol=1e-3, atol=1e-4)


def test_device_script_trains_the_shipped_base_on_and_packs_it(tmp_path, capsys):
    """scripts/device_pocket_base.sh (issue 14's GPU run) on the CPU with --quick: ``--base-init`` trains on
    from the shipped pocket-base, and the tar holds a loadable model that records every run."""
    import subprocess
    import tarfile

    from safetensors.torch import load_file

    from sun_edge.models import load_model, resolve_model

    out, work = tmp_path / "out", tmp_path / "work"
    env = {**__import__("os").environ, "WORK": str(work), "DEVICE": "cpu", "CHECK_PROMPTS": "1",
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "device_pocket_base.sh"), str(out), "--quick"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    checks = [json.loads(line) for line in (out / "check.jsonl").read_text().splitlines()]
    assert [c["model"] for c in checks] == ["pocket-base", str(work / "pocket-base")]
    assert all(0 <= c["cfg25"]["colour"] <= 1 and c["prompts"] == 1 for c in checks)
    with tarfile.open(out / "pocket-base.tar") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert not list(out.glob("*.partial"))
    new = tmp_path / "unpacked" / "pocket-base"
    assert not (new / "sun-adapter.safetensors").exists()  # the shipped adapter is not copied along

    shipped = resolve_model("pocket-base")
    before, after = family.read_pocket_info(shipped), family.read_pocket_info(new)
    run = after["runs"][-1]
    assert after["runs"][:-1] == before["runs"] and run["steps"] == 3 and run["batch_size"] == 4
    assert after["samples"] == before["samples"] + 3 * 4
    assert after["continued_from"] == str(shipped) and "adapter" not in after
    assert after["command"].startswith(before["command"]) and "--base-init pocket-base" in after["command"]
    old_unet = load_file(shipped / "unet" / "diffusion_pytorch_model.safetensors")
    new_unet = load_file(new / "unet" / "diffusion_pytorch_model.safetensors")
    assert old_unet.keys() == new_unet.keys()
    assert any(not torch.equal(old_unet[k], new_unet[k]) for k in old_unet)  # it trained
    old_vae = load_file(shipped / "vae" / "diffusion_pytorch_model.safetensors")
    new_vae = load_file(new / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(old_vae[k], new_vae[k]) for k in old_vae)  # the VAE stays frozen
    assert load_model(str(new)).unet.dtype == torch.float32


def test_base_init_is_refused_with_base_and_for_a_fine_tune(tmp_path, capsys):
    script = load_script()
    assert script.main([str(tmp_path / "a"), "--stages", "base", "--base", "pocket-base",
                        "--base-init", "pocket-base"]) == 2
    assert "give one of them" in capsys.readouterr().err
    (tmp_path / "b" / "data" / "plain").mkdir(parents=True)
    assert script.main([str(tmp_path / "b"), "--stages", "base", "--base-init", "pocket-toon", "--no-progress"]) == 2
    assert "says stage 'toon'" in capsys.readouterr().err
    assert not (tmp_path / "b" / "pocket-base").exists()


def test_open_caption_data_keeps_the_images_and_opens_the_captions(tmp_path, capsys):
    """--adapter-caption-drop: the same pictures as the data stage's, under captions that name fewer attributes."""
    import argparse

    from sun_edge.pocket.world import OPTIONAL, parse_caption, write_dataset

    script = load_script()
    plain = write_dataset(tmp_path / "data" / "plain", 40, seed=3, progress=False)
    folder = script.open_caption_data(plain, 0.75, argparse.Namespace(no_progress=True))
    assert folder == tmp_path / "data" / "plain-drop0.75"
    named = {"plain": 0, "open": 0}
    for i in range(40):
        assert (folder / f"{i:05d}.png").read_bytes() == (plain / f"{i:05d}.png").read_bytes()
        for key, where in (("plain", plain), ("open", folder)):
            caption = (where / f"{i:05d}.txt").read_text().strip()
            named[key] += len(set(parse_caption(caption)) & set(OPTIONAL))
    assert named["open"] < 0.6 * named["plain"]  # drop 0.75 against 0.25: a third as many, give or take the draw
    assert script.open_caption_data(plain, 0.75, argparse.Namespace(no_progress=True)) == folder  # kept, not redone
    assert script.main([str(tmp_path), "--adapter-caption-drop", "1.5"]) == 2
    assert "--adapter-caption-drop must be in [0, 1]" in capsys.readouterr().err


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


def test_time_boxes_come_from_the_gpu_plan_or_the_command_line(tmp_path, capsys):
    script = load_script()
    parser_args = lambda *extra: __import__("argparse").Namespace(plan=extra[0], time_box=list(extra[1:]))  # noqa: E731
    assert script.time_box("base", parser_args("cpu")) is None
    assert script.time_box("base", parser_args("gpu")) == script.GPU_SECONDS["base"]
    assert script.time_box("base", parser_args("gpu", ("base", 12.0))) == 12.0
    assert script.time_box("sun-p0", parser_args("cpu", ("sun-p0", 5.0))) == 5.0
    assert script.parse_time_box("toon=90") == ("toon", 90.0)
    for bad, message in (("tone=90", "unknown stage 'tone'"), ("toon=0", "SECONDS > 0"), ("toon", "SECONDS > 0")):
        with pytest.raises(SystemExit):
            script.main([str(tmp_path), "--time-box", bad])
        assert message in capsys.readouterr().err


def test_max_seconds_stops_a_stage_and_says_so(one_thread):
    from sun_edge.pocket.family import build_components
    from sun_edge.pocket.train_family import ImageCaptions, StageConfig, train_vae

    data = ImageCaptions.render(16, seed=3)
    config = StageConfig(steps=100_000, batch_size=2, learning_rate=1e-3, max_seconds=0.5, progress=False)
    result = train_vae(build_components(0)["vae"], data, config, calibration_samples=8)
    assert 1 <= result.steps < 100_000
    assert result.extra["planned_steps"] == 100_000 and result.extra["stopped_by"] == "max_seconds=0.5"
    assert result.seconds_per_step == pytest.approx(result.seconds / result.steps, rel=0.01, abs=0.006)  # rounded


def test_the_adapter_starts_as_cfg_in_attention_space(one_thread):
    """adapter_from_cross_attention copies each layer's to_k/to_v into both branches: with the positive prompt
    also as the negative, Zn = Zx = Zp, so the adapted UNet returns the plain UNet's conditional prediction."""
    from sun_edge.pocket.adapter_init import adapter_from_cross_attention
    from sun_edge.unet import SUNUNet

    unet = family.build_components(0)["unet"].eval()
    adapter = adapter_from_cross_attention(unet, alpha=0.5, extra_positive=True)
    layer, name = adapter.layers[0], adapter.specs[0].name
    attn = dict(unet.named_modules())[name]
    assert torch.equal(layer.to_k_neg.weight, attn.to_k.weight) and torch.equal(layer.to_v_extra_pos.weight, attn.to_v.weight)
    assert float(layer.to_k_neg_alpha.detach().mean()) == 0.5 and float(layer.to_k_extra_pos_beta.detach().abs().max()) == 0.0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    c = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor([999.0, 249.0])
    with torch.no_grad():
        sun = SUNUNet(unet, adapter)
        same = sun(x, t, c, c)
        plain = sun.plain(x, t, c)
        other = sun(x, t, c, torch.randn(c.shape, generator=gen))
    assert torch.allclose(same, plain, atol=1e-4)
    assert not torch.allclose(other, plain, atol=1e-3)  # another negative prompt changes the prediction
