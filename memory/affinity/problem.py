"""The placement problem every solver takes, and the interface solvers share.

A solver maps ``(transition statistics, number of ranks, topology)`` to an
:class:`~tessera.memory.affinity.placement.ExpertPlacement` in which every
rank holds ``E / R`` experts of every layer. Solvers are interchangeable
(``tessera place --solver NAME``); each records how long it took and the
cost it reached in ``placement.info``.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tessera.memory.affinity.metrics import cross_rank_fraction, transition_cost
from tessera.memory.expert_placement import ExpertPlacement, PlacementInvalid
from tessera.memory.affinity.stats import AffinityStats
from tessera.memory.affinity.topology import Topology


@dataclass(frozen=True, eq=False)
class PlacementProblem:
    """Statistics to place, the expert-parallel degree and the hop costs between ranks."""

    stats: AffinityStats
    num_ranks: int
    topology: Topology | None = None

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise PlacementInvalid(f"num_ranks must be >= 1, got {self.num_ranks}")
        if self.stats.num_experts % self.num_ranks:
            raise PlacementInvalid(
                f"{self.stats.num_experts} experts cannot be shared equally by {self.num_ranks} ranks; "
                "use an ep degree that divides the expert count"
            )
        topo = self.topology or Topology.flat(self.num_ranks)
        if topo.num_ranks != self.num_ranks:
            raise PlacementInvalid(
                f"topology has {topo.num_ranks} ranks but the problem has {self.num_ranks}; build "
                f"Topology(num_ranks={self.num_ranks}, ...)"
            )
        object.__setattr__(self, "topology", topo)

    @property
    def share(self) -> int:
        """Experts per rank per layer."""
        return self.stats.num_experts // self.num_ranks

    def cost(self, rank_of: np.ndarray) -> float:
        return transition_cost(self.stats, rank_of, self.topology)


class PlacementSolver(abc.ABC):
    """Base of all solvers: subclasses implement :meth:`_solve` and set ``name``."""

    name: ClassVar[str] = ""

    def solve(self, problem: PlacementProblem) -> ExpertPlacement:
        start = time.perf_counter()
        rank_of, info = self._solve(problem)
        elapsed = time.perf_counter() - start
        info = {
            **info,
            "solve_s": round(elapsed, 4),
            "cost": problem.cost(rank_of),
            "cross_rank_fraction": cross_rank_fraction(problem.stats, rank_of, problem.num_ranks),
        }
        return ExpertPlacement(rank_of, problem.num_ranks, self.name, info=info)

    @abc.abstractmethod
    def _solve(self, problem: PlacementProblem) -> tuple[np.ndarray, dict]:
        """Return ``rank_of [L, E]`` and solver-specific info."""
