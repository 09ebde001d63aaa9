"""Pipeline parallelism for diffusion transformers over the ``pp`` mesh dim.

Why: tensor parallel shards every block but all-reduces twice per block;
pipeline stages instead hold a contiguous range of blocks each and exchange
one activation "carry" per micro-batch per step, so a DiT that does not fit
one device fits ``pp`` of them with little traffic. A family declares *what*
may be cut (``STAGES``, a ``models.dit_family.StagePlan``: its block lists in
forward order, cut as one sequence; ``embed`` / ``head``: the modules only the
first / last stage holds) and writes its ``forward`` as three closures ``embed() ->
carry``, ``body(carry) -> carry``, ``head(carry) -> output`` handed to a
``stage`` callable (``models/dit_layers.whole_model`` when unstaged). This
file says *how*, in torchtitan-style steps:

1. :func:`apply_pipeline_stages` (on the meta model, before loading): the
   block sequence is cut into contiguous ranges of balanced bytes; other
   stages' blocks become parameter-free ``OnOtherStage`` stand-ins and the
   embeddings / head are dropped where not needed, so the state dict, and
   hence what the loader reads from safetensors, is this stage's only.
2. :class:`~tessera.parallel.pipeline.StageSchedule` (the ``stage`` callable, shared with the
   language models): the first stage embeds,
   later ones ``recv`` the carry (hidden states plus the conditioning the
   blocks read, e.g. PixArt's ``t6`` and projected captions); every stage
   runs its blocks; the last applies the head, the others ``isend`` the carry.
3. :class:`DiTPipeline.predict` runs one denoising step as several
   micro-batches (batch rows: CFG halves, several prompts) so stage ``s``
   works on micro-batch ``i+1`` while stage ``s+1`` works on ``i``; the last
   stage then broadcasts the prediction over ``pp`` so every stage steps the
   scheduler on identical latents (and global rank 0, on stage 0, returns them).

Point-to-point partners are the ranks with the same ``(cfg, sp, tp)``
coordinates in the neighbouring stage, so pp composes with tp (all-reduces
stay inside a stage) and sp (K/V exchanges stay inside a stage).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from tessera.models.dit_family import StagePlan
from tessera.models.dit_layers import OnOtherStage
from tessera.memory.stages import check_stages, stage_ranges
from tessera.parallel.counted import CommCounter
from tessera.parallel.pipeline import StageSchedule


def block_lists(model: nn.Module, stages: StagePlan) -> list[nn.ModuleList]:
    """The family's stage-cuttable block lists, in forward order."""
    return [getattr(model, name) for name in stages.blocks]


def count_blocks(model: nn.Module, stages: StagePlan) -> int:
    return sum(len(blocks) for blocks in block_lists(model, stages))


def check_pp(num_blocks: int, pp: int) -> None:
    """Driver-side check: every stage needs at least one block."""
    check_stages(num_blocks, pp, "a transformer")


def _bytes(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _named_bytes(model: nn.Module, names) -> int:
    total = 0
    for name in names:
        item = getattr(model, name, None)
        total += _bytes(item) if isinstance(item, nn.Module) else (item.numel() * item.element_size()
                                                                    if isinstance(item, torch.Tensor) else 0)
    return total


def _drop(model: nn.Module, dotted: str) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child in parent._parameters or child in parent._buffers:
        setattr(parent, child, None)  # unregistered from the state dict, never read
    elif isinstance(getattr(parent, child, None), nn.Module):
        setattr(parent, child, OnOtherStage())


def apply_pipeline_stages(model: nn.Module, stages: StagePlan, stage: int, pp: int) -> range:
    """Keep only ``stage``'s blocks (and embed/head where they belong) in ``model`` (meta); return its range."""
    lists = block_lists(model, stages)
    sizes = [_bytes(block) for blocks in lists for block in blocks]
    mine = stage_ranges(sizes, pp, _named_bytes(model, stages.embed), _named_bytes(model, stages.head))[stage]
    index = 0
    for blocks in lists:
        for i in range(len(blocks)):
            if index not in mine:
                blocks[i] = OnOtherStage()
            index += 1
    if stage > 0:
        for name in stages.embed:
            _drop(model, name)
    if stage < pp - 1:
        for name in stages.head:
            _drop(model, name)
    return mine


class DiTPipeline:
    """This rank's stage: what it loads (``prepare``) and how a step runs (``predict``)."""

    def __init__(self, stage: int, pp: int, rank_of_stage: Callable[[int], int], group: Any, device: torch.device,
                 counter: CommCounter | None = None) -> None:
        self.stage, self.pp, self.group = stage, pp, group
        self.last_rank = rank_of_stage(pp - 1)
        self.schedule = StageSchedule(stage, pp, rank_of_stage(stage - 1) if stage > 0 else None,
                                      rank_of_stage(stage + 1) if stage < pp - 1 else None, device, counter)
        self.counter = counter
        self.blocks: range | None = None

    @classmethod
    def for_worker(cls, worker: Any, counter: CommCounter | None = None) -> "DiTPipeline":
        """Stage and neighbours from the worker's named mesh (same coordinates on every other dim)."""
        names = list(worker.mesh.mesh_dim_names)
        coords = worker.coordinates()
        axis = names.index("pp")
        here = [coords[n] for n in names]

        def rank_of_stage(stage: int) -> int:
            at = list(here)
            at[axis] = stage
            return int(worker.mesh.mesh[tuple(at)])

        return cls(coords["pp"], int(worker.mesh.mesh.shape[axis]), rank_of_stage, worker.group("pp"),
                   torch.device(worker.device), counter)

    @property
    def last(self) -> bool:
        return self.schedule.last

    def prepare(self, model: nn.Module, stages: StagePlan) -> None:
        self.blocks = apply_pipeline_stages(model, stages, self.stage, self.pp)

    def predict(self, run: Callable[[slice, StageSchedule], torch.Tensor | None], like: torch.Tensor,
                micro_batches: int = 1) -> torch.Tensor:
        """Run ``run(batch_rows, schedule)`` per micro-batch; return the full prediction on every stage.

        ``like`` is the model input (the prediction has its shape and dtype).
        More micro-batches let stages overlap; callers keep one when the
        attention keeps per-layer state across calls (stale patch K/V).
        """
        batch = like.shape[0]
        n = max(1, min(micro_batches, batch))
        base, extra = divmod(batch, n)
        outs, start = [], 0
        for i in range(n):
            size = base + (1 if i < extra else 0)
            outs.append(run(slice(start, start + size), self.schedule))
            start += size
        self.schedule.wait()
        pred = torch.cat(outs).contiguous() if self.last else torch.empty_like(like)
        dist.broadcast(pred, src=self.last_rank, group=self.group)
        if self.counter is not None:
            self.counter.add("pp_pred", pred.nbytes if self.last else 0, 0 if self.last else pred.nbytes)
        return pred

    def block_range(self) -> tuple[int, int] | None:
        """``[start, stop)`` of the blocks this stage holds (after ``prepare``)."""
        return (self.blocks.start, self.blocks.stop) if self.blocks else None
