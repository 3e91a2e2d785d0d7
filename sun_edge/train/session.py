"""One training run's state: models, optimizer, data position, checkpoints, logs (see ``loop``)."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from sun_edge.errors import SunEdgeError
from sun_edge.train.checkpoints import (
    Checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_checkpoint_adapter,
    remove_partial,
    restore_rng,
    save_checkpoint,
)
from sun_edge.train.config import RESUME_IDENTITY, TrainConfig
from sun_edge.train.data import TrainDataset, make_loader
from sun_edge.train.logs import open_logger
from sun_edge.train.loop import Models, StepLog, TrainResult, check_frozen, micro_generator, micro_step
from sun_edge.train.losses import StudentGrid

logger = logging.getLogger(__name__)


class Session:
    """Set up from a config, then :meth:`run` to the last step. Used through ``train()``."""

    def __init__(self, config: TrainConfig, accelerator: Any, dataset: TrainDataset, model: Any | None) -> None:
        from sun_edge.adapter import SUNAdapter, load_adapter
        from sun_edge.models import load_model
        from sun_edge.unet import SUNUNet

        self.config, self.accelerator, self.dataset = config, accelerator, dataset
        self.main = accelerator.is_main_process
        self.ckpt_dir = config.checkpoints.expanduser()
        if self.main:
            remove_partial(self.ckpt_dir)
        accelerator.wait_for_everyone()
        latest = latest_checkpoint(self.ckpt_dir)
        if latest is None and config.resume == "require":
            raise SunEdgeError(f"--resume: no checkpoint in {self.ckpt_dir}")
        checkpoint = load_checkpoint(latest) if latest is not None else None

        loaded = model if model is not None else load_model(config.model, allow_pickle=config.allow_pickle)
        self.model_sha256 = loaded.sha256
        if checkpoint is not None:
            self._check_resumable(checkpoint)
        unet, text_encoder, vae = loaded.unet, loaded.text_encoder, loaded.vae
        for module in (unet, text_encoder, vae):
            module.eval().requires_grad_(False)
        torch.manual_seed(config.seed)
        if checkpoint is not None:
            adapter = load_checkpoint_adapter(checkpoint.path, unet.config)
        elif config.init_adapter is not None:
            adapter = load_adapter(config.init_adapter, unet.config)
        else:
            adapter = SUNAdapter.from_unet(unet, extra_positive=config.extra_positive)
        adapter.float().train().requires_grad_(True)
        sun_unet = SUNUNet(unet, adapter)

        device = accelerator.device
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
        if half is not None:  # frozen weights in half precision (memory); trainable ones stay float32
            unet.to(half)
            text_encoder.to(half)
        sun_unet.to(device)
        adapter.float()
        text_encoder.to(device)
        vae.to(device)
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                      betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
        check_frozen({"unet": unet, "text_encoder": text_encoder, "vae": vae}, adapter, optimizer)

        self.step, self.positions = 0, [0] * accelerator.num_processes
        self.skipped: dict[str, str] = {}
        self.skipped_count = 0
        if checkpoint is not None:
            optimizer.load_state_dict(checkpoint.optimizer)
            self.step = checkpoint.step
            self.positions = list(checkpoint.state["positions"])
            if self.main:
                self.skipped = dict(checkpoint.state.get("skipped", {}))
                self.skipped_count = int(checkpoint.state.get("skipped_count", 0))
        self.start_step = self.step
        student, self.optimizer = accelerator.prepare(sun_unet, optimizer)
        if checkpoint is not None:
            if checkpoint.scaler is not None and accelerator.scaler is not None:
                accelerator.scaler.load_state_dict(checkpoint.scaler)
            restore_rng(checkpoint.rng)
        self.adapter = adapter
        self.models = Models(student, sun_unet, text_encoder, vae, StudentGrid.trailing(config.student_steps))
        if self.main and checkpoint is not None:
            logger.info("resuming from %s", checkpoint.path)

    def _check_resumable(self, checkpoint: Checkpoint) -> None:
        saved, now = checkpoint.state.get("config", {}), self.config.to_json()
        differ = [f"{k}={saved.get(k)!r} there, {now[k]!r} here" for k in RESUME_IDENTITY if saved.get(k) != now[k]]
        sha = checkpoint.state.get("model_sha256")
        if sha and self.model_sha256 and sha != self.model_sha256:
            differ.insert(0, "a different base model (UNet sha256)")
        if len(checkpoint.state.get("positions", [])) != self.accelerator.num_processes:
            differ.append(f"{len(checkpoint.state.get('positions', []))} processes there, "
                          f"{self.accelerator.num_processes} here")
        if differ:
            raise SunEdgeError(f"cannot resume from {checkpoint.path}: {'; '.join(differ)}; use the same settings, "
                               "or another --checkpoint-dir to start afresh")

    def _next_batch(self, batches: Any, rank: int) -> dict[str, Any]:
        """The next batch with at least one readable image; unreadable ones are counted and logged."""
        misses = 0
        while True:
            batch = next(batches)
            self.positions[rank] += batch["drawn"]
            for name, reason in batch["skipped"]:
                self.skipped_count += 1
                misses += 1
                if name not in self.skipped:
                    self.skipped[name] = reason
                    logger.warning("skipped unreadable image %s: %s", name, reason)
            if batch["keys"]:
                return batch
            if misses > len(self.dataset):
                raise SunEdgeError(f"no readable image in {misses} draws: the training images cannot be opened")

    def _gather_skipped(self) -> None:
        from accelerate.utils import gather_object

        merged: dict[str, str] = {}
        for name, reason in gather_object(list(self.skipped.items())):
            merged.setdefault(name, reason)
        counts = self.accelerator.gather(torch.tensor([self.skipped_count], device=self.accelerator.device))
        self.skipped, self.skipped_count = merged, int(counts.sum())

    def _save(self) -> None:
        acc = self.accelerator
        rank = acc.process_index
        mine = torch.tensor([self.positions[rank]], device=acc.device)
        positions = [int(v) for v in acc.gather(mine).tolist()]
        self._gather_skipped()
        if self.main:
            state = {"positions": positions, "skipped": self.skipped, "skipped_count": self.skipped_count,
                     "config": self.config.to_json(), "model_sha256": self.model_sha256,
                     "world_size": acc.num_processes}
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            save_checkpoint(self.ckpt_dir, self.step, adapter=self.adapter, optimizer=self.optimizer.state_dict(),
                            scaler=scaler, state=state, keep=self.config.keep_checkpoints)
        else:  # keep only this process's own view; the main process holds the merged one
            self.skipped, self.skipped_count = {}, 0
        acc.wait_for_everyone()

    def run(self) -> TrainResult:
        """Train from the current step to ``max_steps`` (or ``max_seconds``); checkpoint, log, save the adapter."""
        from tqdm import tqdm

        from sun_edge.adapter import save_adapter

        cfg, acc = self.config, self.accelerator
        rank, accum = acc.process_index, cfg.gradient_accumulation_steps
        loader = make_loader(self.dataset, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank,
                             world=acc.num_processes, start=self.positions[rank], num_workers=cfg.num_workers)
        batches = iter(loader)
        log = open_logger(cfg.log, self.ckpt_dir, resume_step=self.start_step, enabled=self.main)
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", desc="training",
                   disable=not (self.main and cfg.progress))
        history: list[StepLog] = []
        began = time.perf_counter()
        stop = False
        try:
            while self.step < cfg.max_steps and not stop:
                started = time.perf_counter()
                sums = torch.zeros(5, device=acc.device)  # loss, cfg, msc, msc fraction; [4]: out of time
                examples = torch.zeros(1, device=acc.device)
                for m in range(accum):
                    batch = self._next_batch(batches, rank)
                    gen = micro_generator(cfg.seed, self.step * accum + m, rank)
                    syncing = m == accum - 1
                    with nullcontext() if syncing else acc.no_sync(self.models.student):
                        loss, stats = micro_step(self.models, batch, gen, cfg, acc)
                        acc.backward(loss / accum)
                    sums[:4] += stats
                    examples += len(batch["keys"])
                if cfg.max_grad_norm is not None:
                    acc.clip_grad_norm_(self.adapter.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if cfg.max_seconds is not None and time.perf_counter() - began > cfg.max_seconds:
                    sums[4] = accum  # reduced with the losses: every process stops at the same step
                means = acc.reduce(sums / accum, "mean").tolist()
                stop = means[4] > 0
                total = int(acc.reduce(examples, "sum").item())
                seconds = time.perf_counter() - started
                entry = StepLog(self.step, means[0], means[1], means[2], means[3], total, seconds)
                history.append(entry)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or stop:
                    log.log(self.step, {"epoch": self.positions[rank] / self.dataset_shard(), "loss": entry.loss,
                                        "loss_cfg": entry.loss_cfg, "loss_msc": entry.loss_msc,
                                        "msc_fraction": entry.msc_fraction, "learning_rate": cfg.learning_rate,
                                        "examples_per_second": total / seconds, "seconds": seconds})
                bar.update(1)
                bar.set_postfix(loss=f"{entry.loss:.4f}")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps or stop:
                    self._save()
        finally:
            bar.close()
            log.close()
        if not history:
            self._gather_skipped()
        if self.main:
            dtype = torch.float16 if cfg.save_precision == "fp16" else torch.float32
            save_adapter(self.adapter, Path(cfg.output).expanduser(), dtype=dtype)
            if self.skipped_count:
                logger.warning("skipped %d unreadable image draw(s), %d distinct image(s)", self.skipped_count,
                               len(self.skipped))
        acc.wait_for_everyone()
        seconds = sum(h.seconds for h in history)
        return TrainResult(Path(cfg.output), self.ckpt_dir, self.start_step, self.step, tuple(history),
                           dict(self.skipped), self.skipped_count,
                           sum(h.examples for h in history) / seconds if seconds else 0.0, self.main)

    def dataset_shard(self) -> int:
        """How many examples this process draws per epoch."""
        acc = self.accelerator
        return len(range(acc.process_index, len(self.dataset), acc.num_processes))
