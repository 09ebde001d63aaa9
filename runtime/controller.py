"""The controller: turns a Placement into running, connected SPMD workers.

It connects to Ray, reserves one placement-group bundle per rank, starts one
:class:`~tessera.runtime.worker.Worker` actor per bundle (ranks ordered by
node, tensor-parallel groups packed onto one node), initialises
``torch.distributed`` and the named ``DeviceMesh`` on them, and then fans
calls out to every rank with one verb, :meth:`Controller.collective_rpc`.

Every wait is bounded (see :class:`~tessera.config.Timeouts`) and
ends with a message that says what was waited for. The controller is never on
the per-layer path: one engine step is one fan-out.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tessera.memory.placement import Placement
from tessera.config import Timeouts
from tessera.errors import InfrastructureError, PlacementError, RankError, WaitTimeout, WorkerDiedError
from tessera.runtime.logs import default_log_level
from tessera.runtime.health import ClusterMonitor
from tessera.runtime.ray_env import RayConnection
from tessera.runtime.worker import Worker

log = logging.getLogger("tessera.controller")


@dataclass(frozen=True)
class RankInfo:
    """Where one rank landed."""

    rank: int
    node_id: str
    node_ip: str
    hostname: str
    pid: int
    device: str
    coords: dict[str, int]


class Controller:
    """Owns the placement groups, the worker actors and the process group of one job.

    Use as a context manager, or call :meth:`start` and :meth:`shutdown`.
    ``address`` is ``None`` for an embedded local Ray, ``"auto"`` or
    ``"ray://..."``/``"HOST:PORT"`` for a running cluster; the connection is
    :class:`~tessera.runtime.ray_env.RayConnection`'s (shared by every
    controller of the process, released at shutdown).
    """

    def __init__(
        self,
        placement: Placement,
        address: str | None = None,
        timeouts: Timeouts | None = None,
        log_level: str | None = None,
        runtime_env: dict[str, Any] | None = None,
    ) -> None:
        self.placement = placement
        self.address = address
        self.timeouts = timeouts or Timeouts()
        self.log_level = (log_level or default_log_level()).upper()
        self.runtime_env = runtime_env
        self.name = f"tessera-{uuid.uuid4().hex[:8]}"
        self.workers: list[Any] = []  # actor handles, index = rank
        self.ranks: list[RankInfo] = []
        self.startup_timings: dict[str, float] = {}
        self._placement_groups: list[Any] = []
        self._bundle_nodes: list[tuple[Any, int, str]] | None = None
        self._connected = False
        self._monitor: ClusterMonitor | None = None
        self._actor_runtime_env: dict[str, Any] | None = None
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> "Controller":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    @property
    def world_size(self) -> int:
        return self.placement.world_size

    def start(self) -> "Controller":
        """Connect, place, start workers, join the process group; bounded at every step."""
        if self._started:
            return self
        t0 = time.perf_counter()
        try:
            self._connect_ray()
            t1 = time.perf_counter()
            bundle_nodes = self._bundle_nodes = self._reserve_bundles()
            t2 = time.perf_counter()
            self._start_workers(bundle_nodes)
            t3 = time.perf_counter()
            self._init_distributed()
            t4 = time.perf_counter()
        except BaseException:
            self.shutdown()
            raise
        self.startup_timings = {
            "ray_connect_s": t1 - t0,
            "placement_group_s": t2 - t1,
            "worker_start_s": t3 - t2,
            "process_group_s": t4 - t3,
            "total_s": t4 - t0,
        }
        self._started = True
        self._watch_cluster()
        log.info(
            "%d worker(s) ready as mesh %s in %.2fs", self.world_size, self.placement.plan, t4 - t0
        )
        return self

    def _watch_cluster(self) -> None:
        import ray

        if self._monitor is None:
            self._monitor = ClusterMonitor(ray.get_runtime_context().gcs_address,
                                           lambda: {r.node_id for r in self.ranks}).start()

    def _infrastructure_lost(self, problem: str) -> InfrastructureError:
        """Stop what tessera started without asking the lost cluster (by pid, on this host); the error to raise."""
        stopped, elsewhere = self._kill_local_worker_processes()
        self._started = False
        where = f"; ranks on other hosts ({', '.join(elsewhere)}) must be stopped there" if elsewhere else ""
        done = f"tessera stopped its worker processes on this host (pids {stopped})" if stopped else \
            "tessera's worker processes on this host had already exited"
        return InfrastructureError(f"{problem}. {done}{where}. Start the Ray cluster again and launch again")

    def _kill_local_worker_processes(self) -> tuple[list[int], list[str]]:
        import signal

        import psutil

        here = socket.gethostname()
        stopped, elsewhere = [], []
        for info in getattr(self, "_node_infos", None) or []:
            if info["hostname"] != here:
                elsewhere.append(f"rank {info['rank']} pid {info['pid']} on {info['hostname']}")
                continue
            try:  # the pid only while it is still the worker's process (same start time)
                started = psutil.Process(info["pid"]).create_time()
                if info.get("started", started) != started:
                    continue
                os.kill(info["pid"], signal.SIGKILL)
                stopped.append(info["pid"])
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        return stopped, elsewhere

    def _connect_ray(self) -> None:
        if self._connected:
            return
        # Embedded: enough logical CPUs for every rank even on a small machine
        # (oversubscribed on purpose; Ray pins 1 thread per actor).
        import ray

        needed = int(self.world_size * self.placement.cpus_per_rank + 0.999)
        fresh = not ray.is_initialized()
        RayConnection.acquire(self.address, self.runtime_env, needed)
        # A Ray started here got runtime_env as the job's; one started by others needs it per actor.
        self._actor_runtime_env = None if fresh else self.runtime_env
        self._connected = True

    def _reserve_bundles(self) -> list[tuple[Any, int, str]]:
        """Create the placement groups; return (pg, bundle index, node id) in rank order."""
        import ray
        from ray.util.placement_group import placement_group, placement_group_table

        bundle = self.placement.bundle()
        world, tp = self.world_size, self.placement.plan.degree("tp")
        if tp > 1:
            # One STRICT_PACK group per tensor-parallel group: its ranks share a node.
            shapes = [([bundle] * tp, "STRICT_PACK") for _ in range(world // tp)]
        else:
            shapes = [([bundle] * world, "PACK")]
        self._check_feasible(bundle, shapes)
        for i, (bundles, strategy) in enumerate(shapes):
            self._placement_groups.append(
                placement_group(bundles, strategy=strategy, name=f"{self.name}-pg{i}")
            )
        ready, _ = ray.wait(
            [pg.ready() for pg in self._placement_groups],
            num_returns=len(self._placement_groups),
            timeout=self.timeouts.placement_group_s,
        )
        if len(ready) < len(self._placement_groups):
            raise PlacementError(
                f"placement not satisfied within {self.timeouts.placement_group_s:.0f}s: "
                + self._resources_message(bundle, shapes)
            )
        node_ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
        driver_node = ray.get_runtime_context().get_node_id()
        slots = []
        for pg_index, pg in enumerate(self._placement_groups):
            table = placement_group_table(pg)["bundles_to_node_id"]
            for bundle_index in range(len(pg.bundle_specs)):
                slots.append((pg, pg_index, bundle_index, table[bundle_index]))
        # Ranks ordered by node (the driver's node first), keeping each
        # placement group's bundles contiguous so a tp group is a rank range.
        slots.sort(key=lambda s: (s[3] != driver_node, node_ips.get(s[3], ""), s[3], s[1], s[2]))
        return [(pg, bundle_index, node_id) for pg, _, bundle_index, node_id in slots]

    def _check_feasible(self, bundle: dict[str, float], shapes: list) -> None:
        """Fail at once when an embedded (fixed-size) Ray can never hold the request."""
        if not RayConnection.embedded():
            return  # a real cluster may autoscale: wait for the timeout instead
        import ray

        total = ray.cluster_resources()
        for resource, amount in bundle.items():
            need = amount * self.world_size
            if need > total.get(resource, 0.0) + 1e-9:
                raise PlacementError(
                    "placement can never be satisfied on this local Ray: "
                    + self._resources_message(bundle, shapes)
                )

    def _resources_message(self, bundle: dict[str, float], shapes: list) -> str:
        import ray

        total = ray.cluster_resources()
        available = ray.available_resources()
        strategies = sorted({s for _, s in shapes})
        keys = sorted(set(bundle) | {"CPU", "GPU"})
        fmt = lambda res: {k: round(res.get(k, 0.0), 2) for k in keys}  # noqa: E731
        asked = {k: round(v * self.world_size, 2) for k, v in bundle.items()}
        return (
            f"asked for {self.world_size} bundle(s) of {bundle} ({asked} in all, "
            f"{'/'.join(strategies)}, mesh {self.placement.plan}); the cluster has {fmt(total)} "
            f"in total and {fmt(available)} available on {len([n for n in ray.nodes() if n.get('Alive')])} "
            f"node(s). Fix: lower the degrees or cpus_per_rank, free resources, or add nodes."
        )

    def _start_workers(self, bundle_nodes: list[tuple[Any, int, str]]) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = self.placement.bundle()
        self._single_node = len({node for _, _, node in bundle_nodes}) == 1
        env = {"GLOO_SOCKET_IFNAME": "lo"} if self._single_node and self.placement.device == "cpu" else {}
        env.setdefault("DS_ACCELERATOR", self.placement.device)
        # A "health" concurrency group answers pings while a call runs, so a stalled rank (stopped,
        # swapping, stuck in the kernel) is told apart from a busy one in seconds (see _Heartbeats).
        actor_cls = ray.remote(concurrency_groups={"health": 1})(Worker)
        for rank, (pg, bundle_index, _) in enumerate(bundle_nodes):
            options: dict[str, Any] = dict(
                num_cpus=bundle.get("CPU", 0.0),
                num_gpus=bundle.get("GPU", 0.0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=bundle_index
                ),
                max_restarts=0,
            )
            if self._actor_runtime_env:
                options["runtime_env"] = self._actor_runtime_env
            self.workers.append(
                actor_cls.options(**options).remote(
                    rank,
                    self.world_size,
                    self.placement.device,
                    self.log_level,
                    max(1, int(self.placement.cpus_per_rank)),
                    env,
                )
            )
        infos = self._gather(
            [w.node_info.remote() for w in self.workers],
            list(range(self.world_size)),
            self.timeouts.worker_start_s,
            "worker start",
        )
        self._node_infos = infos

    def _init_distributed(self) -> None:
        import ray

        first = self._node_infos[0]
        master_addr = "127.0.0.1" if self._single_node else first["node_ip"]
        master_port = ray.get(self.workers[0].free_port.remote(), timeout=self.timeouts.worker_start_s)
        mesh_dims = dict(self.placement.plan.degrees)
        coords = self._gather(
            [
                w.init_distributed.remote(
                    master_addr, master_port, mesh_dims, self.timeouts.process_group_s, self._single_node
                )
                for w in self.workers
            ],
            list(range(self.world_size)),
            self.timeouts.process_group_s,
            f"process group init ({'nccl' if self.placement.device == 'cuda' else 'gloo'} at "
            f"{master_addr}:{master_port})",
        )
        self.ranks = [
            RankInfo(
                rank=i,
                node_id=info["node_id"],
                node_ip=info["node_ip"],
                hostname=info["hostname"],
                pid=info["pid"],
                device=info["device"],
                coords=coords[i],
            )
            for i, info in enumerate(self._node_infos)
        ]

    def restart(self) -> "Controller":
        """Replace every worker with a fresh one: new actors, process group and mesh, same placement.

        The recovery step after a fault: the survivors of a broken process group
        cannot be trusted (they may be stuck in a collective, or stopped), so
        every rank is killed at once (no graceful shutdown to wait for) and
        restarted in the same placement-group bundles. Engines reload their
        shards and replay the requests that were in flight. A failure here
        leaves the controller restartable (the engines' recovery retries).
        """
        if self._closed:
            raise RuntimeError("controller is shut down; it cannot restart")
        if self._monitor is not None and (problem := self._monitor.check_now()):
            raise self._infrastructure_lost(problem)
        log.warning("restarting all %d worker(s) of mesh %s", self.world_size, self.placement.plan)
        t0 = time.perf_counter()
        # A stopped (SIGSTOP) or stuck rank cannot answer Ray's kill request; Ray force-kills it only after a
        # grace period of seconds, during which its bundle stays taken and the new actor waits. The ranks on
        # this host are SIGKILLed by pid first, so their bundles free at once.
        self._kill_local_worker_processes()
        self._kill_workers()
        self._started = False
        try:
            if self._bundle_nodes is None:
                self._bundle_nodes = self._reserve_bundles()
            t1 = time.perf_counter()
            self._start_workers(self._bundle_nodes)
            t2 = time.perf_counter()
            self._init_distributed()
            t3 = time.perf_counter()
        except BaseException:
            self._kill_workers()
            raise
        self.startup_timings = {"kill_s": t1 - t0, "worker_start_s": t2 - t1, "process_group_s": t3 - t2,
                                "total_s": t3 - t0}
        self._started = True
        return self

    def _kill_workers(self) -> None:
        """Kill every worker actor now (SIGKILL through Ray: also a stopped or stuck process)."""
        import ray

        for worker in self.workers:
            try:
                ray.kill(worker, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        self.workers = []
        self.ranks = []

    def _release_workers(self) -> None:
        """Shut workers down (closing their engines, a bounded wait), then kill them and free the bundles."""
        import ray

        if not ray.is_initialized():
            return
        if self.workers:
            refs = [w.shutdown.remote() for w in self.workers]
            ray.wait(refs, num_returns=len(refs), timeout=5.0)
        self._kill_workers()
        from ray.util.placement_group import remove_placement_group

        for pg in self._placement_groups:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001
                log.warning("could not remove placement group %s", pg.id)
        self._placement_groups = []
        self._bundle_nodes = None

    def shutdown(self) -> None:
        """Release workers, placement groups and (if started here) Ray; safe to call twice; bounded.

        When the Ray head is gone, Ray's own calls would block for a minute (and
        then Ray terminates the process): the workers on this host are stopped
        by pid instead, and the connection is dropped with a bounded wait.
        """
        if self._closed:
            return
        self._closed = True
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.stop()
        try:
            import ray
        except ImportError:  # pragma: no cover
            return
        lost = monitor is not None and (monitor.problem or monitor.check_now())
        try:
            if lost:
                self._kill_local_worker_processes()
                self.workers, self.ranks = [], []
            elif ray.is_initialized():
                self._release_workers()
        finally:
            if self._connected:
                self._connected = False
                RayConnection.release(bounded_s=10.0 if lost else 30.0)

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
        """Run ``fn(worker, *args, **kwargs)`` (or worker method ``fn``) on every rank.

        Returns the per-rank results in rank order. Raises
        :class:`WorkerDiedError` naming the rank and node of a dead worker,
        :class:`RankError` with each failing rank's exception, and
        :class:`WaitTimeout` when ranks do not answer in time or, with
        ``stall_s``, when a rank still working on the call stops answering
        heartbeats for ``stall_s`` seconds (a stalled process).
        """
        if self._monitor is not None and self._monitor.problem and not self._closed:
            raise self._infrastructure_lost(self._monitor.problem)
        if not self._started or self._closed:
            raise RuntimeError("controller is not running; call start() (or use it as a context manager)")
        targets = list(range(self.world_size)) if ranks is None else list(ranks)
        refs = [self.workers[r].execute.remote(fn, tuple(args), kwargs) for r in targets]
        name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))
        if fn == "call" and args:  # name the engine method, not the verb
            name = getattr(args[1], "__qualname__", name) if len(args) > 1 else name
        beats = _Heartbeats(self.workers, stall_s) if stall_s else None
        return self._gather(refs, targets, timeout_s or self.timeouts.call_s, f"call {name}", beats)

    def _gather(self, refs: list[Any], ranks: list[int], timeout_s: float, what: str,
                beats: "_Heartbeats | None" = None) -> list[Any]:
        """Wait for one ref per rank; fail fast on the first dead, failing or (with ``beats``) stalled rank."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        rank_of = {ref: rank for ref, rank in zip(refs, ranks)}
        pending = list(refs)
        deadline = time.monotonic() + timeout_s
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            wait_s = remaining if beats is None else min(remaining, beats.poll_s)
            done, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
            if beats is not None and pending:
                stalled = beats.stalled([rank_of[r] for r in pending])
                if stalled:
                    raise WaitTimeout(
                        f"{what}: rank(s) {stalled} stopped answering heartbeats for {beats.stall_s:.1f}s while "
                        f"working on the call (ranks {sorted(results)} had answered): a stalled process (stopped, "
                        "swapping, stuck in the kernel)"
                    )
            for ref in done:
                rank = rank_of[ref]
                try:
                    results[rank] = ray.get(ref, timeout=max(1.0, remaining))
                except RayActorError as err:
                    raise WorkerDiedError(self._death_message(rank, what, err), [rank]) from err
                except RayTaskError as err:
                    errors[rank] = err.cause if getattr(err, "cause", None) is not None else err
                except GetTimeoutError:  # pragma: no cover - ref was ready
                    pending.append(ref)
            if errors:
                # Ranks blocked in a collective with the failed one would only
                # return at the process-group timeout: report now.
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0) if pending else ([], [])
                for ref in done:
                    try:
                        ray.get(ref)
                    except RayTaskError as err:
                        errors[rank_of[ref]] = err.cause if getattr(err, "cause", None) is not None else err
                    except RayActorError:
                        pass
                dead = [r for r, state in self.health(timeout_s=2.0).items() if state == "dead"]
                if dead:  # a rank's error was its peer dying (a broken collective): report the death
                    raise WorkerDiedError(self._death_message(dead[0], what, None), dead)
                first_rank = min(errors)
                raise RankError(
                    f"{what} failed on rank(s) {sorted(errors)}; rank {first_rank}: "
                    f"{type(errors[first_rank]).__name__}: {errors[first_rank]}",
                    errors,
                ) from errors[first_rank]
        if pending:
            missing = sorted(rank_of[r] for r in pending)
            dead = [r for r in missing if not self._alive(r)]
            if dead:
                raise WorkerDiedError(self._death_message(dead[0], what, None), dead)
            raise WaitTimeout(
                f"{what}: rank(s) {missing} did not answer within {timeout_s:.1f}s "
                f"(ranks {sorted(results)} did); a rank may be stuck in a collective"
            )
        return [results[r] for r in ranks]

    def _alive(self, rank: int) -> bool:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            ray.get(self.workers[rank].ping.remote(), timeout=2.0)
            return True
        except RayActorError:
            return False
        except GetTimeoutError:
            return True  # busy, not dead

    def _death_message(self, rank: int, what: str, err: BaseException | None) -> str:
        info = self.ranks[rank] if rank < len(self.ranks) else None
        node_infos = getattr(self, "_node_infos", None) or []
        if info is not None:
            where = f"node {info.node_ip} ({info.hostname}), pid {info.pid}"
        elif rank < len(node_infos):
            where = f"node {node_infos[rank]['node_ip']}, pid {node_infos[rank]['pid']}"
        else:
            where = "node unknown (it died before reporting)"
        cause = f": {str(err).splitlines()[0]}" if err is not None else ""
        return f"worker rank {rank} on {where} died during {what}{cause}"

    def health(self, timeout_s: float = 5.0) -> dict[int, str]:
        """``{rank: "alive" | "dead" | "unresponsive"}``, asked of every worker at once."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        refs = [w.ping.remote() for w in self.workers]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        status = {}
        for rank, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=0.01)
                status[rank] = "alive"
            except RayActorError:
                status[rank] = "dead"
            except GetTimeoutError:
                status[rank] = "unresponsive"
        return status

    def describe(self) -> list[RankInfo]:
        """Where every rank is: node, pid, device and mesh coordinates."""
        return list(self.ranks)


class _Heartbeats:
    """Pings the ranks still working on a call (on their "health" thread); a rank whose ping goes unanswered
    for ``stall_s`` is stalled. A busy rank answers (computing or waiting in a collective); a stopped one
    cannot."""

    def __init__(self, workers: list[Any], stall_s: float) -> None:
        self.workers, self.stall_s = workers, stall_s
        self.every_s = min(1.0, stall_s / 3)
        self.poll_s = self.every_s / 2
        self._ping: dict[int, tuple[Any, float]] = {}  # rank -> (ping ref, sent at)
        self._answered: dict[int, float] = {}

    def stalled(self, ranks: list[int]) -> list[int]:
        import ray

        now = time.monotonic()
        late = []
        for rank in ranks:
            entry = self._ping.get(rank)
            if entry is None:
                if now - self._answered.get(rank, 0.0) >= self.every_s:
                    ref = self.workers[rank].ping.options(concurrency_group="health").remote()
                    self._ping[rank] = (ref, now)
                continue
            ref, sent = entry
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                del self._ping[rank]
                self._answered[rank] = now
            elif now - sent > self.stall_s:
                late.append(rank)
        return late
