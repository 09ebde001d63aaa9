"""Continuous-batching scheduler with chunked prefill: which requests run in the next step, and their KV blocks.

Every step decodes one token for each running request whose prompt is in
the cache, then spends a prefill token budget (``max_prefill_tokens``) on
prompts: first on the prompts of running requests that are part-way through
their prefill (oldest first), then on admitting waiting requests while
sequence slots, the budget and KV blocks allow. A prompt longer than what
is left of the budget is prefilled in chunks over several steps, each chunk
interleaved with the decode steps of the others (DeepSpeed-FastGen's Dynamic
SplitFuse, vLLM's chunked prefill): one long prompt never makes a step
whose prefill exceeds the budget, so it never stalls the running requests
for more than one chunk's time. A chunk that does not end its prompt samples
nothing (:attr:`Scheduled.samples`); the chunk that ends it samples the
request's first token. Chunks attend to the cached K/V of the earlier ones,
so the tokens are those of a whole-prompt prefill.

A request reserves the blocks for its prompt plus its ``max_new_tokens``
(capped at the context) when admitted, so a running request never waits for
memory and nothing is ever preempted; requests join and leave the batch
between any two steps. ``Request.num_computed`` (tokens whose K/V are in the
cache) is the one record of progress: a running request with
``num_computed < len(prompt)`` is still prefilling.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tessera.memory.kv_cache import BlockAllocator


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    sampling: Any  # SamplingParams
    seed: int
    stop_ids: frozenset[int]
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        """Part of the prompt is not in the cache yet (it gets a chunk at a later step)."""
        return self.num_computed < len(self.prompt)


@dataclass(frozen=True)
class Scheduled:
    """One request's part of a step: ``token_ids`` go to cache positions ``start ..``."""

    request: Request
    token_ids: tuple[int, ...]
    start: int

    @property
    def is_prefill(self) -> bool:
        """The tokens are prompt tokens (a whole prompt or one chunk of it), not a decode step."""
        return self.start < len(self.request.prompt)

    @property
    def samples(self) -> bool:
        """Whether this slice yields a token: a decode step, or the chunk that ends the prompt."""
        return self.start + len(self.token_ids) >= len(self.request.prompt)


class Scheduler:
    """``max_prefill_tokens`` is the prefill token budget of one step (the chunk size of a long prompt)."""

    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_prefill_tokens: int, max_model_len: int) -> None:
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def reserve_tokens(self, request: Request) -> int:
        return min(len(request.prompt) + request.sampling.max_new_tokens, self.max_model_len)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def has_prefill(self) -> bool:
        """A running request still prefilling, or a request waiting to start (the next step prefills)."""
        return bool(self.waiting) or any(r.prefilling for r in self.running)

    def schedule(self) -> list[Scheduled]:
        batch = [Scheduled(r, (r.output[-1],), r.num_computed) for r in self.running if not r.prefilling]
        budget = self.max_prefill_tokens
        for r in self.running:  # prompts part-way through their prefill go on first, oldest first
            if budget <= 0:
                break
            if r.prefilling:
                n = min(len(r.prompt) - r.num_computed, budget)
                batch.append(Scheduled(r, tuple(r.prompt[r.num_computed : r.num_computed + n]), r.num_computed))
                budget -= n
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            request = self.waiting[0]
            need = self.allocator.blocks_for(self.reserve_tokens(request))
            if not self.allocator.can_allocate(need):
                break
            self.waiting.popleft()
            request.blocks = self.allocator.allocate(need)
            self.running.append(request)
            n = min(len(request.prompt), budget)
            batch.append(Scheduled(request, tuple(request.prompt[:n]), 0))
            budget -= n
        return batch

    def finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        if request in self.running:
            self.running.remove(request)
        self.allocator.free(request.blocks)
        request.blocks = []
