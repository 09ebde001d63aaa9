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
cache) is the one record of progress: a running request feeds every token
of ``prompt + output`` not yet cached. That is one token when it decodes, a
prompt chunk while it prefills, and, after a recovery emptied the workers'
caches (the engine sets ``num_computed`` to 0), its whole prompt and output
again, in chunks of the same budget, before it decodes on.
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
    error: str | None = None
    suspect: bool = False  # was in a step that faulted: runs alone next (the engine finds a poison request)
    solo_faults: int = 0  # faults while running alone

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        """Tokens of the sequence so far: prompt and output."""
        return len(self.prompt) + len(self.output)

    @property
    def prefilling(self) -> bool:
        """More than the last token is missing from the cache: the prompt (or, after a recovery, prompt and
        output) goes in chunks before decoding."""
        return self.num_computed < max(len(self.prompt), self.length - 1)

    def tokens(self, start: int, count: int) -> tuple[int, ...]:
        return tuple((self.prompt + self.output)[start : start + count])


@dataclass(frozen=True)
class Scheduled:
    """One request's part of a step: ``token_ids`` go to cache positions ``start ..``."""

    request: Request
    token_ids: tuple[int, ...]
    start: int

    @property
    def is_prefill(self) -> bool:
        """Prompt tokens (a whole prompt or one chunk of it) or a recovery's catch-up, not a decode step."""
        return self.start < len(self.request.prompt) or len(self.token_ids) > 1

    @property
    def samples(self) -> bool:
        """Whether this slice yields a token: it reaches the end of the request's tokens (a decode step, the
        chunk that ends the prompt, or the chunk that ends a recovery's catch-up)."""
        return self.start + len(self.token_ids) >= self.request.length


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
        batch = [Scheduled(r, r.tokens(r.num_computed, 1), r.num_computed) for r in self.running if not r.prefilling]
        budget = self.max_prefill_tokens
        for r in self.running:  # prompts (or catch-ups) part-way through go on first, oldest first
            if budget <= 0:
                break
            if r.prefilling:
                n = min(r.length - r.num_computed, budget)
                batch.append(Scheduled(r, r.tokens(r.num_computed, n), r.num_computed))
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
