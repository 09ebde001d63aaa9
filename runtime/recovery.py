"""Faults and how an engine survives them: detection deadlines, bounded restarts, timing.

A *fault* is anything after which the ranks cannot be trusted: a worker died
(:class:`~tessera.errors.WorkerDiedError`), a rank did not answer in time (a
stall, :class:`~tessera.errors.WaitTimeout`), or a rank raised mid-step
(:class:`~tessera.errors.RankError`: its peers may now be stuck in a
collective with it). Every fault is handled the same way: all ranks are
killed and restarted on the same placement, the engine reloads its shards,
and the work in flight is replayed from the driver's state (which is the
source of truth: prompts, outputs, seeds). Both engines use this module.

- :class:`StepDeadline` turns measured step times into a per-call deadline,
  so a stalled rank is found in seconds (``max(floor, factor x`` the slowest
  recent step per unit of work ``x`` this call's work``)``).
- :class:`Recovery` runs restarts under a :class:`~tessera.options.RecoveryPolicy`:
  at most ``max_restarts`` in ``window_s``, with backoff; a fault during a
  restart or reload is another attempt, never an orphaned request; when the
  budget is spent it raises :class:`RecoveryFailed` for the engine to fail
  what was in flight. Each recovery's time is split into detection, restart
  (worker start reported separately), reload and replay.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from tessera.errors import RankError, TesseraError, WaitTimeout, WorkerDiedError
from tessera.options import RecoveryPolicy

log = logging.getLogger("tessera.recovery")

FAULTS = (WorkerDiedError, WaitTimeout, RankError)


class RecoveryFailed(TesseraError):
    """The restart budget is spent (or a restart cannot succeed); the message names the faults."""


def fault_kind(fault: BaseException) -> str:
    return {WorkerDiedError: "death", WaitTimeout: "stall", RankError: "rank error"}.get(type(fault), "fault")


class StepDeadline:
    """A per-call timeout from measured call times: generous for the first calls, then seconds."""

    def __init__(self, policy: RecoveryPolicy, ceiling_s: float, history: int = 32) -> None:
        self.policy = policy
        self.ceiling_s = ceiling_s  # never longer than the engine's step_timeout_s
        self._rates: deque[float] = deque(maxlen=history)  # seconds per unit of work of recent calls
        self._cold = False

    def expect_cold_start(self) -> None:
        """The next call runs on freshly started workers (after a restart and reload): lazy imports and
        component loads make it slow, so it gets the ceiling (stalls are still found by heartbeats) and its
        time is not taken as a measure of the work."""
        self._cold = True

    def seconds(self, units: float) -> float:
        """The deadline of a call doing ``units`` of work (tokens x steps, or denoising steps x pixels)."""
        if self._cold or len(self._rates) < 2:  # warm-up calls (lazy initialisation, first allocations)
            return self.ceiling_s
        return min(self.ceiling_s, max(self.policy.stall_floor_s, self.policy.stall_factor * max(self._rates) * units))

    def record(self, seconds: float, units: float) -> None:
        if self._cold:  # the first call after a restart: not a measure of the work
            self._cold = False
            return
        self._rates.append(seconds / max(units, 1e-9))


@dataclass
class RecoveryRecord:
    """One recovered fault, timed: ``detect_s`` from the call's start to the fault's report."""

    kind: str
    message: str
    attempts: int
    detect_s: float
    restart_s: float  # controller.restart() in all, worker start included
    worker_start_s: float  # of which Ray starting the actors and their imports
    reload_s: float
    replay_s: float = 0.0  # set by the engine once the interrupted work ran again
    resume_step: int = 0  # diffusion: the denoising step the image resumed from (0: rerun from its seed)

    @property
    def own_s(self) -> float:
        """tessera's own recovery time once the fault is known: restart without worker start (Ray starting
        the actors and their Python imports), reload and replay. Detection is reported apart (``detect_s``):
        a death is reported at once, a stall after the heartbeat or step deadline."""
        return self.restart_s - self.worker_start_s + self.reload_s + self.replay_s

    @property
    def total_s(self) -> float:
        """All the time the fault cost the work in flight: detection, restart (worker start included), reload and
        replay."""
        return self.detect_s + self.restart_s + self.reload_s + self.replay_s


@dataclass
class Recovery:
    """Restarts ``controller`` after faults under ``policy``; ``reload()`` re-attaches the engine's shards."""

    controller: object
    policy: RecoveryPolicy
    reload: Callable[[], None]
    records: list[RecoveryRecord] = field(default_factory=list)
    _times: deque = field(default_factory=deque)  # when recent restarts happened (for the window)

    def recover(self, fault: BaseException, detect_s: float = 0.0) -> RecoveryRecord:
        """Restart and reload until it works or the budget is spent (then :class:`RecoveryFailed`)."""
        kind, message = fault_kind(fault), str(fault).splitlines()[0]
        attempt = 0
        while True:
            now = time.monotonic()
            while self._times and now - self._times[0] > self.policy.window_s:
                self._times.popleft()
            if len(self._times) >= self.policy.max_restarts:
                raise RecoveryFailed(
                    f"{len(self._times)} restarts in the last {self.policy.window_s:.0f}s (the policy allows "
                    f"{self.policy.max_restarts}); last fault ({kind}): {message}. Raise recovery.max_restarts, or "
                    "look for what keeps killing the workers (memory, a bad request, the node)"
                ) from fault
            self._times.append(now)
            attempt += 1
            if attempt > 1:
                time.sleep(min(self.policy.max_backoff_s, self.policy.backoff_s * 2 ** (attempt - 2)))
            log.warning("%s (%s); restarting every rank (attempt %d)", message, kind, attempt)
            started = time.perf_counter()
            try:
                self.controller.restart()
                restarted = time.perf_counter()
                self.reload()
            except FAULTS as again:  # a death during recovery: another attempt, within the budget
                fault, kind, message = again, fault_kind(again), str(again).splitlines()[0]
                continue
            done = time.perf_counter()
            worker_start = float(getattr(self.controller, "startup_timings", {}).get("worker_start_s", 0.0))
            record = RecoveryRecord(kind, message, attempt, detect_s, restarted - started, worker_start,
                                    done - restarted)
            self.records.append(record)
            return record

    def summary(self) -> list[dict]:
        return [dict(r.__dict__, own_s=r.own_s, total_s=r.total_s) for r in self.records]
