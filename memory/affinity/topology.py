"""Topology cost: what it costs to move a token between two expert-parallel ranks.

A hop between GPUs on one node (NVLink) is far cheaper than one across nodes
(InfiniBand/Ethernet), so a placement should first keep transitions on one
rank, then on one node. Ranks are numbered node by node (``ranks_per_node``
consecutive ranks share a node), as the controller orders them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Topology:
    """Two-level cost model: 0 on the same rank, ``intra_node`` on the same node, ``inter_node`` across nodes."""

    num_ranks: int
    ranks_per_node: int | None = None  # None: all ranks on one node
    intra_node: float = 1.0
    inter_node: float = 4.0

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {self.num_ranks}")
        rpn = self.ranks_per_node or self.num_ranks
        if rpn < 1 or self.num_ranks % rpn:
            raise ValueError(
                f"ranks_per_node={self.ranks_per_node} must divide num_ranks={self.num_ranks} "
                "(every node holds the same number of ranks)"
            )
        object.__setattr__(self, "ranks_per_node", rpn)
        if not 0 < self.intra_node <= self.inter_node:
            raise ValueError(
                f"costs must satisfy 0 < intra_node <= inter_node, got {self.intra_node}, {self.inter_node}"
            )

    @classmethod
    def flat(cls, num_ranks: int) -> "Topology":
        """Every cross-rank hop costs 1: the cost is the cross-rank transition count."""
        return cls(num_ranks=num_ranks, ranks_per_node=None, intra_node=1.0, inter_node=1.0)

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.ranks_per_node

    @property
    def is_flat(self) -> bool:
        return self.num_nodes == 1 or self.intra_node == self.inter_node

    def node_of(self, rank) -> np.ndarray:
        return np.asarray(rank) // self.ranks_per_node

    def cost_matrix(self) -> np.ndarray:
        """``[R, R]`` hop cost between ranks (0 on the diagonal)."""
        node = self.node_of(np.arange(self.num_ranks))
        same_node = node[:, None] == node[None, :]
        cost = np.where(same_node, self.intra_node, self.inter_node).astype(np.float64)
        np.fill_diagonal(cost, 0.0)
        return cost
