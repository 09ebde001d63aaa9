"""Page-aligned byte buffers and a budget-charged pool of them.

O_DIRECT reads need destination addresses, offsets and lengths aligned to the
block size; anonymous ``mmap`` gives page-aligned memory of exactly the
requested size (no over-allocation slack to hide from the budget). Reusing
buffers of the same size (experts and layers of one model have a handful of
sizes) avoids re-faulting fresh pages on every read. Free buffers kept in the
pool stay charged to their tier, and are dropped first when a new
reservation needs room, so the tier's accounted peak is what really exists.
"""

from __future__ import annotations

import mmap
import threading
from collections import defaultdict
from typing import Callable

import torch

from tessera.options import ALIGNMENT
from tessera.offload.tiers import TierBudget


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` (a multiple of 4096) at a page-aligned address."""
    if nbytes <= 0 or nbytes % ALIGNMENT:
        raise ValueError(f"aligned buffers are positive multiples of {ALIGNMENT} bytes, got {nbytes}")
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    t = torch.frombuffer(mm, dtype=torch.uint8)  # keeps ``mm`` alive
    assert t.data_ptr() % ALIGNMENT == 0
    return t


class BufferPool:
    """Aligned buffers charged to one tier budget, recycled by size."""

    def __init__(
        self,
        budget: TierBudget,
        alloc: Callable[[int], torch.Tensor] = aligned_empty,
        free: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        self.budget = budget
        self._alloc = alloc
        self._free_fn = free
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._free_bytes = 0
        self._lock = threading.Lock()

    def acquire(self, nbytes: int, what: str, timeout_s: float = 0.0) -> torch.Tensor:
        """A buffer of ``nbytes``: reused when one is free, else allocated after charging the budget."""
        with self._lock:
            bucket = self._free.get(nbytes)
            if bucket:
                self._free_bytes -= nbytes
                return bucket.pop()
            self._drop_free_until_fits(nbytes)
        self.budget.reserve(nbytes, what, timeout_s=timeout_s)
        try:
            return self._alloc(nbytes)
        except BaseException:
            self.budget.release(nbytes)
            raise

    def try_acquire(self, nbytes: int) -> torch.Tensor | None:
        """Like :meth:`acquire` but returns None instead of raising when the tier is full."""
        with self._lock:
            bucket = self._free.get(nbytes)
            if bucket:
                self._free_bytes -= nbytes
                return bucket.pop()
            self._drop_free_until_fits(nbytes)
            if not self.budget.try_reserve(nbytes):
                return None
        try:
            return self._alloc(nbytes)
        except BaseException:
            self.budget.release(nbytes)
            raise

    def give_back(self, buf: torch.Tensor) -> None:
        """Return a buffer for reuse (it stays charged until dropped)."""
        with self._lock:
            self._free[buf.numel()].append(buf)
            self._free_bytes += buf.numel()

    def _drop_free_until_fits(self, nbytes: int) -> None:
        # Caller holds the lock. Drop free buffers (largest first) until nbytes fit.
        for size in sorted(self._free, reverse=True):
            bucket = self._free[size]
            while bucket and not self.budget.fits(nbytes):
                self._release(bucket.pop())
        self._free = defaultdict(list, {k: v for k, v in self._free.items() if v})

    def _release(self, buf: torch.Tensor) -> None:
        n = buf.numel()
        self._free_bytes -= n
        if self._free_fn is not None:
            self._free_fn(buf)
        del buf
        self.budget.release(n)

    def trim(self) -> None:
        """Free every pooled buffer (refunding the budget)."""
        with self._lock:
            for bucket in self._free.values():
                while bucket:
                    self._release(bucket.pop())
            self._free.clear()

    @property
    def free_bytes(self) -> int:
        return self._free_bytes
