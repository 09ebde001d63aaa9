"""Shared-memory all_reduce / all_gather for the ranks of one process group on one CPU node.

Why: on CPU, tensor-parallel decode does ~2 small all_reduces per layer. A gloo
all_reduce of 2 KiB between two processes on this 2-core machine costs about
0.6-1.2 ms of wall time and 0.3-0.7 ms of CPU (TCP loopback, its own threads),
which is more than the matmuls it joins. Ranks on one node can instead meet in
a shared-memory segment: each writes its tensor into its slot, publishes a step
counter, waits (spin, then yield) until every rank has published the same step,
and reduces all slots itself -- about 0.1 ms, mostly the wait for the slower
rank. vLLM's CPU backend and DeepSpeed (``deepspeed_shm_comm``) do the same in
C++; DeepSpeed's needs a JIT build, so this is the same design in torch/numpy.

The segment holds two buffers used alternately (step parity): when a rank
writes step n, every rank has published step n-1 and therefore finished
reading step n-2 from the same buffer, so one meeting per collective is
enough. Every rank sums the slots in rank order (fp32 accumulation for
16-bit types), so all ranks get bitwise the same result. Tensors larger than
a slot, and groups that span nodes, fall back to gloo (the decision depends
only on shapes, so every rank takes the same path).

The ordering argument relies on x86-64's store ordering (data stores become
visible before the counter store); other machines use gloo.
"""

from __future__ import annotations

import math
import mmap
import os
import platform
import secrets
import socket
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

SLOT_BYTES = 1 << 20  # per rank and buffer; larger tensors go through gloo
DEFAULT_WAIT_TIMEOUT_S = 600.0  # TESSERA_SHM_TIMEOUT_S overrides it, read when a segment is attached
SPIN_S, YIELD_S, SLEEP_S = 50e-6, 1e-3, 50e-6  # waiting: busy, then yielding, then napping (see ShmGroup._wait)


def enabled_here() -> bool:
    """Shared memory is used unless TESSERA_SHM_COMM=0, and only on x86-64 (see the module docstring)."""
    return os.environ.get("TESSERA_SHM_COMM", "1") != "0" and platform.machine() in ("x86_64", "AMD64")


def wait_timeout_s() -> float:
    return float(os.environ.get("TESSERA_SHM_TIMEOUT_S", DEFAULT_WAIT_TIMEOUT_S))


class ShmGroup:
    """One group's shared segment: per-rank step counters and two buffers of ``world`` slots."""

    def __init__(self, segment: mmap.mmap, rank: int, world: int, slot_bytes: int, timeout_s: float) -> None:
        self.segment, self.rank, self.world, self.slot_bytes = segment, rank, world, slot_bytes
        self.timeout_s = timeout_s
        self.counters = np.ndarray((world,), dtype=np.int64, buffer=segment, offset=64, strides=(64,))
        # per buffer, each rank's all_to_all send counts (rows per destination)
        # (last column: 1 if that rank's rows fit its slot)
        self.splits = torch.frombuffer(segment, dtype=torch.int64, count=2 * world * (world + 1),
                                       offset=64 + 64 * world).view(2, world, world + 1)
        data = torch.frombuffer(segment, dtype=torch.uint8, count=2 * world * slot_bytes, offset=header_bytes(world))
        self.buffers = data.view(2, world, slot_bytes)
        self.step = int(self.counters[rank])
        self.calls = 0

    def _meet(self, t: torch.Tensor, splits: list[int] | None = None) -> torch.Tensor:
        """Publish ``t`` in this rank's slot and wait for every rank; returns the [world, bytes] buffer.

        With ``splits`` (all_to_all) a ``t`` too large for the slot is not copied; the rank
        says so in its split row and every rank then falls back together."""
        self.step += 1
        self.calls += 1
        buf = self.buffers[self.step % 2]
        nbytes = t.numel() * t.element_size()
        fits = nbytes <= self.slot_bytes
        if fits:
            buf[self.rank, :nbytes].copy_(t.reshape(-1).view(torch.uint8))
        if splits is not None:
            self.splits[self.step % 2, self.rank] = torch.tensor([*splits, int(fits)], dtype=torch.int64)
        self.counters[self.rank] = self.step
        if self.counters.min() < self.step:
            self._wait()
        return buf[:, : min(nbytes, self.slot_bytes)]

    def _wait(self) -> None:
        """Until every rank has published ``self.step``: spin ~50 us (a peer running in parallel is
        that close), then yield the core, and after ~1 ms sleep in 50 us naps, so a peer that
        shares our core (more ranks than cores) is not starved by our waiting."""
        start = time.perf_counter()
        spin_until, yield_until = start + SPIN_S, start + YIELD_S
        deadline = start + self.timeout_s
        while self.counters.min() < self.step:
            now = time.perf_counter()
            if now < spin_until:
                continue
            if now < yield_until:
                os.sched_yield()
            elif now < deadline:
                time.sleep(SLEEP_S)
            else:
                late = [r for r in range(self.world) if self.counters[r] < self.step]
                raise RuntimeError(
                    f"shared-memory collective: rank(s) {late} of the group did not arrive within "
                    f"{self.timeout_s:g} s (a peer died or is stuck); TESSERA_SHM_COMM=0 falls back to gloo"
                )

    def fits(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.is_contiguous() and t.numel() * t.element_size() <= self.slot_bytes

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over the group (``t`` contiguous, on the CPU, at most one slot)."""
        if t.numel() == 0:  # same shape on every rank: nothing to meet over
            return t
        slots = self._meet(t).view(t.dtype).view(self.world, -1)
        acc = torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype
        total = slots[0].to(acc)
        for r in range(1, self.world):
            total = total + slots[r].to(acc)
        t.view(-1).copy_(total)
        return t

    def all_gather_into(self, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``out`` (contiguous, ``world`` x ``t``'s rows) gets every rank's ``t`` in rank order."""
        if t.numel() == 0:
            return out
        slots = self._meet(t).view(t.dtype)
        out.view(self.world, -1).copy_(slots)
        return out

    def all_to_all_rows(self, inp: torch.Tensor, in_splits: list[int], out_splits: list[int]) -> torch.Tensor | None:
        """``all_to_all_single`` along dim 0 with uneven row counts: rank r's rows for me start
        after the rows it sends to lower ranks, which it publishes next to its data.
        None when some rank's rows did not fit its slot (then every rank gets None: use gloo)."""
        row = math.prod(inp.shape[1:])
        self._meet(inp, list(in_splits))
        table = self.splits[self.step % 2]
        if not bool(table[:, -1].all()):
            return None
        slots = self.buffers[self.step % 2].view(inp.dtype)  # whole slots: other ranks may send more rows
        out = inp.new_empty((sum(out_splits), *inp.shape[1:]))
        flat, at = out.view(-1), 0
        for src in range(self.world):
            start = int(table[src, : self.rank].sum()) * row
            n = out_splits[src] * row
            flat[at : at + n].copy_(slots[src, start : start + n])
            at += n
        return out

    def all_gather_cat(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``t`` (same shape everywhere) concatenated along ``dim``."""
        if t.numel() == 0:
            return torch.cat([t] * self.world, dim=dim)
        slots = self._meet(t).view(t.dtype)
        return torch.cat([slots[r].view(t.shape) for r in range(self.world)], dim=dim)


def header_bytes(world: int) -> int:
    """Token (64 bytes), one 64-byte counter line per rank, the split tables; rounded to a page."""
    raw = 64 + 64 * world + 2 * world * (world + 1) * 8
    return -(-raw // 4096) * 4096


def attach(group: Any, slot_bytes: int = SLOT_BYTES, timeout_s: float | None = None) -> ShmGroup | None:
    """A shared segment for ``group`` when all its ranks are CPU processes on one node (collective).

    Rank 0 creates the segment under /dev/shm and writes a random token; every
    rank maps it and checks the token, and only if every rank succeeded is the
    segment used. The file is unlinked once all have mapped it, so no segment
    outlives the processes. Returns None (gloo stays) otherwise. The caller
    keeps the returned object (``parallel.comm.GroupComm``); there is no registry.
    """
    if group is None or dist.get_backend(group) != "gloo":
        return None
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if world < 2:
        return None
    size = header_bytes(world) + 2 * world * slot_bytes
    segment, info = None, [None]
    if rank == 0 and enabled_here():
        token = secrets.token_hex(16)
        path = f"/dev/shm/tessera-comm-{os.getpid()}-{token[:8]}"
        try:
            segment = _map(path, size, create=True)
            segment[:32] = token.encode()
            info = [(path, token, socket.gethostname())]
        except OSError:
            segment = None
    dist.broadcast_object_list(info, src=dist.get_global_rank(group, 0), group=group)
    if info[0] is not None and rank != 0:
        path, token, host = info[0]
        if enabled_here() and host == socket.gethostname():
            try:
                segment = _map(path, size, create=False)
                if segment[:32] != token.encode():
                    segment = None
            except OSError:
                segment = None
    votes: list[Any] = [None] * world
    dist.all_gather_object(votes, segment is not None, group=group)  # also a barrier: all have mapped it
    if rank == 0 and info[0] is not None:
        os.unlink(info[0][0])
    if not all(votes):
        return None
    return ShmGroup(segment, rank, world, slot_bytes, wait_timeout_s() if timeout_s is None else timeout_s)


def _map(path: str, size: int, create: bool) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:
            os.posix_fallocate(fd, 0, size)  # reserve now: a full /dev/shm fails here, not with SIGBUS later
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)
