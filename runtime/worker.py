"""The Worker: one Ray actor per rank, one SPMD process of the job.

The controller creates it inside its placement-group bundle, tells it its
rank, then has it join ``torch.distributed`` and build the ``DeviceMesh``.
Engines then run on it through :meth:`Worker.execute`, which calls a function
with the worker as its first argument (the ``collective_rpc`` verb). Ranks
talk to each other only through ``torch.distributed`` collectives.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import timedelta
from typing import Any, Callable

from tessera.runtime.logs import configure_logging

log = logging.getLogger("tessera.worker")


class Worker:
    """State of one rank: its place in the mesh, its device, what engines attach to it."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        device_kind: str,
        log_level: str = "INFO",
        num_threads: int = 1,
        env: dict[str, str] | None = None,
    ) -> None:
        for key, value in (env or {}).items():
            os.environ[key] = value
        self.rank = rank
        self.world_size = world_size
        self.device_kind = device_kind
        configure_logging(log_level, rank=rank)
        import torch

        torch.set_num_threads(max(1, int(num_threads)))
        if device_kind == "cuda":
            # Ray narrows CUDA_VISIBLE_DEVICES to the bundle's GPU.
            torch.cuda.set_device(0)
            self.device = torch.device("cuda", 0)
        else:
            self.device = torch.device("cpu")
        self.mesh = None
        self.plan_degrees: dict[str, int] = {}
        self._groups: dict[tuple[int, ...], Any] = {}  # dist.new_group results, by member ranks
        self._comms: dict[tuple, Any] = {}  # attached collectives, by (group key, slot bytes)
        # Worker-side engines (one per driver-side engine), by the engine's id: see attach / call.
        self.engines: dict[str, Any] = {}
        log.debug("worker started (pid %d, device %s)", os.getpid(), self.device)

    def __repr__(self) -> str:  # Ray prefixes this actor's log lines with it
        return f"rank{self.rank}"

    # -- discovery -------------------------------------------------------------

    def node_info(self) -> dict[str, Any]:
        import psutil
        import ray

        ctx = ray.get_runtime_context()
        return {
            "rank": self.rank,
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "started": psutil.Process().create_time(),  # with the pid: this process, not a later one
            "device": str(self.device),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def free_port(self) -> int:
        """A TCP port free on this node, for the process-group rendezvous."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return int(s.getsockname()[1])

    def ping(self) -> float:
        return time.time()

    # -- torch.distributed -----------------------------------------------------

    def init_distributed(
        self,
        master_addr: str,
        master_port: int,
        mesh_dims: dict[str, int],
        timeout_s: float,
        single_node: bool,
    ) -> dict[str, int]:
        """Join the default process group and build the named DeviceMesh."""
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if single_node:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        backend = "nccl" if self.device_kind == "cuda" else "gloo"
        started = time.perf_counter()
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        self.plan_degrees = dict(mesh_dims)
        if mesh_dims:
            self.mesh = init_device_mesh(
                self.device.type,
                tuple(mesh_dims.values()),
                mesh_dim_names=tuple(mesh_dims.keys()),
            )
        # One barrier so that a rank which returns knows every rank has joined.
        dist.barrier()
        log.debug("process group %s ready in %.2fs", backend, time.perf_counter() - started)
        return self.coordinates()

    def coordinates(self) -> dict[str, int]:
        """This rank's coordinate along every named mesh dim."""
        if self.mesh is None:
            return {}
        coords = self.mesh.get_coordinate() or []
        return dict(zip(self.mesh.mesh_dim_names or (), (int(c) for c in coords)))

    def group(self, dim: str):
        """The process group of mesh dim ``dim`` that this rank belongs to."""
        if self.mesh is None or dim not in (self.mesh.mesh_dim_names or ()):
            raise KeyError(
                f"mesh dim {dim!r} is not in this job's mesh {self.plan_degrees}; "
                "add it to the plan (degree 1 is allowed)"
            )
        return self.mesh[dim].get_group()

    def comm(self, dim: str, slot_bytes: int | None = None):
        """The collectives of mesh dim ``dim`` (a single-rank ``GroupComm`` when its degree is 1).

        Attaching is collective: on first use every rank of the dim calls this
        (SPMD loading does). Cached here, so engines sharing the workers share it.
        ``slot_bytes``: the shared-memory slot per rank (default ``shm_comm.SLOT_BYTES``).
        """
        from tessera.parallel.comm import GroupComm

        slot_bytes = slot_bytes or _default_slot_bytes()
        if self.plan_degrees.get(dim, 1) == 1:
            return GroupComm()
        key = (dim, slot_bytes)
        if key not in self._comms:
            self._comms[key] = GroupComm.attach(self.group(dim), slot_bytes)
        return self._comms[key]

    def use_backend_collectives(self) -> None:
        """From now on every attached group collects through the backend (gloo), not shared memory (benchmarks)."""
        for comm in self._comms.values():
            comm.shm = None

    def subgroup(self, ranks: tuple[int, ...]) -> Any:
        """``dist.new_group(ranks)`` once per rank tuple; like new_group, every rank of the world calls it."""
        import torch.distributed as dist

        ranks = tuple(int(r) for r in ranks)
        if ranks not in self._groups:
            self._groups[ranks] = dist.new_group(list(ranks))
        return self._groups[ranks]

    def subgroup_comm(self, ranks: tuple[int, ...], slot_bytes: int | None = None):
        """The attached collectives of a :meth:`subgroup` this rank belongs to (collective over its ranks)."""
        from tessera.parallel.comm import GroupComm

        slot_bytes = slot_bytes or _default_slot_bytes()
        ranks = tuple(int(r) for r in ranks)
        key = (ranks, slot_bytes)
        if key not in self._comms:
            self._comms[key] = GroupComm.attach(self.subgroup(ranks), slot_bytes)
        return self._comms[key]

    # -- the collective_rpc verb ------------------------------------------------

    def execute(self, fn: str | Callable[..., Any], args: tuple = (), kwargs: dict | None = None) -> Any:
        """Run ``fn(self, *args, **kwargs)``, or the method named ``fn``."""
        if isinstance(fn, str):
            return getattr(self, fn)(*args, **(kwargs or {}))
        return fn(self, *args, **(kwargs or {}))

    # -- worker-side engines -------------------------------------------------------
    #
    # A driver-side engine (LLMEngine, DiffusionEngine) owns one object per rank
    # (LLMWorker, DiffusionWorker): ``attach`` builds it from a typed load spec,
    # ``call`` runs one of its methods with typed inputs and returns its typed
    # output, ``detach`` closes it. Engines never share per-rank state by name.

    def attach(self, engine_id: str, factory: Callable[..., Any], *args: Any) -> Any:
        """Build ``factory(self, *args)`` as engine ``engine_id`` (replacing and closing an older one);
        returns its ``describe()``."""
        self.detach(engine_id)
        engine = self.engines[engine_id] = factory(self, *args)
        return engine.describe()

    def call(self, engine_id: str, method: Callable[..., Any], *args: Any) -> Any:
        """``method(engine, *args)`` on engine ``engine_id`` (``method`` is the class's function, e.g. ``LLMWorker.step``)."""
        engine = self.engines.get(engine_id)
        if engine is None:
            raise KeyError(f"engine {engine_id!r} is not loaded on rank {self.rank} (loaded: {sorted(self.engines)}); "
                           "load it first (its engine's load())")
        return method(engine, *args)

    def detach(self, engine_id: str) -> None:
        """Close and forget engine ``engine_id`` (no-op when absent)."""
        engine = self.engines.pop(engine_id, None)
        if engine is not None:
            engine.close()

    def shutdown(self) -> None:
        """Release the process group and whatever engines attached (best effort)."""
        import torch.distributed as dist

        for engine_id in list(self.engines):
            try:
                self.detach(engine_id)
            except Exception:  # noqa: BLE001 - shutdown must not fail on one engine
                log.exception("closing engine %r failed", engine_id)
        self._comms.clear()
        self._groups.clear()
        if dist.is_initialized():
            dist.destroy_process_group()


def _default_slot_bytes() -> int:
    from tessera.parallel.shm_comm import SLOT_BYTES

    return SLOT_BYTES
