"""Command-line arguments of ``sun-edge train`` (and ``python -m sun_edge.train``) -> ``TrainConfig``.

Defaults live in ``TrainConfig`` only: an option left out keeps the dataclass default, so
the CLI and the library cannot drift. Enumerated values (mixed precision, log kind) are
checked by ``TrainConfig`` so that a bad one is a one-line ``SunEdgeError``.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from sun_edge.train.config import LOG_KINDS, MIXED_PRECISIONS, TrainConfig

_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


def _opt(group: Any, flag: str, field: str, help_text: str, **kwargs: Any) -> None:
    default = _DEFAULTS.get(field)
    shown = f" (default: {default})" if default is not None and kwargs.get("action") is None else ""
    group.add_argument(flag, dest=field, default=None, help=help_text + shown, **kwargs)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Add every training option to ``p``."""
    p.add_argument("--model", required=True, help="base model: registry name or path (diffusers folder or SD1.x checkpoint)")
    p.add_argument("--data", required=True, type=Path,
                   help="image folder with .txt captions, a .jsonl/.csv manifest, or a datasets save_to_disk folder")
    p.add_argument("-o", "--output", required=True, type=Path, help="the trained adapter (.safetensors)")
    _opt(p, "--checkpoint-dir", "checkpoint_dir", "checkpoints and logs (default: <output stem>.checkpoints/)", type=Path)
    _opt(p, "--init-adapter", "init_adapter", "start from this adapter instead of a fresh one", type=Path)
    _opt(p, "--extra-positive", "extra_positive", "also train the extra-positive branch", action="store_true")
    _opt(p, "--allow-pickle", "allow_pickle", "allow .ckpt/.bin/.pt model files (they can run code)", action="store_true")

    o = p.add_argument_group("optimisation")
    _opt(o, "--max-steps", "max_steps", "optimizer steps", type=int)
    _opt(o, "--max-seconds", "max_seconds", "also stop once this run has trained this many seconds (a time-boxed "
         "lease); the adapter and a checkpoint are saved at that step", type=float)
    _opt(o, "--batch-size", "batch_size", "examples per process and micro-step", type=int)
    _opt(o, "--gradient-accumulation-steps", "gradient_accumulation_steps", "micro-steps per optimizer step", type=int)
    _opt(o, "--learning-rate", "learning_rate", "AdamW learning rate, constant", type=float)
    _opt(o, "--weight-decay", "weight_decay", "AdamW weight decay", type=float)
    _opt(o, "--max-grad-norm", "max_grad_norm", "clip gradients to this norm (default: no clipping)", type=float)
    _opt(o, "--mixed-precision", "mixed_precision", f"one of {', '.join(MIXED_PRECISIONS)}", metavar="NAME")
    _opt(o, "--cpu", "cpu", "train on the CPU even where a GPU is visible", action="store_true")
    _opt(o, "--seed", "seed", "seeds the adapter init, data order, noise and negatives", type=int)

    m = p.add_argument_group("method (SpeedUpNet paper, section 3.3)")
    _opt(m, "--guidance", "guidance", "teacher CFG scale w (eq. 2)", type=float)
    _opt(m, "--student-steps", "student_steps", "the student's steps, 1/Delta", type=int)
    _opt(m, "--teacher-substeps", "teacher_substeps", "teacher DDIM sub-steps per student step (N, eq. 9)", type=int)
    _opt(m, "--msc-probability", "msc_probability", "p of eq. 13", type=float)
    _opt(m, "--msc-weight", "msc_weight", "lambda of eq. 14", type=float)
    _opt(m, "--max-negative-phrases", "max_negative_phrases", "negative prompts join 0..this many phrases", type=int)
    _opt(m, "--negative-pool", "negative_pool", "a phrase file of one's own (default: the bundled pool)", type=Path)

    d = p.add_argument_group("data and bookkeeping")
    _opt(d, "--resolution", "resolution", "shortest side resized to this, then a centre crop", type=int)
    _opt(d, "--num-workers", "num_workers", "data loader worker processes", type=int)
    _opt(d, "--checkpoint-every", "checkpoint_every", "optimizer steps between checkpoints", type=int)
    _opt(d, "--keep-checkpoints", "keep_checkpoints", "how many recent checkpoints to keep", type=int)
    d.add_argument("--resume", dest="resume", action="store_const", const="require", default=None,
                   help="resume from the newest checkpoint and fail if there is none (without it a run resumes "
                        "automatically when checkpoints exist)")
    _opt(d, "--log", "log", f"one of {', '.join(LOG_KINDS)}", metavar="KIND")
    _opt(d, "--log-every", "log_every", "optimizer steps between log rows", type=int)
    _opt(d, "--save-precision", "save_precision", "dtype of the saved adapter: fp32 or fp16", metavar="NAME")
    d.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` the parsed options describe (unset options keep the dataclass defaults)."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    return TrainConfig(**given)
