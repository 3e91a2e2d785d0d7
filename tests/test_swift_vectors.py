"""The Swift package's test vectors (apps/macos/Tests/SUNEdgeKitTests/Resources): current, made by the
functions the product uses, and equal to independent references (torch.randn, diffusers' schedulers,
open_clip's tokenizer, the PyTorch reference runtime).
"""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from test_tokenizer import open_clip_tok  # noqa: F401  (fixture: open_clip's tokenizer, loaded offline by path)

REPO = Path(__file__).resolve().parent.parent
RESOURCES = REPO / "apps" / "macos" / "Tests" / "SUNEdgeKitTests" / "Resources"
EOS = 49407


def _script():
    spec = importlib.util.spec_from_file_location("make_swift_vectors", REPO / "scripts" / "make_swift_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vectors = _script()


def committed(name: str):
    return json.loads((RESOURCES / name).read_text(encoding="utf-8"))


def assert_same(got, want, where: str = "") -> None:
    """Equal structure and strings/ints; floats to 1e-6 relative (other CPUs round libm calls differently)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        if want and all(isinstance(v, float) for v in want):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=where)
        else:
            for i, (g, w) in enumerate(zip(got, want)):
                assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6), where
    else:
        assert got == want, where


# ---- made by the product's functions, and current ------------------------------------------------------------------


@pytest.mark.parametrize("name", vectors.VECTOR_FILES)
def test_committed_vectors_are_what_sun_edge_computes_now(name):
    fresh = json.loads(vectors.dumps(vectors.bundle_free_vectors()[name]))
    assert_same(fresh, committed(name), name)


def test_committed_text_tables_are_current():
    tables = json.loads(vectors.TABLES_FILE.read_text(encoding="utf-8"))
    fresh = json.loads(json.dumps(vectors.text_tables(), ensure_ascii=False))
    for key in ("python", "regex", "unicodedata"):  # where they came from: informative
        fresh.pop(key), tables.pop(key)
    assert fresh == tables, "run scripts/make_swift_vectors.py"


def test_resources_hold_exactly_the_scripts_files():
    assert sorted(p.name for p in RESOURCES.iterdir()) == sorted(vectors.VECTOR_FILES + vectors.BUNDLE_FILES)


# ---- independent references -------------------------------------------------------------------------------------


def test_token_ids_match_open_clip_except_padding(open_clip_tok):  # noqa: F811
    """open_clip reads ``<|endoftext|>`` typed in a prompt as text: the prompt with special tokens is the one
    tests/test_tokenizer.py checks against Hugging Face, and the one where HF's added-token split and CLIP's regex
    disagree by design has no independent reference (tests/test_swift_text_port.py checks the split)."""
    data = committed("tokens.json")
    assert len(data["cases"]) >= 30 and [c["prompt"] for c in data["cases"]] == vectors.PROMPTS
    assert any(c["truncated"] for c in data["cases"]) and any(len(c["tokens"]) == 75 for c in data["cases"])
    specials = [c["prompt"] for c in data["cases"] if "<|" in c["prompt"]]
    assert specials == ["a<|endoftext|>b <|startoftext|> c", "!<|endoftext|> <|ENDOFTEXT|>"]
    for case in data["cases"]:
        if "<|" in case["prompt"]:
            continue
        ref = open_clip_tok(case["prompt"]).numpy()[0]  # open_clip pads with 0, SD1.5 with EOS
        n = int(np.flatnonzero(ref == EOS)[0]) + 1
        assert case["ids"][:n] == ref[:n].tolist(), case["prompt"]
        assert all(i == EOS for i in case["ids"][n:]) and len(case["ids"]) == 77


def test_noise_matches_torch_randn():
    torch = pytest.importorskip("torch")
    for case in committed("noise.json")["cases"]:
        ref = torch.randn(case["shape"], generator=torch.Generator().manual_seed(case["seed"])).numpy().reshape(-1)
        if "values" in case:
            np.testing.assert_allclose(case["values"], ref, rtol=0, atol=5e-6, err_msg=str(case["seed"]))
        else:
            np.testing.assert_allclose(case["head"], ref[:64], rtol=0, atol=5e-6)
            np.testing.assert_allclose(case["tail"], ref[-64:], rtol=0, atol=5e-6)
        assert case["checksums"]["sum"] == pytest.approx(float(ref.astype(np.float64).sum()), abs=1e-3)
    shapes = {(c["seed"], tuple(c["shape"])) for c in committed("noise.json")["cases"]}
    assert any(np.prod(s) < 16 for _, s in shapes) and any(np.prod(s) % 16 for _, s in shapes if np.prod(s) > 16)
    assert any(seed >= 2**32 for seed, _ in shapes)


def _diffusers_scheduler(name: str, spacing: str):
    from test_sampling import make_scheduler

    return make_scheduler(name, spacing)


def test_schedules_match_diffusers():
    pytest.importorskip("diffusers")
    data = committed("schedules.json")
    scheduler = _diffusers_scheduler("ddim", "trailing")
    np.testing.assert_array_equal(np.asarray(data["alphas_cumprod"]), scheduler.alphas_cumprod.double().numpy())
    runs = {(r["scheduler"], r["spacing"], r["steps"]): r for r in data["runs"]}
    assert runs[("ddim", "trailing", 4)]["timesteps"] == [999, 749, 499, 249]
    assert len(runs[("dpmpp_2m", "linspace", 25)]["timesteps"]) == 25
    for (name, spacing, steps), run in runs.items():
        ref = _diffusers_scheduler(name, spacing)
        ref.set_timesteps(steps)
        assert run["timesteps"] == ref.timesteps.tolist(), (name, spacing, steps)
        alphas = ref.alphas_cumprod.double().numpy()
        np.testing.assert_array_equal(run["alphas"], alphas[run["timesteps"]])
        if name == "ddim":
            prev = [alphas[t - 1000 // steps] if t - 1000 // steps >= 0 else ref.final_alpha_cumprod.item()
                    for t in run["timesteps"]]
            np.testing.assert_allclose(run["alphas_prev"], prev, rtol=1e-7)
        else:  # diffusers keeps its sigmas in float32
            np.testing.assert_allclose(run["sigmas"], ref.sigmas.double().numpy(), rtol=1e-6)
            assert run["sigmas"][-1] == 0.0


def test_trajectories_match_diffusers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    data = committed("trajectories.json")
    noise = torch.randn(data["shape"], generator=torch.Generator().manual_seed(data["seed"]))
    assert {(r["scheduler"], r["spacing"], r["steps"]) for r in data["runs"]} >= {("ddim", "trailing", 4),
                                                                                  ("dpmpp_2m", "linspace", 25)}
    for run in data["runs"]:
        ref = _diffusers_scheduler(run["scheduler"], run["spacing"])
        ref.set_timesteps(run["steps"])
        latents = noise.clone() * ref.init_noise_sigma
        for t in ref.timesteps:
            model_input = ref.scale_model_input(latents, t).numpy()
            eps = vectors.analytic_eps(model_input, np.array([float(t)], np.float32))
            latents = ref.step(torch.from_numpy(eps), t, latents).prev_sample
        want = latents.numpy().reshape(-1)
        got = np.asarray(run["final"])
        assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5, run["scheduler"]
        assert [c["timestep"] for c in run["calls"]] == [float(t) for t in ref.timesteps]


# ---- the tiny bundle's manifest and the end-to-end reference ------------------------------------------------------


def test_tiny_manifest_is_a_coreml_bundle_manifest_as_the_exporter_writes_it(tiny_reference):
    from sun_edge.bundle import Manifest
    from sun_edge.export.coreml import CoreMLOptions, plan

    data = committed("tiny_manifest.json")
    manifest = Manifest.from_dict(data)
    assert manifest.target == "coreml" and manifest.format_version == 1
    assert manifest.model["name"] == "tiny-random" and manifest.parity["passed"]
    assert manifest.model["sha256"] == tiny_reference.info["model_sha256"]  # the model the tests generate
    planned = {p.name: p for p in plan(tiny_reference, CoreMLOptions(height=vectors.TINY_SIZE, width=vectors.TINY_SIZE))}
    assert set(manifest.components) == set(planned)
    for name, component in manifest.components.items():
        assert component.file == planned[name].file
        assert (component.inputs, component.outputs) == (planned[name].inputs, planned[name].outputs), name


def test_reference_image_is_what_the_pytorch_reference_makes(home_env, one_thread):
    from sun_edge.tokenizer import CLIPTokenizer

    want = committed("reference.json")
    got, png = vectors.reference_vectors(committed("tiny_manifest.json"), CLIPTokenizer.default())
    assert {k: v for k, v in got.items() if k not in ("latents", "decoded_checksums", "pixels_rgb_base64")} == \
        {k: v for k, v in want.items() if k not in ("latents", "decoded_checksums", "pixels_rgb_base64")}
    np.testing.assert_allclose(got["latents"], want["latents"], rtol=0, atol=1e-4)
    ours = np.frombuffer(base64.b64decode(got["pixels_rgb_base64"]), np.uint8).astype(int)
    theirs = np.frombuffer(base64.b64decode(want["pixels_rgb_base64"]), np.uint8).astype(int)
    assert ours.size == 64 * 64 * 3 and np.abs(ours - theirs).max() <= 1  # 8-bit rounding on another CPU at most
    from PIL import Image
    import io

    committed_png = np.asarray(Image.open(RESOURCES / "reference.png").convert("RGB")).reshape(-1).astype(int)
    assert np.array_equal(committed_png, theirs)
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    assert want["threshold_db"] == committed("tiny_manifest.json")["parity"]["components"]["image"]["threshold_db"]
    assert want["export_parity_db"] >= want["threshold_db"]  # the bundle itself passed it (MIL evaluator, fp16)
