"""scripts/mix_pocket_adapters.py: a weighted mean of adapters, written in fp16 with its provenance."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from sun_edge.adapter import SUNAdapter, load_adapter, save_adapter  # noqa: E402
from sun_edge.weights import read_metadata, read_state_dict  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mix_pocket_adapters.py"


def _script():
    spec = importlib.util.spec_from_file_location("mix_pocket_adapters", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mix")
    paths = []
    for seed in (1, 2):
        adapter = SUNAdapter.from_unet(tiny["unet"]).randomize_(seed)
        paths.append(save_adapter(adapter, folder / f"a{seed}.safetensors"))
    return paths


def test_the_mean_is_weighted_in_fp16_with_each_inputs_hash(adapters, tmp_path, tiny):
    a, b = adapters
    out = tmp_path / "mix.safetensors"
    assert _script().main([str(out), f"{a}:0.25", f"{b}:0.75"]) == 0
    got, sa, sb = read_state_dict(out), read_state_dict(a), read_state_dict(b)
    assert got.keys() == sa.keys()
    for key in sa:
        assert got[key].dtype == torch.float16
        torch.testing.assert_close(got[key].float(), (0.25 * sa[key] + 0.75 * sb[key]).half().float())
    meta = read_metadata(out)
    assert meta["format"] == read_metadata(a)["format"]
    assert json.loads(meta["mixed_from"]) == [
        {"file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "weight": w}
        for p, w in ((a, 0.25), (b, 0.75))]
    load_adapter(out, tiny["unet"].config)  # a valid adapter file


@pytest.mark.parametrize("args, message", [
    (["{a}:0.5", "{b}:0.6"], "error: the weights sum to 1.1; they must sum to 1"),
    (["{a}"], "write each input as PATH:WEIGHT"),
    (["{a}:half"], "the weight after ':' must be a number"),
    (["{a}:0.5", "{other}:0.5"], "holds other tensors than a1.safetensors"),
])
def test_bad_input_is_one_line_and_writes_nothing(adapters, tmp_path, capsys, args, message):
    a, b = adapters
    other = tmp_path / "other.safetensors"
    from sun_edge.weights import write_safetensors_atomic

    write_safetensors_atomic({"x": torch.zeros(2)}, other)
    out = tmp_path / "mix.safetensors"
    code = _script().main([str(out), *(s.format(a=a, b=b, other=other) for s in args)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_an_existing_output_is_not_overwritten(adapters, tmp_path, capsys):
    a, b = adapters
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"not sun-edge's")
    assert _script().main([str(out), f"{a}:0.5", f"{b}:0.5"]) == 2
    assert out.read_bytes() == b"not sun-edge's" and "exists" in capsys.readouterr().err
