"""A one-rank Controller served in this process: one Worker, no Ray, the same engines.

Why: a single-device job gains nothing from an actor, and the lent GPU machine
has no Ray at all (a Ray wheel is larger than everything that travels there).
Engines use only the controller's interface (``placement``,
``collective_rpc``, ``describe``, ``health``, ``restart``, ``shutdown``), so
serving that interface here runs the same engine and worker code as on Ray
workers: ``LLMEngine.load(InProcessController(Placement(plan, device="cuda")), ...)``.

How it mirrors a Ray worker:

- one :class:`~tessera.runtime.worker.Worker` (rank 0 of 1) on ``cpu`` or
  ``cuda:0``, whose calls run one at a time on one dedicated thread (as an
  actor runs one call at a time), so every wait is bounded: a call that does not
  return within its timeout raises :class:`~tessera.errors.WaitTimeout` and the
  controller reports itself ``unresponsive`` until it returns;
- ``torch.distributed`` with one rank: the default process group over an
  in-process ``HashStore`` (no port, no network), backend ``gloo`` for CPU
  tensors plus ``nccl`` for CUDA tensors when CUDA is present (for a ``cuda``
  controller one all_reduce on the device proves the NCCL communicator), and a
  named ``DeviceMesh`` over the plan's dims (an empty plan becomes ``{"dp": 1}``,
  so the placement and the mesh agree);
- an exception raised by a call propagates as it is (one rank: it reads like a
  local call), where the Ray controller wraps rank errors in ``RankError``.

Imports nothing of Ray: ``import tessera``, this controller and both engines
work where Ray is not installed (tests/test_inprocess.py proves it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from tessera.config import ParallelPlan, Timeouts
from tessera.errors import ConfigError, WaitTimeout
from tessera.memory.placement import Placement
from tessera.runtime.controller import RankInfo
from tessera.runtime.logs import default_log_level
from tessera.runtime.worker import Worker

log = logging.getLogger("tessera.inprocess")

NODE_ID = "inprocess"


class _CallThread:
    """One thread that runs submitted calls in order (an actor's mailbox, in this process).

    A daemon thread: a call stuck forever (the reason for a WaitTimeout) cannot keep the
    interpreter from exiting.
    """

    def __init__(self, name: str) -> None:
        self._queue: "queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple] | None]" = queue.SimpleQueue()
        self._busy_since: float | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        self._queue.put((fut, fn, args))
        return fut

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            self._busy_since = time.monotonic()
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - delivered to the caller
                fut.set_exception(exc)
            finally:
                self._busy_since = None

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def busy_for(self) -> float:
        """Seconds the current call has been running (0 when idle)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def stop(self, wait_s: float) -> bool:
        """Ask the thread to end after its current call; True when it ended within ``wait_s``."""
        self._queue.put(None)
        self._thread.join(timeout=wait_s)
        return not self._thread.is_alive()


class DefaultGroup:
    """The process's default ``torch.distributed`` group as in-process controllers share it.

    The default group is process-global, so this class's attributes are the one
    documented registry of this module: how many in-process controllers use the
    group, and whether one of them created it (then the last one destroys it). A
    group created by someone else is used when it has one rank, never destroyed.
    """

    _lock = threading.Lock()
    _users = 0
    _owned = False

    @classmethod
    def acquire(cls, device: torch.device, timeout_s: float) -> str:
        """Join (creating it when needed) a one-rank default group able to serve ``device``; returns its backend."""
        with cls._lock:
            if dist.is_initialized():
                if dist.get_world_size() != 1:
                    raise ConfigError(
                        f"this process already belongs to a {dist.get_world_size()}-rank torch.distributed group; "
                        "an in-process controller runs one rank: use the Ray controller inside a multi-rank job"
                    )
            else:
                # gloo serves CPU tensors; nccl CUDA ones (its communicator is created on first use).
                backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
                # One rank never talks to another host: keep gloo's and NCCL's bootstrap sockets on loopback
                # unless told otherwise.
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
                if "nccl" in backend:
                    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
                dist.init_process_group(
                    backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=timeout_s)
                )
                cls._owned = True
            backend = str(dist.get_backend())
            if device.type == "cuda" and "nccl" not in backend:
                raise ConfigError(
                    f"the process's default torch.distributed group uses {backend!r}, which cannot serve CUDA tensors "
                    "with NCCL; shut down the in-process CPU controller (or whoever created that group) first"
                )
            cls._users += 1
            return backend

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users = max(0, cls._users - 1)
            if cls._users == 0 and cls._owned:
                if dist.is_initialized():
                    dist.destroy_process_group()
                cls._owned = False

    @classmethod
    def users(cls) -> int:
        return cls._users


class InProcessController:
    """The Controller interface for a one-rank placement, served by one Worker in this process.

    ``placement``: a one-rank :class:`~tessera.memory.placement.Placement`
    (default: ``Placement(ParallelPlan({}), device=device)``); its ``device``
    (``"cpu"`` or ``"cuda"``, then ``cuda:0``) is where the worker computes. A plan
    of more than one rank is refused with a ConfigError. Use as a context
    manager, or call :meth:`start` and :meth:`shutdown`.
    """

    def __init__(
        self,
        placement: Placement | None = None,
        *,
        device: str | None = None,
        timeouts: Timeouts | None = None,
        log_level: str | None = None,
    ) -> None:
        if placement is None:
            placement = Placement(ParallelPlan({}), device=device or "cpu")
        elif device is not None and device != placement.device:
            raise ConfigError(f"device {device!r} disagrees with the placement's device {placement.device!r}; give one")
        if placement.world_size != 1:
            raise ConfigError(
                f"plan {placement.plan} has {placement.world_size} ranks, but an in-process controller runs exactly one; "
                "use a one-rank plan (every degree 1), or the Ray controller (tessera.runtime.controller.Controller, "
                "cluster=None/'auto'/an address) for more ranks"
            )
        if not placement.plan.degrees:  # the mesh needs one named dim: an empty plan is one dp replica
            placement = dataclasses.replace(placement, plan=ParallelPlan({"dp": 1}))
        self.placement = placement
        self.timeouts = timeouts or Timeouts()
        self.log_level = (log_level or default_log_level()).upper()
        self.address = None
        self.worker: Worker | None = None
        self.ranks: list[RankInfo] = []
        self.startup_timings: dict[str, float] = {}
        self.backend: str | None = None
        self._calls: _CallThread | None = None
        self._joined_group = False
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> "InProcessController":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "running" if self._started and not self._closed else "stopped"
        return f"<InProcessController {self.placement.plan} on {self.device}, {state}>"

    @property
    def world_size(self) -> int:
        return 1

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0) if self.placement.device == "cuda" else torch.device("cpu")

    def start(self) -> "InProcessController":
        """Create the worker (on its call thread), join the one-rank process group, build the mesh."""
        if self._started and not self._closed:
            return self
        if self.placement.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda asked for, but this machine has no CUDA device; use device cpu")
        t0 = time.perf_counter()
        self._calls = _CallThread(f"tessera-inprocess-{id(self):x}")
        try:
            self._wait(self._calls.submit(self._make_worker), self.timeouts.worker_start_s, "in-process worker start")
            t1 = time.perf_counter()
            self.backend = DefaultGroup.acquire(self.device, self.timeouts.process_group_s)
            self._joined_group = True
            coords = self._wait(self._calls.submit(self._init_mesh), self.timeouts.process_group_s,
                                f"one-rank process group ({self.backend}) and mesh")
            t2 = time.perf_counter()
        except BaseException:
            self._teardown(wait_s=5.0)
            raise
        worker = self.worker
        assert worker is not None
        self.ranks = [RankInfo(rank=0, node_id=NODE_ID, node_ip="127.0.0.1", hostname=socket.gethostname(),
                               pid=os.getpid(), device=str(worker.device), coords=coords)]
        self.startup_timings = {"worker_start_s": t1 - t0, "process_group_s": t2 - t1, "total_s": t2 - t0}
        self._started, self._closed = True, False
        log.info("in-process worker ready on %s (%s) in %.2fs", worker.device, self.backend, t2 - t0)
        return self

    def _make_worker(self) -> None:
        # Worker sets the process's torch thread count: keep this process's own.
        self.worker = Worker(0, 1, self.placement.device, self.log_level, num_threads=torch.get_num_threads())

    def _init_mesh(self) -> dict[str, int]:
        """The named DeviceMesh over the plan's dims (all of degree 1) on this rank; NCCL checked on CUDA."""
        from torch.distributed.device_mesh import init_device_mesh

        worker = self.worker
        assert worker is not None
        dims = dict(self.placement.plan.degrees)
        worker.plan_degrees = dict(dims)
        worker.mesh = init_device_mesh(worker.device.type, tuple(dims.values()), mesh_dim_names=tuple(dims))
        if worker.device.type == "cuda":
            probe = torch.full((1,), 3.0, device=worker.device)
            dist.all_reduce(probe)  # creates the NCCL communicator now, not inside the first engine step
            torch.cuda.synchronize(worker.device)
            if probe.item() != 3.0:
                raise RuntimeError(f"one-rank NCCL all_reduce returned {probe.item()} instead of 3.0")
        return worker.coordinates()

    def restart(self) -> "InProcessController":
        """A fresh worker (engines reload their models), process-group membership and mesh; same placement.

        A call still running (it timed out) is abandoned on its thread; its results are never read.
        """
        log.warning("restarting the in-process worker (%s)", self.placement.plan)
        self._teardown(wait_s=5.0)
        self._closed = False
        self._started = False
        return self.start()

    def shutdown(self) -> None:
        """Close what engines attached to the worker and leave the process group; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._teardown(wait_s=30.0)

    def _teardown(self, wait_s: float) -> None:
        calls, self._calls = self._calls, None
        if calls is not None and calls.alive:
            done = calls.submit(_close_worker_engines, self.worker)
            try:
                done.result(timeout=wait_s)
            except FutureTimeout:
                log.warning("in-process worker did not finish its running call within %.0fs; abandoning it", wait_s)
            except Exception:  # noqa: BLE001 - shutdown must not fail on one engine
                log.exception("closing the in-process worker's engines failed")
            calls.stop(wait_s=1.0)
        if self._joined_group:
            self._joined_group = False
            if self.worker is not None:
                self.worker.mesh = None
            DefaultGroup.release()
        self.worker = None
        self.ranks = []
        self._started = False

    # -- calls -------------------------------------------------------------------

    def collective_rpc(
        self,
        fn: str | Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        ranks: Sequence[int] | None = None,
        stall_s: float | None = None,
    ) -> list[Any]:
        """Run ``fn(worker, *args, **kwargs)`` (or worker method ``fn``) on the one rank; returns ``[result]``.

        ``stall_s`` is accepted for the Controller's interface: in this process a call that stops is a
        call that overruns ``timeout_s``.

        Raises what ``fn`` raised, or :class:`WaitTimeout` when it does not return in ``timeout_s``
        (default ``timeouts.call_s``).
        """
        if not self._started or self._closed or self._calls is None:
            raise RuntimeError("controller is not running; call start() (or use it as a context manager)")
        targets = [0] if ranks is None else list(ranks)
        bad = [r for r in targets if r != 0]
        if bad:
            raise ValueError(f"rank(s) {bad} do not exist: an in-process controller has rank 0 only")
        if not targets:
            return []
        name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))
        fut = self._calls.submit(self.worker.execute, fn, tuple(args), kwargs)
        return [self._wait(fut, timeout_s or self.timeouts.call_s, f"call {name}")]

    def _wait(self, fut: Future, timeout_s: float, what: str) -> Any:
        try:
            return fut.result(timeout=timeout_s)
        except FutureTimeout:
            raise WaitTimeout(
                f"{what}: the in-process rank 0 did not answer within {timeout_s:.1f}s (it is still running; "
                "the controller stays unresponsive until it returns, or restart() abandons it)"
            ) from None

    def health(self, timeout_s: float = 5.0) -> dict[int, str]:
        """``{0: "alive" | "dead" | "unresponsive"}``: dead once shut down, unresponsive while a call overruns."""
        calls = self._calls
        if self._closed or calls is None or not calls.alive:
            return {0: "dead"}
        try:
            calls.submit(_ping).result(timeout=timeout_s)
            return {0: "alive"}
        except FutureTimeout:
            return {0: "unresponsive"}

    def describe(self) -> list[RankInfo]:
        """Where the rank is: this host and process, its device and mesh coordinates."""
        return list(self.ranks)


def _ping() -> float:
    return time.time()


def _close_worker_engines(worker: Worker | None) -> None:
    """What Worker.shutdown does for engines, without destroying the shared default group."""
    if worker is None:
        return
    for engine_id in list(worker.engines):
        try:
            worker.detach(engine_id)
        except Exception:  # noqa: BLE001 - shutdown must not fail on one engine
            log.exception("closing engine %r failed", engine_id)
    if worker.device.type == "cuda":
        torch.cuda.synchronize(worker.device)
