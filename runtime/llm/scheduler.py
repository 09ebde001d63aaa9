"""Continuous-batching scheduler: which requests run in the next step, and their KV blocks.

Every step decodes one token for each running request and admits waiting
requests (whole-prompt prefill) while sequence slots, the prefill token budget
and KV blocks allow. A request reserves the blocks for its prompt plus its
``max_new_tokens`` (capped at the context) when admitted, so a running
request never waits for memory and nothing is ever preempted; requests join
and leave the batch between any two steps.
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


@dataclass(frozen=True)
class Scheduled:
    request: Request
    token_ids: tuple[int, ...]
    start: int

    @property
    def is_prefill(self) -> bool:
        return self.start == 0 or len(self.token_ids) > 1


class Scheduler:
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

    def schedule(self) -> list[Scheduled]:
        # A running request feeds every token whose K/V is not cached yet: its last output token when
        # decoding, or prompt + output after a recovery emptied the workers' caches.
        batch = [Scheduled(r, tuple((r.prompt + r.output)[r.num_computed:]), r.num_computed) for r in self.running]
        prefill = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            need = self.allocator.blocks_for(self.reserve_tokens(request))
            if not self.allocator.can_allocate(need):
                break
            if prefill and prefill + len(request.prompt) > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            request.blocks = self.allocator.allocate(need)
            self.running.append(request)
            batch.append(Scheduled(request, tuple(request.prompt), 0))
            prefill += len(request.prompt)
        return batch

    def finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        if request in self.running:
            self.running.remove(request)
        self.allocator.free(request.blocks)
        request.blocks = []
