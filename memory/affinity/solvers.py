"""Solver registry and the two baselines, ``linear`` and ``round_robin``.

``linear`` (contiguous blocks of experts per rank, the same at every layer)
is what an engine does with no placement; ``round_robin`` deals experts out
like cards. Neither looks at the trace: they are the baselines ``greedy``
(:mod:`.greedy`) and ``ilp`` (:mod:`.ilp`) must beat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tessera.memory.expert_placement import linear_rank_of
from tessera.memory.affinity.problem import PlacementProblem, PlacementSolver


@dataclass(frozen=True)
class LinearSolver(PlacementSolver):
    name = "linear"

    def _solve(self, problem: PlacementProblem) -> tuple[np.ndarray, dict]:
        s = problem.stats
        return linear_rank_of(s.num_layers, s.num_experts, problem.num_ranks), {}


@dataclass(frozen=True)
class RoundRobinSolver(PlacementSolver):
    name = "round_robin"

    def _solve(self, problem: PlacementProblem) -> tuple[np.ndarray, dict]:
        s = problem.stats
        return np.tile(np.arange(s.num_experts) % problem.num_ranks, (s.num_layers, 1)), {}


def solver_names() -> tuple[str, ...]:
    return ("linear", "round_robin", "greedy", "ilp")


def get_solver(name: str, **options: Any) -> PlacementSolver:
    """``get_solver("ilp", time_limit_s=10)`` -> a configured solver; options are the solver's fields."""
    from tessera.memory.affinity.greedy import GreedySolver
    from tessera.memory.affinity.ilp import IlpSolver

    classes = {"linear": LinearSolver, "round_robin": RoundRobinSolver, "greedy": GreedySolver, "ilp": IlpSolver}
    if name not in classes:
        raise ValueError(f"unknown placement solver {name!r}; use one of {', '.join(solver_names())}")
    cls = classes[name]
    try:
        return cls(**options)
    except TypeError as err:
        fields = ", ".join(getattr(cls, "__dataclass_fields__", {})) or "none"
        raise ValueError(f"solver {name!r} does not take options {sorted(options)}; its options: {fields}") from err
