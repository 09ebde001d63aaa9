"""The expert placement: which expert-parallel rank holds which expert, per MoE layer.

``rank_of[l, e]`` is the rank of expert ``e``'s primary copy at MoE layer
``l``; every rank holds exactly ``E / R`` primaries per layer, so no rank
stores more expert weights than another. ``replicas[l][e]`` lists extra
ranks holding a redundant copy of a hot expert (EPLB style); replicas come in
whole slots, the same number per rank per layer, so memory stays balanced.
The engine consumes ``expert_map()`` (``expert_map[l][e] = rank``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np


class PlacementInvalid(ValueError):
    """A placement that breaks the balance rules (names the layer and rank)."""


@dataclass(frozen=True, eq=False)
class ExpertPlacement:
    rank_of: np.ndarray = field(repr=False)
    num_ranks: int = 1
    solver: str = ""
    replicas: tuple[tuple[tuple[int, ...], ...], ...] = field(default=(), repr=False)
    info: Mapping = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        rank_of = np.asarray(self.rank_of, dtype=np.int64)
        if rank_of.ndim != 2:
            raise PlacementInvalid(f"rank_of must be [layers, experts], got shape {rank_of.shape}")
        rank_of = rank_of.copy()
        rank_of.setflags(write=False)
        object.__setattr__(self, "rank_of", rank_of)
        layers, experts = rank_of.shape
        if self.replicas:
            if len(self.replicas) != layers or any(len(row) != experts for row in self.replicas):
                raise PlacementInvalid(f"replicas must be [layers={layers}][experts={experts}] tuples of ranks")
            reps = tuple(tuple(tuple(int(r) for r in extra) for extra in row) for row in self.replicas)
        else:
            reps = tuple(tuple(() for _ in range(experts)) for _ in range(layers))
        object.__setattr__(self, "replicas", reps)
        object.__setattr__(self, "info", dict(self.info))
        self.validate()

    @property
    def num_layers(self) -> int:
        return int(self.rank_of.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.rank_of.shape[1])

    @property
    def has_replicas(self) -> bool:
        return any(extra for row in self.replicas for extra in row)

    def ranks_holding(self, layer: int, expert: int) -> tuple[int, ...]:
        """Primary rank first, then the replicas."""
        return (int(self.rank_of[layer, expert]),) + self.replicas[layer][expert]

    def replica_counts(self) -> np.ndarray:
        """``[L, E]`` number of copies of each expert (1 without replicas)."""
        return np.array([[1 + len(extra) for extra in row] for row in self.replicas], dtype=np.int64)

    def expert_map(self) -> list[list[int]]:
        """``expert_map[l][e]`` = primary rank: the form ``LLMEngine.load(expert_map=...)`` takes."""
        return self.rank_of.tolist()

    def engine_options(self) -> dict:
        """Keyword arguments of ``LLMEngine.load`` that apply this placement (replicas only when present)."""
        options: dict = {"expert_map": self.expert_map()}
        if self.has_replicas:
            options["expert_replicas"] = [[list(extra) for extra in row] for row in self.replicas]
        return options

    def experts_on(self, layer: int, rank: int) -> list[int]:
        """Experts whose weights rank ``rank`` holds at ``layer`` (primaries and replicas)."""
        return [e for e in range(self.num_experts) if rank in self.ranks_holding(layer, e)]

    def validate(self) -> None:
        """Every rank holds ``E/R`` primaries and the same number of replica slots per layer."""
        layers, experts = self.rank_of.shape
        ranks = self.num_ranks
        if ranks < 1:
            raise PlacementInvalid(f"num_ranks must be >= 1, got {ranks}")
        if experts % ranks:
            raise PlacementInvalid(
                f"{experts} experts cannot be shared equally by {ranks} ranks; use an ep degree that divides "
                f"the expert count"
            )
        if self.rank_of.size and (self.rank_of.min() < 0 or self.rank_of.max() >= ranks):
            raise PlacementInvalid(f"ranks must be in [0, {ranks}), got [{self.rank_of.min()}, {self.rank_of.max()}]")
        share = experts // ranks
        for layer in range(layers):
            counts = np.bincount(self.rank_of[layer], minlength=ranks)
            if not np.all(counts == share):
                bad = int(np.argmax(counts != share))
                raise PlacementInvalid(
                    f"layer {layer}: rank {bad} holds {counts[bad]} experts; every rank must hold {share}"
                )
            extra_counts = np.zeros(ranks, dtype=np.int64)
            for e in range(experts):
                holders = self.ranks_holding(layer, e)
                if len(set(holders)) != len(holders):
                    raise PlacementInvalid(f"layer {layer}: expert {e} has two copies on one rank {holders}")
                for r in self.replicas[layer][e]:
                    if not 0 <= r < ranks:
                        raise PlacementInvalid(f"layer {layer}: replica of expert {e} on rank {r} outside [0, {ranks})")
                    extra_counts[r] += 1
            if len(set(extra_counts.tolist())) > 1:
                raise PlacementInvalid(
                    f"layer {layer}: replica slots per rank differ ({extra_counts.tolist()}); every rank must "
                    "hold the same number of replicas so expert memory stays balanced"
                )

    def with_replicas(self, replicas, **info) -> "ExpertPlacement":
        return ExpertPlacement(self.rank_of, self.num_ranks, self.solver, replicas, {**self.info, **info})


def linear_rank_of(num_layers: int, num_experts: int, num_ranks: int) -> np.ndarray:
    """Contiguous blocks: expert e on rank e // (E/R) at every layer (the default placement)."""
    if num_experts % num_ranks:
        raise PlacementInvalid(
            f"{num_experts} experts cannot be shared equally by {num_ranks} ranks; use an ep degree that "
            "divides the expert count"
        )
    share = num_experts // num_ranks
    return np.tile(np.arange(num_experts) // share, (num_layers, 1))
