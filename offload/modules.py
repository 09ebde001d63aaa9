"""Stage offload of a stack of ``nn.Module`` blocks (a DiT's transformer blocks, any layer list).

Consecutive blocks are grouped into stages; each stage's parameters become one
weight group in a :class:`~tessera.offload.store.TieredStore` (host memory or
the NVMe tier file) and the modules keep only empty placeholders. Forward
hooks bind a stage's tensors into its modules just before its first block runs
and unbind them after its last block, through a
:class:`~tessera.offload.prefetch.LayerStreamer`, so stage s+1 streams in
while stage s computes. The model code is not changed: the hooks swap
``param.data`` (inference only; no autograd through offloaded parameters).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tessera.options import OffloadConfig, Tier
from tessera.offload.prefetch import LayerStreamer
from tessera.offload.store import GroupSpec, TieredStore, group_spec


class OffloadedBlocks:
    """Keeps ``blocks`` (an ordered list of modules) in the offload tiers, ``blocks_per_stage`` per group."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        config: OffloadConfig,
        blocks_per_stage: int = 1,
        name: str = "stages",
        fingerprint: str | None = None,
        device: str | torch.device = "cpu",
        read_delay_s: float = 0.0,
    ) -> None:
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage is {blocks_per_stage}; it must be >= 1")
        self.blocks = list(blocks)
        self.stages = [self.blocks[i : i + blocks_per_stage] for i in range(0, len(self.blocks), blocks_per_stage)]
        specs: list[GroupSpec] = []
        self._params: list[list[tuple[nn.Parameter, str]]] = []
        for s, stage in enumerate(self.stages):
            tensors, owned = {}, []
            for b, block in enumerate(stage):
                for pname, p in block.named_parameters():
                    key = f"{b}.{pname}"
                    tensors[key] = p.detach()
                    owned.append((p, key))
            specs.append(group_spec(f"{name}.{s}", tensors))
            self._params.append(owned)
        tier = Tier.NVME if config.nvme_dir is not None else Tier.HOST
        self.store = TieredStore(config, specs, {sp.name: tier for sp in specs}, fingerprint=fingerprint, name=name,
                                 device=device, read_delay_s=read_delay_s)
        self.names = [sp.name for sp in specs]
        self.streamer = LayerStreamer(self.store, self.names)
        self._empty = [
            [torch.empty(0, dtype=p.dtype, device=p.device) for p, _ in owned] for owned in self._params
        ]
        for owned, empties in zip(self._params, self._empty):
            for (p, _), e in zip(owned, empties):
                p.data = e  # the module keeps a placeholder; the bytes live in the store
        self._active: dict[int, object] = {}
        self._hooks = []
        for s, stage in enumerate(self.stages):
            self._hooks.append(stage[0].register_forward_pre_hook(lambda m, a, s=s: self._bind(s)))
            self._hooks.append(stage[-1].register_forward_hook(lambda m, a, o, s=s: self._unbind(s)))

    def _bind(self, s: int) -> None:
        ctx = self.streamer.use(self.names[s])
        handle = ctx.__enter__()
        self._active[s] = ctx
        for p, key in self._params[s]:
            p.data = handle.tensors[key]

    def _unbind(self, s: int) -> None:
        for (p, _), e in zip(self._params[s], self._empty[s]):
            p.data = e
        ctx = self._active.pop(s, None)
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def stats(self) -> dict:
        out = self.store.stats()
        out.update({f"stream_{k}": v for k, v in self.streamer.counters.items()})
        return out

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        for s in list(self._active):
            self._unbind(s)
        self.streamer.close()
        self.store.close()


def offload_model_blocks(model: nn.Module, block_lists: Sequence[str], config: OffloadConfig,
                         device: str | torch.device = "cpu", tag: str = "rank0",
                         blocks_per_stage: int = 1) -> OffloadedBlocks:
    """Offload every block of a DiT's block stacks ``block_lists`` (the family's ``STAGES.blocks``, in
    forward order), one stage per ``blocks_per_stage``."""
    blocks = [b for name in block_lists for b in getattr(model, name, [])]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has none of {tuple(block_lists)}; nothing to offload in stages")
    return OffloadedBlocks(blocks, config, blocks_per_stage=blocks_per_stage, name=f"dit-{tag}", device=device)
