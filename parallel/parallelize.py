"""``parallelize_moe_stage``: a MoE language-model stage's shard hooks for this rank's place in the mesh.

torchtitan applies a plan to a model with one ``parallelize_*`` function made
of small ``apply_*`` steps; tessera's language models are functional (weight
dicts, pre-packed for CPU decode), so the steps return the hooks of
``models.moe_layers.ShardOps`` instead of swapping modules, and the slicer the
loader reads each weight's piece with. The model math never sees a process
group: the hooks do.

- :func:`apply_tensor_parallel`: row-split outputs summed over ``tp``; the
  embedding split by vocabulary over ``tp``, the LM head over the MoE group.
- :func:`apply_expert_parallel`: routed tokens dispatched to the ranks the
  ExpertPlacement names (all_to_all / all_reduce / coherent, ``parallel/expert.py``).
- :func:`apply_token_layout`: ExFlow's token-sharded layout (``parallel/coherent.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tessera.memory.expert_placement import ExpertPlacement
from tessera.models.moe_layers import ShardOps
from tessera.parallel.coherent import EXFLOW, ExFlowTokens
from tessera.parallel.expert import ExpertDispatcher
from tessera.parallel.groups import LLMGroups
from tessera.parallel.tensor import TensorSlicer, tensor_parallel_hooks


@dataclass(frozen=True)
class StageParallelism:
    """What ``parallelize_moe_stage`` hands the loader (``slicer``) and the stage (``ops``)."""

    slicer: TensorSlicer
    ops: ShardOps


def apply_tensor_parallel(groups: LLMGroups) -> dict[str, Any]:
    return tensor_parallel_hooks(groups.tp_comm, groups.moe_comm)


def apply_expert_parallel(groups: LLMGroups, experts: ExpertPlacement | None, mode: str,
                          dispatch: str) -> ExpertDispatcher | None:
    if experts is None or groups.moe_size == 1:
        return None  # one rank holds every expert: ShardOps' local dispatch
    return ExpertDispatcher(groups.moe_comm, coherent=mode == "coherent", mode=dispatch, placement=experts,
                            tp=groups.tp)


def apply_token_layout(groups: LLMGroups, mode: str, dispatcher: ExpertDispatcher | None) -> ExFlowTokens | None:
    if mode != EXFLOW:
        return None
    return ExFlowTokens(groups.moe_comm, dispatcher)


def parallelize_moe_stage(arch, family, groups: LLMGroups, experts: ExpertPlacement | None,
                          mode: str = "standard", dispatch: str = "auto") -> StageParallelism:
    """The slicer and shard hooks of this rank's stage (``mode``: standard | coherent | exflow;
    ``dispatch``: auto | all_to_all | all_reduce)."""
    slicer = TensorSlicer(arch, family.TP_PLAN, groups.tp, groups.tp_rank, groups.moe_size, groups.moe_rank)
    hooks = apply_tensor_parallel(groups)
    dispatcher = apply_expert_parallel(groups, experts, mode, dispatch)
    if dispatcher is not None:
        hooks["dispatch"] = dispatcher
    layout = apply_token_layout(groups, mode, dispatcher)
    if layout is not None:
        hooks["tokens"] = layout
    return StageParallelism(slicer, ShardOps(**hooks))
