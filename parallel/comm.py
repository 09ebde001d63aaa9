"""Thin wrappers over torch.distributed collectives that differ across torch versions.

torch 2.13 renamed ``all_gather_into_tensor`` to ``all_gather_single`` (the old
name warns); tessera accepts torch>=2.4, so it calls through here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from tessera.parallel import shm_comm

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_tensor(output: torch.Tensor, tensor: torch.Tensor, group: Any = None, async_op: bool = False):
    """Gather ``tensor`` from every rank of ``group`` into ``output`` (concatenated on dim 0)."""
    return _all_gather_single(output, tensor, group=group, async_op=async_op)


def all_gather_cat(tensor: torch.Tensor, group: Any = None, dim: int = 0) -> torch.Tensor:
    """All-gather equal-shaped tensors and concatenate them along ``dim``."""
    size = dist.get_world_size(group)
    if size == 1:
        return tensor
    shm = shm_comm.for_group(group)
    if shm is not None and shm.fits(local := tensor.contiguous()):
        return shm.all_gather_cat(local, dim)
    moved = tensor.movedim(dim, 0).contiguous()
    out = torch.empty((size * moved.shape[0], *moved.shape[1:]), dtype=moved.dtype, device=moved.device)
    all_gather_tensor(out, moved, group=group)
    return out.movedim(0, dim)
