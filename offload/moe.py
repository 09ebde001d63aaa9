"""Offloaded routed experts for the MoE engine, behind the model's ``ExpertWeights`` seam.

The MoE block obtains expert weights only through ``experts.get(layer,
expert_ids)`` (``tessera.models.moe_layers.ExpertWeights``). This module
supplies an object with the same interface backed by a
:class:`~tessera.offload.store.TieredStore` (experts on NVMe, or in host
memory without an NVMe dir) and an :class:`~tessera.offload.expert_cache.ExpertCache`
in the device tier; model math is untouched, so offloaded generation is
token- and logit-identical to in-memory generation.

Loading streams: ``models.loader.load_stage_weights`` hands each expert to
:class:`ExpertSink.put`, which appends it to the tier file and drops it, so
host memory never holds all experts at once; :meth:`ExpertSink.finish` then
returns the :class:`OffloadedExperts` the stage is built with (nothing patches
the stage afterwards: the MoE block shows its input to ``observe``). When a tier file for the same
checkpoint, rank slice and dtype exists, it is reused (nothing is written).
The stage's dense weights (attention, norms, routers, shared experts, embeddings)
stay resident and are charged to the device budget.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from tessera.options import OffloadConfig, Tier
from tessera.offload.errors import OffloadConfigError
from tessera.offload.expert_cache import ExpertCache, expert_group_name
from tessera.offload.store import GroupSpec, TieredStore, fingerprint_of
from tessera.offload.tier_file import TierFile, TierFileWriter, group_nbytes

log = logging.getLogger("tessera.offload.moe")


class OffloadedExperts:
    """The ``ExpertWeights`` seam over the expert cache: ``get`` returns (gate_up, down) per expert id."""

    def __init__(self, store: TieredStore, cache: ExpertCache, local: dict[int, list[int]]) -> None:
        self.store = store
        self.cache = cache
        self._local = local
        self._hidden: dict[int, torch.Tensor] = {}

    def local_experts(self, layer: int) -> list[int]:
        return list(self._local.get(layer, []))

    def observe(self, layer: int, hidden: torch.Tensor) -> None:
        """The hidden state entering ``layer``'s MoE block (used by the gate predictor)."""
        self._hidden[layer] = hidden

    def get(self, layer: int, expert_ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ids = [int(e) for e in expert_ids]
        weights = self.cache.get(layer, ids, hidden=self._hidden.pop(layer, None))
        return [(weights[e]["gate_up"], weights[e]["down"]) for e in ids]

    def nbytes(self) -> int:
        """Bytes of all local experts across tiers (what the rank is responsible for)."""
        return sum(s.nbytes for s in self.store.specs.values())

    def stats(self) -> dict[str, Any]:
        out = {f"store_{k}": v for k, v in self.store.stats().items()}
        out.update({f"cache_{k}": v for k, v in self.cache.stats().items()})
        return out

    def close(self) -> None:
        self.cache.close()
        self.store.close()


class ExpertSink:
    """Receives this rank's experts from the loader (``put``) and streams them into the tier file."""

    def __init__(
        self,
        config: OffloadConfig,
        name: str,
        fingerprint: str,
        expected: dict[str, int],
        reload,
        device: torch.device,
    ) -> None:
        self.config = config
        self.name = name
        self.fingerprint = fingerprint
        self.expected = expected  # group name -> padded bytes
        self.reload = reload  # (layer, expert) -> tensors, for repairs
        self.device = device
        self.local: dict[int, list[int]] = {}
        self.host: dict[str, dict[str, torch.Tensor]] = {}
        self.writer: TierFileWriter | None = None
        self.tier = Tier.NVME if config.nvme_dir is not None else Tier.HOST
        if self.tier == Tier.NVME:
            existing = TierFile.open(config.nvme_dir, name, fingerprint=fingerprint, on_corrupt=config.on_corrupt)
            if existing is None or set(existing.groups) != set(expected):
                self.writer = TierFileWriter(
                    config.nvme_dir, name, fingerprint, sum(expected.values()), config.min_free_bytes
                )

    @classmethod
    def for_rank(cls, config: OffloadConfig, model_dir: str, arch, family, held: dict[int, list],
                 dtype: torch.dtype, device: torch.device, tag: str) -> "ExpertSink":
        """A sink for the experts the loader will put on this rank: ``held[layer]`` = (expert, (row start, stop))
        of its intermediate dim (sizes known from config.json)."""
        from tessera.models.checkpoint import CheckpointReader, weight_files
        from tessera.models.loader import read_expert

        H = arch.hidden_size
        expected: dict[str, int] = {}
        rows: dict[tuple[int, int], tuple[int, int]] = {}
        for layer, experts in held.items():
            for expert, (a, b) in experts:
                rows[(layer, expert)] = (a, b)
                meta = {
                    "gate_up": torch.empty((2 * (b - a), H), dtype=dtype, device="meta"),
                    "down": torch.empty((H, b - a), dtype=dtype, device="meta"),
                }
                expected[expert_group_name(layer, expert)] = group_nbytes(meta)
        layout = {f"{n}|{rows[_parse(n)]}|{dtype}": v for n, v in expected.items()}
        fp = fingerprint_of(sorted({str(Path(model_dir) / f) for f in weight_files(model_dir).values()}), layout)
        name = f"experts-{hashlib.sha256(str(model_dir).encode()).hexdigest()[:12]}-{tag}"

        def reload(layer: int, expert: int) -> dict[str, torch.Tensor]:
            reader = CheckpointReader(model_dir, expected_dtype=arch.dtype)
            try:
                gate_up, down = read_expert(reader, arch, family.CHECKPOINT_NAMES, layer, expert, rows[(layer, expert)],
                                            dtype)
            finally:
                reader.close()
            return {"gate_up": gate_up, "down": down}

        return cls(config, name, fp, expected, reload, device)

    # the ExpertWeights interface used while loading
    def put(self, layer: int, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        name = expert_group_name(layer, expert)
        # to host memory now: on CUDA the loader read them onto the device, where they must not pile up
        tensors = {"gate_up": gate_up.to("cpu").contiguous(), "down": down.to("cpu").contiguous()}
        if group_nbytes(tensors) != self.expected.get(name):
            raise OffloadConfigError(f"expert {name!r} has an unexpected size; the checkpoint does not match its config")
        self.local.setdefault(layer, []).append(expert)
        if self.tier == Tier.HOST:
            self.host[name] = {k: own_memory(v) for k, v in tensors.items()}
        elif self.writer is not None:
            self.writer.add(name, tensors)

    def local_experts(self, layer: int) -> list[int]:
        return sorted(self.local.get(layer, []))

    def finish(self, weights, arch, layers) -> OffloadedExperts:
        """Close the tier file and build the store and the cache; ``weights`` (the stage's resident
        ``models.loader.StageWeights``) are charged to the device budget and give the routers."""
        if self.writer is not None:
            self.writer.finish()
            self.writer = None
        # The resident weights are charged to the device budget: they must really be resident. Read
        # zero-copy, they are views of the checkpoint's memory map, which keeps the whole file mapped
        # (every page the load touched, experts included, stays in the process's memory) and lets the
        # kernel evict and re-read dense weights under a memory limit, every token (issue 14).
        for params in weights.params.values():
            for k, v in params.items():
                params[k] = own_memory(v)
        for k, v in weights.globals.items():
            weights.globals[k] = own_memory(v)
        specs = []
        for name, nbytes in self.expected.items():
            layer, expert = _parse(name)
            if self.tier == Tier.HOST:
                held = self.host[name]
                specs.append(GroupSpec(name, nbytes, lambda held=held: held))
            else:
                specs.append(GroupSpec(name, nbytes, lambda layer=layer, expert=expert: self.reload(layer, expert)))
        store = TieredStore(
            self.config, specs, {s.name: self.tier for s in specs}, fingerprint=self.fingerprint, name=self.name,
            device=self.device, external_resident_bytes=weights.nbytes(),
        )
        self.host.clear()  # the store holds the host tier now
        moe_layers = [l for l in layers if arch.moe_layers[l]]

        def gate_weight(layer: int):
            p = weights.params.get(layer)
            return None if p is None or "router" not in p else p["router"]

        cache = ExpertCache(
            store, arch.num_layers, arch.num_experts, layers=moe_layers, gate_weight=gate_weight,
            router_top_k=arch.top_k, cyclic=True,  # every forward visits the MoE layers in order
        )
        return OffloadedExperts(store, cache, {l: sorted(v) for l, v in self.local.items()})


def own_memory(t: torch.Tensor) -> torch.Tensor:
    """``t`` in anonymous memory of its own (a CPU copy), not a view of a memory-mapped file.

    The copy keeps the source's offset within a page: BLAS kernels choose their code path by the
    operands' alignment and round differently, so an offloaded engine computes bitwise what the
    in-memory engine computes on its zero-copy views. Device tensors are returned as they are.
    """
    if t.device.type != "cpu":
        return t
    nbytes = t.numel() * t.element_size()
    raw = torch.empty(nbytes + _PAGE, dtype=torch.uint8)
    start = (t.data_ptr() - raw.data_ptr()) % _PAGE
    out = raw[start : start + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


_PAGE = 4096


def _parse(name: str) -> tuple[int, int]:
    parts = name.split(".")
    return int(parts[1]), int(parts[3])
