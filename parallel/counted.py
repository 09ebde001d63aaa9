"""Collectives and point-to-point calls that count the bytes they are handed.

Why: the diffusion benchmarks and tests compare communication volume of
patch-parallel modes. The numbers must be what was actually passed to
``torch.distributed`` on this rank, not a formula, so every exchange in
``parallel/patch.py``, ``ulysses.py`` and ``cfg.py`` goes through here.
``sent`` counts the bytes of tensors this rank hands over (its all-gather
input, its all-to-all input minus the part addressed to itself, its isend
payloads); ``received`` counts bytes that arrive from other ranks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from tessera.parallel.comm import GroupComm


@dataclass(frozen=True)
class KindStats:
    """Bytes and calls of one kind of exchange on one rank."""

    sent: int
    received: int
    calls: int


@dataclass(frozen=True)
class CommStats:
    """What one rank handed to and got from ``torch.distributed`` since the last reset, by kind."""

    sent_bytes: int
    received_bytes: int
    by_kind: Mapping[str, KindStats]

    def as_dict(self) -> dict[str, Any]:
        return {"sent_bytes": self.sent_bytes, "received_bytes": self.received_bytes,
                "by_kind": {k: {"sent": v.sent, "received": v.received, "calls": v.calls}
                            for k, v in self.by_kind.items()}}


@dataclass
class CommCounter:
    """Per-kind byte and call counts; ``reset()`` between measurements."""

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    received: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, sent: int, received: int) -> None:
        self.sent[kind] += int(sent)
        self.received[kind] += int(received)
        self.calls[kind] += 1

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()
        self.calls.clear()

    @property
    def sent_bytes(self) -> int:
        return sum(self.sent.values())

    def snapshot(self) -> CommStats:
        return CommStats(
            sent_bytes=self.sent_bytes,
            received_bytes=sum(self.received.values()),
            by_kind={k: KindStats(self.sent[k], self.received.get(k, 0), self.calls[k]) for k in sorted(self.sent)},
        )


def gather_tokens(local: torch.Tensor, counts: Sequence[int], comm: GroupComm, counter: CommCounter | None,
                  kind: str, async_op: bool = False):
    """All-gather token-major ``[n_local, ...]`` tensors whose lengths ``counts`` may differ.

    gloo cannot all-gather lists of uneven tensors, so every rank pads to the
    longest and the pad is dropped after. Returns ``(work, finish)``;
    ``finish()`` (after ``work.wait()`` when async) gives ``[sum(counts), ...]``.
    """
    work, out, longest = gather_padded(local, counts, comm, counter, kind, async_op)

    def finish() -> torch.Tensor:
        if all(n == longest for n in counts):
            return out  # nothing to drop: no copy
        parts = [out[i * longest: i * longest + n] for i, n in enumerate(counts)]
        return torch.cat(parts, dim=0)

    return work, finish


def gather_padded(local: torch.Tensor, counts: Sequence[int], comm: GroupComm, counter: CommCounter | None, kind: str,
                  async_op: bool = False):
    """The all-gather under :func:`gather_tokens`: returns ``(work, out, longest)`` where rank ``i``'s
    ``counts[i]`` rows sit at ``out[i * longest:]`` (callers that rearrange anyway skip the compaction copy).
    ``local`` may already have ``longest`` rows (its pad rows are never read)."""
    longest = max(counts)
    world = len(counts)
    if local.shape[0] < longest:
        pad = local.new_zeros((longest - local.shape[0], *local.shape[1:]))
        local = torch.cat([local, pad], dim=0)
    local = local.contiguous()
    out = local.new_empty((world * longest, *local.shape[1:]))
    work = comm.all_gather_into(out, local, async_op=async_op)  # one node, CPU: shared memory
    if counter is not None:
        counter.add(kind, local.nbytes, local.nbytes * (world - 1))
    return work, out, longest


def all_to_all_tokens(inp: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int], comm: GroupComm,
                      counter: CommCounter | None, kind: str, my_index: int) -> torch.Tensor:
    """``all_to_all_single`` along dim 0 with (possibly uneven) split sizes in rows."""
    inp = inp.contiguous()
    out = comm.all_to_all_rows(inp, in_splits, out_splits)  # one node, CPU: shared memory
    if counter is not None:
        row = inp[0].nbytes if inp.shape[0] else 0
        counter.add(kind, (sum(in_splits) - in_splits[my_index]) * row, (sum(out_splits) - out_splits[my_index]) * row)
    return out


def exchange_p2p(sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]], comm: GroupComm,
                 counter: CommCounter | None, kind: str) -> tuple[list, list]:
    """Post isend/irecv pairs (peers are ranks *within* ``comm``'s group).

    Returns ``(works, ops)``: wait on the works; keep ``ops`` alive until then
    (they hold the send buffers).
    """
    ops = []
    for tensor, peer in sends:
        ops.append(dist.P2POp(dist.isend, tensor.contiguous(), comm.global_rank(peer), comm.group))
    for tensor, peer in recvs:
        ops.append(dist.P2POp(dist.irecv, tensor, comm.global_rank(peer), comm.group))
    if counter is not None:
        counter.add(kind, sum(t.nbytes for t, _ in sends), sum(t.nbytes for t, _ in recvs))
    return (dist.batch_isend_irecv(ops) if ops else []), ops
