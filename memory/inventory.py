"""What the cluster has: nodes, devices per node and memory per device.

The planner needs this before any worker starts. It comes from the running
Ray cluster when this process is connected to one, otherwise from the local
machine; ``JobSpec.planning`` may override the device count (``world_size``)
and memory (``device_memory_gib``) for planning ahead of time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from tessera.errors import ConfigError
from tessera.options import PlanningHints


@dataclass(frozen=True)
class NodeInventory:
    address: str
    devices: int
    device_bytes: int  # memory of one device (GPU memory; host memory share on CPU)


@dataclass(frozen=True)
class ClusterInventory:
    device: str
    nodes: tuple[NodeInventory, ...]
    source: str  # where the facts came from, for the plan report
    device_name: str = ""  # GPU model (Ray accelerator type or CUDA name): picks the cost model's rates

    @property
    def total_devices(self) -> int:
        return sum(n.devices for n in self.nodes)

    @property
    def devices_per_node(self) -> int:
        return min((n.devices for n in self.nodes), default=0)

    @property
    def device_bytes(self) -> int:
        return min((n.device_bytes for n in self.nodes), default=0)


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def detect_inventory(device: str, hints: PlanningHints | None = None) -> ClusterInventory:
    """The cluster as the planner sees it (see the module docstring for the sources)."""
    hints = hints or PlanningHints()
    world, memory_gib = hints.world_size, hints.device_memory_gib
    override = int(float(memory_gib) * 2**30) if memory_gib is not None else None
    try:
        import ray

        connected = ray.is_initialized()
    except ImportError:  # pragma: no cover
        connected = False
    if connected and world is None:
        nodes = []
        names = set()
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            res = node.get("Resources", {})
            names.update(k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:"))
            count = int(res.get("GPU", 0)) if device == "cuda" else int(res.get("CPU", 0))
            if count:
                per = override or (_cuda_bytes() if device == "cuda" else int(res.get("memory", 0)) // max(count, 1))
                nodes.append(NodeInventory(node["NodeManagerAddress"], count, per))
        if not nodes:
            raise ConfigError(f"the connected Ray cluster has no {'GPU' if device == 'cuda' else 'CPU'} resources")
        return ClusterInventory(device, tuple(nodes), "ray cluster", ",".join(sorted(names)))
    if device == "cuda":
        import torch

        count = world or torch.cuda.device_count()
        if not count:
            raise ConfigError("device cuda asked for, but this machine has no CUDA device; use device cpu, "
                              "or give world_size and device_memory_gib to plan for a GPU cluster")
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
        return ClusterInventory(device, (NodeInventory("local", count, override or _cuda_bytes()),), "local GPUs", name)
    count = world or 4
    per = override or _host_available_bytes() // count
    return ClusterInventory(device, (NodeInventory("local", count, per),), "local host memory")


def _cuda_bytes() -> int:
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("cannot read GPU memory on this machine (no CUDA); give device_memory_gib in the job options")
    return int(torch.cuda.get_device_properties(0).total_memory)
