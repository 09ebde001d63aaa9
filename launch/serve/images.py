"""``/v1/images/generations`` over a :class:`~tessera.runtime.diffusion.engine.DiffusionEngine`, one loop.

Like the language-model loop, one thread owns the engine (its calls block
and it is not thread-safe); requests queue (bounded: 429 when full) and run
in arrival order. Today every request runs alone: its ``n`` images are one
call of the public ``DiffusionEngine.generate_images`` (one denoising loop
over a batch of ``n``).

Where batching across requests slots in (issue 13, item 4): ``_next_batch``
takes the head of the queue and, once the engine can run requests with
their own seeds in one loop, every queued request with the same
:func:`batch_key` (size, steps, mode, guidance) up to a cap; ``_run_batch``
then makes one engine call for the batch and hands each request its own
images. Nothing else changes: the queue, the 429, the futures and the
metrics already work per request. (For batched images to equal the images
made alone, the engine must draw each request's noise from its own seed, not
one batch-shaped draw.)
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
    """Requests with equal keys could share one denoising loop (item 4)."""
    return (job.width, job.height, job.steps, job.mode, job.guidance_scale)


@dataclass(eq=False)
class _Pending:
    job: ImageJob
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancelled: bool = False
    queued_at: float = field(default_factory=time.monotonic)


class ImageService:
    """The loop around one DiffusionEngine: ``await generate(job)`` -> PNG bytes per image."""

    def __init__(self, engine, max_waiting: int = 64, retry_after_s: float = 1.0, rate_window_s: float = 30.0) -> None:
        self.engine = engine
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
        """The requests of the next engine call: today the oldest one alone (see the module docstring)."""
        with self._lock:
            while self._queue:
                head = self._queue.popleft()
                if not head.cancelled:
                    return [head]
        return []

    def _run_batch(self, batch: list[_Pending]) -> None:
        for p in batch:
            j = p.job
            try:
                images = self.engine.generate_images(
                    [j.prompt] * j.n, steps=j.steps, height=j.height, width=j.width, guidance_scale=j.guidance_scale,
                    seed=j.seed, mode=j.mode, negative_prompt=j.negative_prompt)
                result: Any = [_png(im) for im in images]
                self._totals["images"] += len(result)
                self._totals["requests_finished"] += 1
                self._done.append((time.monotonic(), len(result)))
            except Exception as err:  # noqa: BLE001 - the request fails alone
                log.warning("image request failed: %s: %s", type(err).__name__, err)
                self._totals["requests_failed"] += 1
                result = err
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
