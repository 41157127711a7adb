"""In-process micro-batcher: one engine thread owns the Pipeline; compatible requests share one call.

Threading: the event loop only queues jobs and resolves futures; every Pipeline call (load, warm-up, batches)
runs on the batcher's single worker thread, so the loop stays free and the Pipeline's lock is never contended.
Futures are resolved on the loop thread (asyncio futures are not thread-safe).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from diffrt.engine.request import Request, combine
from diffrt.engine.request import batch_key as request_batch_key
from diffrt.errors import BadInput
from diffrt.serve.progress import Progress

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue is full; the caller should answer 429."""


def batch_key(r: Request) -> tuple:
    """Requests with equal keys share one pipeline call: every image has its own seed and prompt, so batching
    changes no one's images. Image jobs get a key of their own."""
    key = request_batch_key(r)
    return key if key is not None else (id(r),)


def compatible_groups(items: list[Request], max_batch: int) -> list[list[int]]:
    """Indices of `items` (in arrival order) split into groups that may each share one pipeline call, as the
    queue groups them: the oldest request not yet placed, then every later one with its batch key while they
    fit in `max_batch` images. A request of more than `max_batch` images runs alone."""
    groups: list[list[int]] = []
    placed: set[int] = set()
    for i, head in enumerate(items):
        if i in placed:
            continue
        key, total, group = batch_key(head), head.num_images, [i]
        for j in range(i + 1, len(items)):
            if j not in placed and batch_key(items[j]) == key and total + items[j].num_images <= max_batch:
                group.append(j)
                total += items[j].num_images
        placed.update(group)
        groups.append(group)
    return groups


@dataclass
class JobResult:
    images: list  # PIL images, this request's own
    parameters: dict
    timings: dict[str, float]  # the whole batch's stage timings
    batch_images: int  # images in the pipeline call that produced these


@dataclass
class Job:
    settings: Request  # resolved
    future: asyncio.Future
    is_disconnected: Callable[[], Awaitable[bool]] | None = None
    model: str | None = None  # the pool's model name; None: the one pipeline (set_pipeline)
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Bounded FIFO of jobs, dispatched in compatible groups of up to `max_batch` images to one engine thread."""

    def __init__(self, max_batch: int, batch_wait_s: float, max_queue: int, metrics: Any = None):
        self.max_batch, self.batch_wait_s, self.max_queue = max(1, max_batch), max(0.0, batch_wait_s), max_queue
        self.metrics = metrics
        self.pipeline: Any = None  # set by set_pipeline(); owned by the engine thread from then on
        self.pool: Any = None  # or a ModelPool (set_pool): jobs name their model, batches never mix models
        self.progress = Progress()  # the running call's step, for progress reports and interrupts
        self.running = 0  # requests in the engine call now
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffrt-engine")
        self._pending: deque[Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # --- engine thread -------------------------------------------------------------------------------------
    async def run_in_engine(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread (loading and warm-up go here too, so they never race a batch)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def set_pipeline(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self._cap(pipeline.manifest)

    def set_pool(self, pool: Any) -> None:
        """Serve several bundles: a job's `model` picks its Pipeline (loaded by the pool on this thread)."""
        self.pool = pool
        for model in pool.models.values():
            self._cap(model.manifest)

    def _cap(self, manifest: Any) -> None:
        bundle_max = manifest.components["vae_decoder"].spec.dim_ranges["batch"].max
        if self.max_batch > bundle_max:
            log.info(
                "max batch %d > this bundle's %d images per call: using %d", self.max_batch, bundle_max, bundle_max
            )
            self.max_batch = bundle_max

    # --- loop side ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._dispatch_forever(), name="diffrt-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self._pending:
            job.future.cancel()
        self._pending.clear()
        # Don't wait for a running generation: shutdown should not hang on a long request.
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def depth(self) -> int:
        return len(self._pending)

    def submit(
        self,
        settings: Request,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
        model: str | None = None,
    ) -> Job:
        """Queue a job (raises QueueFull). The caller awaits `job.future` and cancels it to withdraw."""
        if len(self._pending) >= self.max_queue:
            raise QueueFull(f"queue is full ({self.max_queue} waiting)")
        job = Job(settings, asyncio.get_running_loop().create_future(), is_disconnected, model)
        self._pending.append(job)
        self._gauge()
        assert self._wakeup is not None, "Batcher.start() was not called"
        self._wakeup.set()
        return job

    def withdraw(self, job: Job, reason: str) -> None:
        """The caller gave up (timeout, cancellation): free its queue slot now rather than at dispatch."""
        if job.future.done():
            return
        job.future.cancel()
        try:
            self._pending.remove(job)
        except ValueError:
            return  # already taken by the engine: its result will be discarded
        self._gauge()
        if self.metrics:
            self.metrics.dropped.labels(reason=reason).inc()

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._pending))

    def _fitting(self, head: Job) -> list[Job]:
        """Head first, then later compatible jobs in order, while they fit in max_batch images."""
        key, total, out = batch_key(head.settings), head.settings.num_images, [head]
        for job in self._pending:
            if job is head or job.model != head.model or batch_key(job.settings) != key:
                continue
            if total + job.settings.num_images <= self.max_batch:
                out.append(job)
                total += job.settings.num_images
        return out

    async def _dispatch_forever(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._pending[0]
            # Wait for partners only until batch_wait after the head arrived: under load the head has already
            # waited for the engine, so it leaves at once.
            deadline = head.enqueued + self.batch_wait_s
            while sum(j.settings.num_images for j in self._fitting(head)) < self.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            if head.future.done():  # withdrawn (timeout) while we waited
                self._pending.remove(head)
                self._gauge()
                continue
            jobs = self._fitting(head)
            for job in jobs:
                self._pending.remove(job)
            self._gauge()
            live = [job for job in jobs if await self._still_wanted(job)]
            if not live:
                continue
            started = time.perf_counter()
            if self.metrics:
                for job in live:
                    self.metrics.queue_wait.observe(started - job.enqueued)
            self.running = len(live)
            try:
                group = [j.settings for j in live]
                results = await loop.run_in_executor(self._executor, self.run_group, group, head.model)
            except Exception as e:  # noqa: BLE001 - the executor itself failed (e.g. shut down)
                results = [e] * len(live)
            finally:
                self.running = 0
            for job, result in zip(live, results):
                if job.future.done():  # timed out while running: the answer has gone already
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    async def _still_wanted(self, job: Job) -> bool:
        """Drop jobs whose caller gave up (timeout, cancellation) or whose client went away."""
        reason = None
        if job.future.done():
            reason = "cancelled"
        elif job.is_disconnected is not None and await job.is_disconnected():
            reason = "disconnected"
            job.future.cancel()
        if reason:
            log.info("dropped a queued request before the engine: %s", reason)
            if self.metrics:
                self.metrics.dropped.labels(reason=reason).inc()
            return False
        return True

    # --- engine thread -------------------------------------------------------------------------------------
    def run_group(self, group: list[Request], model: str | None = None) -> list[JobResult | BaseException]:
        """One pipeline call for a compatible group (equal batch keys, at most max_batch images in all): a
        result or an exception per request. Engine thread only; the Ray Serve deployment calls it too."""
        try:
            return self._run_group(group, model)
        except BadInput as e:
            if len(group) == 1:
                return [e]
            # One bad request must not fail its batch-mates: run each alone.
            log.info("batched call refused (%s); running its %d requests one by one", e, len(group))
            return [r for s in group for r in self.run_group([s], model)]
        except Exception as e:  # noqa: BLE001 - handed to the request's future, logged by the app
            return [e] * len(group)

    def _run_group(self, group: list[Request], model: str | None) -> list[JobResult]:
        pipe = self.pool.pipeline(model) if self.pool is not None else self.pipeline
        if len(group) > 1:  # prompts of different lengths (75-token windows) take calls of their own
            windows = [pipe.text_windows(r) for r in group]
            if len(set(windows)) > 1:
                results: dict[int, JobResult] = {}
                for w in dict.fromkeys(windows):
                    part = [i for i, x in enumerate(windows) if x == w]
                    results.update(zip(part, self._run_group([group[i] for i in part], model)))
                return [results[i] for i in range(len(group))]
        self.progress.begin(lambda: getattr(pipe, "latest_sample", None))
        try:
            out = pipe.generate(combine(group), callback=self.progress.step)
        finally:
            self.progress.end()
        total = sum(r.num_images for r in group)
        if self.metrics:
            self.metrics.batch_images.observe(total)
            self.metrics.images.inc(total)
            for stage, seconds in out.timings.items():
                self.metrics.stage_seconds.labels(stage=stage).observe(seconds)
        results, i = [], 0
        for r in group:
            own = {"prompt": r.prompts[0], "seed": r.seeds[0], "all_seeds": list(r.seeds), "num_images": r.num_images}
            images = out.images[i : i + r.num_images]
            results.append(JobResult(images, {**out.parameters, **own}, dict(out.timings), total))
            i += r.num_images
        return results
