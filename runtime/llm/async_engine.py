"""One loop that owns an :class:`~tessera.runtime.llm.engine.LLMEngine` and serves many concurrent consumers.

Why a loop of its own: the engine is synchronous and not thread-safe (one
step is one blocking fan-out to the workers), while a server holds
hundreds of concurrent requests on an asyncio event loop. So exactly one
thread touches the engine. It steps the engine while work exists and sleeps
when there is none; requests and aborts reach it through an inbox that it
drains at every step boundary, so a new request joins continuous batching
at the next step and an abort (a client that disconnected) frees the
request's KV blocks at the next boundary, before the next step is planned.
Outputs go back to each consumer's event loop with
``call_soon_threadsafe``, one message per request per step.

Admission is bounded: :meth:`AsyncLLMEngine.submit` refuses with
:class:`QueueFull` (a server answers 429 with ``Retry-After``) when the
requests waiting to start would exceed ``max_waiting``. A request is
validated (tokens, context, cache size) on the caller's thread before it is
queued (``LLMEngine.check_request``), so a bad request is refused at once.

Failures: a worker death inside a step is recovered by the engine (it
rebuilds the ranks and replays the KV of every running request); the loop
only reports it (:attr:`AsyncLLMEngine.state` is ``"recovering"`` meanwhile),
and the streams simply pause: the tokens after the recovery are the ones the
engine would have produced, none repeated, none missing, because every
consumer receives exactly the tokens ``step()`` returns. A step that raises
anything else fails the requests it held (finish reason ``"error"`` with
the engine's message) and the loop goes on with the next requests.

Text: a consumer may attach an :class:`OutputProcessor` (the server's
incremental detokenizer and stop-string matcher) that runs on the loop's
thread, token by token, so a stop string ends the request (and frees its
blocks) at the same step boundary at which it appeared.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from tessera.options import SamplingParams

log = logging.getLogger("tessera.llm.async")

READY, RECOVERING, FAILED, STOPPED = "ready", "recovering", "failed", "stopped"


class QueueFull(Exception):
    """Too many requests wait to start; try again after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineStopped(Exception):
    """The loop is shut down (the server is stopping); no request is accepted."""


class OutputProcessor(Protocol):
    """Turns one request's tokens into text on the loop's thread (see ``tessera.launch.serve.text``)."""

    def feed(self, token: int) -> tuple[str, bool]:
        """Text that may be sent now after ``token``, and whether a stop string ended the request."""

    def flush(self) -> str:
        """Text held back so far, sent when the request ends for another reason."""


@dataclass(frozen=True)
class Output:
    """New tokens (and text) of one request since its previous Output; the last one has ``finished``."""

    token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "error" | "abort"
    error: str | None = None
    num_generated: int = 0  # tokens generated so far (usage counts)
    time: float = 0.0  # time.monotonic() when the loop produced it


@dataclass(frozen=True)
class Submission:
    """One request to :meth:`AsyncLLMEngine.submit`: a prompt (text or token ids), its sampling, optional text."""

    prompt: Any
    sampling: SamplingParams
    processor: OutputProcessor | None = None


@dataclass
class RequestStream:
    """A consumer's view of one request: ``async for out in stream``; :meth:`abort` to give it up."""

    owner: "AsyncLLMEngine"
    loop: asyncio.AbstractEventLoop
    prompt_ids: list[int]
    sampling: SamplingParams
    processor: OutputProcessor | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    engine_id: str | None = None  # set by the loop when it adds the request
    aborted: bool = False
    done: bool = False  # the loop sent the last Output
    generated: int = 0
    _ended: bool = False  # the consumer received the last Output

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> Output:
        if self._ended:
            raise StopAsyncIteration
        out = await self.queue.get()
        if out.finished:
            self._ended = True
        return out

    def abort(self) -> None:
        """Stop the request (a no-op once it finished); its KV blocks are freed at the next step boundary."""
        self.owner._abort(self)


class AsyncLLMEngine:
    """The loop around one LLMEngine. :meth:`start` it, :meth:`submit` requests, :meth:`close` it.

    ``max_waiting``: how many requests may wait to start (queued here or in
    the scheduler) before :meth:`submit` answers :class:`QueueFull`.
    ``retry_after_s``: the wait suggested to a refused client.
    """

    def __init__(self, engine, max_waiting: int = 64, retry_after_s: float = 1.0, idle_wait_s: float = 0.5,
                 rate_window_s: float = 10.0, offload_stats_every_s: float = 5.0) -> None:
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"max_waiting is {max_waiting!r}; it must be an integer >= 0")
        self.engine = engine
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self.idle_wait_s = idle_wait_s
        self.rate_window_s = rate_window_s
        self.offload_stats_every_s = offload_stats_every_s
        self.state = READY
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[tuple[str, RequestStream]] = []
        self._inbox_adds = 0
        self._engine_waiting = 0
        self._stopping = False
        self._streams: dict[str, RequestStream] = {}  # engine request id -> stream (loop thread only)
        self._thread: threading.Thread | None = None
        self._rate: deque[tuple[float, int]] = deque()
        self._totals = {"generated_tokens": 0, "prompt_tokens": 0, "requests_finished": 0, "requests_failed": 0,
                        "requests_aborted": 0, "step_errors": 0}
        self._offload_checked = 0.0
        self._offloaded: bool | None = None  # None until the first look at the ranks' offload counters
        self._hit_rate: float | None = None
        self._recoveries = 0
        self.snapshot: dict[str, Any] = {}
        engine.on_recovery = self._on_recovery
        self._publish()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> "AsyncLLMEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tessera-llm-loop", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the loop after its current step; every unfinished request ends with an error ("server stopping")."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("the engine loop did not stop within %.0fs (a step is still running)", timeout_s)
        self.state = STOPPED
        self.engine.on_recovery = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # -- the consumer side ----------------------------------------------------------------

    def submit(self, requests: Sequence[Submission], loop: asyncio.AbstractEventLoop | None = None) -> list[RequestStream]:
        """Validate and queue requests together (all or none); one :class:`RequestStream` each.

        Raises ValueError for a bad request (nothing is queued), :class:`QueueFull`
        when they would not fit in the waiting queue, :class:`EngineStopped` after close.
        """
        loop = loop or asyncio.get_running_loop()
        checked = [self.engine.check_request(r.prompt, r.sampling) + (r.processor,) for r in requests]
        streams = [RequestStream(self, loop, ids, params, proc) for ids, params, proc in checked]
        with self._lock:
            if self._stopping or self._thread is None:
                raise EngineStopped("the engine loop is not running (the server is stopping)")
            waiting = self._inbox_adds + self._engine_waiting
            if waiting + len(streams) > self.max_waiting:
                raise QueueFull(
                    f"{waiting} request(s) wait to start and the queue holds {self.max_waiting}; "
                    f"retry after {self.retry_after_s:g}s", self.retry_after_s)
            self._inbox.extend(("add", s) for s in streams)
            self._inbox_adds += len(streams)
        self._wake.set()
        return streams

    async def generate(self, prompt, sampling: SamplingParams | None = None) -> Output:
        """One request to the end: every token and the finish reason in one Output (aborted if cancelled)."""
        stream = self.submit([Submission(prompt, sampling or SamplingParams())])[0]
        tokens: list[int] = []
        text = []
        try:
            async for out in stream:
                tokens.extend(out.token_ids)
                text.append(out.text)
                if out.finished:
                    return Output(tuple(tokens), "".join(text), True, out.finish_reason, out.error,
                                  out.num_generated, out.time)
        finally:
            stream.abort()
        raise RuntimeError("stream ended without a last output")  # pragma: no cover

    def _abort(self, stream: RequestStream) -> None:
        with self._lock:
            if stream.aborted or stream.done:
                return
            stream.aborted = True
            self._inbox.append(("abort", stream))
        self._wake.set()

    # -- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                with self._lock:
                    if self._stopping:
                        break
                    commands, self._inbox = self._inbox, []
                self._apply(commands)
                if not self.engine.has_unfinished():
                    self._publish()
                    self._wake.wait(self.idle_wait_s)
                    continue
                try:
                    out = self.engine.step()
                except Exception as err:  # noqa: BLE001 - a failed step fails its requests, not the server
                    self._step_failed(err)
                    continue
                with self._lock:
                    self._engine_waiting = len(self.engine.scheduler.waiting)
                if self.state == FAILED:
                    self.state, self.last_error = READY, None
                self._deliver(out)
                self._maybe_offload_stats()
                self._publish()
        except BaseException as err:  # pragma: no cover - a bug in the loop itself: fail every consumer loudly
            log.exception("the engine loop crashed")
            self.state, self.last_error = FAILED, f"engine loop crashed: {type(err).__name__}: {err}"
        finally:
            reason = self.last_error if self.state == FAILED else "the server is stopping"
            with self._lock:
                self._stopping = True
                leftover = [s for _, s in self._inbox]
                self._inbox = []
            for stream in list(self._streams.values()) + leftover:
                self._end(stream, "error", reason, abort=True)
            self._streams.clear()
            self._publish()

    def _apply(self, commands: list[tuple[str, RequestStream]]) -> None:
        """Requests join and aborts take effect here, between two steps."""
        engine = self.engine
        for verb, stream in commands:
            if verb == "add":
                if stream.aborted:
                    with self._lock:
                        self._inbox_adds -= 1
                    continue
                rid = engine.add_request(list(stream.prompt_ids), stream.sampling)
                with self._lock:  # one move from the inbox to the scheduler: the waiting count never dips
                    self._inbox_adds -= 1
                    self._engine_waiting = len(engine.scheduler.waiting)
                stream.engine_id = rid
                self._totals["prompt_tokens"] += len(stream.prompt_ids)
                if rid in engine.errors:  # validated before, so only if the engine's rules changed
                    res = engine.pop(rid)
                    self._end(stream, "error", res.error)
                else:
                    self._streams[rid] = stream
            elif verb == "abort" and stream.engine_id is not None and stream.engine_id in self._streams:
                engine.abort(stream.engine_id)  # frees its KV blocks now
                engine.pop(stream.engine_id)
                del self._streams[stream.engine_id]
                self._totals["requests_aborted"] += 1
                self._end(stream, "abort", None)
        with self._lock:
            self._engine_waiting = len(engine.scheduler.waiting)

    def _deliver(self, out: list[tuple[str, int, bool]]) -> None:
        now = time.monotonic()
        new: dict[str, list[int]] = {}
        texts: dict[str, list[str]] = {}
        ended: dict[str, tuple[str, str | None]] = {}
        count = 0
        for rid, token, finished in out:
            stream = self._streams.get(rid)
            if stream is None or rid in ended:
                continue  # aborted, or tokens of a multi-step call after a stop string
            count += 1
            stream.generated += 1
            new.setdefault(rid, []).append(token)
            stop = False
            if stream.processor is not None:
                delta, stop = stream.processor.feed(token)
                texts.setdefault(rid, []).append(delta)
            if stop:  # a stop string: the request ends now (its blocks are freed before the next step)
                if not finished:
                    self.engine.abort(rid)
                ended[rid] = ("stop", None)
            elif finished:
                res = self.engine.result(rid)
                if stream.processor is not None:
                    texts[rid].append(stream.processor.flush())
                ended[rid] = (res.finish_reason, res.error)
        self._totals["generated_tokens"] += count
        self._rate.append((now, count))
        for rid, tokens in new.items():
            stream = self._streams[rid]
            reason, error = ended.get(rid, (None, None))
            if reason is not None:
                self.engine.pop(rid)
                del self._streams[rid]
                self._totals["requests_failed" if reason == "error" else "requests_finished"] += 1
            self._send(stream, Output(tuple(tokens), "".join(texts.get(rid, ())), reason is not None, reason, error,
                                      stream.generated, now))

    def _step_failed(self, err: Exception) -> None:
        """A step raised (not a recovered worker death): the requests it ran fail, those waiting stay queued."""
        message = f"{type(err).__name__}: {err}"
        running = {r.request_id for r in self.engine.scheduler.running}
        log.error("engine step failed; failing its %d request(s): %s", len(running), message)
        self._totals["step_errors"] += 1
        self.state, self.last_error = FAILED, message
        for rid in running & set(self._streams):
            stream = self._streams.pop(rid)
            self.engine.abort(rid)  # frees its KV blocks
            self.engine.pop(rid)
            self._totals["requests_failed"] += 1
            self._end(stream, "error", f"the engine failed: {message}")
        with self._lock:
            self._engine_waiting = len(self.engine.scheduler.waiting)

    def _end(self, stream: RequestStream, reason: str, error: str | None, abort: bool = False) -> None:
        if stream.done:
            return
        if abort and stream.engine_id is not None and stream.engine_id in self.engine.requests:
            try:
                self.engine.abort(stream.engine_id)
                self.engine.pop(stream.engine_id)
            except Exception:  # noqa: BLE001 - best effort while stopping
                pass
        self._send(stream, Output((), "", True, reason, error, stream.generated, time.monotonic()))

    def _send(self, stream: RequestStream, out: Output) -> None:
        if out.finished:
            stream.done = True
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            pass

    # -- state for /health and /metrics ----------------------------------------------------

    def _on_recovery(self, phase: str) -> None:
        if phase == "start":
            self.state = RECOVERING
            log.warning("the engine is recovering from a worker failure; open streams pause until it is done")
        else:
            self.state = READY  # "failed": the step raises next, and _step_failed reports it
            self._recoveries += phase == "done"
        self._publish()

    def _maybe_offload_stats(self) -> None:
        now = time.monotonic()
        if self._offloaded is False or now - self._offload_checked < self.offload_stats_every_s:
            return
        self._offload_checked = now
        try:
            ranks = [r for r in self.engine.offload_stats() if r]
        except Exception:  # noqa: BLE001 - a metric must not break serving
            return
        self._offloaded = bool(ranks)
        if not ranks:  # not offloaded: never ask again
            return
        hits = sum(r.get("cache_hits", 0) for r in ranks)
        total = hits + sum(r.get("cache_misses", 0) for r in ranks)
        self._hit_rate = hits / total if total else 0.0

    def _publish(self) -> None:
        """A consistent, read-only view for other threads (replaced whole, never mutated)."""
        engine = self.engine
        now = time.monotonic()
        while self._rate and now - self._rate[0][0] > self.rate_window_s:
            self._rate.popleft()
        span = min(self.rate_window_s, max(1e-9, now - self._rate[0][0])) if self._rate else self.rate_window_s
        with self._lock:
            waiting = self._inbox_adds + self._engine_waiting
        self.snapshot = {
            "state": self.state,
            "last_error": self.last_error,
            "running": len(engine.scheduler.running),
            "waiting": waiting,
            "max_waiting": self.max_waiting,
            "kv_blocks_total": engine.allocator.num_blocks,
            "kv_blocks_free": engine.allocator.num_free,
            "tokens_per_s": sum(n for _, n in self._rate) / span if self._rate else 0.0,
            "recoveries": self._recoveries,
            "expert_cache_hit_rate": self._hit_rate,
            **self._totals,
        }
