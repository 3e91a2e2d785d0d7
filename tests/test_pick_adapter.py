"""scripts/pick_pocket_adapter.py: the held-out pick's JSON line, and ``--steps``' read-back at other step counts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "sun_edge" / "data" / "pocket" / "pocket-base" / "sun-adapter.safetensors"


def _script():
    spec = importlib.util.spec_from_file_location("pick_pocket_adapter", REPO / "scripts" / "pick_pocket_adapter.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_pick_line_and_sun_colour_by_steps(capsys):
    script = _script()
    assert script.main(["--prompts", "3", "--steps", "4,8", "--fig5-seeds", "1", str(SHIPPED)]) == 0
    (line,) = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert line["adapter"] == str(SHIPPED) and set(line["sun_colour_by_steps"]) == {"4", "8"}
    assert all(0 <= v <= 1 for v in (line["cfg25_colour"], *line["sun_colour_by_steps"].values()))
    assert -1 <= line["colour_gap_vs_cfg25"] <= 1 and line["fig5_fall"] <= 1
    # --steps 4 reruns the pick's own SUN 4 images (same prompts and seeds): the same read-back as the gap says
    assert line["sun_colour_by_steps"]["4"] == pytest.approx(line["cfg25_colour"] - line["colour_gap_vs_cfg25"],
                                                             abs=1e-4)


@pytest.mark.parametrize("steps", ["0", "4,x"])
def test_bad_step_counts_are_refused(steps, capsys):
    with pytest.raises(SystemExit) as exit_:
        _script().main(["--steps", steps, str(SHIPPED)])
    assert exit_.value.code == 2 and "--steps" in capsys.readouterr().err
