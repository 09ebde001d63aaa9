"""Page-aligned byte buffers (page-locked for a GPU where needed) and a budget-charged pool of them.

O_DIRECT reads need destination addresses, offsets and lengths aligned to the
block size; anonymous ``mmap`` gives page-aligned memory of exactly the
requested size (no over-allocation slack to hide from the budget). Reusing
buffers of the same size (experts and layers of one model have a handful of
sizes) avoids re-faulting fresh pages on every read. Free buffers kept in the
pool stay charged to their tier, and are dropped first when a new
reservation needs room, so the tier's accounted peak is what really exists.
On CUDA the staging buffers between NVMe and the device are registered with
the driver (``cudaHostRegister``) so host-to-device copies from them are
asynchronous.
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


def pin_buffer(buf: torch.Tensor) -> torch.Tensor:
    """Page-lock an aligned host buffer in place (``cudaHostRegister``) so copies from it to a GPU are asynchronous.

    Registering keeps the buffer's page alignment (O_DIRECT reads land in it directly): NVMe ->
    pinned staging buffer -> device, with no bounce copy. A buffer that is already page-locked
    (DeepSpeed's aio allocates locked tensors) is returned as is.
    """
    if buf.is_pinned():
        return buf
    from torch import cuda

    cuda.check_error(cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel() * buf.element_size(), 0))
    return buf


def unpin_buffer(buf: torch.Tensor) -> None:
    """Undo :func:`pin_buffer` (before the memory is unmapped)."""
    from torch import cuda

    cuda.check_error(cuda.cudart().cudaHostUnregister(buf.data_ptr()))


class PinnedAllocator:
    """Aligned host buffers page-locked for a GPU: wraps a reader's ``alloc``/``free`` (CUDA staging buffers)."""

    def __init__(self, alloc: Callable[[int], torch.Tensor] = aligned_empty,
                 free: Callable[[torch.Tensor], None] | None = None) -> None:
        self._alloc, self._free = alloc, free
        self._registered: set[int] = set()
        self._lock = threading.Lock()

    def alloc(self, nbytes: int) -> torch.Tensor:
        buf = self._alloc(nbytes)
        if not buf.is_pinned():
            pin_buffer(buf)
            with self._lock:
                self._registered.add(buf.data_ptr())
        return buf

    def free(self, buf: torch.Tensor) -> None:
        with self._lock:
            registered = buf.data_ptr() in self._registered
            self._registered.discard(buf.data_ptr())
        if registered:
            unpin_buffer(buf)
        if self._free is not None:
            self._free(buf)


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
            return self._new(nbytes)
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
            return self._new(nbytes)
        except BaseException:
            self.budget.release(nbytes)
            raise

    def _new(self, nbytes: int) -> torch.Tensor:
        # An ordinary tensor whatever mode the caller is in: pooled buffers outlive the call and are
        # written on I/O threads (reads, repairs), where an inference tensor could not be updated in place.
        with torch.inference_mode(False):
            return self._alloc(nbytes)

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
