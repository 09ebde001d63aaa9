"""Classifier-free-guidance parallelism over the ``cfg`` mesh dim (exact).

With guidance, every step needs the model on the conditional and on the
unconditional text. Instead of batching both on every rank, the ``cfg`` dim
splits ranks into two groups: coordinate 0 runs the conditional branch,
coordinate 1 the unconditional one. After each step the two predictions (of
this rank's patch) are exchanged with one all-gather over the ``cfg`` group
and combined identically on both, so the two groups step in lockstep. It
composes with ``sp``: each cfg group is a complete patch/sequence-parallel
group of its own.
"""

from __future__ import annotations

import torch

from tessera.parallel.comm import GroupComm
from tessera.parallel.counted import CommCounter, gather_tokens

COND, UNCOND = 0, 1


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """The guidance formula as diffusers writes it: ``uncond + s * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def branch_of(cfg_coord: int) -> str:
    return "cond" if cfg_coord == COND else "uncond"


def cfg_parallel_combine(local_pred: torch.Tensor, comm: GroupComm, scale: float, counter: CommCounter | None = None) -> torch.Tensor:
    """Exchange this branch's prediction with the other ``cfg`` rank and return the guided one."""
    _, finish = gather_tokens(local_pred.unsqueeze(0), [1, 1], comm, counter, "cfg_pred")
    both = finish()
    return guide(both[COND], both[UNCOND], scale)


def cfg_batched_combine(batched_pred: torch.Tensor, scale: float) -> torch.Tensor:
    """No ``cfg`` dim: the batch holds ``[uncond, cond]`` halves (diffusers' order)."""
    uncond, cond = batched_pred.chunk(2)
    return guide(cond, uncond, scale)
