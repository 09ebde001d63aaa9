"""Worker side of the LLM engine: loads this rank's shard of a model and runs engine steps.

The driver attaches one :class:`ModelRunner` per loaded model to every worker
(``Worker.attach(key, load_runner, spec)``) and runs its methods through
``Worker.call`` (one engine step is one call of :meth:`ModelRunner.step`); one
set of workers can hold several models under their keys (tests load many tiny
ones on one controller). Inputs (:class:`LoadSpec`, :class:`StepBatch`) and
outputs (:class:`ShardInfo`, :class:`StepOutput`) are frozen dataclasses.

Loading, in order: the rank's process groups (``parallel/groups``), its
slicer and shard hooks (``parallel/parallelize``), its weights
(``models/loader``, experts into memory or an offload tier), its KV cache,
then the stage (``models/moe_layers.MoEStage``), built once with everything
plugged in.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tessera.memory.expert_placement import ExpertPlacement
from tessera.models.checkpoint import read_config
from tessera.models.loader import load_stage_weights
from tessera.models.moe_layers import ExpertWeights, MoEStage, RoutingRecorder
from tessera.models.paged_attention import PagedKVCache, SeqSlice, build_metadata
from tessera.models.registry import family_for
from tessera.options import OffloadConfig
from tessera.parallel.groups import LLMGroups, llm_groups
from tessera.parallel.parallelize import parallelize_moe_stage
from tessera.parallel.pipeline import StageSchedule, micro_batches
from tessera.runtime.llm.sampler import NOT_FINITE, SampleSpec, sample

log = logging.getLogger("tessera.llm.runner")


@dataclass(frozen=True)
class LoadSpec:
    """Everything a rank needs to load its shard (built and validated on the driver, from the Placement)."""

    key: str
    model_dir: str
    dtype: str
    num_blocks: int
    block_size: int
    stages: tuple[tuple[int, ...], ...]  # layers of each pipeline stage
    experts: ExpertPlacement | None
    record_routing: bool = False
    ep_mode: str = "standard"  # standard | coherent | exflow
    moe_dispatch: str = "auto"  # auto | all_to_all | all_reduce
    offload: OffloadConfig | None = None  # experts in host/NVMe tiers behind an expert cache


@dataclass(frozen=True)
class StepSeq:
    """One sequence in a step: its new tokens, where they start, its block table, how to sample."""

    token_ids: tuple[int, ...]
    start: int
    block_table: tuple[int, ...]
    sample: SampleSpec | None  # None: no token wanted (a prefill chunk that does not end its prompt; a KV rebuild)


@dataclass(frozen=True)
class StepBatch:
    seqs: tuple[StepSeq, ...]
    return_logits: str = "none"  # "none" | "last" | "all" (tests compare prefill logits)


@dataclass(frozen=True)
class StepOutput:
    """What the result rank returns: per sequence, the tokens sampled (one per decode step run; none for a
    sequence that asked for none), and logits if asked.

    A token equal to ``sampler.NOT_FINITE`` means that sequence's logits were not finite (its request fails alone).
    """

    tokens: tuple[tuple[int, ...], ...]
    logits: tuple[torch.Tensor, ...] | None = None


@dataclass(frozen=True)
class ShardInfo:
    """What one rank holds (the engine's placement report)."""

    rank: int
    coords: dict[str, int]
    layers: tuple[int, ...]
    experts: dict[int, list[int]]
    bytes_read: int
    expert_bytes: int
    kv_cache_bytes: int
    load_s: float
    returns_result: bool


@dataclass
class ModelRunner:
    spec: LoadSpec
    stage: MoEStage
    groups: LLMGroups
    first: bool
    last: bool
    info: ShardInfo
    schedule: StageSchedule
    stats: dict[str, float] = field(default_factory=lambda: {"steps": 0, "tokens": 0, "compute_s": 0.0})

    def describe(self) -> ShardInfo:
        return self.info

    def close(self) -> None:
        self.stage.params.clear()
        close_experts = getattr(self.stage.experts, "close", None)  # offloaded experts hold files and buffers
        if close_experts is not None:
            close_experts()

    @property
    def returns_result(self) -> bool:
        return self.last and self.groups.moe_rank == 0

    def step(self, batch: StepBatch, every_rank_samples: bool = False) -> StepOutput | None:
        """One forward over the batch; the result rank samples (every last-stage rank when asked)."""
        started = time.perf_counter()
        st, g = self.stage, self.groups
        arch = st.arch
        dtype = next(iter(st.params.values()))["attn_norm"].dtype if st.params else torch.float32
        tokens: list[tuple[int, ...]] = []
        logits_out: list[torch.Tensor] = []

        def start(chunk):
            ids = torch.tensor([t for s in chunk for t in s.token_ids], dtype=torch.int64, device=st.cache.device)
            return st.embed(ids)

        def body(chunk, h):
            meta = build_metadata([SeqSlice(s.start, len(s.token_ids), s.block_table) for s in chunk], st.cache.block_size)
            meta = meta.to(st.cache.device)
            chunk_meta[id(chunk)] = meta
            return st.forward(h, meta)

        def finish(chunk, h):
            # Every last-stage rank runs the head (its all-gather is collective over tp); one samples.
            meta = chunk_meta[id(chunk)]
            if batch.return_logits == "all":
                logits = st.head(h)
                last = logits[meta.last_index]
            else:
                logits = last = st.head(h[meta.last_index])
            if not (self.returns_result or every_rank_samples):
                return
            if batch.return_logits == "all":
                offsets = torch.cumsum(torch.tensor([0] + [len(s.token_ids) for s in chunk]), 0).tolist()
                logits_out.extend(logits[offsets[i] : offsets[i + 1]] for i in range(len(chunk)))
            elif batch.return_logits == "last":
                logits_out.extend(last)
            wanted = [i for i, s in enumerate(chunk) if s.sample is not None]
            drawn = iter(sample(last[wanted].cpu(), [chunk[i].sample for i in wanted]) if wanted else [])  # seeded CPU generators
            tokens.extend((next(drawn),) if s.sample is not None else () for s in chunk)

        chunk_meta: dict[int, Any] = {}
        with torch.inference_mode():
            for chunk in micro_batches(list(batch.seqs), g.pp):  # stages overlap on micro-batches of sequences
                rows = sum(len(s.token_ids) for s in chunk)
                self.schedule(lambda: {"h": start(chunk)}, lambda c: {"h": body(chunk, c["h"])},
                              lambda c: finish(chunk, c["h"]), expect={"h": ((rows, arch.hidden_size), dtype)})
            self.schedule.wait()
        self.stats["steps"] += 1
        self.stats["tokens"] += sum(len(s.token_ids) for s in batch.seqs)
        self.stats["compute_s"] += time.perf_counter() - started
        if not (self.returns_result or every_rank_samples):
            return None
        logits = tuple(t.cpu().clone() for t in logits_out) if batch.return_logits != "none" else None
        return StepOutput(tuple(tokens), logits)

    def decode_steps(self, batch: StepBatch, steps: int, stop_ids: tuple[frozenset[int], ...]) -> StepOutput | None:
        """Up to ``steps`` decode steps in one call, so the driver is not on the per-token path.

        Needs one pipeline stage: every rank then holds the same all-gathered
        logits and samples the same token (seeded per request and token index),
        which is fed straight back as the next input. A sequence leaves the loop
        after a stop token; the caller keeps ``steps`` within every sequence's
        token budget and its reserved KV blocks.
        """
        if self.groups.pp != 1:
            raise RuntimeError("multi-step decode needs pp=1 (the first stage cannot see the last stage's tokens)")
        seqs = batch.seqs
        out: list[list[int]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        for j in range(steps):
            step_seqs = tuple(
                StepSeq((out[i][-1] if j else seqs[i].token_ids[0],), seqs[i].start + j, seqs[i].block_table,
                        dataclasses.replace(seqs[i].sample, index=seqs[i].sample.index + j))
                for i in active
            )
            tokens = self.step(StepBatch(step_seqs), every_rank_samples=True).tokens
            for i, (token,) in zip(active, tokens):
                out[i].append(token)
            active = [i for i in active if out[i][-1] not in stop_ids[i] and out[i][-1] != NOT_FINITE]
            if not active:
                break
        return StepOutput(tuple(tuple(t) for t in out)) if self.returns_result else None

    def routing_trace(self) -> dict[int, Any] | None:
        if self.stage.routing is None:
            return None
        return self.stage.routing.trace()

    def clear_routing(self) -> None:
        if self.stage.routing is not None:
            self.stage.routing.clear()

    def runner_stats(self) -> dict[str, float]:
        return dict(self.stats)

    def offload_stats(self) -> dict[str, Any] | None:
        """This rank's offload counters (None when the experts are not offloaded)."""
        stats = getattr(self.stage.experts, "stats", None)
        return stats() if callable(stats) else None


def load_runner(worker, spec: LoadSpec) -> ModelRunner:
    """Load this rank's shard of ``spec.model_dir`` (``Worker.attach``'s factory)."""
    started = time.perf_counter()
    groups = llm_groups(worker)  # small per-layer collectives of CPU ranks on one node meet in shared memory
    cfg = read_config(spec.model_dir)
    family = family_for(cfg["architectures"][0])
    arch = family.parse_config(cfg)
    layers = spec.stages[groups.pp_rank]
    first, last = groups.pp_rank == 0, groups.pp_rank == groups.pp - 1
    parallel = parallelize_moe_stage(arch, family, groups, spec.experts, spec.ep_mode, spec.moe_dispatch)
    slicer = parallel.slicer
    held = {
        layer: [(e, slicer.expert_rows(i, n)) for e, i, n in spec.experts.local_experts(layer, groups.moe_rank, groups.tp)]
        for layer in layers if arch.moe_layers[layer]
    } if spec.experts is not None else {}
    dtype = getattr(torch, spec.dtype)
    if spec.offload is not None:
        from tessera.offload.moe import ExpertSink

        sink = ExpertSink.for_rank(spec.offload, spec.model_dir, arch, family, held, dtype, worker.device,
                                   f"rank{worker.rank}of{worker.world_size}")
    else:
        sink = ExpertWeights()
    weights = load_stage_weights(spec.model_dir, arch, family, layers, first, last, slicer, held, sink, dtype,
                                 worker.device)
    experts = sink.finish(weights, arch, layers) if spec.offload is not None else sink
    heads, kdim, vdim = arch.kv_geometry(slicer.local_kv_heads)
    cache = PagedKVCache(layers, spec.num_blocks, spec.block_size, heads, kdim, vdim, dtype, worker.device)
    recorder = RoutingRecorder() if spec.record_routing and groups.moe_rank == 0 else None
    stage = MoEStage(arch, tuple(layers), weights.params, weights.globals, slicer.vocab_start, experts, cache,
                     slicer.local_heads, slicer.local_kv_heads, parallel.ops, recorder)
    load_s = time.perf_counter() - started
    info = ShardInfo(
        rank=worker.rank,
        coords={"pp": groups.pp_rank, "ep": groups.ep_rank, "tp": groups.tp_rank},
        layers=tuple(layers),
        experts={l: experts.local_experts(l) for l in layers if arch.moe_layers[l]},
        bytes_read=weights.bytes_read,
        expert_bytes=experts.nbytes(),
        kv_cache_bytes=cache.nbytes(),
        load_s=load_s,
        returns_result=last and groups.moe_rank == 0,
    )
    schedule = StageSchedule(groups.pp_rank, groups.pp, groups.prev_rank, groups.next_rank, worker.device)
    return ModelRunner(spec, stage, groups, first, last, info, schedule)
