"""Training logs: a CSV file or TensorBoard event files, written by the main process only.

Both live in the checkpoint directory (``train_log.csv`` or ``tensorboard/``). A resumed run
first drops what was logged after the checkpoint it resumes from, so the log reads as one
run: the CSV keeps rows up to that step, TensorBoard purges later events (``purge_step``).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sun_edge.errors import SunEdgeError
from sun_edge.train.config import LogKind

CSV_FILE = "train_log.csv"
TENSORBOARD_DIR = "tensorboard"
COLUMNS = ("step", "epoch", "loss", "loss_cfg", "loss_msc", "msc_fraction", "learning_rate",
           "examples_per_second", "seconds")


class Logger(Protocol):
    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


@dataclass
class NullLogger:
    """What processes other than the main one log: nothing."""

    def log(self, step: int, values: Mapping[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class CSVLogger:
    """One row per logged step; floats written with ``repr`` so values round-trip exactly."""

    def __init__(self, path: Path, resume_step: int) -> None:
        kept: list[dict[str, str]] = []
        if resume_step > 0 and path.is_file():
            with open(path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if row.get("step") and int(row["step"]) <= resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=COLUMNS, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.handle.flush()

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.writer.writerow({"step": step, **{k: repr(float(v)) for k, v in values.items()}})
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class TensorBoardLogger:
    """Scalars under ``train/<name>``."""

    def __init__(self, path: Path, resume_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise SunEdgeError("--log tensorboard needs the tensorboard package: pip install 'sun-edge[train]'") from e
        self.writer = SummaryWriter(log_dir=str(path), purge_step=resume_step + 1 if resume_step > 0 else None)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", float(value), step)

    def close(self) -> None:
        self.writer.close()


def open_logger(kind: LogKind, directory: Path, *, resume_step: int, enabled: bool) -> Any:
    """The logger for ``kind`` writing under ``directory``, or a null one where ``enabled`` is false."""
    if not enabled:
        return NullLogger()
    if kind == "csv":
        return CSVLogger(Path(directory) / CSV_FILE, resume_step)
    return TensorBoardLogger(Path(directory) / TENSORBOARD_DIR, resume_step)


def read_csv_log(path: Path) -> list[dict[str, float]]:
    """The rows of a ``train_log.csv`` as floats (for tests and plots)."""
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]
