"""``ilp``: the ExFlow integer program, solved with HiGHS (``highspy``, or ``scipy.optimize.milp``).

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

Solver backend: ``highspy`` (HiGHS's own Python API) when installed, else
``scipy.optimize.milp`` (the same HiGHS, without a MIP start). With highspy
``greedy``'s placement is passed as the MIP start (``setSolution``): HiGHS
begins with it as its incumbent and the time limit can never lose it. With
scipy its cost becomes an objective cut-off row instead (the greedy solution
stays feasible, worse branches are pruned).

A valid lower bound (:func:`cross_lower_bound`: an expert's rank holds only
E/R experts of the next layer, so all but its E/R heaviest successors cross)
comes first; when greedy meets it, greedy is optimal and no ILP runs. Under
strong planted affinity with as many groups as ranks this is the usual case.

Scaling: the direct program has ``L*E*R`` binaries and one row per (pair,
rank). ``auto`` solves it directly while it has at most ``max_rows`` rows
(with highspy for half the time limit), then improves the best placement by
*large-neighbourhood search* (:func:`improve_rank_pairs`): the experts of two
ranks in a window of 2 or 4 consecutive layers are re-split by an exact
2-way ILP with everything else fixed (small: ``w * 2E/R`` binaries, solved
to optimality in milliseconds), warm-started from the current placement,
for rank pairs in order of the traffic between them, until a round improves
nothing or time is up. This is what beats ``greedy`` at realistic sizes
(64 experts x 16 layers x 8 ranks): greedy re-assigns one layer at a time
and cannot move a piece of an expert chain to another rank without first
breaking it. Without highspy, large instances use recursive bipartition
instead: split ranks in two halves (node boundaries first), solve a 2-way
balanced min-cut ILP over the experts of every layer, recurse. The objective
needs only the per-layer-pair transition counts, so the trace can be
sampled (``AffinityStats.from_trace(max_tokens=...)``) to bound the inputs;
``keep_mass`` drops the lightest pairs of the direct program.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from tessera.memory.affinity.greedy import greedy_rank_of
from tessera.memory.affinity.metrics import rank_pair_counts
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
    use_greedy_cutoff: bool = True  # scipy backend: greedy's cost as an objective cut-off (highspy: a MIP start)
    backend: str = "auto"  # "auto" (highspy when installed) | "highspy" | "scipy"
    windows: tuple[int, ...] = (2, 4)  # layer-window sizes of the two-rank neighbourhoods, tried in turn

    name = "ilp"

    def __post_init__(self) -> None:
        if self.method not in ("auto", "direct", "bipartition", "lns"):
            raise ValueError(f"ilp method must be auto, direct, bipartition or lns, got {self.method!r}")
        if self.backend not in ("auto", "highspy", "scipy"):
            raise ValueError(f"ilp backend must be auto, highspy or scipy, got {self.backend!r}")
        if self.backend == "highspy" and not have_highspy():
            raise ValueError("ilp backend 'highspy' is not installed; pip install highspy (or use backend='scipy')")
        if not 0 < self.keep_mass <= 1:
            raise ValueError(f"keep_mass must be in (0, 1], got {self.keep_mass}")
        if self.time_limit_s <= 0:
            raise ValueError(f"time_limit_s must be > 0, got {self.time_limit_s}")

    def _solve(self, problem: PlacementProblem) -> tuple[np.ndarray, dict]:
        started = time.perf_counter()
        greedy, _ = greedy_rank_of(problem)
        greedy_cost = problem.cost(greedy)
        bound = cross_lower_bound(problem)
        backend = "highspy" if self.backend == "auto" and have_highspy() else self.backend
        backend = "scipy" if backend == "auto" else backend
        info: dict = {"greedy_cost": greedy_cost, "lower_bound": bound, "backend": backend,
                      "pairs_total": int((problem.stats.transitions > 0).sum())}
        if problem.num_ranks == 1:
            return np.zeros_like(greedy), {**info, "used": "trivial", "method": "trivial", "status": "optimal"}
        if self.method == "auto" and greedy_cost <= bound + 1e-9 * max(1.0, bound):
            return greedy, {**info, "used": "greedy (proved optimal: it meets the lower bound)", "method": "bound",
                            "status": "optimal"}
        pairs = _pairs(problem, self.keep_mass)
        method = self.method
        if method == "auto":
            if _direct_rows(problem, len(pairs[0])) <= self.max_rows:
                method = "direct"
            else:  # windows need a MIP start to be worth their time; scipy has none
                method = "lns" if backend == "highspy" else "bipartition"
        if method == "direct" and _direct_rows(problem, len(pairs[0])) > self.max_rows:
            pairs = _prune_to_rows(problem, pairs, self.max_rows)
        info["pairs_kept"] = int(len(pairs[0]))
        info["method"] = method
        if method == "direct":
            cutoff = _pruned_cost(problem, greedy, pairs) if self.use_greedy_cutoff else None
            rank_of, solve_info = self._direct(problem, pairs, cutoff, greedy, backend)
        elif method == "bipartition":
            rank_of, solve_info = self._bipartition(problem, pairs)
        else:
            rank_of, solve_info = greedy, {"status": "time_limit"}
        info.update(solve_info)
        if rank_of is None or problem.cost(rank_of) > greedy_cost - 1e-9:
            rank_of, info["used"] = greedy, "greedy (no better ILP solution within the time limit)"
        else:
            info["used"] = "ilp"
        left = self.time_limit_s - (time.perf_counter() - started)
        if info.get("status") != "optimal" and left > 0.05:
            # Large neighbourhoods (two ranks x a window of layers, each an exact sub-ILP) from the best so far.
            polished, lns = improve_rank_pairs(problem, rank_of, left, self.mip_rel_gap, backend, self.windows)
            info["lns"] = lns
            if problem.cost(polished) < problem.cost(rank_of) - 1e-9:
                rank_of, info["used"] = polished, "ilp"
        if problem.cost(rank_of) <= bound + 1e-9 * max(1.0, bound):
            info["status"] = "optimal"
        return rank_of, info

    # -- direct ------------------------------------------------------------------------

    def _direct(self, problem: PlacementProblem, pairs, cutoff: float | None, start: np.ndarray | None = None,
                backend: str = "auto"):
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
        A = sparse.csr_matrix((vals, (rows, cols)), shape=(row, n))
        lb, ub = np.zeros(n), np.ones(n)
        hottest = int(np.argmax(stats.load[0]))
        if start is not None and start[0, hottest] != 0:  # relabel ranks so the start honours the pin
            if topo.is_flat:
                swap = np.arange(R)
                swap[[0, start[0, hottest]]] = swap[[start[0, hottest], 0]]
                start = swap[start]
        lb[xi(0, hottest, 0)] = 1.0  # symmetry breaking
        integrality = np.zeros(n)
        integrality[:nx] = 1
        x0 = None
        if start is not None and start[0, hottest] == 0:  # the MIP start must respect the symmetry pin
            x0 = np.zeros(n)
            x0[xi(np.arange(L)[:, None], np.arange(E)[None, :], start)] = 1.0
            x0[nx : nx + P] = start[layer, p] != start[layer + 1, q]
            if with_nodes:
                x0[nx + P :] = topo.node_of(start[layer, p]) != topo.node_of(start[layer + 1, q])
        # With a MIP start (highspy) half the time goes to the whole program, the rest to the window search.
        limit = self.time_limit_s / 2 if backend == "highspy" else self.time_limit_s
        x, sol = _solve_mip(c, A, np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64), lb, ub, integrality,
                            limit, self.mip_rel_gap, start=x0, cutoff=cutoff, backend=backend)
        info = {**sol, "variables": n, "rows": row}
        if x is None:
            return None, info
        rank_of = x[:nx].reshape(L, E, R).argmax(axis=2)
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


# -- the MIP backend: highspy (MIP start) when installed, else scipy.optimize.milp ------------


def have_highspy() -> bool:
    try:
        import highspy  # noqa: F401
    except ImportError:
        return False
    return True


def _solve_mip(c, A, lo, hi, lb, ub, integrality, time_limit, gap, start=None, cutoff=None, backend="auto"):
    """Minimise ``c @ x`` s.t. ``lo <= A x <= hi``, ``lb <= x <= ub``; ``start`` is a feasible MIP start.

    Returns ``(x or None, info)``. highspy takes the start as its incumbent
    (``setSolution``): branches that cannot beat it are pruned from the root
    on, and the time limit never costs the start. scipy's milp has no MIP
    start; there ``cutoff`` (the start's objective) becomes an objective row.
    """
    if backend == "highspy" or (backend == "auto" and have_highspy()):
        return _solve_highspy(c, A, lo, hi, lb, ub, integrality, time_limit, gap, start)
    if cutoff is not None:
        nz = np.nonzero(c)[0]
        row = sparse.csr_matrix((c[nz], (np.zeros(len(nz), dtype=np.int64), nz)), shape=(1, len(c)))
        A = sparse.vstack([A, row]).tocsr()
        lo = np.append(lo, -np.inf)
        hi = np.append(hi, cutoff + 1e-6 * max(1.0, abs(cutoff)))
    res = milp(
        c, constraints=LinearConstraint(A, lo, hi), integrality=integrality, bounds=Bounds(lb, ub),
        options={"time_limit": max(float(time_limit), 0.05), "mip_rel_gap": float(gap), "disp": False},
    )
    info = {"backend": "scipy", "status": _STATUS.get(res.status, str(res.status)),
            "objective": None if res.x is None else float(res.fun),
            "dual_bound": _get(res, "mip_dual_bound"), "mip_gap": _get(res, "mip_gap")}
    return res.x, info


def _solve_highspy(c, A, lo, hi, lb, ub, integrality, time_limit, gap, start):
    import highspy

    inf = highspy.kHighsInf
    A = sparse.csc_matrix(A)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = A.shape[1], A.shape[0]
    lp.col_cost_ = np.asarray(c, dtype=np.float64)
    lp.col_lower_, lp.col_upper_ = np.asarray(lb, dtype=np.float64), np.asarray(ub, dtype=np.float64)
    lp.row_lower_ = np.where(np.isinf(lo), -inf, lo).astype(np.float64)
    lp.row_upper_ = np.where(np.isinf(hi), inf, hi).astype(np.float64)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = A.indptr.astype(np.int32)
    lp.a_matrix_.index_ = A.indices.astype(np.int32)
    lp.a_matrix_.value_ = A.data.astype(np.float64)
    lp.integrality_ = [highspy.HighsVarType.kInteger if v else highspy.HighsVarType.kContinuous for v in integrality]
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", max(float(time_limit), 0.05))
    h.setOptionValue("mip_rel_gap", float(gap))
    h.setOptionValue("threads", 1)
    h.passModel(lp)
    if start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = np.asarray(start, dtype=np.float64).tolist()
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
    status = h.modelStatusToString(h.getModelStatus()).lower()
    info = h.getInfo()
    has = info.primal_solution_status == 2  # kSolutionStatusFeasible
    x = np.asarray(h.getSolution().col_value) if has else None
    out = {"backend": "highspy", "status": "optimal" if status == "optimal" else status.replace(" ", "_"),
           "objective": float(info.objective_function_value) if has else None,
           "dual_bound": float(info.mip_dual_bound), "mip_gap": float(info.mip_gap)}
    return x, out


# -- large neighbourhoods: two ranks over all layers ------------------------------------------


def improve_rank_pairs(problem: PlacementProblem, rank_of: np.ndarray, time_limit_s: float, gap: float = 1e-4,
                       backend: str = "auto", windows: tuple[int, ...] | int | None = (2, 4)) -> tuple[np.ndarray, dict]:
    """Large-neighbourhood search: re-split the experts of two ranks over a window of layers, by exact sub-ILPs.

    With everything else fixed, which of ranks a and b each of their experts
    in layers l..l+w-1 goes to (each rank keeping its share per layer) is a
    balanced 2-way min-cut ILP of ``w * 2E/R`` binaries, with the fixed
    neighbours entering as linear costs. A window moves a piece of an expert
    chain between ranks in one step, which greedy's one-layer assignments
    cannot do without first breaking the chain. Each sub-ILP starts from the
    current placement (a MIP start), so the cost never rises; after a win,
    greedy's layer sweeps run again from it. Rank pairs exchanging the most
    transitions go first; window sizes alternate; the search stops when a round
    of every size improves nothing, or at the time limit.
    """
    from tessera.memory.affinity.greedy import _sweep

    stats, R, L = problem.stats, problem.num_ranks, problem.stats.num_layers
    rank_of = np.array(rank_of, dtype=np.int64)
    info = {"subproblems": 0, "improved": 0, "passes": 0, "statuses": {}}
    if R < 2 or L < 2:
        return rank_of, info
    sizes = [L] if windows is None else [windows] if isinstance(windows, int) else list(windows)
    sizes = [max(2, min(int(w), L)) for w in sizes]
    deadline = time.perf_counter() + time_limit_s
    cost = problem.cost(rank_of)
    pairs_of_ranks = [(a, b) for a in range(R) for b in range(a + 1, R)]
    idle, turn = 0, 0
    while idle < len(sizes) and time.perf_counter() < deadline:
        w = sizes[turn % len(sizes)]
        turn += 1
        starts = list(range(0, L - w + 1, max(w - 1, 1)))
        if starts[-1] + w < L:
            starts.append(L - w)
        info["passes"] += 1
        traffic = rank_pair_counts(stats, rank_of, R).sum(0)
        pairs_of_ranks.sort(key=lambda ab: -(traffic[ab[0], ab[1]] + traffic[ab[1], ab[0]]))
        jobs = [(ab, range(s0, s0 + w)) for ab in pairs_of_ranks for s0 in starts]
        improved = False
        for i, ((a, b), win) in enumerate(jobs):
            left = deadline - time.perf_counter()
            if left <= 0.02:
                break
            budget = max(left / (len(jobs) - i), min(0.5, left))
            candidate, status = _two_rank_ilp(problem, rank_of, a, b, budget, gap, backend, win)
            info["subproblems"] += 1
            info["statuses"][status] = info["statuses"].get(status, 0) + 1
            if candidate is None:
                continue
            new_cost = problem.cost(candidate)
            if new_cost < cost - 1e-9:
                swept, _ = _sweep(problem, candidate, 20)
                if problem.cost(swept) < new_cost:
                    candidate, new_cost = swept, problem.cost(swept)
                rank_of, cost, improved = candidate, new_cost, True
                info["improved"] += 1
        idle = 0 if improved else idle + 1
    return rank_of, info


def _two_rank_ilp(problem: PlacementProblem, rank_of: np.ndarray, a: int, b: int, time_limit: float, gap: float,
                  backend: str, layers: range | None = None):
    """Best re-split of the experts on ranks a and b in ``layers`` (all by default), everything else fixed."""
    stats, hop = problem.stats, problem.topology.cost_matrix()
    L, E = stats.num_layers, stats.num_experts
    window = range(L) if layers is None else layers
    var = np.full((L, E), -1, dtype=np.int64)
    none = np.zeros(0, dtype=np.int64)
    members = [np.nonzero((rank_of[l] == a) | (rank_of[l] == b))[0] if l in window else none for l in range(L)]
    offsets = np.cumsum([0] + [len(m) for m in members])
    for l, m in enumerate(members):
        var[l, m] = offsets[l] + np.arange(len(m))
    nx = int(offsets[-1])
    lin = np.zeros(nx)
    pl, pp, pq, pc = [], [], [], []
    for l in range(L - 1):
        T = stats.transitions[l]
        m_l, m_n = members[l], members[l + 1]
        inside_n = np.zeros(E, dtype=bool)
        inside_n[m_n] = True
        inside_l = np.zeros(E, dtype=bool)
        inside_l[m_l] = True
        # p inside, q fixed elsewhere: x_p=1 (rank a) costs hop[a, rank q], else hop[b, rank q].
        fixed_n = np.nonzero(~inside_n)[0]
        d = hop[a, rank_of[l + 1, fixed_n]] - hop[b, rank_of[l + 1, fixed_n]]
        lin[var[l, m_l]] += T[np.ix_(m_l, fixed_n)] @ d
        fixed_l = np.nonzero(~inside_l)[0]
        d = hop[rank_of[l, fixed_l], a] - hop[rank_of[l, fixed_l], b]
        lin[var[l + 1, m_n]] += d @ T[np.ix_(fixed_l, m_n)]
        sub = T[np.ix_(m_l, m_n)]
        i, j = np.nonzero(sub)
        pl.append(np.full(len(i), l))
        pp.append(m_l[i])
        pq.append(m_n[j])
        pc.append(sub[i, j])
    layer, p, q, count = (np.concatenate(x) if x else np.zeros(0) for x in (pl, pp, pq, pc))
    layer, p, q = layer.astype(np.int64), p.astype(np.int64), q.astype(np.int64)
    P = len(count)
    n = nx + P
    c = np.concatenate([lin, count * hop[a, b]])
    xa, xb = var[layer, p], var[layer + 1, q]
    ys = nx + np.arange(P)
    share = problem.share
    # rows: per-layer balance, then y >= x_a - x_b and y >= x_b - x_a
    W = len(window)
    rows = [np.repeat(np.arange(W), [len(members[l]) for l in window])]
    cols = [np.arange(nx)]
    vals = [np.ones(nx)]
    r0 = W + 2 * np.arange(P)
    rows += [r0, r0, r0, r0 + 1, r0 + 1, r0 + 1]
    cols += [xa, xb, ys, xb, xa, ys]
    vals += [np.ones(P), -np.ones(P), -np.ones(P), np.ones(P), -np.ones(P), -np.ones(P)]
    lo = [np.full(W, float(share)), np.full(2 * P, -np.inf)]
    hi = [np.full(W, float(share)), np.zeros(2 * P)]
    row = W + 2 * P
    for group, bound in _capacity_groups(layer, p, q, count, share):
        rows.append(np.full(len(group), row))
        cols.append(ys[group])
        vals.append(count[group].astype(np.float64))
        lo.append(np.array([bound]))
        hi.append(np.array([np.inf]))
        row += 1
    A = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(row, n))
    x0 = np.zeros(n)
    on_a = np.concatenate([rank_of[l, m] == a for l, m in enumerate(members)]).astype(np.float64)
    x0[:nx] = on_a
    x0[nx:] = np.abs(on_a[xa] - on_a[xb])
    lb, ub = np.zeros(n), np.ones(n)
    others = [k for k in range(len(hop)) if k not in (a, b)]
    if np.allclose(hop[a, others], hop[b, others]):
        # a and b are interchangeable (same hop costs to every other rank): pin one expert to its side.
        lb[0] = ub[0] = on_a[0]
    integrality = np.zeros(n)
    integrality[:nx] = 1
    x, sol = _solve_mip(c, A, np.concatenate(lo), np.concatenate(hi), lb, ub, integrality, time_limit, gap,
                        start=x0, cutoff=float(c @ x0), backend=backend)
    if x is None:
        return None, sol["status"]
    out = rank_of.copy()
    side = x[:nx] > 0.5
    for l, m in enumerate(members):
        out[l, m] = np.where(side[offsets[l] : offsets[l + 1]], a, b)
    return out, sol["status"]


def cross_lower_bound(problem: PlacementProblem) -> float:
    """A valid lower bound on the objective: each expert's rank holds only E/R experts of the next layer.

    So at most the E/R heaviest successors of p (or predecessors of q) can be
    local; the rest of its row (column) crosses ranks at the cheapest hop cost.
    """
    stats, share = problem.stats, problem.share
    hop = problem.topology.cost_matrix()
    cheapest = float(hop[~np.eye(len(hop), dtype=bool)].min()) if len(hop) > 1 else 0.0
    total = 0.0
    for T in stats.transitions:
        rows = np.sort(T, axis=1)[:, ::-1][:, share:].sum()
        cols = np.sort(T, axis=0)[::-1][share:].sum()
        total += max(rows, cols)
    return total * cheapest
