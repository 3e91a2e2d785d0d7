"""The SUN training loop (Algorithm 1) under Hugging Face Accelerate: ``train(config)``.

``train(config)`` runs on one CPU or GPU as it is, and on several GPUs or machines under
``accelerate launch -m sun_edge.train ...`` with no change: the student (``SUNUNet``, whose
only trainable parameters are the adapter's) is wrapped by ``accelerator.prepare``, so
gradients are averaged across processes; each process reads its own shard of the data.

The pieces: ``session.Session`` sets a run up (models, optimizer, data position, resume) and
writes checkpoints; ``step.micro_step`` is one micro-step's loss (eq. 14); this module is the
loop: :func:`optimizer_step` (``gradient_accumulation_steps`` micro-steps, backward, clip,
AdamW step, figures reduced over processes) and :func:`run` (steps to ``max_steps`` or
``max_seconds``, logging, checkpoints, the saved adapter).

Only the adapter trains: the UNet, text encoder and VAE are frozen and
:func:`sun_edge.train.step.check_frozen` asserts it, and that the optimizer (AdamW, constant
learning rate) holds exactly the adapter's parameters. Under ``fp16``/``bf16`` mixed precision
the frozen UNet and text encoder are cast to that type (the adapter stays float32) and run
under autocast; the VAE stays float32.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sun_edge.errors import SunEdgeError
from sun_edge.train.config import TrainConfig
from sun_edge.train.session import Session
from sun_edge.train.step import micro_generator, micro_step

if TYPE_CHECKING:
    from sun_edge.models import LoadedModel


@dataclass(frozen=True)
class StepLog:
    """One optimizer step's figures, averaged over micro-steps and processes."""

    step: int
    loss: float
    loss_cfg: float
    loss_msc: float
    msc_fraction: float  # share of examples whose input was replaced by the student's (eq. 12)
    examples: int  # examples in the step, all processes
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    """What a call to :func:`train` did."""

    output: Path
    checkpoint_dir: Path
    start_step: int  # 0, or the step of the checkpoint it resumed from
    steps: int  # optimizer steps done in total
    history: tuple[StepLog, ...]  # this call's steps
    skipped: Mapping[str, str]  # unreadable images: name -> reason (whole run, resumes included)
    skipped_count: int  # times an unreadable image was drawn
    examples_per_second: float  # this call's steps, all processes
    main_process: bool = True  # False in the other processes of a distributed run


def train(config: TrainConfig, model: LoadedModel | None = None) -> TrainResult:
    """Train a SUN adapter as ``config`` says and save it to ``config.output``.

    ``model`` skips loading ``config.model`` (its modules are used in place: frozen, the
    adapter's attention processors installed, cast under mixed precision). A run resumes from
    the newest checkpoint in ``config.checkpoints`` when there is one.
    """
    from accelerate import Accelerator

    from sun_edge.train.data import TrainDataset, open_records
    from sun_edge.train.negatives import load_pool

    out_dir = Path(config.output).expanduser().resolve().parent
    if not out_dir.is_dir():
        raise SunEdgeError(f"output folder {out_dir} does not exist; create it first")
    if config.init_adapter is not None and not Path(config.init_adapter).is_file():
        raise SunEdgeError(f"--init-adapter {config.init_adapter} does not exist")
    records = open_records(config.data)
    dataset = TrainDataset(records, load_pool(config.negative_pool), resolution=config.resolution,
                           seed=config.seed, max_negative_phrases=config.max_negative_phrases)
    try:
        accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)
    except (ValueError, RuntimeError) as e:
        raise SunEdgeError(f"cannot set up mixed precision {config.mixed_precision!r}: {str(e).splitlines()[0]}") from e
    ckpt_dir = config.checkpoints.expanduser()
    created = not ckpt_dir.exists()
    try:
        return run(Session(config, accelerator, dataset, model))
    except BaseException:
        if created and accelerator.is_main_process:
            _remove_if_no_checkpoint(ckpt_dir)
        raise
    finally:
        if accelerator.num_processes == 1:  # let a later train() in this process pick another precision
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()


def _remove_if_no_checkpoint(ckpt_dir: Path) -> None:
    """A run that failed before its first checkpoint leaves nothing: remove the folder it made (logs only).

    Called only when this run created ``ckpt_dir``; a folder holding a checkpoint stays, to resume from."""
    import shutil

    from sun_edge.train.checkpoints import list_checkpoints

    if ckpt_dir.is_dir() and not list_checkpoints(ckpt_dir):
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def run(session: Session) -> TrainResult:
    """Train from the session's step to ``max_steps`` (or ``max_seconds``); log, checkpoint, save the adapter."""
    from tqdm import tqdm

    from sun_edge.train.logs import open_logger

    cfg, acc = session.config, session.accelerator
    batches = session.batches()
    log = open_logger(cfg.log, session.ckpt_dir, resume_step=session.start_step, enabled=session.main)
    bar = tqdm(total=cfg.max_steps, initial=session.step, unit="step", desc="training",
               disable=not (session.main and cfg.progress))
    history: list[StepLog] = []
    began = time.perf_counter()
    stop = False
    try:
        while session.step < cfg.max_steps and not stop:
            entry, stop = optimizer_step(session, batches, began)
            history.append(entry)
            last = session.step == cfg.max_steps or stop
            if session.step % cfg.log_every == 0 or last:
                log.log(session.step, {"epoch": session.epoch(), "loss": entry.loss, "loss_cfg": entry.loss_cfg,
                                       "loss_msc": entry.loss_msc, "msc_fraction": entry.msc_fraction,
                                       "learning_rate": cfg.learning_rate,
                                       "examples_per_second": entry.examples / entry.seconds,
                                       "seconds": entry.seconds})
            bar.update(1)
            bar.set_postfix(loss=f"{entry.loss:.4f}")
            if session.step % cfg.checkpoint_every == 0 or last:
                session.save_checkpoint()
    finally:
        bar.close()
        log.close()
    if not history:
        session.gather_skipped()
    session.save_adapter()
    acc.wait_for_everyone()
    seconds = sum(h.seconds for h in history)
    return TrainResult(Path(cfg.output), session.ckpt_dir, session.start_step, session.step, tuple(history),
                       dict(session.skipped), session.skipped_count,
                       sum(h.examples for h in history) / seconds if seconds else 0.0, session.main)


def optimizer_step(session: Session, batches: Iterator[dict[str, Any]], began: float) -> tuple[StepLog, bool]:
    """One optimizer step of ``gradient_accumulation_steps`` micro-steps; its figures, and whether to stop.

    Every process stops at the same step: the out-of-time flag (``max_seconds`` since ``began``)
    is reduced with the losses.
    """
    cfg, acc, models = session.config, session.accelerator, session.models
    rank, accum = acc.process_index, cfg.gradient_accumulation_steps
    started = time.perf_counter()
    sums = torch.zeros(5, device=acc.device)  # loss, cfg, msc, msc fraction; [4]: out of time
    examples = torch.zeros(1, device=acc.device)
    for m in range(accum):
        batch = session.next_batch(batches)
        gen = micro_generator(cfg.seed, session.step * accum + m, rank)
        syncing = m == accum - 1  # gradients are averaged across processes on the last micro-step only
        with nullcontext() if syncing else acc.no_sync(models.student):
            loss, stats = micro_step(models, batch, gen, cfg, acc)
            acc.backward(loss / accum)
        sums[:4] += stats
        examples += len(batch["keys"])
    if cfg.max_grad_norm is not None:
        acc.clip_grad_norm_(session.adapter.parameters(), cfg.max_grad_norm)
    session.optimizer.step()
    session.optimizer.zero_grad(set_to_none=True)
    session.step += 1
    if cfg.max_seconds is not None and time.perf_counter() - began > cfg.max_seconds:
        sums[4] = accum
    means = acc.reduce(sums / accum, "mean").tolist()
    total = int(acc.reduce(examples, "sum").item())
    seconds = time.perf_counter() - started
    return StepLog(session.step, means[0], means[1], means[2], means[3], total, seconds), means[4] > 0
