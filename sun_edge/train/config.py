"""``TrainConfig``: every knob of SUN adapter training, with the paper's values as defaults.

Defaults follow the SpeedUpNet paper (section 4.1): AdamW at a constant learning rate of
1e-4 with weight decay 0.01, 512x512 centre crops, guidance scale 8 for the teacher
(eq. 2), MSC with Delta = 0.25 (a 4-step student), p = 0.1 and lambda = 1.0 (eq. 14),
negative prompts of 0 to 100 phrases. The paper does not say how many teacher sub-steps
make one student step (eq. 9's N); we use 6: 4 x 6 = 24 teacher evaluations per
trajectory, about the 25 steps of the DPM-Solver++ baseline the paper's teacher matches.

Importing this module imports no PyTorch, so the CLI can build its parser cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, get_args

from sun_edge.errors import SunEdgeError

MixedPrecision = Literal["no", "fp16", "bf16"]
LogKind = Literal["csv", "tensorboard"]
Resume = Literal["auto", "require"]
SavePrecision = Literal["fp32", "fp16"]

MIXED_PRECISIONS: tuple[str, ...] = get_args(MixedPrecision)
LOG_KINDS: tuple[str, ...] = get_args(LogKind)
SAVE_PRECISIONS: tuple[str, ...] = get_args(SavePrecision)

# Fields that must match between a checkpoint and the run resuming it: changing any of
# them would make the resumed run a different run (different data order, noise, shapes).
# The base model is compared by its UNet's sha256, not by name.
RESUME_IDENTITY = ("seed", "batch_size", "gradient_accumulation_steps", "resolution", "student_steps",
                   "extra_positive")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Paths are resolved by the loop; nothing here touches the disk."""

    model: str  # registry name or path (diffusers folder or single SD1.x checkpoint)
    data: Path  # image-caption folder, JSONL/CSV manifest, or a `datasets` save_to_disk folder
    output: Path  # final adapter, .safetensors (sun_edge.adapter.save_adapter)
    checkpoint_dir: Path | None = None  # default: <output stem>.checkpoints beside the output
    init_adapter: Path | None = None  # start from this adapter instead of SUNAdapter.from_unet
    extra_positive: bool = False  # train the extra-positive branch too (the released file has one)
    allow_pickle: bool = False

    # optimisation (paper 4.1)
    max_steps: int = 5000  # optimizer steps (paper: ~5k at batch 32 on 4 A100s)
    max_seconds: float | None = None  # also stop (checkpoint, save the adapter) once this run trained this long
    batch_size: int = 1  # per process and per micro-step
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = None  # the paper clips nothing
    mixed_precision: MixedPrecision = "no"
    cpu: bool = False  # force the CPU even where accelerate sees a GPU
    seed: int = 0

    # the method (paper 3.3, 4.1)
    guidance: float = 8.0  # w of eq. 2
    student_steps: int = 4  # 1 / Delta: the student's grid is SD1.5's trailing 4-step grid
    teacher_substeps: int = 6  # N of eq. 9: teacher DDIM sub-steps per student step
    msc_probability: float = 0.1  # p of eq. 13
    msc_weight: float = 1.0  # lambda of eq. 14
    max_negative_phrases: int = 100  # negative prompts: 0..this many phrases from the pool
    negative_pool: Path | None = None  # a phrase file of one's own (default: the bundled pool)

    # data
    resolution: int = 512  # shortest side resized to this, then a centre crop
    num_workers: int = 0

    # bookkeeping
    checkpoint_every: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2
    resume: Resume = "auto"  # auto: resume when checkpoints exist; require: fail when none do
    log: LogKind = "csv"
    log_every: int = 1
    save_precision: SavePrecision = "fp32"
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise one SunEdgeError line for the first invalid value."""
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise SunEdgeError(f"unknown mixed precision {self.mixed_precision!r}; choose one of: {', '.join(MIXED_PRECISIONS)}")
        if self.log not in LOG_KINDS:
            raise SunEdgeError(f"unknown log kind {self.log!r}; choose one of: {', '.join(LOG_KINDS)}")
        if self.save_precision not in SAVE_PRECISIONS:
            raise SunEdgeError(f"unknown save precision {self.save_precision!r}; choose one of: {', '.join(SAVE_PRECISIONS)}")
        if self.resume not in get_args(Resume):
            raise SunEdgeError(f"unknown resume mode {self.resume!r}; choose auto or require")
        if Path(self.output).suffix != ".safetensors":
            raise SunEdgeError(f"output {self.output} must end in .safetensors")
        positive = {"max_steps": self.max_steps, "batch_size": self.batch_size, "student_steps": self.student_steps,
                    "gradient_accumulation_steps": self.gradient_accumulation_steps, "resolution": self.resolution,
                    "teacher_substeps": self.teacher_substeps, "checkpoint_every": self.checkpoint_every,
                    "keep_checkpoints": self.keep_checkpoints, "log_every": self.log_every}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SunEdgeError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.resolution % 8:
            raise SunEdgeError(f"resolution must be a multiple of 8 (SD1.5's VAE downsamples 8x, Pocket SD's 4x), "
                               f"got {self.resolution}")
        if 1000 % self.student_steps or self.teacher_substeps > 1000 // self.student_steps:
            raise SunEdgeError(f"student steps must divide 1000 and teacher sub-steps be at most 1000/steps, "
                               f"got {self.student_steps} and {self.teacher_substeps}")
        if not 0.0 <= self.msc_probability <= 1.0:
            raise SunEdgeError(f"msc probability must be in [0, 1], got {self.msc_probability}")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.msc_weight < 0:
            raise SunEdgeError("learning rate must be positive, weight decay and msc weight non-negative")
        if self.max_negative_phrases < 0 or self.num_workers < 0:
            raise SunEdgeError("max negative phrases and num workers must be non-negative")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise SunEdgeError(f"max seconds must be positive, got {self.max_seconds}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise SunEdgeError(f"max grad norm must be positive, got {self.max_grad_norm}")

    @property
    def checkpoints(self) -> Path:
        """Where intermediate state goes: ``checkpoint_dir`` or ``<output stem>.checkpoints/``."""
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir)
        out = Path(self.output)
        return out.with_name(f"{out.stem}.checkpoints")

    def to_json(self) -> dict[str, object]:
        """Plain JSON values (paths as strings), for checkpoints and logs."""
        return {f.name: (str(v) if isinstance(v := getattr(self, f.name), Path) else v) for f in fields(self)}
