"""The batching engine: one worker thread owns the runtime; requests wait in a bounded queue.

A request (a ``Ticket``) is a list of ``Job``s (prompt, negative prompt, seed, and the images of an
edit: init image, mask, ControlNet condition) under one ``Settings``. The worker takes the oldest
waiting ticket, waits up to the batch window for more tickets with the same key (the settings: size,
steps, mode, scheduler, guidance, strength, mask blur, control scale; and which images its jobs carry),
and runs up to ``max_batch`` of their jobs in one ``Pipeline.generate_batch`` call: each job brings
its own images, so img2img requests with different pictures share a batch. Batches are independent (DESIGN.md): each image is the one
its seed gives alone, whoever shares its batch. A cancelled ticket (timeout, client gone) leaves the
queue at once; a running batch whose tickets are all cancelled stops at its next UNet step.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sun_edge.errors import SunEdgeError
from sun_edge.pipeline import Generated, Job
from sun_edge.settings import Settings

log = logging.getLogger("sun_edge_server")


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8  # images per UNet call (capped by the runtime's own batch range)
    batch_window_s: float = 0.02  # how long the first request of a batch waits for others
    queue: int = 64  # images waiting (not yet started) before new requests get 429


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("queue full")
        self.retry_after = retry_after


class NotReady(Exception):
    """The model is still loading or warming up."""


class Draining(Exception):
    """The server is shutting down: it finishes what it has and takes nothing new."""


class Cancelled(Exception):
    """The ticket was cancelled (timeout or disconnect) or interrupted."""


class Interrupted(Exception):
    """``/sdapi/v1/interrupt`` stopped the batch this ticket was in."""


class ShutDown(Exception):
    """The server stopped (drain timeout) before this ticket's images were made."""


class _Abandoned(Exception):
    """Every ticket of the running batch was cancelled: stop sampling."""


def job_kind(job: Job) -> tuple[str, ...]:
    """Which images a job carries: jobs share a batch only with jobs that carry the same ones."""
    return tuple(name for name in ("init_image", "mask", "control_image") if getattr(job, name, None) is not None)


@dataclass(eq=False)
class Ticket:
    jobs: list[Job]
    settings: Settings
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    results: list[Generated | None] = field(default_factory=list)
    next: int = 0  # the next job to schedule
    done: int = 0
    cancelled: bool = False
    key: tuple[Any, ...] = field(default=(), init=False)  # the batching key: the settings and the job kind

    def __post_init__(self) -> None:
        self.results = [None] * len(self.jobs)
        self.key = (self.settings, job_kind(self.jobs[0]) if self.jobs else ())

    @property
    def waiting(self) -> int:
        return len(self.jobs) - self.next


class Observer:
    """What the engine reports (the app's metrics implement it)."""

    def batch(self, size: int, seconds: float, unet_step_seconds: float) -> None: ...
    def queue_depth(self, images: int) -> None: ...


class Engine:
    """Owns the runtime's one worker thread. ``start(load)`` loads (in the worker) and warms up."""

    def __init__(self, config: EngineConfig, observer: Observer | None = None) -> None:
        self.config, self.observer = config, observer or Observer()
        self._lock = threading.Condition()
        self._pending: list[Ticket] = []
        self._running: list[Ticket] = []
        self._thread: threading.Thread | None = None
        self.source: Any = None
        self.ready = False
        self.failed: str | None = None
        self.draining = self.stopping = self._interrupt = False
        self.progress = {"done": 0, "total": 0, "steps": 0, "batch": 0, "started": 0.0}
        self.max_batch = config.max_batch
        self._batch_seconds = 0.0  # a moving average, for Retry-After

    # --- lifecycle

    def start(self, load: Callable[[], Any], warm: bool = True) -> None:
        self._thread = threading.Thread(target=self._main, args=(load, warm), name="sun-edge-engine", daemon=True)
        self._thread.start()

    def _main(self, load: Callable[[], Any], warm: bool) -> None:
        try:
            self.source = load()
            self.max_batch = max(1, min(self.config.max_batch, int(self.source.runtime.max_batch)))
            if warm:
                self._warm_up()
            self.ready = True
            log.info("ready: %s, batches of up to %d", self.source.name, self.max_batch)
        except SunEdgeError as e:
            self.failed = str(e)
            log.error("cannot serve: %s", e)
            return
        except Exception:  # noqa: BLE001: the log gets the traceback, clients a line
            self.failed = "the model failed to load; see the server log"
            log.error("cannot serve:\n%s", traceback.format_exc())
            return
        self._loop()

    def _warm_up(self) -> None:
        """One UNet call per mode; on CUDA one 1-step batch per size, so CUDA graphs are captured before serving."""
        from dataclasses import replace

        pipe = self.source.pipeline
        for mode in self.source.modes:
            settings = self.source.settings(mode)
            pipe.warm_up(settings)
            sizes = range(1, self.max_batch + 1) if str(self.source.device).startswith("cuda") else [1]
            for b in sizes:
                pipe.generate_batch([Job("", "", i) for i in range(b)], settings=replace(settings, steps=1), max_batch=b)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self.stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def begin_drain(self) -> None:
        with self._lock:
            self.draining = True

    def idle(self) -> bool:
        with self._lock:
            return not self._pending and not self._running

    # --- clients

    def submit(self, jobs: Sequence[Job], settings: Settings) -> Ticket:
        with self._lock:
            if self.draining or self.stopping:
                raise Draining()
            if not self.ready:
                raise NotReady()
            depth = self.depth()
            if depth and depth + len(jobs) > self.config.queue:
                raise QueueFull(self.retry_after(depth))
            ticket = Ticket(list(jobs), settings)
            self._pending.append(ticket)
            self.observer.queue_depth(depth + len(jobs))
            self._lock.notify_all()
            return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Forget a ticket: its waiting jobs leave the queue; a running batch of only cancelled tickets stops."""
        with self._lock:
            ticket.cancelled = True
            if ticket in self._pending:
                self._pending.remove(ticket)
                self.observer.queue_depth(self.depth())
            if not ticket.future.done():
                ticket.future.set_exception(Cancelled())

    def interrupt(self) -> None:
        """Stop the running batch at its next step (A1111's /interrupt); its tickets fail with ``Interrupted``."""
        with self._lock:
            self._interrupt = bool(self._running)

    def abort(self) -> None:
        """Fail every waiting and running ticket with ``ShutDown`` and stop the running batch at its next step."""
        with self._lock:
            tickets = self._pending + self._running
            self._pending = []
            self._interrupt = bool(self._running)
            for ticket in tickets:
                ticket.cancelled = True
                if not ticket.future.done():
                    ticket.future.set_exception(ShutDown())

    def depth(self) -> int:
        """Images waiting, not started."""
        return sum(t.waiting for t in self._pending)

    def waiting(self) -> int:
        with self._lock:
            return self.depth()

    def jobs_in_flight(self) -> int:
        with self._lock:
            return self.depth() + sum(len(t.jobs) - t.done for t in self._running)

    def retry_after(self, depth: int) -> int:
        batches = math.ceil(depth / self.max_batch)
        return max(1, math.ceil(batches * (self._batch_seconds or 1.0)))

    # --- the worker

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self.stopping:
                    self._lock.wait()
                if self.stopping:
                    return
                key = self._pending[0].key
                deadline = time.monotonic() + self.config.batch_window_s
                while (self._count(key) < self.max_batch and not self.stopping
                       and (left := deadline - time.monotonic()) > 0):
                    self._lock.wait(left)
                if not self._pending:
                    continue  # everything waiting was cancelled
                key = self._pending[0].key
                batch = self._take(key)
                self._running = list(dict.fromkeys(t for t, _ in batch))
                self._interrupt = False
                self.observer.queue_depth(self.depth())
            try:
                self._run(key[0], batch)
            finally:
                with self._lock:
                    self._running = []

    def _count(self, key: tuple[Any, ...]) -> int:
        return sum(t.waiting for t in self._pending if t.key == key)

    def _take(self, key: tuple[Any, ...]) -> list[tuple[Ticket, int]]:
        batch: list[tuple[Ticket, int]] = []
        for ticket in list(self._pending):
            if ticket.key != key:
                continue
            while ticket.waiting and len(batch) < self.max_batch:
                batch.append((ticket, ticket.next))
                ticket.next += 1
            if not ticket.waiting:
                self._pending.remove(ticket)
            if len(batch) == self.max_batch:
                break
        return batch

    def _run(self, settings: Settings, batch: list[tuple[Ticket, int]]) -> None:
        tickets = list(dict.fromkeys(t for t, _ in batch))
        start = time.monotonic()
        self.progress = {"done": 0, "total": len(batch) * settings.steps, "steps": settings.steps,
                         "batch": len(batch), "started": time.time()}

        def progress(done: int, total: int) -> None:
            self.progress = {**self.progress, "done": done, "total": total}
            if self._interrupt:
                raise Interrupted()
            if all(t.cancelled for t in tickets):
                raise _Abandoned()

        try:
            results = self.source.pipeline.generate_batch([t.jobs[i] for t, i in batch], settings=settings,
                                                          progress=progress, max_batch=len(batch))
        except _Abandoned:
            log.info("batch of %d stopped: every request in it was cancelled", len(batch))
            return
        except (Interrupted, SunEdgeError) as e:
            self._fail(tickets, e)
            return
        except Exception:  # noqa: BLE001
            log.error("generation failed:\n%s", traceback.format_exc())
            self._fail(tickets, RuntimeError("generation failed; see the server log"))
            return
        seconds = time.monotonic() - start
        self._batch_seconds = seconds if not self._batch_seconds else 0.7 * self._batch_seconds + 0.3 * seconds
        g = results[0]
        self.observer.batch(len(batch), seconds, g.unet_seconds * g.batch / max(1, g.unet_calls))
        with self._lock:
            for (ticket, index), generated in zip(batch, results):
                ticket.results[index] = generated
                ticket.done += 1
                if ticket.done == len(ticket.jobs) and not ticket.future.done():
                    ticket.future.set_result(list(ticket.results))

    def _fail(self, tickets: list[Ticket], error: BaseException) -> None:
        with self._lock:
            for ticket in tickets:
                ticket.cancelled = True
                if ticket in self._pending:
                    self._pending.remove(ticket)
                if not ticket.future.done():
                    ticket.future.set_exception(error)
