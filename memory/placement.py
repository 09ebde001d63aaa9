"""The Placement: the one description of what every rank holds.

``memory/planner`` produces it (from a JobSpec, the model's config and
safetensors headers, and the cluster inventory); the controller places ranks
from its mesh, and the loaders, the engines and offload read from it which
layers or blocks a rank's pipeline stage holds (``stages``), which experts
(and which slice of each) its MoE layers hold (``experts``), and the tiers
(``offload``). Tensor slices follow from a rank's mesh coordinates and the
family's declared plan. It is frozen: once workers start, the mesh and the
shard layout do not change under them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tessera.config import JobSpec, ParallelPlan, check_plan_and_resources
from tessera.options import OffloadConfig

if TYPE_CHECKING:  # numpy stays out of the controller's imports (it imports this module)
    from tessera.memory.expert_placement import ExpertPlacement


@dataclass(frozen=True)
class Placement:
    """Mesh shape with named dims, device kind, per-rank resources and (once a model is planned) its shards.

    ``model``: the checkpoint the shards below were planned for (None: a bare
    mesh). ``stages[s]``: the layer indices (language models) or block indices
    (diffusion, the block lists as one sequence) of pipeline stage ``s``.
    ``experts``: the expert placement over ``ep`` (MoE models). ``offload``:
    the tiers each rank keeps weights in beyond the device budget.
    ``report``: why the planner chose this (``memory.planner.PlanReport``).
    """

    plan: ParallelPlan
    device: str = "cpu"
    cpus_per_rank: float = 1.0
    model: str | None = None
    stages: tuple[tuple[int, ...], ...] | None = None
    experts: "ExpertPlacement | None" = None
    offload: OffloadConfig | None = None
    report: Any = None

    def __post_init__(self) -> None:
        check_plan_and_resources(self)
        if self.stages is not None:
            stages = tuple(tuple(int(i) for i in s) for s in self.stages)
            if len(stages) != self.plan.degree("pp"):
                raise ValueError(f"{len(stages)} stage layer lists for pp={self.plan.degree('pp')}")
            object.__setattr__(self, "stages", stages)

    @classmethod
    def from_job(cls, job: JobSpec) -> "Placement":
        return cls(plan=job.plan, device=job.device, cpus_per_rank=job.cpus_per_rank, offload=job.offload)

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    def bundle(self) -> dict[str, float]:
        """Ray resources of one rank's bundle."""
        if self.device == "cuda":
            return {"GPU": 1.0, "CPU": float(self.cpus_per_rank)}
        return {"CPU": float(self.cpus_per_rank)}

    def stage_of(self, rank: int) -> int:
        return self.plan.coordinates(rank).get("pp", 0)
