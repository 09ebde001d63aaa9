"""``ilp``: the ExFlow integer program, solved with ``scipy.optimize.milp`` (HiGHS).

Formulation (direct method), for MoE layers l, experts e, ranks r:

* ``x[l,e,r]`` binary: expert e of layer l lives on rank r;
  ``sum_r x[l,e,r] = 1`` and ``sum_e x[l,e,r] = E/R`` (every rank its share).
* for every observed transition pair (p at l, q at l+1) with count c, a
  cross-rank indicator ``y >= x[l,p,r] - x[l+1,q,r]`` for all r (y is 1 as
  soon as q is not on p's rank); with a multi-node topology also a
  cross-node indicator ``w >= n[l,p,a] - n[l+1,q,a]`` over node sums n.
* minimise ``sum c * (intra * y + (inter - intra) * w)``: the exact
  two-level topology cost of :mod:`.topology`.
* optional load balance: ``sum_e load[l,e] x[l,e,r] <= (1 + slack) * mean``.
* symmetry breaking: the hottest expert of layer 0 is pinned to rank 0
  (ranks, and nodes, are interchangeable).

Warm start: HiGHS through scipy accepts no MIP start, so ``greedy`` runs
first and its cost is added as an objective cut-off row (``objective <=
greedy cost``: the greedy solution stays feasible, worse branches are
pruned). When HiGHS stops at the time limit with no better solution (or
none), the greedy placement is returned; ``info["used"]`` says which.

Scaling: the program has ``L*E*R`` binaries and one row per (pair, rank).
Beyond ``max_rows`` the solver (a) keeps only the heaviest transition pairs
that hold ``keep_mass`` of all transitions (sampling tokens when building
the statistics shrinks inputs further) and (b) switches to recursive
bipartition: split ranks in two halves (node boundaries first), solve a
2-way balanced min-cut ILP over the experts of every layer, recurse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from tessera.memory.affinity.greedy import greedy_rank_of
from tessera.memory.affinity.problem import PlacementProblem, PlacementSolver

_STATUS = {0: "optimal", 1: "time_limit", 2: "infeasible", 3: "unbounded", 4: "error"}


@dataclass(frozen=True)
class IlpSolver(PlacementSolver):
    time_limit_s: float = 20.0
    mip_rel_gap: float = 1e-4
    method: str = "auto"  # "auto" | "direct" | "bipartition"
    max_rows: int = 40_000  # beyond this the root LP alone can outlast the time limit: bipartition
    keep_mass: float = 1.0  # fraction of transition mass kept (heaviest pairs first)
    load_slack: float | None = None  # None: no load constraint; 0.25: each rank <= 1.25 x mean load
    use_greedy_cutoff: bool = True

    name = "ilp"

    def __post_init__(self) -> None:
        if self.method not in ("auto", "direct", "bipartition"):
            raise ValueError(f"ilp method must be auto, direct or bipartition, got {self.method!r}")
        if not 0 < self.keep_mass <= 1:
            raise ValueError(f"keep_mass must be in (0, 1], got {self.keep_mass}")
        if self.time_limit_s <= 0:
            raise ValueError(f"time_limit_s must be > 0, got {self.time_limit_s}")

    def _solve(self, problem: PlacementProblem) -> tuple[np.ndarray, dict]:
        greedy, _ = greedy_rank_of(problem)
        greedy_cost = problem.cost(greedy)
        pairs = _pairs(problem, self.keep_mass)
        info: dict = {"greedy_cost": greedy_cost, "pairs_total": int((problem.stats.transitions > 0).sum())}
        method = self.method
        if method == "auto":
            method = "direct" if _direct_rows(problem, len(pairs[0])) <= self.max_rows else "bipartition"
        if method == "direct" and _direct_rows(problem, len(pairs[0])) > self.max_rows:
            pairs = _prune_to_rows(problem, pairs, self.max_rows)
        info["pairs_kept"] = int(len(pairs[0]))
        info["method"] = method
        if problem.num_ranks == 1:
            return np.zeros_like(greedy), {**info, "used": "trivial"}
        if method == "direct":
            cutoff = _pruned_cost(problem, greedy, pairs) if self.use_greedy_cutoff else None
            rank_of, solve_info = self._direct(problem, pairs, cutoff)
        else:
            rank_of, solve_info = self._bipartition(problem, pairs)
        info.update(solve_info)
        if rank_of is None or problem.cost(rank_of) > greedy_cost + 1e-9:
            info["used"] = "greedy (no better ILP solution within the time limit)"
            return greedy, info
        info["used"] = "ilp"
        return rank_of, info

    # -- direct ------------------------------------------------------------------------

    def _direct(self, problem: PlacementProblem, pairs, cutoff: float | None):
        stats, topo = problem.stats, problem.topology
        L, E, R = stats.num_layers, stats.num_experts, problem.num_ranks
        layer, p, q, count = pairs
        P = len(count)
        with_nodes = not topo.is_flat
        nx = L * E * R
        n = nx + P + (P if with_nodes else 0)

        def xi(l, e, r):
            return (l * E + e) * R + r

        c = np.zeros(n)
        c[nx : nx + P] = count * topo.intra_node
        if with_nodes:
            c[nx + P :] = count * (topo.inter_node - topo.intra_node)
        rows, cols, vals, lo, hi = [], [], [], [], []
        row = 0

        def add(cs, vs, lb, ub):
            nonlocal row
            cols.extend(cs)
            vals.extend(vs)
            rows.extend([row] * len(cs))
            lo.append(lb)
            hi.append(ub)
            row += 1

        # Each expert on exactly one rank; each rank exactly E/R experts per layer.
        ls, es, rs = np.meshgrid(np.arange(L), np.arange(E), np.arange(R), indexing="ij")
        a_rows = (ls * E + es).ravel()
        b_rows = L * E + (ls * R + rs).ravel()
        xs = xi(ls, es, rs).ravel()
        cols.extend(np.concatenate([xs, xs]).tolist())
        vals.extend([1.0] * (2 * nx))
        rows.extend(np.concatenate([a_rows, b_rows]).tolist())
        lo.extend([1.0] * (L * E) + [problem.share] * (L * R))
        hi.extend([1.0] * (L * E) + [problem.share] * (L * R))
        row = L * E + L * R
        # Cross-rank indicators: x[l,p,r] - x[l+1,q,r] - y_i <= 0.
        i_idx = np.repeat(np.arange(P), R)
        r_idx = np.tile(np.arange(R), P)
        base = row + np.arange(P * R)
        rows.extend(np.concatenate([base, base, base]).tolist())
        cols.extend(
            np.concatenate(
                [xi(layer[i_idx], p[i_idx], r_idx), xi(layer[i_idx] + 1, q[i_idx], r_idx), nx + i_idx]
            ).tolist()
        )
        vals.extend([1.0] * (P * R) + [-1.0] * (P * R) + [-1.0] * (P * R))
        lo.extend([-np.inf] * (P * R))
        hi.extend([0.0] * (P * R))
        row += P * R
        if with_nodes:
            rpn = topo.ranks_per_node
            for i in range(P):
                for node in range(topo.num_nodes):
                    rr = range(node * rpn, (node + 1) * rpn)
                    add(
                        [xi(layer[i], p[i], r) for r in rr] + [xi(layer[i] + 1, q[i], r) for r in rr] + [nx + P + i],
                        [1.0] * rpn + [-1.0] * rpn + [-1.0],
                        -np.inf,
                        0.0,
                    )
        # Capacity cuts (valid, and what gives the LP relaxation a non-zero bound):
        # rank(p) holds only E/R experts of the next layer, so at most the
        # heaviest E/R entries of p's row can stay local; likewise per column,
        # and per node for the cross-node indicators.
        for ind, offset, capacity in ((True, nx, problem.share), (with_nodes, nx + P, problem.share * topo.ranks_per_node if with_nodes else 0)):
            if not ind:
                continue
            for members, vals_ in _capacity_groups(layer, p, q, count, capacity):
                add([offset + i for i in members], [float(count[i]) for i in members], vals_, np.inf)
        if self.load_slack is not None:
            for l in range(L):
                cap = (1.0 + self.load_slack) * stats.load[l].sum() / R
                # Never tighter than what the heaviest expert alone needs.
                cap = max(cap, float(stats.load[l].max()))
                for r in range(R):
                    add([xi(l, e, r) for e in range(E)], stats.load[l].tolist(), -np.inf, cap)
        if cutoff is not None:
            nz = np.nonzero(c)[0]
            add(nz.tolist(), c[nz].tolist(), -np.inf, cutoff + 1e-6 * max(1.0, abs(cutoff)))
        A = sparse.csr_matrix((vals, (rows, cols)), shape=(row, n))
        lb, ub = np.zeros(n), np.ones(n)
        hottest = int(np.argmax(stats.load[0]))
        lb[xi(0, hottest, 0)] = 1.0  # symmetry breaking
        integrality = np.zeros(n)
        integrality[:nx] = 1
        res = milp(
            c,
            constraints=LinearConstraint(A, lo, hi),
            integrality=integrality,
            bounds=Bounds(lb, ub),
            options={"time_limit": float(self.time_limit_s), "mip_rel_gap": float(self.mip_rel_gap), "disp": False},
        )
        info = {
            "status": _STATUS.get(res.status, str(res.status)),
            "variables": n,
            "rows": row,
            "objective": None if res.x is None else float(res.fun),
            "dual_bound": _get(res, "mip_dual_bound"),
            "mip_gap": _get(res, "mip_gap"),
        }
        if res.x is None:
            return None, info
        rank_of = res.x[:nx].reshape(L, E, R).argmax(axis=2)
        return rank_of, info

    # -- recursive bipartition --------------------------------------------------------

    def _bipartition(self, problem: PlacementProblem, pairs):
        stats, topo = problem.stats, problem.topology
        L, E, R = stats.num_layers, stats.num_experts, problem.num_ranks
        rank_of = np.full((L, E), -1, dtype=np.int64)
        splits = max(R - 1, 1)
        per_split = float(self.time_limit_s) / splits
        statuses: list[str] = []
        members = [np.arange(E) for _ in range(L)]
        stack = [(members, list(range(R)))]
        while stack:
            groups, ranks = stack.pop()
            if len(ranks) == 1:
                for l in range(L):
                    rank_of[l, groups[l]] = ranks[0]
                continue
            h = _split_point(ranks, topo.ranks_per_node)
            n_left = len(groups[0]) * h // len(ranks)
            side, status = _two_way(stats, pairs, groups, n_left, per_split, self.mip_rel_gap, symmetric=h * 2 == len(ranks))
            statuses.append(status)
            if side is None:
                return None, {"status": status, "splits": len(statuses)}
            left = [g[side[l]] for l, g in enumerate(groups)]
            right = [g[~side[l]] for l, g in enumerate(groups)]
            stack.append((left, ranks[:h]))
            stack.append((right, ranks[h:]))
        worst = "optimal" if all(s == "optimal" for s in statuses) else "time_limit"
        return rank_of, {"status": worst, "splits": len(statuses)}


def _two_way(stats, pairs, groups, n_left, time_limit, gap, symmetric):
    """Balanced 2-way min cut of the experts in ``groups`` (one array per layer); True = left."""
    L = len(groups)
    index = {}
    for l, g in enumerate(groups):
        for e in g:
            index[(l, int(e))] = len(index)
    nx = len(index)
    layer, p, q, count = pairs
    keep = [i for i in range(len(count)) if (layer[i], p[i]) in index and (layer[i] + 1, q[i]) in index]
    P = len(keep)
    n = nx + P
    c = np.zeros(n)
    rows, cols, vals, lo, hi = [], [], [], [], []
    for l, g in enumerate(groups):
        cols.extend(index[(l, int(e))] for e in g)
        vals.extend([1.0] * len(g))
        rows.extend([l] * len(g))
        lo.append(n_left)
        hi.append(n_left)
    row = L
    for j, i in enumerate(keep):
        a, b = index[(layer[i], p[i])], index[(layer[i] + 1, q[i])]
        c[nx + j] = count[i]
        # y >= |x_a - x_b|
        rows.extend([row, row, row, row + 1, row + 1, row + 1])
        cols.extend([a, b, nx + j, b, a, nx + j])
        vals.extend([1.0, -1.0, -1.0, 1.0, -1.0, -1.0])
        lo.extend([-np.inf, -np.inf])
        hi.extend([0.0, 0.0])
        row += 2
    # Capacity cuts: one side holds at most max(n_left, n_right) experts of the next layer.
    sub = (np.array([layer[i] for i in keep], dtype=np.int64), np.array([p[i] for i in keep], dtype=np.int64),
           np.array([q[i] for i in keep], dtype=np.int64), np.array([count[i] for i in keep]))
    cap = max(n_left, len(groups[0]) - n_left)
    for members, bound in _capacity_groups(*sub, cap):
        cols.extend(nx + j for j in members)
        vals.extend(float(sub[3][j]) for j in members)
        rows.extend([row] * len(members))
        lo.append(bound)
        hi.append(np.inf)
        row += 1
    A = sparse.csr_matrix((vals, (rows, cols)), shape=(row, n))
    lb, ub = np.zeros(n), np.ones(n)
    if symmetric:
        lb[index[(0, int(groups[0][0]))]] = 1.0
    integrality = np.zeros(n)
    integrality[:nx] = 1
    res = milp(
        c,
        constraints=LinearConstraint(A, lo, hi),
        integrality=integrality,
        bounds=Bounds(lb, ub),
        options={"time_limit": max(time_limit, 0.1), "mip_rel_gap": gap, "disp": False},
    )
    status = _STATUS.get(res.status, str(res.status))
    if res.x is None:
        return None, status
    x = res.x[:nx] > 0.5
    return [np.array([x[index[(l, int(e))]] for e in g]) for l, g in enumerate(groups)], status


def _capacity_groups(layer, p, q, count, capacity):
    """For each expert's outgoing row and incoming column: (pair indices, lower bound on its cut mass).

    At most ``capacity`` experts of the other layer share the expert's rank
    (or side), so the mass kept local is at most the sum of the
    ``capacity`` heaviest entries; the rest must cross.
    """
    groups: dict[tuple, list[int]] = {}
    for i in range(len(count)):
        groups.setdefault(("out", int(layer[i]), int(p[i])), []).append(i)
        groups.setdefault(("in", int(layer[i]), int(q[i])), []).append(i)
    for members in groups.values():
        if len(members) <= capacity:
            continue
        c = np.sort(np.asarray([count[i] for i in members]))[::-1]
        bound = float(c[capacity:].sum())
        if bound > 0:
            yield members, bound


def _split_point(ranks: list[int], ranks_per_node: int) -> int:
    """Split a contiguous block of ranks in two: at a node boundary when it spans several nodes."""
    nodes = math.ceil(len(ranks) / ranks_per_node)
    if nodes > 1 and len(ranks) % ranks_per_node == 0:
        return (nodes // 2) * ranks_per_node
    return len(ranks) // 2


def _pairs(problem: PlacementProblem, keep_mass: float):
    """Observed transition pairs ``(layer, p, q, count)``, heaviest first, holding ``keep_mass`` of the mass."""
    t = problem.stats.transitions
    layer, p, q = np.nonzero(t)
    count = t[layer, p, q]
    order = np.argsort(-count, kind="stable")
    layer, p, q, count = layer[order], p[order], q[order], count[order]
    if keep_mass < 1.0 and len(count):
        cum = np.cumsum(count) / count.sum()
        k = int(np.searchsorted(cum, keep_mass) + 1)
        layer, p, q, count = layer[:k], p[:k], q[:k], count[:k]
    return layer, p, q, count


def _direct_rows(problem: PlacementProblem, num_pairs: int) -> int:
    topo = problem.topology
    node_rows = 0 if topo.is_flat else num_pairs * topo.num_nodes
    s = problem.stats
    return s.num_layers * (s.num_experts + problem.num_ranks) + num_pairs * problem.num_ranks + node_rows


def _prune_to_rows(problem, pairs, max_rows):
    keep = len(pairs[0])
    while keep > 0 and _direct_rows(problem, keep) > max_rows:
        keep = int(keep * 0.8)
    return tuple(a[:keep] for a in pairs)


def _pruned_cost(problem: PlacementProblem, rank_of: np.ndarray, pairs) -> float:
    """The ILP objective (kept pairs only) of a full placement."""
    layer, p, q, count = pairs
    hop = problem.topology.cost_matrix()
    return float((count * hop[rank_of[layer, p], rank_of[layer + 1, q]]).sum())


def _get(res, name):
    value = getattr(res, name, None)
    return None if value is None else float(value)
