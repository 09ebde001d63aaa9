"""Worker side of the LLM engine: loads this rank's shard of a model and runs engine steps.

The driver attaches one :class:`ModelRunner` per loaded model to every worker
(``Worker.attach(key, load_runner, spec)``) and runs its methods through
``Worker.call`` (one engine step is one call of :meth:`ModelRunner.step`); one
set of workers can hold several models under their keys (tests load many tiny
ones on one controller).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tessera.memory.kv_cache import PagedKVCache, SeqSlice, build_metadata
from tessera.models.checkpoint import read_config
from tessera.models.loader import load_stage
from tessera.models.moe_layers import MoEStage, ParallelView
from tessera.models.registry import family_for
from tessera.parallel.expert import ExpertPlacement
from tessera.parallel.groups import LLMGroups, llm_groups
from tessera.parallel.pipeline import micro_batches, run_pipeline, stage_layers
from tessera.runtime.llm.sampler import SampleSpec, sample

log = logging.getLogger("tessera.llm.runner")


@dataclass(frozen=True)
class LoadSpec:
    """Everything a rank needs to load its shard (built and validated on the driver)."""

    key: str
    model_dir: str
    dtype: str
    num_blocks: int
    block_size: int
    placement: ExpertPlacement | None
    record_routing: bool = False
    moe_dispatch: str = "auto"  # see tessera.parallel.expert.DISPATCH_MODES
    offload: Any = None  # tessera.options.OffloadConfig: experts in host/NVMe tiers behind an expert cache


@dataclass(frozen=True)
class StepSeq:
    """One sequence in a step: its new tokens, where they start, its block table, how to sample."""

    token_ids: tuple[int, ...]
    start: int
    block_table: tuple[int, ...]
    sample: SampleSpec | None  # None: no token wanted (not used by the engine today)


@dataclass(frozen=True)
class StepBatch:
    seqs: tuple[StepSeq, ...]
    return_logits: str = "none"  # "none" | "last" | "all" (tests compare prefill logits)


@dataclass
class ModelRunner:
    spec: LoadSpec
    stage: MoEStage
    groups: LLMGroups
    first: bool
    last: bool
    load_s: float
    bytes_read: int
    info: dict[str, Any] = field(default_factory=dict)  # what this rank holds (the engine's placement report)
    stats: dict[str, float] = field(default_factory=lambda: {"steps": 0, "tokens": 0, "compute_s": 0.0})

    def describe(self) -> dict[str, Any]:
        return dict(self.info)

    def close(self) -> None:
        self.stage.cache = None
        self.stage.params.clear()
        close_experts = getattr(self.stage.experts, "close", None)  # offloaded experts hold files and buffers
        if close_experts is not None:
            close_experts()

    @property
    def returns_result(self) -> bool:
        return self.last and self.groups.moe_rank == 0

    def step(self, batch: StepBatch, every_rank_samples: bool = False) -> dict[str, Any] | None:
        """One forward over the batch; the result rank samples (every last-stage rank when asked)."""
        started = time.perf_counter()
        st, g = self.stage, self.groups
        arch = st.arch
        dtype = next(iter(st.params.values()))["attn_norm"].dtype if st.params else torch.float32
        tokens: list[int] = []
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
            tokens.extend(sample(last.cpu(), [s.sample for s in chunk]))  # seeded CPU generators

        chunk_meta: dict[int, Any] = {}
        chunks = micro_batches(list(batch.seqs), g.pp)
        with torch.inference_mode():
            run_pipeline(
                chunks, self.first, self.last, g.prev_rank, g.next_rank,
                tokens_of=lambda c: sum(len(s.token_ids) for s in c), hidden=arch.hidden_size, dtype=dtype,
                start=start, body=body, finish=finish,
            )
        self.stats["steps"] += 1
        self.stats["tokens"] += sum(len(s.token_ids) for s in batch.seqs)
        self.stats["compute_s"] += time.perf_counter() - started
        if every_rank_samples:
            return {"tokens": tokens}
        if not self.returns_result:
            return None
        out: dict[str, Any] = {"tokens": tokens}
        if batch.return_logits != "none":
            out["logits"] = [t.cpu().clone() for t in logits_out]
        return out

    def decode_steps(self, batch: StepBatch, steps: int, stop_ids: tuple[frozenset[int], ...]) -> dict[str, Any] | None:
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
            tokens = self.step(StepBatch(step_seqs), every_rank_samples=True)["tokens"]
            for i, token in zip(active, tokens):
                out[i].append(token)
            active = [i for i in active if out[i][-1] not in stop_ids[i]]
            if not active:
                break
        return {"tokens": out} if self.returns_result else None

    def routing_trace(self) -> dict[int, torch.Tensor] | None:
        if not self.stage.record_routing or self.groups.moe_rank != 0:
            return None
        return {layer: torch.cat(parts).cpu().numpy() for layer, parts in self.stage.routing.items()}

    def clear_routing(self) -> None:
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
    layers = stage_layers(arch.num_layers, groups.pp, groups.pp_rank)
    first, last = groups.pp_rank == 0, groups.pp_rank == groups.pp - 1
    pv = ParallelView(groups.tp_comm, groups.moe_comm)
    dtype = getattr(torch, spec.dtype)
    sink = None
    if spec.offload is not None:
        from tessera.offload.moe import sink_for_stage

        sink = sink_for_stage(spec, worker, spec.model_dir, arch, family, layers, pv.moe_rank, dtype)
    stage, nbytes = load_stage(spec.model_dir, arch, family, layers, first, last, pv, spec.placement, dtype,
                               expert_weights=sink, dispatch_mode=spec.moe_dispatch, device=worker.device)
    if sink is not None:
        stage.experts = sink.finish(stage)
    if arch.attention == "mla":  # one latent + shared roped key per token (see MoEStage.latent_attention)
        heads, kdim, vdim = 1, arch.kv_lora_rank + arch.rope_dim, 0
    else:
        heads, kdim, vdim = stage.local_kv_heads, arch.qk_head_dim, arch.v_head_dim
    stage.cache = PagedKVCache(stage.layers, spec.num_blocks, spec.block_size, heads, kdim, vdim, dtype, worker.device)
    stage.record_routing = spec.record_routing and groups.moe_rank == 0
    stage.coherent_sharded = spec.placement is not None and spec.placement.mode == "exflow"  # parallel.coherent
    runner = ModelRunner(spec, stage, groups, first, last, time.perf_counter() - started, nbytes)
    runner.info = {
        "rank": worker.rank,
        "coords": {"pp": groups.pp_rank, "ep": groups.ep_rank, "tp": groups.tp_rank},
        "layers": [stage.layers[0], stage.layers[-1]] if stage.layers else [],
        "experts": {l: stage.experts.local_experts(l) for l in stage.layers if arch.moe_layers[l]},
        "bytes_read": nbytes,
        "expert_bytes": stage.experts.nbytes(),
        "kv_cache_bytes": stage.cache.nbytes(),
        "load_s": runner.load_s,
        "returns_result": runner.returns_result,
    }
    return runner
