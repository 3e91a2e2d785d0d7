"""Shared fixtures: tiny random SD1.5-architecture models, made once per session."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub


@pytest.fixture(scope="session")
def tiny():
    """The tiny UNet, text encoder and VAE (do not mutate: copy first)."""
    from sun_edge.tiny import build_tiny_components

    return build_tiny_components()


@pytest.fixture()
def tiny_sun_unet(tiny):
    """A SUNUNet over a copy of the tiny UNet with a seeded random adapter."""
    from sun_edge.adapter import SUNAdapter
    from sun_edge.unet import SUNUNet

    unet = copy.deepcopy(tiny["unet"])
    return SUNUNet(unet, SUNAdapter.from_unet(unet).randomize_(3)).eval()


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory) -> Path:
    """A models home holding the generated tiny-random model (and its adapter)."""
    from sun_edge.tiny import ensure_tiny_random

    home = tmp_path_factory.mktemp("sun-edge-home")
    ensure_tiny_random(home / "models")
    return home


@pytest.fixture()
def home_env(tiny_home, monkeypatch) -> Path:
    """SUN_EDGE_HOME pointed at the session's tiny home."""
    monkeypatch.setenv("SUN_EDGE_HOME", str(tiny_home))
    return tiny_home
