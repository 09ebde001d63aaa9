"""How good a placement is: cross-rank transitions, topology cost, all-to-all bytes.

Two views, both measured on the same trace:

* *Transition view* (the ExFlow objective): of all (p at l, q at l+1) pairs a
  token takes, the fraction whose experts sit on different ranks (and, with a
  topology, on different nodes). It does not depend on where attention runs.
* *Traffic view*: bytes a token's hidden state moves through all-to-alls per
  forward pass, under two expert-parallel schedules:

  - ``standard``: attention runs on the token's home rank (``t mod R``); each
    MoE layer dispatches the token to every other rank holding one of its k
    experts and combines the outputs back (two all-to-alls per layer).
  - ``coherent`` (ExFlow's context-coherent EP): the token stays on the rank
    of its top-1 expert (its *anchor*) between layers. Each layer dispatches
    it from the previous anchor to the ranks of its k experts and combines
    the partial outputs on the new anchor (one all-to-all per layer; the
    attention context is made available on every rank). Placement matters
    here: with chains on one rank the token rarely moves.

Where an expert has replicas, a token uses the copy on its current rank if
there is one, else the primary.
"""

from __future__ import annotations

import numpy as np

from tessera.memory.expert_placement import ExpertPlacement
from tessera.memory.affinity.stats import AffinityStats
from tessera.memory.affinity.topology import Topology
from tessera.memory.affinity.trace import RoutingTrace


def rank_pair_counts(stats: AffinityStats, rank_of: np.ndarray, num_ranks: int) -> np.ndarray:
    """``[L-1, R, R]`` transitions aggregated by (rank at l, rank at l+1)."""
    out = np.zeros((stats.num_layers - 1, num_ranks, num_ranks))
    eye = np.eye(num_ranks)
    for layer in range(stats.num_layers - 1):
        a, b = eye[rank_of[layer]], eye[rank_of[layer + 1]]  # [E, R] one-hot
        out[layer] = a.T @ stats.transitions[layer] @ b
    return out


def transition_cost(stats: AffinityStats, rank_of: np.ndarray, topology: Topology) -> float:
    """Sum over transitions of the hop cost between their experts' ranks (the solvers' objective)."""
    pairs = rank_pair_counts(stats, np.asarray(rank_of), topology.num_ranks)
    return float((pairs * topology.cost_matrix()[None]).sum())


def cross_rank_fraction(stats: AffinityStats, placement: ExpertPlacement | np.ndarray, num_ranks: int | None = None) -> float:
    """Fraction of layer-to-layer transitions whose two experts are on different ranks."""
    rank_of, ranks = _unpack(placement, num_ranks)
    total = stats.total_transitions
    if total == 0:
        return 0.0
    pairs = rank_pair_counts(stats, rank_of, ranks)
    return float(1.0 - np.trace(pairs, axis1=1, axis2=2).sum() / total)


def cross_node_fraction(stats: AffinityStats, placement: ExpertPlacement | np.ndarray, topology: Topology) -> float:
    """Fraction of transitions whose two experts are on different nodes."""
    rank_of, _ = _unpack(placement, topology.num_ranks)
    total = stats.total_transitions
    if total == 0:
        return 0.0
    pairs = rank_pair_counts(stats, rank_of, topology.num_ranks)
    node = topology.node_of(np.arange(topology.num_ranks))
    cross = node[:, None] != node[None, :]
    return float((pairs * cross[None]).sum() / total)


def alltoall_bytes_per_token(
    trace: RoutingTrace,
    placement: ExpertPlacement,
    hidden_size: int,
    dtype_bytes: int = 2,
    mode: str = "standard",
) -> float:
    """Mean bytes one token's hidden state crosses ranks for, over one pass through all MoE layers."""
    if mode not in ("standard", "coherent"):
        raise ValueError(f"mode must be 'standard' or 'coherent', got {mode!r}")
    ids = trace.expert_ids.astype(np.int64)
    tokens, layers, _ = ids.shape
    if tokens == 0:
        return 0.0
    ranks = placement.num_ranks
    holds = np.zeros((layers, placement.num_experts, ranks), dtype=bool)
    for layer in range(layers):
        for e in range(placement.num_experts):
            holds[layer, e, list(placement.ranks_holding(layer, e))] = True
    home = np.arange(tokens) % ranks
    where = home.copy()
    moves = 0
    rows = np.arange(tokens)[:, None]
    for layer in range(layers):
        experts = ids[:, layer, :]
        local = holds[layer, experts, where[:, None]]  # [T, k]: a copy is on the token's current rank
        dest = np.where(local, where[:, None], placement.rank_of[layer][experts])
        seen = np.zeros((tokens, ranks), dtype=bool)
        seen[rows, dest] = True
        remote = seen.sum(axis=1) - seen[np.arange(tokens), where]  # ranks other than the current one
        if mode == "standard":
            moves += 2 * remote.sum()  # dispatch + combine back home
        else:
            anchor = dest[:, 0]
            moves += remote.sum()  # dispatch from the previous anchor
            moves += (seen.sum(axis=1) - 1).sum()  # combine partial outputs on the new anchor
            where = anchor
    return float(moves) * hidden_size * dtype_bytes / tokens


def _unpack(placement, num_ranks):
    if isinstance(placement, ExpertPlacement):
        return placement.rank_of, placement.num_ranks
    if num_ranks is None:
        raise ValueError("num_ranks is required when placement is a bare rank_of array")
    return np.asarray(placement), num_ranks
