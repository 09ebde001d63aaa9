"""``greedy``: a fast heuristic that keeps high-affinity expert chains on one rank.

Layer by layer, it places the experts of layer l+1 where the experts that
feed them at layer l already are: with the neighbouring layers fixed, the
best placement of one layer is a linear assignment problem (expert -> one of
``E/R`` slots per rank, cost = transitions weighted by the hop cost to the
neighbours' ranks), solved exactly by ``scipy.optimize.linear_sum_assignment``.

1. Forward pass: layer 0 contiguous, then each next layer assigned against
   the previous one (this grows the chains).
2. Sweeps: re-assign every layer against both neighbours, forward then
   backward, until the cost stops falling (coordinate descent; each step can
   only lower the cost).
3. The same sweeps started from ``linear``; the cheaper result wins, so
   ``greedy`` is never worse than ``linear``.

Cost per layer assignment is O(E^3); with E = 256 and 60 layers this is
seconds, so ``greedy`` also serves as the ILP's incumbent and fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from tessera.memory.expert_placement import linear_rank_of
from tessera.memory.affinity.problem import PlacementProblem, PlacementSolver


@dataclass(frozen=True)
class GreedySolver(PlacementSolver):
    max_sweeps: int = 20

    name = "greedy"

    def _solve(self, problem: PlacementProblem) -> tuple[np.ndarray, dict]:
        return greedy_rank_of(problem, self.max_sweeps)


def greedy_rank_of(problem: PlacementProblem, max_sweeps: int = 20) -> tuple[np.ndarray, dict]:
    stats = problem.stats
    linear = linear_rank_of(stats.num_layers, stats.num_experts, problem.num_ranks)
    chained = _forward_chains(problem, linear[0])
    best, best_cost, info = None, np.inf, {}
    for start_name, start in (("forward_chains", chained), ("linear", linear)):
        rank_of, sweeps = _sweep(problem, start, max_sweeps)
        cost = problem.cost(rank_of)
        if cost < best_cost - 1e-9:
            best, best_cost = rank_of, cost
            info = {"start": start_name, "sweeps": sweeps}
    return best, info


def layer_cost(problem: PlacementProblem, rank_of: np.ndarray, layer: int, prev: bool = True, nxt: bool = True) -> np.ndarray:
    """``[E, R]``: cost of putting each expert of ``layer`` on each rank, neighbours fixed."""
    stats, ranks = problem.stats, problem.num_ranks
    hop = problem.topology.cost_matrix()
    eye = np.eye(ranks)
    cost = np.zeros((stats.num_experts, ranks))
    if prev and layer > 0:
        # sum_p T[l-1][p, e] * hop[rank(p), r]
        cost += stats.transitions[layer - 1].T @ eye[rank_of[layer - 1]] @ hop
    if nxt and layer < stats.num_layers - 1:
        # sum_q T[l][e, q] * hop[r, rank(q)]
        cost += stats.transitions[layer] @ eye[rank_of[layer + 1]] @ hop.T
    return cost


def assign_balanced(cost: np.ndarray, share: int) -> np.ndarray:
    """Cheapest expert->rank map with exactly ``share`` experts per rank (exact, Hungarian)."""
    ranks = cost.shape[1]
    slot_rank = np.repeat(np.arange(ranks), share)
    rows, cols = linear_sum_assignment(cost[:, slot_rank])
    out = np.empty(cost.shape[0], dtype=np.int64)
    out[rows] = slot_rank[cols]
    return out


def _forward_chains(problem: PlacementProblem, first: np.ndarray) -> np.ndarray:
    stats = problem.stats
    rank_of = np.zeros((stats.num_layers, stats.num_experts), dtype=np.int64)
    rank_of[0] = first
    for layer in range(1, stats.num_layers):
        rank_of[layer] = assign_balanced(layer_cost(problem, rank_of, layer, nxt=False), problem.share)
    return rank_of


def _sweep(problem: PlacementProblem, start: np.ndarray, max_sweeps: int) -> tuple[np.ndarray, int]:
    rank_of = start.copy()
    cost = problem.cost(rank_of)
    layers = problem.stats.num_layers
    for sweep in range(1, max_sweeps + 1):
        order = list(range(layers)) if sweep % 2 else list(range(layers - 1, -1, -1))
        for layer in order:
            c = layer_cost(problem, rank_of, layer)
            candidate = assign_balanced(c, problem.share)
            # Only move when strictly better for this layer (avoids cycling on ties).
            if c[np.arange(len(candidate)), candidate].sum() < c[np.arange(len(candidate)), rank_of[layer]].sum() - 1e-9:
                rank_of[layer] = candidate
        new_cost = problem.cost(rank_of)
        if new_cost >= cost - 1e-9:
            return rank_of, sweep
        cost = new_cost
    return rank_of, max_sweeps
