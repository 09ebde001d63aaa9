"""Pipeline parallelism over the ``pp`` mesh dim: layer stages and the micro-batch schedule.

A family declares where stages may cut (every family here: any layer
boundary). Stages get balanced contiguous layer ranges. One engine step is
split into micro-batches of whole sequences (as many as there are stages),
so while stage 1 runs micro-batch 0, stage 0 already runs micro-batch 1:
several requests are in flight and stages overlap (GPipe-style, forward only).
Activations move between stages with point-to-point ``isend``/``recv`` between
ranks in the same (ep, tp) slot of neighbouring stages.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from tessera.parallel.tensor import split_range
from tessera.config import ConfigError

T = TypeVar("T")


def check_pp(num_layers: int, pp: int, what: str) -> None:
    if pp > num_layers:
        raise ConfigError(f"{what}: pp={pp} stages for {num_layers} layers; use pp <= {num_layers}")


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    a, b = split_range(num_layers, pp, stage)
    return range(a, b)


def micro_batches(items: Sequence[T], stages: int) -> list[list[T]]:
    """Split a step's sequences into up to ``stages`` contiguous micro-batches."""
    n = min(stages, len(items))
    return [list(items[slice(*split_range(len(items), n, i))]) for i in range(n)]


def run_pipeline(
    chunks: Sequence[T],
    first: bool,
    last: bool,
    prev_rank: int | None,
    next_rank: int | None,
    tokens_of: Callable[[T], int],
    hidden: int,
    dtype: torch.dtype,
    start: Callable[[T], torch.Tensor],  # first stage: embeddings of a chunk
    body: Callable[[T, torch.Tensor], torch.Tensor],  # this stage's layers
    finish: Callable[[T, torch.Tensor], None],  # last stage: head + sampling
) -> None:
    """Run every micro-batch through this stage, receiving from and sending to neighbours."""
    pending = []
    for chunk in chunks:
        if first:
            h = start(chunk)
        else:
            h = torch.empty((tokens_of(chunk), hidden), dtype=dtype)
            dist.recv(h, src=prev_rank)
        h = body(chunk, h)
        if last:
            finish(chunk, h)
        else:
            h = h.contiguous()
            pending.append((dist.isend(h, dst=next_rank), h))
    for work, _ in pending:
        work.wait()
