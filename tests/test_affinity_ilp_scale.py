"""The ILP at sizes where the direct program is too big: lower bound, highspy MIP start, window search."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.memory.affinity.ilp import _solve_mip, cross_lower_bound, improve_rank_pairs
from tessera.memory.affinity.problem import PlacementProblem
from tessera.memory.affinity.solvers import get_solver
from tessera.memory.affinity.stats import AffinityStats
from tessera.memory.affinity.synthetic import chain_affinity_trace, planted_affinity_trace


def test_greedy_at_the_lower_bound_is_proved_optimal():
    # As many planted groups as ranks: the floor is reachable and the capacity bound meets it.
    syn = planted_affinity_trace(num_layers=16, num_experts=64, num_groups=4, top_k=2, num_tokens=8000,
                                 affinity=0.9, seed=1)
    stats = AffinityStats.from_trace(syn.trace)
    problem = PlacementProblem(stats, 4)
    placement = get_solver("ilp", time_limit_s=5.0).solve(problem)
    assert placement.info["status"] == "optimal" and placement.info["method"] == "bound"
    assert placement.info["cost"] == pytest.approx(cross_lower_bound(problem))
    assert placement.info["cost"] <= problem.cost(syn.planted_rank_of) + 1e-9


def test_bound_is_a_lower_bound():
    stats = AffinityStats.from_trace(chain_affinity_trace(6, 16, 2, 2000, 0.9, 2, seed=5))
    problem = PlacementProblem(stats, 4)
    rng = np.random.default_rng(0)
    bound = cross_lower_bound(problem)
    for _ in range(20):
        rank_of = np.stack([rng.permutation(np.repeat(np.arange(4), 4)) for _ in range(6)])
        assert problem.cost(rank_of) >= bound - 1e-9


@pytest.mark.timeout(120)
def test_ilp_beats_greedy_on_branching_chains():
    pytest.importorskip("highspy")
    # 32 experts x 8 layers x 8 ranks: the direct program has ~60k rows; the window search runs.
    stats = AffinityStats.from_trace(chain_affinity_trace(8, 32, 2, 4000, 0.9, 2, seed=3))
    problem = PlacementProblem(stats, 8)
    greedy = get_solver("greedy").solve(problem)
    placement = get_solver("ilp", time_limit_s=6.0).solve(problem)
    assert placement.info["method"] == "lns" and placement.info["backend"] == "highspy"
    assert placement.info["used"] == "ilp" and placement.info["lns"]["improved"] >= 1
    assert placement.info["cost"] < greedy.info["cost"], "the window search found nothing better than greedy"
    assert placement.info["cross_rank_fraction"] < greedy.info["cross_rank_fraction"]
    for layer in range(8):
        assert np.bincount(placement.rank_of[layer], minlength=8).tolist() == [4] * 8


def test_window_search_never_raises_the_cost_on_either_backend():
    stats = AffinityStats.from_trace(chain_affinity_trace(5, 16, 2, 1500, 0.8, 2, seed=7))
    problem = PlacementProblem(stats, 4)
    greedy = get_solver("greedy").solve(problem)
    backends = ["scipy"] + (["highspy"] if _has_highspy() else [])
    for backend in backends:
        rank_of, info = improve_rank_pairs(problem, greedy.rank_of, 2.0, backend=backend, windows=(2,))
        assert problem.cost(rank_of) <= greedy.info["cost"] + 1e-9
        assert info["subproblems"] >= 1
        for layer in range(5):
            assert np.bincount(rank_of[layer], minlength=4).tolist() == [4] * 4


def test_highspy_keeps_the_mip_start_when_out_of_time():
    pytest.importorskip("highspy")
    from scipy import sparse

    # min -x0 - 2 x1, x0 + x1 <= 1: the start (1, 0) is feasible; with any time the optimum (0, 1) is found.
    A = sparse.csr_matrix(np.array([[1.0, 1.0]]))
    x, info = _solve_mip(np.array([-1.0, -2.0]), A, np.array([-np.inf]), np.array([1.0]), np.zeros(2), np.ones(2),
                         np.ones(2), 1.0, 1e-4, start=np.array([1.0, 0.0]), backend="highspy")
    assert info["backend"] == "highspy" and x.tolist() == [0.0, 1.0]


def _has_highspy() -> bool:
    try:
        import highspy  # noqa: F401
    except ImportError:
        return False
    return True
