"""Load balance: per-rank token load per layer and redundant replicas of hot experts.

Routers are skewed: a few hot experts receive many times the mean load, and
the rank holding them sets the pace of every MoE layer. Following EPLB, we
add ``slots_per_rank`` redundant expert slots to every rank (the same number
on each, so expert memory stays balanced), give them to the experts with the
highest load per copy, and split an expert's tokens evenly across its
copies. The affinity placement is kept as is (primaries do not move), so
balance is bought with memory, not with extra cross-rank transitions.

Balancedness of a layer = mean rank load / max rank load (1.0 is perfect).
"""

from __future__ import annotations

import numpy as np

from tessera.memory.expert_placement import ExpertPlacement


def rank_loads(load: np.ndarray, placement: ExpertPlacement) -> np.ndarray:
    """``[L, R]`` tokens each rank computes per layer, hot experts' tokens split evenly across copies."""
    load = np.asarray(load, dtype=np.float64)
    if load.shape != placement.rank_of.shape:
        raise ValueError(f"load has shape {load.shape}, placement has {placement.rank_of.shape} (layers, experts)")
    out = np.zeros((placement.num_layers, placement.num_ranks))
    counts = placement.replica_counts()
    for layer in range(placement.num_layers):
        for e in range(placement.num_experts):
            share = load[layer, e] / counts[layer, e]
            for r in placement.ranks_holding(layer, e):
                out[layer, r] += share
    return out


def balancedness(loads: np.ndarray) -> np.ndarray:
    """Per layer: mean rank load / max rank load (1.0 for an idle layer)."""
    loads = np.asarray(loads, dtype=np.float64)
    peak = loads.max(axis=1)
    return np.divide(loads.mean(axis=1), peak, out=np.ones(len(loads)), where=peak > 0)


def balance_report(load: np.ndarray, placement: ExpertPlacement) -> dict:
    b = balancedness(rank_loads(load, placement))
    return {"balancedness_mean": float(b.mean()), "balancedness_min": float(b.min())}


def add_replicas(placement: ExpertPlacement, load: np.ndarray, slots_per_rank: int) -> ExpertPlacement:
    """Return ``placement`` with ``slots_per_rank`` redundant copies per rank per layer (EPLB style).

    Per layer, the ``R * slots_per_rank`` extra copies go one by one to the
    expert with the highest load per copy, on the least-loaded rank that has
    a free slot and no copy of it yet (see :func:`_replicate_layer`).
    """
    if slots_per_rank < 0:
        raise ValueError(f"slots_per_rank must be >= 0, got {slots_per_rank}")
    if slots_per_rank == 0:
        return placement
    ranks, experts = placement.num_ranks, placement.num_experts
    if ranks == 1:
        raise ValueError("replicas need at least 2 expert-parallel ranks; with ep=1 every expert is local")
    if slots_per_rank > experts - experts // ranks:
        raise ValueError(
            f"{slots_per_rank} replica slots per rank exceed what {experts} experts on {ranks} ranks can use "
            f"(a rank can copy at most the {experts - experts // ranks} experts it does not hold); lower --replicas"
        )
    load = np.asarray(load, dtype=np.float64)
    replicas = []
    for layer in range(placement.num_layers):
        replicas.append(_replicate_layer(placement.rank_of[layer], load[layer], ranks, slots_per_rank))
    before = balance_report(load, placement)
    after = balance_report(load, placement.with_replicas(tuple(replicas)))
    return placement.with_replicas(
        tuple(replicas),
        replica_slots_per_rank=slots_per_rank,
        balancedness_before=before["balancedness_mean"],
        balancedness_after=after["balancedness_mean"],
    )


def _replicate_layer(rank_of: np.ndarray, load: np.ndarray, ranks: int, slots: int) -> tuple[tuple[int, ...], ...]:
    """Fill ``slots`` extra slots per rank, one copy at a time.

    Each step takes the expert with the highest load per copy that some rank
    with a free slot does not hold yet, and puts the copy on the least-loaded
    such rank; loads are re-split evenly over the expert's copies. A rank with
    a free slot can always take some expert (``slots <= E - E/R``), so the
    loop never dead-ends.
    """
    experts = len(rank_of)
    holders = [[int(rank_of[e])] for e in range(experts)]
    rank_load = np.zeros(ranks)
    np.add.at(rank_load, rank_of, load)
    free = np.full(ranks, slots)
    for _ in range(slots * ranks):
        best = None
        for e in np.argsort(-(load / np.array([len(h) for h in holders])), kind="stable"):
            options = [r for r in range(ranks) if free[r] > 0 and r not in holders[e]]
            if options:
                best = (int(e), min(options, key=lambda r: (rank_load[r], r)))
                break
        e, r = best
        old, new = load[e] / len(holders[e]), load[e] / (len(holders[e]) + 1)
        for h in holders[e]:
            rank_load[h] += new - old
        rank_load[r] += new
        holders[e].append(r)
        free[r] -= 1
    return tuple(tuple(h[1:]) for h in holders)
