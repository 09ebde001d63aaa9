"""Step checkpoints of a denoising loop: what a rank needs to resume mid-image after a fault.

A rank's state between two denoising steps is its band of latent rows, the
scheduler (a multistep solver keeps its last model outputs, band-shaped too),
the step index and, for tests, the trace. The driver keeps the latest
:class:`StepCheckpoint` of every rank (they are small: one band of latents and
a few of its predecessors), so after a restart each rank resumes at that step
instead of re-running the image from its seed, with the same bits. The
stale-K/V modes (``displaced``, ``partial``) also carry every layer's stale
activations between steps; they are not checkpointed and rerun from the seed.

Tensors travel on the host: a driver without a GPU can hold them, and
:func:`restore_scheduler` puts back on the rank's device exactly those that
lived there (diffusers keeps some schedule tensors on the CPU on purpose).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from tessera.runtime.diffusion.protocol import SchedulerState, TraceStep


def _move(value: Any, device: torch.device | str) -> tuple[Any, bool]:
    """``value`` with its tensors on ``device`` (a tensor, or a list/tuple of tensors and Nones), and whether
    any tensor was moved."""
    if isinstance(value, torch.Tensor):
        return value.to(device), value.device != torch.device(device)
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        moved = [_move(v, device) for v in value]
        return type(value)(v for v, _ in moved), any(m for _, m in moved)
    return value, False


def host_scheduler(scheduler: Any) -> SchedulerState:
    """A deep copy of ``scheduler`` with every tensor on the host (the live one keeps running)."""
    copied = copy.deepcopy(scheduler)
    on_device = set()
    for name, value in vars(copied).items():
        value, moved = _move(value, "cpu")
        if moved:
            setattr(copied, name, value)
            on_device.add(name)
    return SchedulerState(copied, frozenset(on_device))


def restore_scheduler(state: SchedulerState, device: torch.device | str) -> Any:
    """A live scheduler from ``state``: its device tensors back on ``device``, the host ones left there."""
    scheduler = copy.deepcopy(state.scheduler)
    for name in state.on_device:
        setattr(scheduler, name, _move(getattr(scheduler, name), device)[0])
    return scheduler


def host_trace(trace: list[TraceStep]) -> tuple[TraceStep, ...]:
    return tuple(TraceStep(s.t, s.latents.cpu(), s.pred.cpu()) for s in trace)
