"""``/v1/images/generations`` over a :class:`~tessera.runtime.diffusion.engine.DiffusionEngine`, one loop.

Like the language-model loop, one thread owns the engine (its calls block
and it is not thread-safe); requests queue (bounded: 429 when full) and run
in arrival order.

Request batching: concurrent requests that can share a denoising loop (the
same :func:`batch_key`: size, steps, mode, guidance, negative prompt) run as
one batch of up to ``max_batch_images`` images: ``_next_batch`` takes the
head of the queue and every queued request with its key that fits, and
``_run_batch`` makes one ``DiffusionEngine.generate_images`` call and hands
each request its own images. A request arriving while a loop runs joins the
next one. Each image's noise is drawn alone from its own seed (image ``i`` of
a request uses ``seed + i``), so a request's images do not depend on what it
was batched with: with ``exact_batches`` (the default) the engine runs each
image's forward with the shapes it has alone (``batch_invariant``), so they
equal the request run alone bit for bit; without it one batched forward per
step, equal to fp32 rounding. Modes that share per-step state across the
batch (stale K/V) run alone when exact. If a batch fails, its requests run
alone, so a request that fails inside the engine fails alone.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tessera.runtime.llm.async_engine import EngineStopped, QueueFull

log = logging.getLogger("tessera.serve.images")


@dataclass(frozen=True)
class ImageJob:
    """One request's parameters (what ``generate_images`` takes)."""

    prompt: str
    n: int
    width: int
    height: int
    steps: int | None
    guidance_scale: float | None
    seed: int
    mode: str
    negative_prompt: str


def batch_key(job: ImageJob) -> tuple:
    """Requests with equal keys share one denoising loop."""
    return (job.width, job.height, job.steps, job.mode, job.guidance_scale, job.negative_prompt)


@dataclass(eq=False)
class _Pending:
    job: ImageJob
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancelled: bool = False
    queued_at: float = field(default_factory=time.monotonic)


class ImageService:
    """The loop around one DiffusionEngine: ``await generate(job)`` -> PNG bytes per image."""

    def __init__(self, engine, max_waiting: int = 64, retry_after_s: float = 1.0, rate_window_s: float = 30.0,
                 max_batch_images: int = 8, exact_batches: bool = True) -> None:
        self.engine = engine
        self.max_batch_images = max_batch_images
        self.exact_batches = exact_batches
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self.rate_window_s = rate_window_s
        self._queue: deque[_Pending] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._busy = 0
        self._done: deque[tuple[float, int]] = deque()
        self._totals = {"images": 0, "requests_finished": 0, "requests_failed": 0, "batches": 0}
        self._thread: threading.Thread | None = None
        self.state = "ready"

    def start(self) -> "ImageService":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tessera-image-loop", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout_s: float = 60.0) -> None:
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.state = "stopped"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    async def generate(self, job: ImageJob) -> list[bytes]:
        loop = asyncio.get_running_loop()
        pending = _Pending(job, loop, loop.create_future())
        with self._lock:
            if self._stopping or self._thread is None:
                raise EngineStopped("the image loop is not running (the server is stopping)")
            if len(self._queue) + 1 > self.max_waiting:
                raise QueueFull(f"{len(self._queue)} image request(s) wait and the queue holds {self.max_waiting}; "
                                f"retry after {self.retry_after_s:g}s", self.retry_after_s)
            self._queue.append(pending)
        self._wake.set()
        try:
            return await pending.future
        finally:
            pending.cancelled = True  # a client that left: dropped if it has not started yet

    # -- the loop ------------------------------------------------------------------------------------

    def _next_batch(self) -> list[_Pending]:
        """The oldest request and every waiting one that can share its loop, up to ``max_batch_images`` images."""
        with self._lock:
            while self._queue and self._queue[0].cancelled:
                self._queue.popleft()
            if not self._queue:
                return []
            head = self._queue.popleft()
            batch, images, key = [head], head.job.n, batch_key(head.job)
            if self.exact_batches and not self.engine.supports_batch_invariance(head.job.mode):
                return batch  # its images would depend on the batch: it runs alone
            for p in list(self._queue):
                if not p.cancelled and batch_key(p.job) == key and images + p.job.n <= self.max_batch_images:
                    self._queue.remove(p)
                    batch.append(p)
                    images += p.job.n
            return batch

    def _generate(self, batch: list[_Pending]) -> list[Any]:
        """One denoising loop for the batch; each request's PNGs (its images drawn from seed, seed + 1, ...)."""
        head = batch[0].job
        prompts = [p.job.prompt for p in batch for _ in range(p.job.n)]
        seeds = [p.job.seed + i for p in batch for i in range(p.job.n)]
        images = self.engine.generate_images(
            prompts, steps=head.steps, height=head.height, width=head.width, guidance_scale=head.guidance_scale,
            seed=seeds, mode=head.mode, negative_prompt=head.negative_prompt, batch_invariant=self.exact_batches)
        out, at = [], 0
        for p in batch:
            out.append([_png(im) for im in images[at:at + p.job.n]])
            at += p.job.n
        return out

    def _run_batch(self, batch: list[_Pending]) -> None:
        try:
            results: list[Any] = self._generate(batch)
        except Exception as err:  # noqa: BLE001 - find the request that fails: each runs alone
            if len(batch) == 1:
                results = [err]
            else:
                log.warning("a batch of %d image requests failed (%s); running them one at a time", len(batch), err)
                results = []
                for p in batch:
                    try:
                        results += self._generate([p])
                    except Exception as alone:  # noqa: BLE001 - this request fails alone
                        results.append(alone)
        for p, result in zip(batch, results):
            if isinstance(result, BaseException):
                log.warning("image request failed: %s: %s", type(result).__name__, result)
                self._totals["requests_failed"] += 1
            else:
                self._totals["images"] += len(result)
                self._totals["requests_finished"] += 1
                self._done.append((time.monotonic(), len(result)))
            p.loop.call_soon_threadsafe(_settle, p.future, result)
        self._totals["batches"] += 1

    def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                with self._lock:
                    if self._stopping:
                        break
                batch = self._next_batch()
                if not batch:
                    self._wake.wait(0.5)
                    continue
                self._busy = len(batch)
                self._run_batch(batch)
                self._busy = 0
        finally:
            with self._lock:
                self._stopping = True
                left, self._queue = list(self._queue), deque()
            for p in left:
                p.loop.call_soon_threadsafe(_settle, p.future, EngineStopped("the server is stopping"))

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        while self._done and now - self._done[0][0] > self.rate_window_s:
            self._done.popleft()
        rate = sum(n for _, n in self._done) / self.rate_window_s if self._done else 0.0
        return {"state": self.state, "waiting": len(self._queue), "running": self._busy, "images_per_s": rate,
                **self._totals}


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
