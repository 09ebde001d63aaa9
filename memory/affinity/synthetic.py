"""Synthetic routing traces with a planted, tunable expert affinity.

Real traces show that a token's expert at layer l+1 depends strongly on its
expert at layer l (ExFlow, 2024). To test that solvers find such structure,
and to benchmark how much they gain as a function of its strength, we plant
it: experts of every layer are split into ``num_groups`` hidden groups (a
fresh random permutation per layer, so contiguous ``linear`` placement is not
aligned with them by accident). Every token belongs to one group; at each
layer, with probability ``affinity`` it picks its top-k experts inside its
group, otherwise uniformly among all experts (weighted by a Zipf popularity
when ``skew > 0``, which makes hot experts for load-balance tests).

Placing each hidden group on one rank is the *planted placement*; its
cross-rank transition fraction is the floor a solver should reach.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tessera.memory.affinity.trace import RoutingTrace, TraceHeader


@dataclass(frozen=True, eq=False)
class SyntheticTrace:
    trace: RoutingTrace
    planted_rank_of: np.ndarray = field(repr=False)  # [layers, experts] -> group == rank


def planted_affinity_trace(
    num_layers: int = 4,
    num_experts: int = 8,
    num_groups: int = 4,
    top_k: int = 2,
    num_tokens: int = 2000,
    affinity: float = 0.9,
    skew: float = 0.0,
    seed: int = 0,
) -> SyntheticTrace:
    """A trace whose tokens stay inside a hidden expert group with probability ``affinity``."""
    if num_experts % num_groups:
        raise ValueError(f"num_experts={num_experts} must be a multiple of num_groups={num_groups}")
    per_group = num_experts // num_groups
    if not 0.0 <= affinity <= 1.0:
        raise ValueError(f"affinity must be in [0, 1], got {affinity}")
    if top_k > per_group and affinity > 0:
        raise ValueError(f"top_k={top_k} exceeds the group size {per_group}; use fewer groups or a smaller top_k")
    rng = np.random.default_rng(seed)
    # members[l, g] = experts of group g at layer l; planted[l, e] = group of e.
    members = np.stack([rng.permutation(num_experts).reshape(num_groups, per_group) for _ in range(num_layers)])
    planted = np.empty((num_layers, num_experts), dtype=np.int64)
    for layer in range(num_layers):
        for g in range(num_groups):
            planted[layer, members[layer, g]] = g
    popularity = 1.0 / np.arange(1, num_experts + 1) ** skew
    popularity /= popularity.sum()
    # Popularity is tied to a random expert per layer, not to expert 0.
    pop_perm = np.stack([rng.permutation(num_experts) for _ in range(num_layers)])

    token_group = rng.integers(0, num_groups, size=num_tokens)
    ids = np.empty((num_tokens, num_layers, top_k), dtype=np.int64)
    for layer in range(num_layers):
        inside = rng.random(num_tokens) < affinity
        # In-group choice: k distinct members of the token's group.
        keys = rng.random((num_tokens, per_group))
        pick = np.argsort(keys, axis=1)[:, :top_k]
        ids_in = members[layer, token_group][np.arange(num_tokens)[:, None], pick]
        # Free choice: k distinct experts, popularity-weighted (Gumbel top-k).
        weights = popularity[np.argsort(pop_perm[layer])]
        gumbel = np.log(weights)[None, :] - np.log(-np.log(rng.random((num_tokens, num_experts))))
        ids_free = np.argsort(-gumbel, axis=1)[:, :top_k]
        ids[:, layer, :] = np.where(inside[:, None], ids_in, ids_free)
    header = TraceHeader(
        model=f"synthetic(affinity={affinity},skew={skew},seed={seed})",
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
    )
    return SyntheticTrace(RoutingTrace(header, ids), planted)


def chain_affinity_trace(
    num_layers: int = 16,
    num_experts: int = 64,
    top_k: int = 2,
    num_tokens: int = 20000,
    affinity: float = 0.9,
    successors: int = 2,
    seed: int = 0,
) -> RoutingTrace:
    """A trace with branching expert chains: no hidden groups, so no placement reaches zero.

    Every expert ``p`` of layer l has ``successors`` random preferred experts
    at layer l+1; with probability ``affinity`` a token's top-k at l+1 are
    drawn from the successors of its top-1 expert at l, else uniformly. Chains
    branch and merge across ranks as in recorded traces (ExFlow), which makes
    the placement a graph-partitioning problem where one-layer-at-a-time
    heuristics stop in local optima.
    """
    if top_k > successors and affinity > 0:
        raise ValueError(f"top_k={top_k} exceeds successors={successors}")
    rng = np.random.default_rng(seed)
    nxt = np.stack([np.stack([rng.choice(num_experts, successors, replace=False) for _ in range(num_experts)])
                    for _ in range(num_layers)])  # [L, E, successors]
    ids = np.empty((num_tokens, num_layers, top_k), dtype=np.int64)
    ids[:, 0, :] = np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :top_k]
    rows = np.arange(num_tokens)[:, None]
    for layer in range(1, num_layers):
        cand = nxt[layer][ids[:, layer - 1, 0]]
        follow = cand[rows, np.argsort(rng.random((num_tokens, successors)), axis=1)[:, :top_k]]
        free = np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :top_k]
        inside = rng.random(num_tokens) < affinity
        ids[:, layer, :] = np.where(inside[:, None], follow, free)
    header = TraceHeader(model=f"chains(affinity={affinity},successors={successors},seed={seed})",
                         num_layers=num_layers, num_experts=num_experts, top_k=top_k)
    return RoutingTrace(header, ids)
