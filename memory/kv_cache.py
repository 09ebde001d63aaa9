"""The paged KV cache's block allocator (driver side).

The cache is a pool of fixed-size blocks; each sequence owns a *block table*
(list of block ids) so sequences of any length share one pool without
fragmentation and join or leave the batch between steps (continuous
batching). The scheduler owns the allocator; workers only receive block
tables and write/read the slots those tables name (the storage and the
attention over it are model math: ``models/paged_attention.py``).
"""

from __future__ import annotations

from typing import Sequence

from tessera.errors import ConfigError


class BlockAllocator:
    """Free list of KV blocks shared by all sequences (same ids on every rank)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ConfigError(f"KV cache needs >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV cache out of blocks: asked for {n}, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: Sequence[int]) -> None:
        self._free.extend(reversed(list(blocks)))
