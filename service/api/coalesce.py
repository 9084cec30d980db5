"""Gather the stamps of concurrent requests into one inference batch (per model).

A GPU (and ONNX Runtime on CPU, to a lesser degree) scores 64 stamps in about the
time it scores one, so an API that runs one inference per request wastes most of
its hardware under load. `RequestCoalescer` queues the stamps of every request; a worker
task takes what is queued, waits at most ``max_wait_s`` for more (or until
``max_batch`` stamps are there), runs one inference in a worker thread (off the event
loop) and hands each request its slice of the scores. While one batch is being
scored, the next one fills, so batches grow with concurrency by themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class _Job:
    stamps: np.ndarray
    future: asyncio.Future


class RequestCoalescer:
    """Score stamp arrays of concurrent callers in shared batches.

    Parameters
    ----------
    score : callable
        ``score(stamps[batch, ...]) -> scores[batch]``, e.g. `service.score.model.Scorer.score`.
        Called from one worker thread, one batch at a time.
    max_batch : int
        Most stamps in one inference call. A request with more stamps is split.
    max_wait_s : float
        Longest time the first stamps of a batch wait for others to join it.
    on_batch : callable, optional
        ``on_batch(size, seconds)`` after each inference (metrics).
    name : str
        Name of the worker thread (the survey), for logs and debuggers.

    Attributes
    ----------
    batches : int
        Inference calls made so far.
    closed : bool
        Whether `retire` was called.
    """

    def __init__(self, score: Callable[[np.ndarray], np.ndarray], max_batch: int = 64, max_wait_s: float = 0.005,
                 on_batch: Callable[[int, float], None] | None = None, name: str = "model"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._score = score
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self.batches = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task | None = None
        self._pending: deque[_Job] = deque()
        self._pending_stamps = 0
        self._wakeup: asyncio.Event | None = None
        #: Set by `retire`: no caller scores with it any more.
        self.closed = False

    async def score(self, stamps: np.ndarray) -> np.ndarray:
        """Scores of ``stamps`` [n, ...], computed in one or more shared batches."""
        if len(stamps) == 0:
            return np.empty(0, dtype=np.float32)
        loop = asyncio.get_running_loop()
        self._ensure_worker(loop)
        futures = []
        for start in range(0, len(stamps), self.max_batch):
            job = _Job(stamps[start:start + self.max_batch], loop.create_future())
            self._pending.append(job)
            self._pending_stamps += len(job.stamps)
            futures.append(job.future)
        self._wakeup.set()
        parts = await asyncio.gather(*futures)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _ensure_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        # The worker lives on the loop of its callers. A new loop (a test client opened
        # anew, a server restarted in-process) gets a new worker; the old one is gone with its loop.
        if self._worker is not None and self._loop is loop and not self._worker.done():
            return
        self._loop = loop
        self._pending = deque(job for job in self._pending if not job.future.done() and job.future.get_loop() is loop)
        self._pending_stamps = sum(len(job.stamps) for job in self._pending)
        self._wakeup = asyncio.Event()
        self._worker = loop.create_task(self._work(), name="request-coalescer")

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = loop.time() + self.max_wait_s
            while self._pending_stamps < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    # Waiting on an Event (not on a queue) so that a timeout never loses a job.
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            jobs = self._take_batch()
            if not jobs:
                continue
            batch = jobs[0].stamps if len(jobs) == 1 else np.concatenate([job.stamps for job in jobs])
            started = time.perf_counter()
            try:
                scores = await loop.run_in_executor(self._executor, self._score, batch)
                scores = np.asarray(scores).reshape(-1)
                if len(scores) != len(batch):
                    raise RuntimeError(f"model returned {len(scores)} scores for {len(batch)} stamps")
            except Exception as exc:  # a failed inference fails the requests of this batch, not the worker
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.batches += 1
            if self._on_batch is not None:
                self._on_batch(len(batch), time.perf_counter() - started)
            offset = 0
            for job in jobs:
                if not job.future.done():  # the request may have been cancelled meanwhile
                    job.future.set_result(scores[offset:offset + len(job.stamps)])
                offset += len(job.stamps)

    def _take_batch(self) -> list[_Job]:
        """Queued jobs, oldest first, up to `max_batch` stamps (always at least one job)."""
        jobs, size = [], 0
        while self._pending and (not jobs or size + len(self._pending[0].stamps) <= self.max_batch):
            job = self._pending.popleft()
            self._pending_stamps -= len(job.stamps)
            if job.future.done():  # cancelled while queued: do not score it
                continue
            jobs.append(job)
            size += len(job.stamps)
        return jobs

    def retire(self) -> None:
        """Stop the worker and free its thread, from any thread, once no caller will score with
        this coalescer again (its model was replaced, `service.api.served`)."""
        self.closed = True
        loop, worker = self._loop, self._worker
        if worker is not None and not worker.done() and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(worker.cancel)
        self._executor.shutdown(wait=False)

    async def aclose(self) -> None:
        """Stop the worker (pending requests are cancelled); a later `score` starts a new one."""
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        for job in self._pending:
            job.future.cancel()
        self._pending.clear()
        self._pending_stamps = 0
