"""The process groups an MoE language model needs, read off the worker's named DeviceMesh.

The mesh's ``pp``, ``ep`` and ``tp`` dims are used; ``dp``, ``cfg`` and ``sp``
must be 1 for language models (refused with a clear error otherwise). The
*MoE group* of a stage is its ``ep`` x ``tp`` ranks (``tessera.parallel.expert``).
The worker caches process groups and their attached collectives
(``Worker.comm``, ``Worker.subgroup_comm``), so several models loaded on the
same workers share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tessera.config import ParallelPlan
from tessera.errors import ConfigError
from tessera.parallel.comm import GroupComm

LLM_DIMS = ("pp", "ep", "tp")


def check_llm_plan(plan: ParallelPlan) -> None:
    extra = {d: k for d, k in plan.degrees.items() if d not in LLM_DIMS and k > 1}
    if extra:
        raise ConfigError(
            f"the MoE language-model engine uses the pp, ep and tp dims; plan {plan} also has {extra}; "
            "drop those dims (or set them to 1)"
        )


@dataclass
class LLMGroups:
    """This rank's place in (pp, ep, tp) and the groups to talk over."""

    pp: int
    ep: int
    tp: int
    pp_rank: int
    ep_rank: int
    tp_rank: int
    tp_comm: GroupComm
    moe_comm: GroupComm
    prev_rank: int | None  # global rank of the same (ep, tp) slot in the previous stage
    next_rank: int | None
    result_rank: int  # global rank that returns sampled tokens (last stage, ep 0, tp 0)

    @property
    def moe_rank(self) -> int:
        return self.ep_rank * self.tp + self.tp_rank

    @property
    def moe_size(self) -> int:
        return self.ep * self.tp


def llm_groups(worker) -> LLMGroups:
    """This rank's groups, with their collectives attached (collective: every rank calls it while loading)."""
    if worker.mesh is None or worker.world_size == 1:
        return LLMGroups(1, 1, 1, 0, 0, 0, GroupComm(), GroupComm(), None, None, 0)
    names = tuple(worker.mesh.mesh_dim_names)
    check_llm_plan(ParallelPlan(dict(zip(names, worker.mesh.mesh.shape))))
    shape = dict(zip(names, worker.mesh.mesh.shape))
    present = [d for d in LLM_DIMS if d in names]
    others = [d for d in names if d not in LLM_DIMS]  # all of degree 1 (checked above)
    PP, EP, TP = (int(shape.get(d, 1)) for d in LLM_DIMS)
    order = [names.index(d) for d in others + present]
    grid = worker.mesh.mesh.permute(*order).reshape(PP, EP, TP)
    coords = worker.coordinates()
    pp_r, ep_r, tp_r = (coords.get(d, 0) for d in LLM_DIMS)
    tp_comm = worker.comm("tp")
    if EP == 1:
        moe_comm = tp_comm
    elif TP == 1:
        moe_comm = worker.comm("ep")
    else:
        stages = [tuple(int(r) for r in grid[s].reshape(-1)) for s in range(PP)]
        for ranks in stages:  # every rank creates every stage's group, in the same order
            worker.subgroup(ranks)
        moe_comm = worker.subgroup_comm(stages[pp_r])
    return LLMGroups(
        pp=PP, ep=EP, tp=TP, pp_rank=pp_r, ep_rank=ep_r, tp_rank=tp_r, tp_comm=tp_comm, moe_comm=moe_comm,
        prev_rank=int(grid[pp_r - 1, ep_r, tp_r]) if pp_r > 0 else None,
        next_rank=int(grid[pp_r + 1, ep_r, tp_r]) if pp_r < PP - 1 else None,
        result_rank=int(grid[PP - 1, 0, 0]),
    )
