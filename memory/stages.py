"""Where pipeline stages cut a model: contiguous layer (or block) ranges of balanced bytes.

One function for both engines: the planner cuts a language model's decoder
layers and a diffusion transformer's blocks (its block lists as one sequence)
the same way, and the loaders read the ranges from the Placement.
"""

from __future__ import annotations

from tessera.errors import ConfigError


def check_stages(num_blocks: int, pp: int, what: str = "the model") -> None:
    """Every stage needs at least one layer/block."""
    if pp < 1 or pp > num_blocks:
        raise ConfigError(f"pp={pp} pipeline stages for {what} of {num_blocks} blocks: every stage needs "
                          f"at least one block; use pp <= {num_blocks} (and put other ranks on tp, sp, ep or cfg)")


def stage_ranges(block_bytes: list[int], pp: int, first_extra: int = 0, last_extra: int = 0) -> list[range]:
    """Contiguous, non-empty block ranges of the ``pp`` stages that minimise the largest stage's bytes.

    Why bytes and not block counts: a stage's memory (and, for linears, its
    compute) is its parameter bytes, and blocks differ (a Flux double-stream
    block is about twice a single-stream one; DeepSeek's first layers are
    dense; the first stage also holds the embeddings, the last the head). A
    small DP over cut points, deterministic, so every rank computes the same cuts.
    """
    n = len(block_bytes)
    check_stages(n, pp)
    prefix = [0]
    for b in block_bytes:
        prefix.append(prefix[-1] + b)

    def cost(stage: int, i: int, j: int) -> int:
        return (prefix[j] - prefix[i] + (first_extra if stage == 0 else 0)
                + (last_extra if stage == pp - 1 else 0))

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp + 1)]  # best[s][j]: s stages over blocks [0, j)
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0
    for s in range(1, pp + 1):
        for j in range(s, n - (pp - s) + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], cost(s - 1, i, j))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    bounds, j = [n], n
    for s in range(pp, 0, -1):
        j = cut[s][j]
        bounds.append(j)
    bounds.reverse()
    return [range(bounds[s], bounds[s + 1]) for s in range(pp)]
