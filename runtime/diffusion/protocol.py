"""The typed driver <-> worker protocol of the diffusion engine.

The driver (``engine.py``) sends a :class:`LoadSpec` once and a
:class:`~tessera.runtime.diffusion.request.DiffusionRequest` per image; every
rank's :class:`~tessera.runtime.diffusion.worker.DiffusionWorker` answers with
these frozen dataclasses (pickled by Ray), never with dicts of ``Any``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from tessera.errors import ConfigError
from tessera.options import DTYPES, OffloadConfig
from tessera.parallel.counted import CommStats


@dataclass(frozen=True)
class LoadSpec:
    """What every rank loads: the pipeline directory, the weight dtype, optional block offload."""

    model_dir: str
    dtype: str = "float32"
    offload: OffloadConfig | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.offload is not None and not isinstance(self.offload, OffloadConfig):
            raise ConfigError(f"offload must be an OffloadConfig, got {type(self.offload).__name__}")


@dataclass(frozen=True)
class WorkerInfo:
    """One rank's loaded shard: what it holds and what it read."""

    rank: int
    param_bytes: int  # parameters held (a 1/tp share of the split linears, a pipeline stage's blocks)
    loaded_bytes: int  # bytes read from the safetensors files: only this rank's slices
    load_s: float
    blocks: tuple[int, int] | None = None  # [start, stop) of the blocks a pipeline stage holds


@dataclass(frozen=True)
class RequestStart:
    """A rank's share of a request: its band of patch-grid rows and the number of denoising steps."""

    rank: int
    rows: tuple[int, int]
    steps: int


@dataclass(frozen=True)
class StepResult:
    """One denoising step on one rank, measured there."""

    step: int
    seconds: float
    cpu_seconds: float  # this process's CPU time: robust to other jobs on the machine
    sent_bytes: int


@dataclass(frozen=True)
class TraceStep:
    """The model's input latents and (guided) prediction of one step, whole image (tests)."""

    t: float
    latents: torch.Tensor
    pred: torch.Tensor


@dataclass(frozen=True)
class SchedulerState:
    """A scheduler copied to the host; ``on_device`` names the attributes whose tensors were on the rank's device."""

    scheduler: Any
    on_device: frozenset[str]


@dataclass(frozen=True)
class StepCheckpoint:
    """One rank's state after ``step`` denoising steps of the request in flight."""

    rank: int
    step: int
    latents: torch.Tensor  # this rank's band of rows, on the host
    scheduler: SchedulerState
    trace: tuple[TraceStep, ...] = ()


@dataclass(frozen=True)
class ChunkResult:
    """A rank's answer to a run of consecutive steps: their timings and, unless the loop is done or its mode
    keeps stale activations between steps, the rank's checkpoint after them."""

    rank: int
    steps: tuple[StepResult, ...]
    checkpoint: StepCheckpoint | None = None


@dataclass(frozen=True)
class RequestResult:
    """A rank's end of a request. Global rank 0 also carries the latents, images and (on request) the trace."""

    rank: int
    comm: CommStats
    steps: tuple[StepResult, ...] = ()
    latents: torch.Tensor | None = None
    images: Any = None  # numpy [N, H, W, 3] in [0, 1] when output="image"
    trace: tuple[TraceStep, ...] | None = None
    embeds: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]] | None = None  # (cond, uncond)
