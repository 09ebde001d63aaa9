"""Pipeline parallelism over the ``pp`` mesh dim: the micro-batch schedule both engines run.

Where stages cut is the planner's (``memory/stages.stage_ranges``: contiguous
ranges of balanced bytes, in the Placement). One engine step is split into
micro-batches (whole sequences for a language model, batch rows for a DiT),
so while stage 1 runs micro-batch 0, stage 0 already runs micro-batch 1:
stages overlap (GPipe-style, forward only). :class:`StageSchedule` moves the
activations between stages with point-to-point ``isend``/``recv``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from tessera.parallel.tensor import split_range

T = TypeVar("T")


def micro_batches(items: Sequence[T], stages: int) -> list[list[T]]:
    """Split a step's sequences into up to ``stages`` contiguous micro-batches."""
    n = min(stages, len(items))
    return [list(items[slice(*split_range(len(items), n, i))]) for i in range(n)]


@dataclass
class StageSchedule:
    """This rank's pipeline stage, one micro-batch per call: the first stage embeds, later ones receive the
    *carry* (a dict of tensors) from the previous stage; every stage runs its layers; the last applies the
    head, the others send the carry on without waiting (``wait`` before the step returns).

    The one pipeline mechanism of both engines: a DiT's carry is its hidden states plus the conditioning
    the blocks read, shapes announced per micro-batch (they change with the request); a language model's
    carry is its packed hidden states, whose shape every stage knows from the batch (``expect``), so only
    the tensor travels. Point-to-point partners are the ranks with the same coordinates on every other
    dim in the neighbouring stage, so pp composes with tp, ep, sp and cfg.
    """

    stage: int
    pp: int
    prev_rank: int | None
    next_rank: int | None
    device: torch.device
    counter: Any = None  # parallel.counted.CommCounter: bytes handed over, for the DiT benchmarks
    pending: list = field(default_factory=list)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.pp - 1

    def __call__(self, embed: Callable, body: Callable, head: Callable,
                 expect: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None):
        carry = embed() if self.first else self.recv(expect)
        carry = body(carry)
        if self.last:
            return head(carry)
        self.send(carry, announce=expect is None)
        return None

    def send(self, carry: dict[str, torch.Tensor], announce: bool = True) -> None:
        """Shapes first when the receiver cannot know them, then every tensor without waiting."""
        if announce:
            meta = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in carry.items()]
            dist.send_object_list([meta], dst=self.next_rank, device=self.device)
        for tensor in carry.values():
            tensor = tensor.contiguous()
            self.pending.append((dist.isend(tensor, dst=self.next_rank), tensor))
            if self.counter is not None:
                self.counter.add("pp_activations", tensor.nbytes, 0)

    def recv(self, expect: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None) -> dict[str, torch.Tensor]:
        if expect is None:
            box: list[Any] = [None]
            dist.recv_object_list(box, src=self.prev_rank, device=self.device)
            specs = [(k, shape, getattr(torch, dtype)) for k, shape, dtype in box[0]]
        else:
            specs = [(k, shape, dtype) for k, (shape, dtype) in expect.items()]
        carry = {}
        for key, shape, dtype in specs:
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
            dist.recv(tensor, src=self.prev_rank)
            if self.counter is not None:
                self.counter.add("pp_activations", 0, tensor.nbytes)
            carry[key] = tensor
        return carry

    def wait(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()
