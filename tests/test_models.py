"""Model registry, safe weight reading and model loading (diffusers folders and single files)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import sun_edge
from sun_edge.cli import CLI_FIXES
from sun_edge.errors import SunEdgeError
from sun_edge.models import (
    CONFIG_DIR,
    MODELS,
    list_models,
    load_model,
    models_home,
    parse_lora_arg,
    resolve_model,
)
from sun_edge.weights import read_shapes, read_state_dict, sha256_file, write_safetensors_atomic
from ldm_layout import ldm_checkpoint

COMPONENTS = ("unet", "text_encoder", "vae")


@pytest.fixture(autouse=True)
def offline_home(tmp_path, monkeypatch) -> Path:
    """A private SUN_EDGE_HOME per test; the hub is never reachable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SUN_EDGE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tiny_files(tiny, tmp_path_factory) -> dict[str, Path]:
    """The tiny model as a diffusers folder and as one LDM-layout safetensors file."""
    from sun_edge.tiny import write_diffusers_folder

    root = tmp_path_factory.mktemp("tiny-files")
    write_diffusers_folder(tiny, root / "tiny")
    checkpoint = root / "tiny-ldm.safetensors"
    write_safetensors_atomic(ldm_checkpoint(tiny["unet"], tiny["text_encoder"], tiny["vae"]), checkpoint)
    return {"folder": root / "tiny", "checkpoint": checkpoint}


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message


def assert_same_weights(expected, actual) -> None:
    a, b = expected.state_dict(), actual.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_ready(model) -> None:
    for component in COMPONENTS:
        module = getattr(model, component)
        assert not module.training
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in module.parameters())


# Bundled SD1.5 configs ---------------------------------------------------------------


def test_bundled_configs_have_sd15_parameter_counts():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def config(name: str) -> dict:
        return json.loads((CONFIG_DIR / name / "config.json").read_text())

    with torch.device("meta"):  # allocates nothing
        unet = UNet2DConditionModel.from_config(config("unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder")))
        vae = AutoencoderKL.from_config(config("vae"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 859_520_964
    assert count(text_encoder) == 123_060_480
    assert count(vae) == 83_653_863


# Loading -----------------------------------------------------------------------------


def test_diffusers_folder_round_trips_exactly(tiny, tiny_files):
    model = load_model(str(tiny_files["folder"]))
    for component in COMPONENTS:
        assert_same_weights(tiny[component], getattr(model, component))
    assert_ready(model)
    assert model.name == "tiny" and model.path == tiny_files["folder"]
    assert model.sha256 == sha256_file(tiny_files["folder"] / "unet" / "diffusion_pytorch_model.safetensors")


def test_single_ldm_file_loads_to_identical_models(tiny, tiny_files):
    model = load_model(str(tiny_files["checkpoint"]), config_dir=tiny_files["folder"])
    for component in COMPONENTS:
        assert_same_weights(tiny[component], getattr(model, component))
    assert_ready(model)
    assert model.sha256 == sha256_file(tiny_files["checkpoint"])
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)  # [1, 4, h, w]
    ids = torch.randint(0, 49408, (1, 77), generator=generator)  # [1, 77]
    with torch.no_grad():
        emb = tiny["text_encoder"](ids).last_hidden_state  # [1, 77, 32]
        assert torch.equal(model.text_encoder(ids).last_hidden_state, emb)
        assert torch.equal(model.unet(latents, 999, emb).sample, tiny["unet"](latents, 999, emb).sample)
        assert torch.equal(model.vae.decode(latents).sample, tiny["vae"].decode(latents).sample)


def test_single_file_in_float16_loads_as_float32(tiny, tiny_files, tmp_path):
    state = read_state_dict(tiny_files["checkpoint"])
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    write_safetensors_atomic(half, tmp_path / "half.safetensors")
    model = load_model(str(tmp_path / "half.safetensors"), config_dir=tiny_files["folder"])
    expected = tiny["vae"].state_dict()
    for key, value in model.vae.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, expected[key].half().float()), key


def test_pickle_checkpoint_refused_then_loaded_with_allow_pickle(tiny, tiny_files, tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": read_state_dict(tiny_files["checkpoint"]), "global_step": 1}, ckpt)
    with pytest.raises(SunEdgeError) as excinfo:
        load_model(str(ckpt), config_dir=tiny_files["folder"])
    message = one_line_error(excinfo)
    assert "refusing to load pickle checkpoint tiny.ckpt" in message and "allow pickle files (allow_pickle)" in message
    assert excinfo.value.render(CLI_FIXES).endswith("pass --allow-pickle if you trust it")  # the CLI names its flag
    model = load_model(str(ckpt), config_dir=tiny_files["folder"], allow_pickle=True)
    assert_same_weights(tiny["unet"], model.unet)


def test_checkpoint_key_problems_are_summarised(tiny_files, tmp_path):
    state = read_state_dict(tiny_files["checkpoint"])
    del state["model.diffusion_model.out.2.bias"]
    state["model.diffusion_model.input_blocks.1.1.extra.weight"] = torch.zeros(3)
    key = "first_stage_model.decoder.conv_in.weight"
    state[key] = torch.zeros(2, *state[key].shape[1:])
    write_safetensors_atomic(state, tmp_path / "bad.safetensors")
    with pytest.raises(SunEdgeError) as excinfo:
        load_model(str(tmp_path / "bad.safetensors"), config_dir=tiny_files["folder"])
    message = one_line_error(excinfo)
    assert "UNet weights do not fit" in message
    assert "1 missing (conv_out.bias)" in message and "1 unexpected" in message
    state["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    del state["model.diffusion_model.input_blocks.1.1.extra.weight"]
    write_safetensors_atomic(state, tmp_path / "bad.safetensors")
    with pytest.raises(SunEdgeError) as excinfo:
        load_model(str(tmp_path / "bad.safetensors"), config_dir=tiny_files["folder"])
    assert "VAE weights do not fit" in one_line_error(excinfo) and "1 with wrong shapes" in str(excinfo.value)


def test_keys_the_conversion_would_drop_are_reported(tiny_files, tmp_path):
    """diffusers' converter silently skips keys it does not know; the loader must not."""
    state = read_state_dict(tiny_files["checkpoint"])
    state["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(128, 8)
    state["first_stage_model.encoder.mid.attn_2.q.weight"] = torch.zeros(16, 16, 1, 1)
    write_safetensors_atomic(state, tmp_path / "extra.safetensors")
    with pytest.raises(SunEdgeError) as excinfo:
        load_model(str(tmp_path / "extra.safetensors"), config_dir=tiny_files["folder"])
    assert "1 unexpected (model.diffusion_model.label_emb.0.0.weight)" in one_line_error(excinfo)
    del state["model.diffusion_model.label_emb.0.0.weight"]
    write_safetensors_atomic(state, tmp_path / "extra.safetensors")
    with pytest.raises(SunEdgeError) as excinfo:
        load_model(str(tmp_path / "extra.safetensors"), config_dir=tiny_files["folder"])
    assert "VAE" in one_line_error(excinfo) and "attn_2" in str(excinfo.value)


SD1_CONV_IN = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
SD2_CROSS_K = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            {**SD1_CONV_IN, **SD2_CROSS_K},
            "looks like an SD2.x checkpoint (cross-attention width 1024); sun-edge supports SD1.x models",
        ),
        ({**SD1_CONV_IN, "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024)}, "SD2.x"),
        ({**SD1_CONV_IN, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,)}, "SDXL"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3)}, "InstructPix2Pix"),  # 9 (inpainting) loads
        ({"lora_unet_conv_in.lora_down.weight": (4, 4, 3, 3)}, "--lora"),
        ({"model.diffusion_model.joint_blocks.0.x.weight": (8, 8)}, "SD3 or Flux"),
        ({"down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3)}, "diffusers folder"),
        ({"some.weight": (8,)}, "not a Stable Diffusion checkpoint"),
        (SD1_CONV_IN, "no CLIP text encoder weights"),
    ],
)
def test_other_architectures_are_named(tmp_path, keys, expected):
    write_safetensors_atomic({k: torch.zeros(shape) for k, shape in keys.items()}, tmp_path / "other.safetensors")
    with pytest.raises(SunEdgeError) as excinfo:
        load_model(str(tmp_path / "other.safetensors"))
    assert expected in one_line_error(excinfo)


# Bad files ---------------------------------------------------------------------------


def test_corrupt_and_truncated_safetensors(tiny_files, tmp_path):
    (tmp_path / "random.safetensors").write_bytes(os.urandom(4096))
    data = tiny_files["checkpoint"].read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    for name in ("random.safetensors", "half.safetensors"):
        for read in (read_state_dict, read_shapes, lambda p: load_model(str(p))):
            with pytest.raises(SunEdgeError) as excinfo:
                read(tmp_path / name)
            message = one_line_error(excinfo)
            assert f"cannot read {name}: file is truncated or not a safetensors file" in message
            assert "re-download" in message


def test_read_state_dict_rejects_missing_unknown_and_unsafe_pickle(tmp_path):
    with pytest.raises(SunEdgeError, match="no such file"):
        read_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(SunEdgeError, match="unknown weight format '.npz'"):
        read_state_dict(tmp_path / "weights.npz")
    torch.save({"w": torch.ones(2)}, tmp_path / "lora.pt")
    with pytest.raises(SunEdgeError, match="pickle files can run code"):
        read_state_dict(tmp_path / "lora.pt")
    assert torch.equal(read_state_dict(tmp_path / "lora.pt", allow_pickle=True)["w"], torch.ones(2))
    torch.save({"w": torch.ones(2), "cfg": Path("x")}, tmp_path / "evil.pt")
    with pytest.raises(SunEdgeError) as excinfo:
        read_state_dict(tmp_path / "evil.pt", allow_pickle=True)
    assert "cannot load evil.pt safely" in one_line_error(excinfo)
    (tmp_path / "junk.ckpt").write_bytes(os.urandom(512))
    with pytest.raises(SunEdgeError, match="truncated or not a PyTorch checkpoint"):
        read_state_dict(tmp_path / "junk.ckpt", allow_pickle=True)


def test_write_safetensors_atomic_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.safetensors"
    write_safetensors_atomic({"a": torch.arange(4.0)}, target, metadata={"k": "v"})
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(Exception):
        write_safetensors_atomic({"a": torch.ones(2), "b": "not a tensor"}, target)  # type: ignore[dict-item]
    assert sorted(os.listdir(tmp_path)) == before
    assert torch.equal(read_state_dict(target)["a"], torch.arange(4.0))


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


# Registry ----------------------------------------------------------------------------


def test_models_home_follows_env(offline_home):
    assert models_home() == offline_home


def test_registry_entries_are_sd15():
    wanted = {"sd15", "toonyou", "realistic-vision-v51", "anything-v5", "rev-animated", "fancy-pet", "tiny-random"}
    pocket = {"pocket-base", "pocket-toon"}
    assert wanted | pocket <= set(MODELS)
    others = [entry for entry in MODELS.values() if entry.name not in pocket]
    assert all(entry.base == "sd15" and (entry.files or entry.folders) and not entry.shipped for entry in others)
    pocket_dir = Path(sun_edge.__file__).resolve().parent / "data" / "pocket"  # package data, not the models home
    for name in sorted(pocket):
        entry = MODELS[name]
        assert entry.base == "pocket" and entry.shipped and not entry.generated
        assert entry.files == () and entry.folders == (name,)
        path = resolve_model(name).resolve()
        assert path == pocket_dir / name and path.is_dir() and (path / "unet" / "config.json").is_file()


def test_resolve_installed_names_and_list(tiny_files, offline_home):
    models = offline_home / "models"
    models.mkdir(parents=True)
    os.symlink(tiny_files["checkpoint"], models / "toonyou_beta6.safetensors")
    os.symlink(tiny_files["folder"], models / "stable-diffusion-v1-5")
    assert resolve_model("toonyou") == models / "toonyou_beta6.safetensors"
    assert resolve_model("sd15") == models / "stable-diffusion-v1-5"
    present = {entry.name: path for entry, path in list_models()}
    assert present["toonyou"] == models / "toonyou_beta6.safetensors"
    assert present["anything-v5"] is None
    model = load_model("sd15")
    assert model.name == "sd15" and model.path == models / "stable-diffusion-v1-5"


def test_missing_registry_model_says_what_to_put_where(offline_home):
    with pytest.raises(SunEdgeError) as excinfo:
        resolve_model("toonyou")
    message = one_line_error(excinfo)
    assert message.startswith("model 'toonyou' is not installed: put toonyou_beta6.safetensors (ToonYou beta 6")
    assert f"in {offline_home / 'models'}/ or give the model's path" in message
    assert excinfo.value.render(CLI_FIXES).endswith(f"in {offline_home / 'models'}/ or pass --model PATH")
    assert not offline_home.exists()  # looking writes nothing


def test_missing_path_and_unknown_name(tmp_path):
    with pytest.raises(SunEdgeError) as excinfo:
        load_model(str(tmp_path / "nowhere.safetensors"))
    assert "does not exist" in one_line_error(excinfo)
    with pytest.raises(SunEdgeError) as excinfo:
        resolve_model("dreamshaper")
    message = one_line_error(excinfo)
    assert "unknown model 'dreamshaper'" in message and all(name in message for name in MODELS)


def test_folder_without_components_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SunEdgeError) as excinfo:
        load_model(str(tmp_path / "empty"))
    assert "not a diffusers model folder" in one_line_error(excinfo)


# --lora FILE[:SCALE] -------------------------------------------------------------------


def test_parse_lora_arg(tmp_path):
    assert parse_lora_arg("style.safetensors") == (Path("style.safetensors"), 1.0)
    assert parse_lora_arg("style.safetensors:0.7") == (Path("style.safetensors"), 0.7)
    assert parse_lora_arg("/data/a:b/style.safetensors:-0.5") == (Path("/data/a:b/style.safetensors"), -0.5)
    assert parse_lora_arg("a:b.safetensors") == (Path("a:b.safetensors"), 1.0)
    assert parse_lora_arg(r"C:\loras\x.safetensors") == (Path(r"C:\loras\x.safetensors"), 1.0)
    odd = tmp_path / "odd:name"
    odd.write_bytes(b"")
    assert parse_lora_arg(str(odd)) == (odd, 1.0)
    for bad in ("style.safetensors:strong", "style.safetensors:nan", "style.safetensors:"):
        with pytest.raises(SunEdgeError) as excinfo:
            parse_lora_arg(bad)
        assert "bad LoRA scale" in one_line_error(excinfo)


def test_tiny_random_is_generated_and_loads(home_env):
    model = load_model("tiny-random")
    assert model.name == "tiny-random" and model.path == home_env / "models" / "tiny-random"
    assert dict((e.name, p) for e, p in list_models())["tiny-random"] == model.path
    assert_ready(model)
