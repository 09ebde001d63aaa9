"""The process groups an MoE language model needs, read off the worker's named DeviceMesh.

The mesh's ``pp``, ``ep`` and ``tp`` dims are used; ``dp``, ``cfg`` and ``sp``
must be 1 for language models (refused with a clear error otherwise). The
*MoE group* of a stage is its ``ep`` x ``tp`` ranks (``tessera.parallel.expert``).
Groups are built once per worker and cached in ``worker.store``, so several
models loaded on the same workers share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from tessera.config import ConfigError, ParallelPlan

LLM_DIMS = ("pp", "ep", "tp")
_STORE_KEY = "tessera.llm.groups"


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
    tp_group: Any
    moe_group: Any
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
    cached = worker.store.get(_STORE_KEY)
    if cached is not None:
        return cached
    if worker.mesh is None or worker.world_size == 1:
        groups = LLMGroups(1, 1, 1, 0, 0, 0, None, None, None, None, 0)
        worker.store[_STORE_KEY] = groups
        return groups
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
    tp_group = worker.group("tp") if TP > 1 else None
    if EP * TP == 1:
        moe_group = None
    elif EP == 1:
        moe_group = tp_group
    elif TP == 1:
        moe_group = worker.group("ep")
    else:
        moe_group = None
        for s in range(PP):  # every rank creates every group, in the same order
            g = dist.new_group([int(r) for r in grid[s].reshape(-1)])
            if s == pp_r:
                moe_group = g
    groups = LLMGroups(
        pp=PP, ep=EP, tp=TP, pp_rank=pp_r, ep_rank=ep_r, tp_rank=tp_r, tp_group=tp_group, moe_group=moe_group,
        prev_rank=int(grid[pp_r - 1, ep_r, tp_r]) if pp_r > 0 else None,
        next_rank=int(grid[pp_r + 1, ep_r, tp_r]) if pp_r < PP - 1 else None,
        result_rank=int(grid[PP - 1, 0, 0]),
    )
    worker.store[_STORE_KEY] = groups
    return groups
