"""Training SUN adapters: CFG distillation plus the Multi-Step Consistency loss (paper Algorithm 1).

``train(TrainConfig(model=..., data=..., output=...))`` trains an adapter for a base model and
saves it; ``accelerate launch -m sun_edge.train ...`` runs the same on many GPUs or machines.
Modules: ``config`` (``TrainConfig``), ``args`` (the command line), ``losses`` (eqs. 2, 8-13),
``data`` (inputs, crops, sampler), ``negatives`` (the phrase pool), ``checkpoints``, ``logs``;
``session`` (one run's setup and state), ``step`` (one micro-step's loss), ``loop`` (``train``
and the Accelerate loop). Importing this package loads no PyTorch until a name needs it.
"""

from __future__ import annotations

from typing import Any

from sun_edge.train.config import TrainConfig

__all__ = ["TrainConfig", "TrainResult", "train"]


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainResult"):
        from sun_edge.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'sun_edge.train' has no attribute {name!r}")
