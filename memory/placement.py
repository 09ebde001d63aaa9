"""The Placement: what the controller needs to know to place shards on ranks.

``memory/`` produces it (from a JobSpec, a ModelSpec and the cluster
inventory); ``runtime/controller`` consumes it. It is frozen: once workers
start, the mesh and the shard layout do not change under them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from tessera.config import JobSpec, ParallelPlan, check_plan_and_resources


@dataclass(frozen=True)
class Placement:
    """Mesh shape with named dims, the device kind and per-rank resources.

    ``extras`` carries what later planning stages attach (shard manifests,
    the expert-to-rank map, tier budgets) without changing this type.
    """

    plan: ParallelPlan
    device: str = "cpu"
    cpus_per_rank: float = 1.0
    extras: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_plan_and_resources(self)

    @classmethod
    def from_job(cls, job: JobSpec, **extras: Any) -> "Placement":
        return cls(plan=job.plan, device=job.device, cpus_per_rank=job.cpus_per_rank, extras=extras)

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    def bundle(self) -> dict[str, float]:
        """Ray resources of one rank's bundle."""
        if self.device == "cuda":
            return {"GPU": 1.0, "CPU": float(self.cpus_per_rank)}
        return {"CPU": float(self.cpus_per_rank)}
