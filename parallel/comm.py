"""One process group and the collectives tessera runs over it: :class:`GroupComm`.

Why an object: a group's collectives take one of two paths (a shared-memory
segment when every rank is a CPU process on one node, ``parallel/shm_comm.py``;
the backend otherwise), and the choice is made once, when the group is
attached, not looked up in a module-level registry on every call. Whoever
builds a model's parallel strategies (the worker-side runners) passes the
``GroupComm`` of each mesh dim to them; the strategies call its methods.

A ``GroupComm()`` without a group is the single-rank case: every collective is
the identity, so the same code runs on one rank without ``torch.distributed``.
It also wraps the torch version differences: torch 2.13 renamed
``all_gather_into_tensor`` to ``all_gather_single`` (the old name warns);
tessera accepts torch>=2.5.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from tessera.parallel import shm_comm

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_tensor(output: torch.Tensor, tensor: torch.Tensor, group: Any = None, async_op: bool = False):
    """Gather ``tensor`` from every rank of ``group`` into ``output`` (concatenated on dim 0)."""
    return _all_gather_single(output, tensor, group=group, async_op=async_op)


class GroupComm:
    """The collectives of one process group (``group=None``: a single rank, all identities)."""

    def __init__(self, group: Any = None, shm: shm_comm.ShmGroup | None = None) -> None:
        self.group = group
        self.shm = shm
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0

    @classmethod
    def attach(cls, group: Any, slot_bytes: int = shm_comm.SLOT_BYTES, timeout_s: float | None = None) -> "GroupComm":
        """Collective over ``group``: set up its shared-memory segment when its ranks share a CPU node."""
        if group is None:
            return cls()
        return cls(group, shm_comm.attach(group, slot_bytes, timeout_s))

    def __repr__(self) -> str:
        path = "single rank" if self.group is None else ("shared memory" if self.shm else "backend")
        return f"GroupComm(rank {self.rank} of {self.size}, {path})"

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    # -- collectives -------------------------------------------------------------------------------------

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over the group (shared memory when ``t`` fits a slot)."""
        if self.size == 1:
            return t
        if self.shm is not None and self.shm.fits(t):
            return self.shm.all_reduce(t)
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather_cat(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's ``t`` (same shape everywhere) concatenated along ``dim``."""
        if self.size == 1:
            return t
        if self.shm is not None and self.shm.fits(local := t.contiguous()):
            return self.shm.all_gather_cat(local, dim)
        moved = t.movedim(dim, 0).contiguous()
        out = torch.empty((self.size * moved.shape[0], *moved.shape[1:]), dtype=moved.dtype, device=moved.device)
        all_gather_tensor(out, moved, group=self.group)
        return out.movedim(0, dim)

    def all_gather_into(self, out: torch.Tensor, t: torch.Tensor, async_op: bool = False):
        """``out`` (``size`` x ``t``'s rows) gets every rank's ``t``; returns the async work or None."""
        if self.size == 1:
            out.copy_(t.reshape(out.shape))
            return None
        if not async_op and self.shm is not None and self.shm.fits(t) and out.is_contiguous():
            self.shm.all_gather_into(out, t)
            return None
        return all_gather_tensor(out, t, group=self.group, async_op=async_op)

    def all_to_all_rows(self, inp: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int]) -> torch.Tensor:
        """``all_to_all_single`` along dim 0 with (possibly uneven) row counts per rank."""
        if self.size == 1:
            return inp
        inp = inp.contiguous()
        if self.shm is not None and inp.device.type == "cpu":
            out = self.shm.all_to_all_rows(inp, list(in_splits), list(out_splits))
            if out is not None:  # None on every rank when one rank's rows did not fit its slot
                return out
        out = inp.new_empty((sum(out_splits), *inp.shape[1:]))
        dist.all_to_all_single(out, inp, list(out_splits), list(in_splits), group=self.group)
        return out
