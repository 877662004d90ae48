"""A bounded queue and one worker thread that runs requests in batches.

Requests wait at most ``max_wait_ms`` for company; a batch takes, in arrival order, up to
``max_batch`` items that share the engine's batch key (in ``mixed`` mode any adapters, as long as the
batch needs no more than the engine may keep loaded). When ``max_queue`` items are waiting, a new one
is refused at once (:class:`QueueFull`, which the HTTP layer answers with 503): a server that cannot
keep up says so instead of letting latency grow without bound. A batch that fails is run again item
by item, so that one faulty request cannot fail the others it was batched with.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from mmlora.serve.engine import Engine, Item


class QueueFull(Exception):
    """The queue holds ``max_queue`` items already."""


@dataclass
class _Job:
    item: Item
    future: Future = field(default_factory=Future)


class Batcher:
    def __init__(self, engine: Engine, max_queue: int = 64, max_batch: int = 8, max_wait_ms: float = 10.0):
        self.engine, self.max_queue, self.max_batch, self.max_wait = engine, max_queue, max_batch, max_wait_ms / 1000
        self._jobs: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches run so far
        self.batch_sizes: list[int] = []
        self.retried = 0  # failed batches whose items were run again one by one

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
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests are waiting (limit {self.max_queue}); retry later")
            self._jobs.append(job)
            self._cv.notify()
        return job.future

    def _take(self) -> list[_Job]:
        """The next batch (call with the lock held and the queue non-empty)."""
        key = self.engine.batch_key(self._jobs[0].item)
        adapters: set[str] = set()
        batch: list[_Job] = []
        for job in list(self._jobs):
            if len(batch) == self.max_batch:
                break
            if self.engine.batch_key(job.item) != key:
                continue
            needed = adapters | {job.item.adapter}
            if len(needed - {"__base__"}) > self.engine.max_loaded:
                continue
            adapters = needed
            batch.append(job)
        for job in batch:
            self._jobs.remove(job)
        return batch

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                deadline = time.monotonic() + self.max_wait
                while len(self._jobs) < self.max_batch and not self._stop:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(timeout=left)
                batch = self._take()
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        """Run ``batch``; if it fails, run its items one by one, so that only a faulty item gets an error."""
        try:
            results = self.engine.run([job.item for job in batch])
        except Exception as err:  # noqa: BLE001 — one bad batch must not stop the worker
            if len(batch) == 1:
                batch[0].future.set_exception(err)
                return
            self.retried += 1
            for job in batch:
                self._run([job])
            return
        self.batches += 1
        self.batch_sizes.append(len(batch))
        for job, result in zip(batch, results):
            job.future.set_result(result)
