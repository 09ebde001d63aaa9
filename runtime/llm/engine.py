"""Driver side of the MoE language-model engine (the contract in docs/DEVELOPING.md).

``LLMEngine.load`` validates the checkpoint and the plan on the driver (clear
errors before any worker loads anything), then has every rank read its own
slices. Each engine step is one ``collective_rpc`` fan-out: the scheduler
picks the batch (continuous batching over a paged KV cache), every rank runs
its stage/shard, and the last stage returns sampled tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from tessera.memory.kv_cache import BlockAllocator
from tessera.models.checkpoint import CheckpointError, read_config, weight_files
from tessera.models.registry import family_for
from tessera.memory.planner import place_llm
from tessera.parallel.coherent import EXFLOW, check_exflow
from tessera.parallel.groups import check_llm_plan
from tessera.parallel.tensor import check_tp
from tessera.errors import ConfigError
from tessera.options import DTYPES, LLMOptions, OffloadConfig, SamplingParams, from_mapping
from tessera.runtime.llm import model_runner as mr
from tessera.runtime.llm.sampler import NOT_FINITE, SampleSpec
from tessera.runtime.recovery import FAULTS, Recovery, RecoveryFailed, StepDeadline, fault_kind
from tessera.runtime.llm.scheduler import Request, Scheduler

log = logging.getLogger("tessera.llm")


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None  # None when the checkpoint has no tokenizer
    finish_reason: str  # "length" | "stop" | "error" ("abort" after abort())
    error: str | None = None


def _set_fields(options: LLMOptions) -> dict[str, Any]:
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


def _load_tokenizer(model_dir: Path):
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


class LLMEngine:
    """Generation over a Controller's workers: paged KV, continuous batching, sampling, streaming."""

    # What builds each rank's runner from the LoadSpec (at load and after every recovery).
    runner_factory = staticmethod(mr.load_runner)

    def __init__(self, controller, model_dir: Path, arch, options: LLMOptions, placement, tokenizer, key: str) -> None:
        self.controller = controller
        self.model_dir = model_dir
        self.arch = arch
        self.options = options
        self.placement = placement
        self.tokenizer = tokenizer
        self.key = key
        self.allocator = BlockAllocator(options.num_kv_blocks, options.block_size)
        self.scheduler = Scheduler(self.allocator, options.max_num_seqs, options.max_prefill_tokens, options.max_model_len)
        self.requests: dict[str, Request] = {}
        self.errors: dict[str, GenerationResult] = {}
        self.shards: list[dict[str, Any]] = []
        self.result_rank = 0
        self._ids = itertools.count()
        self._closed = False
        self._counters = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0,
                          "requests_finished": 0, "requests_failed": 0, "recoveries": 0}
        self.load_s = 0.0
        self.recovery = Recovery(controller, options.recovery, self._reload)
        self.deadline = StepDeadline(options.recovery, options.step_timeout_s)
        self.broken: str | None = None  # set when recovery gave up: every request then fails with this reason
        # Called with "start", then "done" or "failed", around a recovery (a server reports /health "recovering").
        self.on_recovery: Callable[[str], None] | None = None

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, controller, model_dir, options: LLMOptions | Mapping[str, Any] | None = None,
             offload: OffloadConfig | Mapping[str, Any] | None = None, **overrides: Any) -> "LLMEngine":
        """Validate on the driver, then load every rank's slices.

        ``options``: :class:`~tessera.options.LLMOptions` (or a dict of its
        fields); keyword ``overrides`` are more of its fields. ``offload``
        (:class:`~tessera.options.OffloadConfig`): routed experts live in host
        memory or an NVMe tier file and stream through a per-rank expert cache
        within the device budget (same tokens as without it).
        """
        started = time.perf_counter()
        model_dir = Path(model_dir)
        cfg = read_config(model_dir)
        archs = cfg.get("architectures") or []
        if not archs:
            raise CheckpointError(f"{model_dir / 'config.json'} names no architectures; it is not a causal-LM checkpoint")
        family = family_for(archs[0])
        arch = family.parse_config(cfg)
        weight_files(model_dir)  # fails now, naming the directory, if there are no safetensors
        if offload is not None:
            offload = from_mapping(OffloadConfig, offload, "offload")
        opts = from_mapping(LLMOptions, options, "LLMEngine.load")
        if overrides:
            opts = from_mapping(LLMOptions, {**_set_fields(opts), **overrides}, "LLMEngine.load")
        max_model_len = opts.max_model_len or min(arch.max_position_embeddings, 1024)
        opts = dataclasses.replace(
            opts, dtype=opts.dtype or (arch.dtype if arch.dtype in DTYPES else "float32"), max_model_len=max_model_len,
            num_kv_blocks=opts.num_kv_blocks or opts.max_num_seqs * -(-max_model_len // opts.block_size))
        if arch.sliding_window is not None and opts.max_model_len > arch.sliding_window:
            raise ConfigError(
                f"{arch.architecture} uses sliding-window attention (window {arch.sliding_window}), which tessera does "
                f"not implement; load with max_model_len <= {arch.sliding_window} so every context fits in the window"
            )
        plan = controller.placement.plan
        check_llm_plan(plan)
        check_tp(arch.num_heads, arch.num_kv_heads, plan.degree("tp"), f"{arch.architecture} on plan {plan}")
        if opts.expert_parallel_mode == EXFLOW:  # token-sharded forward (tessera.parallel.coherent)
            check_exflow(plan, arch, opts.record_routing)
        # The planner's Placement says which layers and experts every rank holds; a controller started
        # without this model (a bare mesh) gets them planned here, by the same function.
        placement = controller.placement
        resolved = str(model_dir.resolve())
        if placement.model != resolved or placement.stages is None:
            placement = place_llm(placement, resolved, arch, opts)
        key = f"{model_dir.name}-{uuid.uuid4().hex[:8]}"  # this engine's id on the workers
        engine = cls(controller, model_dir, arch, opts, placement, _load_tokenizer(model_dir), key)
        spec = mr.LoadSpec(key, resolved, opts.dtype, opts.num_kv_blocks, opts.block_size, placement.stages,
                           placement.experts, opts.record_routing, opts.expert_parallel_mode, opts.moe_dispatch,
                           offload)
        engine._load_spec = spec
        engine.shards = controller.collective_rpc("attach", args=(key, cls.runner_factory, spec))
        engine.result_rank = next(s.rank for s in engine.shards if s.returns_result)
        engine.load_s = time.perf_counter() - started
        log.info("loaded %s (%s) on %d rank(s) in %.2fs", model_dir.name, arch.architecture, len(engine.shards), engine.load_s)
        return engine

    # -- requests -----------------------------------------------------------------------

    def _tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt is text but {self.model_dir} has no tokenizer.json; pass token ids instead")
            return list(self.tokenizer.encode(prompt).ids)
        if not isinstance(prompt, Sequence) or any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
            raise ValueError(f"prompt must be a string or a sequence of integer token ids, got "
                             f"{type(prompt).__name__}" + (f" holding {next(type(t).__name__ for t in prompt if isinstance(t, bool) or not isinstance(t, int))}"
                                                            if isinstance(prompt, Sequence) else ""))
        return list(prompt)

    def _validate(self, ids: list[int], sampling) -> SamplingParams:
        if isinstance(sampling, Mapping):
            sampling = from_mapping(SamplingParams, sampling, "sampling")
        elif sampling is None:
            sampling = SamplingParams()
        elif not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be SamplingParams or a dict of its fields, got {type(sampling).__name__}")
        if not ids:
            raise ValueError("prompt is empty; give at least one token")
        bad = [t for t in ids if not 0 <= t < self.arch.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.arch.vocab_size})")
        if len(ids) >= self.options.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but the context is max_model_len={self.options.max_model_len}, "
                "leaving no room to generate; shorten the prompt or load the engine with a larger max_model_len"
            )
        bad = [t for t in sampling.stop_token_ids if t >= self.arch.vocab_size]
        if bad:
            raise ValueError(f"stop token id {bad[0]} is outside the vocabulary [0, {self.arch.vocab_size})")
        need = self.allocator.blocks_for(min(len(ids) + sampling.max_new_tokens, self.options.max_model_len))
        if need > self.allocator.num_blocks:
            raise ValueError(
                f"request needs {need} KV blocks but the cache has {self.allocator.num_blocks}; "
                "load the engine with a larger num_kv_blocks or ask for fewer max_new_tokens"
            )
        return sampling

    def check_request(self, prompt, sampling=None) -> tuple[list[int], SamplingParams]:
        """Tokenize and validate one request without queueing it: (token ids, SamplingParams), or ValueError.

        Reads only what ``load`` fixed (tokenizer, vocabulary, context, cache
        size), so a server may call it from another thread to answer a bad
        request at once, before it joins the engine's queue.
        """
        ids = self._tokenize(prompt)
        return ids, self._validate(ids, sampling)

    def check_request(self, prompt, sampling=None) -> tuple[list[int], SamplingParams]:
        """Tokenize and validate one request without queueing it: (token ids, SamplingParams), or ValueError.

        Reads only what ``load`` fixed (tokenizer, vocabulary, context, cache
        size), so a server may call it from another thread to answer a bad
        request at once, before it joins the engine's queue.
        """
        if self.broken is not None:
            raise ValueError(self.broken)
        ids = self._tokenize(prompt)
        return ids, self._validate(ids, sampling)

    def add_request(self, prompt, sampling=None) -> str:
        """Queue one request; it joins the batch at the next step. Invalid requests fail alone.

        Returns the request id. A request that cannot run is recorded with
        ``finish_reason="error"`` and its message (see :meth:`result`).
        """
        request_id = f"req-{next(self._ids)}"
        try:
            ids, params = self.check_request(prompt, sampling)
        except (ValueError, TypeError) as err:
            prompt_ids = [t for t in prompt if isinstance(t, int)] if isinstance(prompt, (list, tuple)) else []
            self.errors[request_id] = GenerationResult(request_id, prompt_ids, [], None, "error", str(err))
            self._counters["requests_failed"] += 1
            return request_id
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**31)
        stops = set(params.stop_token_ids)
        if self.options.stop_at_eos:
            stops |= set(self.arch.eos_token_ids)
        request = Request(request_id, ids, params, seed, frozenset(stops))
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[tuple[str, int, bool]]:
        """Run one engine step; returns (request id, new token, finished) for each request that advanced.

        A fault (a worker died, stalled or raised mid-step) is recovered here
        (:class:`~tessera.runtime.recovery.Recovery`): every rank restarts, the
        shards reload, and the requests in flight recompute their KV from their
        prompt and output at their next step, so no request is lost and seeded
        tokens are the same. The requests of the failed step then run one at a
        time once, so a request that keeps killing workers is found and failed
        alone. When the restart budget is spent, the requests fail with the reason.
        """
        if self._closed:
            raise RuntimeError("engine is closed")
        if self.broken is not None:
            self._fail_all(self.broken)
            return []
        batch = self.scheduler.schedule()
        if not batch:
            return []
        if any(s.request.suspect for s in batch):
            return self._step_one_at_a_time(batch)
        try:
            output, elapsed, steps = self._run(batch)
        except FAULTS as fault:
            for s in batch:
                s.request.suspect = True
            self._recover(fault)
            return []
        return self._apply(batch, output, elapsed, steps)

    def _step_one_at_a_time(self, batch) -> list[tuple[str, int, bool]]:
        """After a fault: each request of the step alone, so a poison request fails alone."""
        out = []
        for s in batch:
            if s.request.finished:
                continue
            try:
                output, elapsed, steps = self._run([s])
            except FAULTS as fault:
                s.request.solo_faults += 1
                if s.request.solo_faults >= self.options.recovery.poison_faults:
                    self._fail(s.request, f"request {s.request.request_id} crashed the workers {s.request.solo_faults} "
                                          f"times when run alone ({fault_kind(fault)}: {str(fault).splitlines()[0]}); "
                                          "failed alone, the other requests go on")
                self._recover(fault)
                return out
            s.request.suspect = False
            out += self._apply([s], output, elapsed, steps)
        return out

    def _run(self, batch):
        """One call for ``batch`` (several decode steps when nothing waits): (StepOutput, seconds, steps)."""
        seqs = tuple(
            mr.StepSeq(
                s.token_ids, s.start, tuple(s.request.blocks),
                SampleSpec(s.request.sampling.temperature, s.request.sampling.top_k, s.request.sampling.top_p,
                           s.request.seed, len(s.request.output))
                if s.samples else None,  # a prefill chunk that does not end its prompt samples nothing
            )
            for s in batch
        )
        steps = self._decode_steps(batch)
        if steps > 1:
            call = (self.key, mr.ModelRunner.decode_steps, mr.StepBatch(seqs), steps,
                    tuple(s.request.stop_ids for s in batch))
        else:
            call = (self.key, mr.ModelRunner.step, mr.StepBatch(seqs))
        units = sum(len(s.token_ids) for s in batch) * steps
        started = time.perf_counter()
        try:
            results = self.controller.collective_rpc("call", args=call, timeout_s=self.deadline.seconds(units),
                                                     stall_s=self.options.recovery.stall_floor_s)
        except FAULTS as fault:
            fault.detect_s = time.perf_counter() - started
            raise
        elapsed = time.perf_counter() - started
        self.deadline.record(elapsed, units)
        return results[self.result_rank], elapsed, steps

    def _apply(self, batch, output, elapsed: float, steps: int) -> list[tuple[str, int, bool]]:
        """Record a step's tokens on the driver (the source of truth for replays)."""
        prefill = sum(len(s.token_ids) for s in batch if s.is_prefill)
        c = self._counters
        c["steps"] += 1
        if prefill:
            c["prefill_tokens"] += prefill
            c["prefill_s"] += elapsed
        else:
            c["decode_tokens"] += sum(len(t) for t in output.tokens)
            c["decode_s"] += elapsed
        out = []
        for s, new_tokens in zip(batch, output.tokens):
            r = s.request
            r.num_computed = s.start + len(s.token_ids)  # also after a chunk that sampled nothing
            for i, token in enumerate(new_tokens):
                if token == NOT_FINITE:
                    self._fail(r, "the model's logits for this request were not finite (NaN or inf): the checkpoint's "
                                  "weights or this prompt overflow the model dtype; try float32")
                    break
                r.num_computed = s.start + len(s.token_ids) + i
                r.output.append(token)
                if token in r.stop_ids:
                    self.scheduler.finish(r, "stop")
                elif len(r.output) >= r.sampling.max_new_tokens or len(r.prompt) + len(r.output) >= self.options.max_model_len:
                    self.scheduler.finish(r, "length")
                if r.finished:
                    c["requests_finished"] += 1
                out.append((r.request_id, token, r.finished))
                if r.finished:
                    break
        if self.recovery.records and self.recovery.records[-1].replay_s == 0.0 and self._replaying:
            self.recovery.records[-1].replay_s = elapsed  # the first step after a recovery recomputes the KV
            self._replaying = False
        return out

    def _decode_steps(self, batch) -> int:
        """How many decode steps the next call may run: >1 only when every sequence decodes,
        nothing waits to join, there is one pipeline stage, and every sequence has that many tokens left."""
        if self.options.decode_steps == 1 or self.scheduler.has_prefill() or any(s.is_prefill for s in batch):
            return 1
        if self.controller.placement.plan.degree("pp") != 1:
            return 1
        left = min(
            min(s.request.sampling.max_new_tokens - len(s.request.output),
                self.options.max_model_len - len(s.request.prompt) - len(s.request.output))
            for s in batch
        )
        return max(1, min(self.options.decode_steps, left))

    _replaying = False

    def _recover(self, fault: BaseException) -> None:
        """A fault: restart every rank, reload the shards; every running request recomputes its KV next step.

        The driver holds every request's prompt and output, so nothing is lost: a
        request's next step feeds ``prompt + output`` (not yet in the new cache)
        and samples the next token; sampling is seeded by (request seed, token
        index), so the replayed tokens are identical.
        """
        log.warning("%s; restarting the workers and replaying %d request(s) in flight", fault,
                    len(self.scheduler.running))
        self._tell("start")
        try:
            self.recovery.recover(fault, detect_s=getattr(fault, "detect_s", 0.0))
        except RecoveryFailed as failed:
            self.broken = f"the workers could not be recovered: {failed}"
        except Exception as err:  # noqa: BLE001 - e.g. the placement cannot be satisfied any more
            self.broken = f"the workers could not be restarted: {type(err).__name__}: {err}"
        if self.broken is not None:
            self._fail_all(self.broken)
            self._tell("failed")
            return
        for r in self.scheduler.running:
            # The new workers' caches are empty: each request feeds prompt + output again (in prefill-budget
            # chunks, like any prompt) before it decodes on.
            r.num_computed = 0
        self._replaying = True
        self._counters["recoveries"] += 1
        self._tell("done")

    def _tell(self, state: str) -> None:
        if self.on_recovery is not None:
            self.on_recovery(state)

    def _reload(self) -> None:
        """Attach this model's shards to the restarted workers (Recovery's reload step)."""
        self.shards = self.controller.collective_rpc("attach", args=(self.key, self.runner_factory, self._load_spec))
        self.deadline.expect_cold_start()

    def _fail(self, request: Request, message: str) -> None:
        """Finish ``request`` with an error (its KV blocks freed); the others go on."""
        request.error = message
        self.scheduler.finish(request, "error")
        self._counters["requests_failed"] += 1

    def _fail_all(self, message: str) -> None:
        for request in list(self.scheduler.running) + list(self.scheduler.waiting):
            if request in self.scheduler.waiting:
                self.scheduler.waiting.remove(request)
            self._fail(request, message)

    def result(self, request_id: str) -> GenerationResult:
        if request_id in self.errors:
            return self.errors[request_id]
        r = self.requests[request_id]
        text = self.tokenizer.decode(r.output) if self.tokenizer is not None else None
        return GenerationResult(r.request_id, list(r.prompt), list(r.output), text, r.finish_reason or "running",
                                r.error)

    def pop(self, request_id: str) -> GenerationResult:
        """The request's result, and the engine forgets it (the caller owns the request's lifetime)."""
        res = self.result(request_id)
        self.errors.pop(request_id, None)
        self.requests.pop(request_id, None)
        return res

    # -- the contract -------------------------------------------------------------------

    def generate(self, prompts, sampling=None) -> list[GenerationResult]:
        """Generate for one prompt or a list (text or token ids); one result per prompt, in order.

        ``sampling`` is one SamplingParams (or dict) for all, or one per prompt. A
        request with a bad prompt or bad sampling parameters gets ``finish_reason
        "error"`` and its message; the others run normally.
        """
        single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and len(prompts) > 0
                                              and isinstance(prompts[0], int) and not isinstance(prompts[0], bool))
        plist = [prompts] if single else list(prompts)
        if isinstance(sampling, (list, tuple)):
            if len(sampling) != len(plist):
                raise ValueError(f"{len(sampling)} sampling params for {len(plist)} prompts; give one, or one per prompt")
            slist = list(sampling)
        else:
            slist = [sampling] * len(plist)
        ids = [self.add_request(p, s) for p, s in zip(plist, slist)]
        pending = {i for i in ids if i not in self.errors}
        while pending:
            self.step()
            if not self.scheduler.running and self.scheduler.waiting and pending:
                for request in list(self.scheduler.waiting):  # nothing runs and nothing can be admitted
                    self.scheduler.waiting.remove(request)
                    self._fail(request, "the KV cache cannot hold this request next to the others; load the engine "
                                        "with a larger num_kv_blocks or ask for fewer max_new_tokens")
            pending = {i for i in pending if not self.requests[i].finished}
        return [self.pop(i) for i in ids]

    def stream(self, prompt, sampling=None) -> Iterator[int]:
        """Yield the token ids of one request as they are produced (other requests keep running)."""
        request_id = self.add_request(prompt, sampling)
        if request_id in self.errors:
            raise ValueError(self.pop(request_id).error)
        request = self.requests[request_id]
        sent = 0
        try:
            while not request.finished:
                self.step()
                while sent < len(request.output):
                    yield request.output[sent]
                    sent += 1
        finally:  # also when the caller stops iterating early: free the request's KV blocks
            self.abort(request_id)
            self.pop(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a queued or running request now (finish_reason "abort"); its KV blocks are freed."""
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return
        if request in self.scheduler.waiting:
            self.scheduler.waiting.remove(request)
        self.scheduler.finish(request, "abort")

    def score(self, prompt) -> "torch.Tensor":
        """Logits [len(prompt), vocab] of one prompt (fp32, on the driver), through the same paged path.

        For checking numerics against a reference; generation does not need it.
        """
        ids = self._tokenize(prompt)
        self._validate(ids, SamplingParams(max_new_tokens=1))
        blocks = self.allocator.allocate(self.allocator.blocks_for(len(ids)))
        try:
            seq = mr.StepSeq(tuple(ids), 0, tuple(blocks), SampleSpec(0.0, 0, 1.0, 0, 0))
            results = self.controller.collective_rpc(
                "call", args=(self.key, mr.ModelRunner.step, mr.StepBatch((seq,), return_logits="all")),
                timeout_s=self.options.step_timeout_s
            )
        finally:
            self.allocator.free(blocks)
        return results[self.result_rank].logits[0]

    def stats(self) -> dict:
        c = dict(self._counters)
        c["prefill_tok_s"] = c["prefill_tokens"] / c["prefill_s"] if c["prefill_s"] else 0.0
        c["decode_tok_s"] = c["decode_tokens"] / c["decode_s"] if c["decode_s"] else 0.0
        c.update(
            model=self.arch.architecture,
            plan=str(self.controller.placement.plan),
            load_s=self.load_s,
            kv_blocks_total=self.allocator.num_blocks,
            kv_blocks_free=self.allocator.num_free,
            recovery=self.recovery.summary(),
            broken=self.broken,
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            shards=[dataclasses.asdict(s) for s in self.shards],
        )
        return c

    def routing_trace(self) -> dict:
        """Top-k expert ids chosen at every MoE layer for every token processed since load (or the last clear).

        Returns ``{"model", "num_layers", "num_experts", "top_k", "moe_layers",
        "layers": {layer: int32 array [tokens, top_k]}}``; tokens are in step order
        (prefill tokens of each sequence, then one per decode step).
        Requires ``LLMEngine.load(..., record_routing=True)``.
        """
        if not self.options.record_routing:
            raise RuntimeError("routing is not recorded; load the engine with record_routing=True")
        layers: dict[int, Any] = {}
        for part in self.controller.collective_rpc("call", args=(self.key, mr.ModelRunner.routing_trace)):
            if part:
                layers.update(part)
        return {
            "model": self.arch.architecture,
            "model_dir": str(self.model_dir),
            "num_layers": self.arch.num_layers,
            "num_experts": self.arch.num_experts,
            "top_k": self.arch.top_k,
            "moe_layers": list(self.arch.moe_layer_ids),
            "layers": dict(sorted(layers.items())),
        }

    def offload_stats(self) -> list[dict[str, Any] | None]:
        """Per rank: expert-cache and tier counters (hits, misses, bytes read, peaks); None where not offloaded."""
        return self.controller.collective_rpc("call", args=(self.key, mr.ModelRunner.offload_stats))

    def clear_routing_trace(self) -> None:
        self.controller.collective_rpc("call", args=(self.key, mr.ModelRunner.clear_routing))

    def placement_report(self) -> list[str]:
        """One line per rank: mesh coordinates, layers, experts held (with slice when sliced), bytes read."""
        lines = []
        tp = self.controller.placement.plan.degree("tp")
        moe_layers = [l for l in self.arch.moe_layer_ids]
        for s in self.shards:
            c = s.coords
            experts = "no MoE layers"
            if moe_layers and self.placement.experts is not None:
                held = self.placement.experts.local_experts(moe_layers[0], c["ep"] * tp + c["tp"], tp)
                slices = {n for _, _, n in held}
                experts = f"experts {[e for e, _, _ in held]}"
                if slices != {1}:
                    experts += f" (slice {held[0][1] + 1}/{held[0][2]} of each)"
                experts += " in MoE layer " + str(moe_layers[0])
            layers = f"layers {s.layers[0]}-{s.layers[-1]}" if s.layers else "no layers"
            lines.append(
                f"rank {s.rank} pp={c['pp']} ep={c['ep']} tp={c['tp']}: {layers}, "
                f"{experts}, {s.bytes_read / 1e6:.2f} MB read in {s.load_s:.2f}s"
            )
        return lines

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.controller.collective_rpc("detach", args=(self.key,))
        except Exception:  # noqa: BLE001 - closing must not fail because a worker is gone
            log.warning("could not unload %s from every worker", self.key)

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
