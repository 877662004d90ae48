"""A bounded queue and one worker thread that runs requests in batches.

When ``max_queue`` items are waiting, a new one is refused at once (:class:`QueueFull`, which the HTTP
layer answers with 503): a server that cannot keep up says so instead of letting latency grow without
bound. Two ways to batch, chosen by the engine:

* **Continuous batching** (captions where ``engine.continuous``): between two decoding steps, waiting
  requests join the running batch (a prefill of the newcomers), up to ``max_batch`` sequences, and a
  sequence leaves the moment it ends — a request never waits for another's answer to finish (newcomers
  join together when they fill the free room or the oldest has waited ``max_wait_ms``). A request
  whose adapter is not loaded yet waits in the queue while the engine pages it in on another thread;
  the others go ahead of it. When nothing is running, the first request waits at most ``max_wait_ms``
  for company.
* **Fixed batches** (segmentation, and the ``switch`` / ``merged`` modes): requests wait at most
  ``max_wait_ms`` for company; a batch takes, in arrival order, up to ``max_batch`` items that share the
  engine's batch key (in ``mixed`` and ``gathered`` mode any adapters, as long as they fit the loaded
  set) and runs to the end.

Isolation: a prefill or a fixed batch that fails is run again item by item, so one faulty request
cannot fail the others it was batched with; a decoding step that fails fails only the sequences it ran.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from mmlora.runs.compose import BASE
from mmlora.serve.engine import Engine, Item


class QueueFull(Exception):
    """The queue holds ``max_queue`` items already."""


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Give ``future`` its result or error, unless it has one already: a future cancelled meanwhile (its
    client went away, or the awaiting task was cancelled and cancelled it) takes neither."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@dataclass
class _Job:
    item: Item
    future: Future = field(default_factory=Future)
    since: float = field(default_factory=time.monotonic)  # when it was queued


class Batcher:
    def __init__(self, engine: Engine, max_queue: int = 64, max_batch: int = 8, max_wait_ms: float = 10.0):
        self.engine, self.max_queue, self.max_batch, self.max_wait = engine, max_queue, max_batch, max_wait_ms / 1000
        self._jobs: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # fixed batches, or prefills that joined the running batch, so far
        self.batch_sizes: list[int] = []  # requests per fixed batch or prefill
        self.running_sizes: list[int] = []  # sequences per decoding step (continuous batching)
        self.retried = 0  # failed batches whose items were run again one by one
        self.cancelled = 0  # requests whose client went away, dropped from the queue or the running batch
        self._running: dict[int, _Job] = {}  # id(sequence's request) -> its job
        if getattr(engine, "pager", None) is not None:
            engine.pager.notify = self._wake

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    @property
    def continuous(self) -> bool:
        return bool(getattr(self.engine, "continuous", False))

    def start(self) -> Batcher:
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="mmlora-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for job in self._jobs:
            job.future.set_exception(RuntimeError("the server is shutting down"))
        self._jobs.clear()

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    def submit(self, item: Item) -> Future:
        """Queue ``item``; its future gets the engine's result dict (or the batch's exception)."""
        job = _Job(item)
        with self._cv:
            self._drop_cancelled()  # what nobody waits for does not hold a place
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests are waiting (limit {self.max_queue}); retry later")
            self._jobs.append(job)
            self._cv.notify()
        return job.future

    # ------------------------------------------------------------------ fixed batches

    def _take(self) -> list[_Job]:
        """The next fixed batch, maybe empty (call with the lock held and the queue non-empty)."""
        self._drop_cancelled()
        if not self._jobs:
            return []
        key = self.engine.batch_key(self._jobs[0].item)
        adapters: set[str] = set()
        batch: list[_Job] = []
        for job in list(self._jobs):
            if len(batch) == self.max_batch:
                break
            if self.engine.batch_key(job.item) != key:
                continue
            needed = adapters | {job.item.adapter}
            if not self.engine.fits(needed - {BASE}):
                continue
            adapters = needed
            batch.append(job)
        for job in batch:
            self._jobs.remove(job)
        return batch

    def _wait_for_company(self) -> None:
        """(Lock held.) Let the queue fill up to ``max_batch`` for at most ``max_wait``."""
        deadline = time.monotonic() + self.max_wait
        while len(self._jobs) < self.max_batch and not self._stop:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cv.wait(timeout=left)

    def _work(self) -> None:
        if self.continuous:
            return self._work_continuous()
        while True:
            with self._cv:
                while not self._jobs and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                self._wait_for_company()
                batch = self._take()
            self._run(batch)

    def _isolating(self, jobs: list[_Job], call, deliver) -> None:
        """``call`` the engine with ``jobs``' items and ``deliver(jobs, out)``; if the call fails, call it for
        each job alone, so that only a faulty job gets the error."""
        try:
            out = call([job.item for job in jobs])
        except Exception as err:  # noqa: BLE001 — one bad request must not stop the worker
            if len(jobs) == 1:
                _settle(jobs[0].future, error=err)
                return
            self.retried += 1
            for job in jobs:
                self._isolating([job], call, deliver)
            return
        self.batches += 1
        self.batch_sizes.append(len(jobs))
        deliver(jobs, out)

    def _run(self, batch: list[_Job]) -> None:
        """Run a fixed ``batch`` to the end (each item alone if it fails)."""
        def deliver(jobs: list[_Job], results: list[dict]) -> None:
            for job, result in zip(jobs, results):
                _settle(job.future, result)

        if batch:
            self._isolating(batch, self.engine.run, deliver)

    # ------------------------------------------------------------------ continuous batching

    def _cancel(self, job: _Job) -> None:
        job.future.cancel()
        self.cancelled += 1

    def _drop_cancelled(self) -> None:
        """(Lock held.) Waiting jobs whose client went away leave the queue, their futures cancelled."""
        for job in [j for j in self._jobs if j.item.cancelled]:
            self._jobs.remove(job)
            self._cancel(job)

    def _admit(self) -> tuple[list[_Job], list[_Job]]:
        """(Lock held.) Waiting caption jobs that may join now — adapter ready, room in the batch and in
        the loaded set — in arrival order; and waiting jobs of another kind (run as fixed batches).
        While sequences are running, newcomers join together: when they fill the free room, or when the
        oldest has waited ``max_wait`` (one prefill of several costs less than several of one)."""
        self._drop_cancelled()
        room = self.max_batch - self.engine.active
        if self.engine.active and self._jobs:
            waited = time.monotonic() - self._jobs[0].since
            if len(self._jobs) < room and waited < self.max_wait:
                return [], []
        adapters = set(self.engine.in_use)
        joiners, others = [], []
        for job in list(self._jobs):
            if job.item.kind != "caption":
                others.append(job)
                continue
            if len(joiners) >= room:
                continue
            name = job.item.adapter
            if not self.engine.ready(name) or not self.engine.fits((adapters | {name}) - {BASE}):
                continue
            adapters.add(name)
            joiners.append(job)
        for job in joiners + others:
            self._jobs.remove(job)
        return joiners, others

    def _work_continuous(self) -> None:
        while True:
            with self._cv:
                while not self._stop:
                    if self.engine.active:
                        break
                    if self._jobs:
                        self._wait_for_company()
                        joiners, others = self._admit()
                        if joiners or others:
                            break
                        self._cv.wait(timeout=0.05)  # adapters paging in: the pager wakes us
                    else:
                        self._cv.wait()
                if self._stop:
                    return
                if self.engine.active:
                    joiners, others = self._admit()
            if others:
                self._run(others)
            if joiners:
                self._join(joiners)
            self._step()

    def _join(self, jobs: list[_Job]) -> None:
        """Prefill ``jobs`` into the running batch (each alone if that fails)."""
        def deliver(jobs: list[_Job], seqs: list) -> None:
            for job, seq in zip(jobs, seqs):
                self._running[id(seq.request)] = job
            self._finish([s for s in seqs if s.done])

        self._isolating(jobs, self.engine.join, deliver)

    def _step(self) -> None:
        if not self.engine.active:
            return
        self.running_sizes.append(self.engine.active)
        try:
            done = self.engine.step()
        except Exception as err:  # noqa: BLE001 — our bug or the machine's: the sequences it ran fail, the server lives
            for seq in self.engine.abort():
                _settle(self._running.pop(id(seq.request)).future, error=err)
            for key, job in list(self._running.items()):  # cancelled ones the step let go before it failed
                if job.item.cancelled:
                    self._cancel(self._running.pop(key))
            return
        self._finish(done)

    def _finish(self, done) -> None:
        for seq in done:
            job = self._running.pop(id(seq.request))
            if seq.finish_reason == "cancelled":
                self._cancel(job)
            else:
                _settle(job.future, self.engine.answer(seq))
