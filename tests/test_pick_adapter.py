"""scripts/pick_pocket_adapter.py: the held-out pick's JSON line, and ``--steps``' read-back at other step counts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
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


def test_check_sun_guidance_lines(capsys):
    """scripts/check_sun_guidance.py: the teacher's read-back beside CFG 25's and SUN's (on the pick's own prompts
    and seeds, so the same figures as pick_pocket_adapter.py's), and SUN's share of CFG's guidance per timestep."""
    spec = importlib.util.spec_from_file_location("check_sun_guidance", REPO / "scripts" / "check_sun_guidance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--prompts", "3"]) == 0
    teacher, share = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert set(teacher["teacher"]) == {"cfg25_colour", "teacher_ddim24_cfg8_colour", "sun4_colour"}
    assert all(0 <= v <= 1 for v in teacher["teacher"].values())
    assert list(share["guidance_share"]) == [str(t) for t in module.TIMESTEPS]
    assert all(np.isfinite(v["share"]) and v["error"] >= 0 for v in share["guidance_share"].values())
    pick = _script()
    assert pick.main(["--prompts", "3", "--fig5-seeds", "1", str(SHIPPED)]) == 0
    (line,) = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert teacher["teacher"]["sun4_colour"] == pytest.approx(line["cfg25_colour"] - line["colour_gap_vs_cfg25"],
                                                              abs=1e-4)
    assert teacher["teacher"]["cfg25_colour"] == pytest.approx(line["cfg25_colour"], abs=1e-4)
