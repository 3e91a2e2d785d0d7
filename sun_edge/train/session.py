"""One training run's state: models, optimizer, data position, checkpoints (the loop is in ``loop``).

``Session(config, accelerator, dataset, model)`` sets a run up in named steps, in this order
(the order matters: it fixes what the seeded generators draw, so a resumed run equals a
straight one):

1. :meth:`Session.find_checkpoint`: the newest complete checkpoint, if any (half-written ones removed);
2. :meth:`Session.load_models`: the base model, frozen;
3. :meth:`Session.check_resumable`: the checkpoint belongs to this run (same settings, model, processes);
4. :meth:`Session.build_adapter`: from the checkpoint, ``init_adapter``, or fresh (seeded);
5. :meth:`Session.place_models`: the frozen weights cast under mixed precision, all moved to the device;
6. :meth:`Session.build_optimizer`: AdamW over exactly the adapter's parameters (:func:`check_frozen`);
7. :meth:`Session.restore_progress`: the optimizer state, step, data positions and skipped images;
8. ``accelerator.prepare``, then :meth:`Session.restore_scaler_and_rng`.

During the run the loop calls :meth:`Session.batches`, :meth:`Session.next_batch`,
:meth:`Session.save_checkpoint` and, at the end, :meth:`Session.save_adapter`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

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
from sun_edge.train.losses import StudentGrid
from sun_edge.train.step import Models, check_frozen

if TYPE_CHECKING:
    from sun_edge.models import LoadedModel

logger = logging.getLogger(__name__)


class Session:
    """A run set up from a config (see the module docstring for the steps); driven by ``loop.run``."""

    def __init__(self, config: TrainConfig, accelerator: Any, dataset: TrainDataset,
                 model: LoadedModel | None = None) -> None:
        from sun_edge.unet import SUNUNet

        self.config, self.accelerator, self.dataset = config, accelerator, dataset
        self.main = accelerator.is_main_process
        self.ckpt_dir = config.checkpoints.expanduser()
        checkpoint = self.find_checkpoint()
        loaded = self.load_models(model)
        if checkpoint is not None:
            self.check_resumable(checkpoint)
        self.adapter = self.build_adapter(loaded.unet, checkpoint)
        sun_unet = SUNUNet(loaded.unet, self.adapter)
        self.place_models(sun_unet, loaded)
        optimizer = self.build_optimizer(loaded)
        self.restore_progress(checkpoint, optimizer)
        self.start_step = self.step
        student, self.optimizer = accelerator.prepare(sun_unet, optimizer)
        self.restore_scaler_and_rng(checkpoint)
        self.models = Models(student, sun_unet, loaded.text_encoder, loaded.vae,
                             StudentGrid.trailing(config.student_steps))
        if self.main and checkpoint is not None:
            logger.info("resuming from %s", checkpoint.path)

    # -- setup, in the order __init__ runs it --------------------------------------------------

    def find_checkpoint(self) -> Checkpoint | None:
        """The newest complete checkpoint (half-written ones are removed first); ``resume="require"`` needs one."""
        if self.main:
            remove_partial(self.ckpt_dir)
        self.accelerator.wait_for_everyone()
        latest = latest_checkpoint(self.ckpt_dir)
        if latest is None and self.config.resume == "require":
            raise SunEdgeError(f"--resume: no checkpoint in {self.ckpt_dir}")
        return load_checkpoint(latest) if latest is not None else None

    def load_models(self, model: LoadedModel | None) -> LoadedModel:
        """``model``, or ``config.model`` loaded; its UNet, text encoder and VAE frozen in eval mode."""
        from sun_edge.models import load_model

        cfg = self.config
        loaded = model if model is not None else load_model(cfg.model, allow_pickle=cfg.allow_pickle)
        self.model_sha256 = loaded.sha256
        for module in (loaded.unet, loaded.text_encoder, loaded.vae):
            module.eval().requires_grad_(False)
        return loaded

    def check_resumable(self, checkpoint: Checkpoint) -> None:
        """Raise unless ``checkpoint`` was written by this run's settings, base model and process count."""
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

    def build_adapter(self, unet: nn.Module, checkpoint: Checkpoint | None) -> nn.Module:
        """The trainable adapter (float32): the checkpoint's, ``init_adapter``, or a fresh one seeded by ``seed``."""
        from sun_edge.adapter import SUNAdapter, load_adapter

        cfg = self.config
        torch.manual_seed(cfg.seed)
        if checkpoint is not None:
            adapter = load_checkpoint_adapter(checkpoint.path, unet.config)
        elif cfg.init_adapter is not None:
            adapter = load_adapter(cfg.init_adapter, unet.config)
        else:
            adapter = SUNAdapter.from_unet(unet, extra_positive=cfg.extra_positive)
        return adapter.float().train().requires_grad_(True)

    def place_models(self, sun_unet: nn.Module, loaded: LoadedModel) -> None:
        """Frozen UNet and text encoder in half precision under fp16/bf16 (memory); everything to the device."""
        device = self.accelerator.device
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.config.mixed_precision)
        if half is not None:  # trainable weights stay float32
            loaded.unet.to(half)
            loaded.text_encoder.to(half)
        sun_unet.to(device)
        self.adapter.float()
        loaded.text_encoder.to(device)
        loaded.vae.to(device)

    def build_optimizer(self, loaded: LoadedModel) -> torch.optim.Optimizer:
        """AdamW (constant learning rate) over the adapter's parameters; checks nothing else trains."""
        cfg = self.config
        optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                      betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        check_frozen({"unet": loaded.unet, "text_encoder": loaded.text_encoder, "vae": loaded.vae}, self.adapter,
                     optimizer)
        return optimizer

    def restore_progress(self, checkpoint: Checkpoint | None, optimizer: torch.optim.Optimizer) -> None:
        """Step, data positions and skipped images: zero, or the checkpoint's (with the optimizer state)."""
        self.step, self.positions = 0, [0] * self.accelerator.num_processes
        self.skipped: dict[str, str] = {}
        self.skipped_count = 0
        self.upscaled: set[str] = set()  # images smaller than the resolution, warned about once each
        if checkpoint is None:
            return
        optimizer.load_state_dict(checkpoint.optimizer)
        self.step = checkpoint.step
        self.positions = list(checkpoint.state["positions"])
        if self.main:
            self.skipped = dict(checkpoint.state.get("skipped", {}))
            self.skipped_count = int(checkpoint.state.get("skipped_count", 0))

    def restore_scaler_and_rng(self, checkpoint: Checkpoint | None) -> None:
        """After ``accelerator.prepare``: the fp16 loss scaler's state and every generator's state."""
        if checkpoint is None:
            return
        scaler = self.accelerator.scaler
        if checkpoint.scaler is not None and scaler is not None:
            scaler.load_state_dict(checkpoint.scaler)
        restore_rng(checkpoint.rng)

    # -- used by the loop ------------------------------------------------------------------------

    def batches(self) -> Iterator[dict[str, Any]]:
        """This process's batches, from its saved data position on."""
        cfg, acc = self.config, self.accelerator
        rank = acc.process_index
        return iter(make_loader(self.dataset, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank,
                                world=acc.num_processes, start=self.positions[rank], num_workers=cfg.num_workers))

    def next_batch(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """The next batch with at least one readable image; unreadable ones are counted and logged."""
        rank = self.accelerator.process_index
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
            for name, (w, h) in batch.get("upscaled", ()):
                if name not in self.upscaled:
                    self.upscaled.add(name)
                    logger.warning("image %s is %dx%d, smaller than the training resolution %d: upscaled to it "
                                   "(blurry examples teach blur; use larger images or a lower --resolution)",
                                   name, w, h, self.dataset.resolution)
            if batch["keys"]:
                return batch
            if misses > len(self.dataset):
                raise SunEdgeError(f"no readable image in {misses} draws: the training images cannot be opened")

    def epoch(self) -> float:
        """How far this process is through the data, in epochs of its own shard."""
        acc = self.accelerator
        shard = len(range(acc.process_index, len(self.dataset), acc.num_processes))
        return self.positions[acc.process_index] / shard

    def gather_skipped(self) -> None:
        """Merge every process's skipped images and counts (a collective: all processes call it)."""
        from accelerate.utils import gather_object

        merged: dict[str, str] = {}
        for name, reason in gather_object(list(self.skipped.items())):
            merged.setdefault(name, reason)
        counts = self.accelerator.gather(torch.tensor([self.skipped_count], device=self.accelerator.device))
        self.skipped, self.skipped_count = merged, int(counts.sum())

    def save_checkpoint(self) -> None:
        """Write a checkpoint of the current step (a collective; the main process writes)."""
        acc = self.accelerator
        rank = acc.process_index
        mine = torch.tensor([self.positions[rank]], device=acc.device)
        positions = [int(v) for v in acc.gather(mine).tolist()]
        self.gather_skipped()
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

    def save_adapter(self) -> None:
        """The main process saves the adapter to ``config.output`` (in ``save_precision``) and warns of skips."""
        from sun_edge.adapter import save_adapter

        if not self.main:
            return
        cfg = self.config
        dtype = torch.float16 if cfg.save_precision == "fp16" else torch.float32
        save_adapter(self.adapter, Path(cfg.output).expanduser(), dtype=dtype)
        if self.skipped_count:
            logger.warning("skipped %d unreadable image draw(s), %d distinct image(s)", self.skipped_count,
                           len(self.skipped))
