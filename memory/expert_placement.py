"""Which expert-parallel ranks hold each routed expert of each MoE layer: the one ``ExpertPlacement``.

The planner builds it for a job (linear by default, or from the user's
``expert_map`` / ``expert_replicas`` / a ``tessera place`` file), the affinity
solvers (``memory/affinity``) produce it from routing traces, the loader reads
which experts (and which slice of each) a rank holds from it, and the MoE
dispatch (``parallel/expert.py``) reads its owner tables. Nothing else
computes an expert map.

- ``rank_of[l, e]``: the ep rank of expert ``e``'s primary copy at MoE layer
  row ``l`` (``layer_ids[l]`` is the model's layer index).
- ``replicas[l][e]``: extra ep ranks holding a whole copy of a hot expert
  (EPLB style); a token's choice goes to one copy, by token index.
- ``slices``: with more ep ranks than experts (``ep = slices * experts``) each
  expert's intermediate dim is split over ``slices`` consecutive ep ranks
  (DeepSpeed-MoE expert slicing); ``rank_of`` then names the first of them.
- Inside an ep rank, every copy is further split over that rank's ``tp``
  ranks: group rank ``g = ep_rank * tp + tp_rank`` of the stage's MoE group.

``balanced`` placements (every solver's output) hold exactly ``E / R``
primaries per rank and the same number of replica slots per rank; a user's
map only needs every rank to hold at least one expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from tessera.errors import ConfigError


class PlacementInvalid(ConfigError):
    """A placement that cannot work or breaks the balance rules (names the layer and rank)."""


@dataclass(frozen=True, eq=False)
class ExpertPlacement:
    rank_of: np.ndarray = field(repr=False)
    num_ranks: int = 1
    solver: str = ""
    replicas: tuple[tuple[tuple[int, ...], ...], ...] = field(default=(), repr=False)
    info: Mapping = field(default_factory=dict, repr=False)
    slices: int = 1
    layer_ids: tuple[int, ...] | None = None
    balanced: bool = True

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
        ids = tuple(range(layers)) if self.layer_ids is None else tuple(int(i) for i in self.layer_ids)
        if len(ids) != layers:
            raise PlacementInvalid(f"layer_ids has {len(ids)} entries for {layers} MoE layers")
        object.__setattr__(self, "layer_ids", ids)
        self.validate()

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def linear(cls, layer_ids: Sequence[int], num_experts: int, ep: int) -> "ExpertPlacement":
        """The default: contiguous blocks of experts per ep rank; with more ranks than experts, each expert
        sliced over ``ep / experts`` ranks."""
        layer_ids = tuple(layer_ids)
        if num_experts >= ep:
            row = [_split_index(num_experts, ep, e) for e in range(num_experts)]
            return cls(np.array([row] * len(layer_ids), dtype=np.int64).reshape(len(layer_ids), num_experts), ep,
                       "linear", layer_ids=layer_ids, balanced=num_experts % ep == 0)
        if ep % num_experts:
            raise PlacementInvalid(
                f"ep={ep} ranks and {num_experts} experts: with more ep ranks than experts, ep must be a multiple "
                f"of the expert count so each expert is sliced over ep/experts ranks; use ep in "
                f"{[d for d in range(1, num_experts + 1) if num_experts % d == 0] + [num_experts * 2]}"
            )
        s = ep // num_experts
        row = [e * s for e in range(num_experts)]
        return cls(np.array([row] * len(layer_ids), dtype=np.int64).reshape(len(layer_ids), num_experts), ep,
                   "linear", slices=s, layer_ids=layer_ids, balanced=False)

    @classmethod
    def for_model(cls, num_experts: int, layer_ids: Sequence[int], ep: int, expert_map: Any = None,
                  expert_replicas: Any = None) -> "ExpertPlacement":
        """The placement of a model's experts over ``ep`` ranks: linear, or the user's ``expert_map``
        (``[layer][expert] = ep rank``, or one list for every MoE layer) with optional ``expert_replicas``
        (``[layer][expert]`` = extra ep ranks). Errors name the layer and the fix."""
        layer_ids = tuple(layer_ids)
        if expert_map is None:
            base = cls.linear(layer_ids, num_experts, ep)
        else:
            if num_experts < ep:
                raise PlacementInvalid(
                    f"an explicit expert_map needs at least as many experts ({num_experts}) as ep ranks ({ep}); "
                    "leave expert_map out to slice experts over ranks"
                )
            maps = list(expert_map)
            if maps and not isinstance(maps[0], (list, tuple, np.ndarray)):
                maps = [maps] * len(layer_ids)
            if len(maps) == 1 and len(layer_ids) > 1:
                maps = maps * len(layer_ids)
            if len(maps) != len(layer_ids):
                raise PlacementInvalid(
                    f"expert_map has {len(maps)} per-layer lists, but the model has {len(layer_ids)} MoE layers "
                    f"({list(layer_ids)}); give one list per MoE layer or a single list for all"
                )
            rows = []
            for layer, m in zip(layer_ids, maps):
                m = [int(r) for r in m]
                if len(m) != num_experts:
                    raise PlacementInvalid(
                        f"expert_map for layer {layer} has {len(m)} entries; it needs one ep rank per expert ({num_experts})")
                bad = [r for r in m if not 0 <= r < ep]
                if bad:
                    raise PlacementInvalid(f"expert_map for layer {layer} names ep rank {bad[0]}, outside 0..{ep - 1}")
                empty = sorted(set(range(ep)) - set(m))
                if empty:
                    raise PlacementInvalid(
                        f"expert_map for layer {layer} leaves ep rank(s) {empty} without experts; every rank must "
                        "hold its share")
                rows.append(m)
            base = cls(np.array(rows, dtype=np.int64).reshape(len(layer_ids), num_experts), ep, "expert_map",
                       layer_ids=layer_ids, balanced=False)
        if expert_replicas is None:
            return base
        return base.with_replicas(_check_replicas(base, expert_replicas), balanced=False)

    def with_replicas(self, replicas, balanced: bool | None = None, **info) -> "ExpertPlacement":
        return ExpertPlacement(self.rank_of, self.num_ranks, self.solver, replicas, {**self.info, **info}, self.slices,
                               self.layer_ids, self.balanced if balanced is None else balanced)

    # -- what the affinity tools read ----------------------------------------------------------------------

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
        """Primary rank first, then the replicas (``layer`` is the MoE-layer row)."""
        return (int(self.rank_of[layer, expert]),) + self.replicas[layer][expert]

    def replica_counts(self) -> np.ndarray:
        """``[L, E]`` number of copies of each expert (1 without replicas)."""
        return np.array([[1 + len(extra) for extra in row] for row in self.replicas], dtype=np.int64)

    def expert_map(self) -> list[list[int]]:
        """``expert_map[l][e]`` = primary rank: the form ``LLMOptions.expert_map`` takes."""
        return self.rank_of.tolist()

    def engine_options(self) -> dict:
        """``LLMOptions`` fields that apply this placement (replicas only when present)."""
        options: dict = {"expert_map": self.expert_map()}
        if self.has_replicas:
            options["expert_replicas"] = [[list(extra) for extra in row] for row in self.replicas]
        return options

    def experts_on(self, layer: int, rank: int) -> list[int]:
        """Experts whose weights ``rank`` holds at MoE-layer row ``layer`` (primaries and replicas)."""
        return [e for e in range(self.num_experts) if rank in self.ranks_holding(layer, e)]

    # -- what the loader and the dispatch read (by the model's layer index) -----------------------------------

    def row(self, layer_id: int) -> int:
        try:
            return self.layer_ids.index(int(layer_id))
        except ValueError:
            raise KeyError(f"layer {layer_id} is not a MoE layer of this placement ({list(self.layer_ids)})") from None

    def copies(self, layer_id: int, expert: int) -> tuple[tuple[int, ...], ...]:
        """Every copy of ``expert`` at model layer ``layer_id``: each a tuple of ep ranks (its slices)."""
        r = self.row(layer_id)
        first = int(self.rank_of[r, expert])
        primary = tuple(range(first, first + self.slices))
        return (primary, *((int(x),) for x in self.replicas[r][expert]))

    def owners(self, layer_id: int, tp: int = 1) -> tuple[tuple[int, ...], ...]:
        """Per expert, the MoE-group ranks of its primary copy, in slice order (ep slices, then tp)."""
        return tuple(_group_ranks(self.copies(layer_id, e)[0], tp) for e in range(self.num_experts))

    def local_experts(self, layer_id: int, group_rank: int, tp: int = 1) -> list[tuple[int, int, int]]:
        """(expert, slice index, number of slices) that MoE-group rank ``group_rank`` holds at ``layer_id``."""
        out = []
        for expert in range(self.num_experts):
            for copy in self.copies(layer_id, expert):
                ranks = _group_ranks(copy, tp)
                if group_rank in ranks:
                    out.append((expert, ranks.index(group_rank), len(ranks)))
        return out

    def owner_table(self, layer_id: int, tp: int = 1):
        """[experts, slices] int64 tensor of owner group ranks; with replicas [experts, copies, slices],
        padded with -1 where an expert has fewer copies than the most replicated one."""
        import torch

        copies = [[_group_ranks(c, tp) for c in self.copies(layer_id, e)] for e in range(self.num_experts)]
        if all(len(c) == 1 for c in copies):
            return torch.tensor([c[0] for c in copies], dtype=torch.int64)
        width, slices = max(len(c) for c in copies), len(copies[0][0])
        padded = [c + [(-1,) * slices] * (width - len(c)) for c in copies]
        return torch.tensor(padded, dtype=torch.int64)

    def ep_map(self, layer_id: int) -> list[int]:
        """expert -> first ep rank owning it (what the affinity tools read back)."""
        return self.rank_of[self.row(layer_id)].tolist()

    # -- rules ------------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Ranks in range, copies on distinct ranks; for ``balanced`` placements equal shares per rank."""
        layers, experts = self.rank_of.shape
        ranks = self.num_ranks
        if ranks < 1:
            raise PlacementInvalid(f"num_ranks must be >= 1, got {ranks}")
        if self.slices < 1 or (self.slices > 1 and (self.has_replicas or experts * self.slices != ranks)):
            raise PlacementInvalid(f"slices={self.slices} needs ep = slices x experts ({experts}) and no replicas")
        if self.rank_of.size and (self.rank_of.min() < 0 or self.rank_of.max() >= ranks):
            raise PlacementInvalid(f"ranks must be in [0, {ranks}), got [{self.rank_of.min()}, {self.rank_of.max()}]")
        for layer in range(layers):
            for e in range(experts):
                holders = self.ranks_holding(layer, e)
                if len(set(holders)) != len(holders):
                    raise PlacementInvalid(f"layer {layer}: expert {e} has two copies on one rank {holders}")
                for r in self.replicas[layer][e]:
                    if not 0 <= r < ranks:
                        raise PlacementInvalid(f"layer {layer}: replica of expert {e} on rank {r} outside [0, {ranks})")
        if self.balanced:
            self._check_balance()

    def _check_balance(self) -> None:
        layers, experts = self.rank_of.shape
        ranks = self.num_ranks
        if experts % ranks:
            raise PlacementInvalid(
                f"{experts} experts cannot be shared equally by {ranks} ranks; use an ep degree that divides "
                f"the expert count"
            )
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
                for r in self.replicas[layer][e]:
                    extra_counts[r] += 1
            if len(set(extra_counts.tolist())) > 1:
                raise PlacementInvalid(
                    f"layer {layer}: replica slots per rank differ ({extra_counts.tolist()}); every rank must "
                    "hold the same number of replicas so expert memory stays balanced"
                )


def linear_rank_of(num_layers: int, num_experts: int, num_ranks: int) -> np.ndarray:
    """Contiguous blocks: expert e on rank e // (E/R) at every layer (the default placement)."""
    if num_experts % num_ranks:
        raise PlacementInvalid(
            f"{num_experts} experts cannot be shared equally by {num_ranks} ranks; use an ep degree that "
            "divides the expert count"
        )
    share = num_experts // num_ranks
    return np.tile(np.arange(num_experts) // share, (num_layers, 1))


def _group_ranks(ep_ranks: tuple[int, ...], tp: int) -> tuple[int, ...]:
    return tuple(r * tp + t for r in ep_ranks for t in range(tp))


def _split_index(n: int, parts: int, item: int) -> int:
    """Which of ``parts`` balanced contiguous pieces of ``range(n)`` holds ``item``."""
    base, extra = divmod(n, parts)
    big = extra * (base + 1)
    return item // (base + 1) if item < big else extra + (item - big) // base


def _check_replicas(base: ExpertPlacement, expert_replicas: Any) -> tuple:
    reps = list(expert_replicas)
    layer_ids = base.layer_ids
    if len(reps) != len(layer_ids):
        raise PlacementInvalid(
            f"expert_replicas has {len(reps)} per-layer lists, but the model has {len(layer_ids)} MoE layers "
            f"({list(layer_ids)})"
        )
    if base.num_ranks > base.num_experts:
        raise PlacementInvalid("expert_replicas needs at least as many experts as ep ranks (experts are not sliced over ep)")
    out = []
    for row, (layer, per_expert) in enumerate(zip(layer_ids, reps)):
        per_expert = list(per_expert)
        if len(per_expert) != base.num_experts:
            raise PlacementInvalid(f"expert_replicas for layer {layer} has {len(per_expert)} entries; it needs one per expert")
        copies = []
        for expert, extra in enumerate(per_expert):
            primary = int(base.rank_of[row, expert])
            extra = [int(r) for r in extra]
            if any(not 0 <= r < base.num_ranks for r in extra) or len(set(extra + [primary])) != len(extra) + 1:
                raise PlacementInvalid(
                    f"expert_replicas for layer {layer}, expert {expert} is {extra}: copies must be distinct ep ranks "
                    f"in 0..{base.num_ranks - 1} other than the primary rank {primary}"
                )
            copies.append(tuple(extra))
        out.append(tuple(copies))
    return tuple(out)
