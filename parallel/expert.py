"""Expert parallelism: which rank owns which expert (or slice of one), and the
all_to_all dispatch / combine of routed tokens.

Ranks of one pipeline stage form the *MoE group* (``ep`` x ``tp`` ranks, group
rank ``g = ep_rank * tp + tp_rank``). An expert lives on the ep rank the
expert map names (contiguous by default, any map allowed: expert-affinity
placement supplies non-contiguous ones) and its intermediate dim is sliced
over that ep rank's tp ranks. When there are more ep ranks than experts
(``ep % experts == 0``), each expert is sliced over ``ep / experts`` ep ranks
too, as in DeepSpeed-MoE expert slicing. Every owner of an expert computes a
partial output with its slice; the combine step sums them.

Dispatch (``all_to_all`` mode): activations are replicated inside the group, so each rank takes a
balanced share of the tokens, sends every (token, choice) to every owner of the
chosen expert with ``all_to_all_single`` (uneven splits), gets the partial
expert outputs back the same way, weights and sums them, and the shares are
all-gathered so every rank again holds the full batch.

``all_reduce`` mode skips the exchange: every rank already holds every token,
computes the (token, choice) pairs its expert slices own (the same work as
after an all_to_all), and one all_reduce sums the partial outputs. Both modes
give the same result. ``auto`` picks all_reduce for a handful of tokens
(decode: five collectives per layer cost more than the data they move) and
whenever it moves fewer bytes: all_to_all sends each row ``k * slices`` times
to ``1/P`` of the group twice and then all-gathers the shares, which beats one
all_reduce only when ``2 * k * slices < P`` (large ep, few choices).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from tessera.errors import ConfigError
from tessera.parallel.comm import GroupComm
from tessera.parallel.tensor import split_range


EP_MODES = ("standard", "coherent")


@dataclass(frozen=True)
class ExpertPlacement:
    """Owners of every expert of every MoE layer: ``owners[layer][expert]`` = group ranks, slice order."""

    num_experts: int
    ep: int
    tp: int
    owners: dict  # layer -> tuple[tuple[int, ...], ...]
    # Optional redundant copies of hot experts (expert-affinity load balance):
    # layer -> per expert, a tuple of extra copies, each a tuple of group ranks
    # like ``owners``. A token's (expert) choice goes to one copy, split evenly.
    replicas: dict = field(default_factory=dict)
    # "standard": tokens split over the group by index; "coherent": each token is
    # handled on the rank of its top-1 expert (see ExpertDispatcher).
    mode: str = "standard"

    def local_experts(self, layer: int, group_rank: int) -> list[tuple[int, int, int]]:
        """(expert, slice index, number of slices) held by ``group_rank`` in ``layer`` (replicas included)."""
        out = []
        extra = self.replicas.get(layer) or ((),) * self.num_experts
        for expert, ranks in enumerate(self.owners[layer]):
            for copy in (ranks, *extra[expert]):
                if group_rank in copy:
                    out.append((expert, copy.index(group_rank), len(copy)))
        return out

    def owner_table(self, layer: int) -> torch.Tensor:
        """[experts, slices] int64 tensor of owner group ranks (every expert has the same slice count).

        With replicas in ``layer``: [experts, copies, slices], padded with -1
        where an expert has fewer copies than the most replicated one.
        """
        if not self.replicas.get(layer):
            return torch.tensor(self.owners[layer], dtype=torch.int64)
        copies = [(ranks, *extra) for ranks, extra in zip(self.owners[layer], self.replicas[layer])]
        width, slices = max(len(c) for c in copies), len(self.owners[layer][0])
        padded = [list(c) + [(-1,) * slices] * (width - len(c)) for c in copies]
        return torch.tensor(padded, dtype=torch.int64)

    def ep_map(self, layer: int) -> list[int]:
        """expert -> first ep rank owning it (what the affinity planner reads back)."""
        return [ranks[0] // self.tp for ranks in self.owners[layer]]


def build_placement(
    num_experts: int, moe_layers: Sequence[int], ep: int, tp: int, expert_map=None, expert_replicas=None,
    mode: str = "standard",
) -> ExpertPlacement:
    """Validate ``expert_map`` (``map[layer][expert] = ep rank``, or one list for all layers) and expand it.

    ``expert_replicas[layer][expert]`` (optional, one entry per MoE layer) lists
    extra ep ranks holding a copy of that expert. Raises :class:`ConfigError`
    before any worker starts when the map cannot work.
    """
    if mode not in EP_MODES:
        raise ConfigError(f"expert-parallel mode {mode!r} is unknown; use one of {', '.join(EP_MODES)}")
    if mode != "standard":
        base = build_placement(num_experts, moe_layers, ep, tp, expert_map, expert_replicas)
        return ExpertPlacement(base.num_experts, base.ep, base.tp, base.owners, base.replicas, mode)
    if expert_replicas is not None:
        base = build_placement(num_experts, moe_layers, ep, tp, expert_map)
        return _with_replicas(base, list(moe_layers), expert_replicas)
    layers = list(moe_layers)
    per_layer: dict[int, list[int]] = {}
    if expert_map is None:
        if num_experts >= ep:
            default = [split_index(num_experts, ep, e) for e in range(num_experts)]
            per_layer = {layer: default for layer in layers}
        elif ep % num_experts:
            raise ConfigError(
                f"ep={ep} ranks and {num_experts} experts: with more ep ranks than experts, ep must be a multiple "
                f"of the expert count so each expert is sliced over ep/experts ranks; use ep in "
                f"{[d for d in range(1, num_experts + 1) if num_experts % d == 0] + [num_experts * 2]}"
            )
        else:
            s = ep // num_experts
            owners = tuple(
                tuple(r * tp + t for r in range(e * s, (e + 1) * s) for t in range(tp)) for e in range(num_experts)
            )
            return ExpertPlacement(num_experts, ep, tp, {layer: owners for layer in layers})
    else:
        if num_experts < ep:
            raise ConfigError(
                f"an explicit expert_map needs at least as many experts ({num_experts}) as ep ranks ({ep}); "
                "leave expert_map out to slice experts over ranks"
            )
        maps = list(expert_map)
        if maps and not isinstance(maps[0], (list, tuple)):
            maps = [maps] * len(layers)
        if len(maps) == 1 and len(layers) > 1:
            maps = maps * len(layers)
        if len(maps) != len(layers):
            raise ConfigError(
                f"expert_map has {len(maps)} per-layer lists, but the model has {len(layers)} MoE layers "
                f"({layers}); give one list per MoE layer or a single list for all"
            )
        for layer, m in zip(layers, maps):
            m = [int(r) for r in m]
            if len(m) != num_experts:
                raise ConfigError(f"expert_map for layer {layer} has {len(m)} entries; it needs one ep rank per expert ({num_experts})")
            bad = [r for r in m if not 0 <= r < ep]
            if bad:
                raise ConfigError(f"expert_map for layer {layer} names ep rank {bad[0]}, outside 0..{ep - 1}")
            empty = sorted(set(range(ep)) - set(m))
            if empty:
                raise ConfigError(
                    f"expert_map for layer {layer} leaves ep rank(s) {empty} without experts; every rank must hold its share"
                )
            per_layer[layer] = m
    owners = {
        layer: tuple(tuple(m[e] * tp + t for t in range(tp)) for e in range(num_experts)) for layer, m in per_layer.items()
    }
    return ExpertPlacement(num_experts, ep, tp, owners)


def _with_replicas(base: ExpertPlacement, layers: list[int], expert_replicas) -> ExpertPlacement:
    reps = list(expert_replicas)
    if len(reps) != len(layers):
        raise ConfigError(
            f"expert_replicas has {len(reps)} per-layer lists, but the model has {len(layers)} MoE layers ({layers})"
        )
    if base.ep > base.num_experts:
        raise ConfigError("expert_replicas needs at least as many experts as ep ranks (experts are not sliced over ep)")
    out = {}
    for layer, per_expert in zip(layers, reps):
        per_expert = list(per_expert)
        if len(per_expert) != base.num_experts:
            raise ConfigError(f"expert_replicas for layer {layer} has {len(per_expert)} entries; it needs one per expert")
        copies = []
        for expert, extra in enumerate(per_expert):
            primary = base.owners[layer][expert][0] // base.tp
            extra = [int(r) for r in extra]
            if any(not 0 <= r < base.ep for r in extra) or len(set(extra + [primary])) != len(extra) + 1:
                raise ConfigError(
                    f"expert_replicas for layer {layer}, expert {expert} is {extra}: copies must be distinct ep ranks "
                    f"in 0..{base.ep - 1} other than the primary rank {primary}"
                )
            copies.append(tuple(tuple(r * base.tp + t for t in range(base.tp)) for r in extra))
        out[layer] = tuple(copies)
    return ExpertPlacement(base.num_experts, base.ep, base.tp, base.owners, out)


def split_index(n: int, parts: int, item: int) -> int:
    """Which of ``parts`` balanced contiguous pieces of ``range(n)`` holds ``item``."""
    for p in range(parts):
        a, b = split_range(n, parts, p)
        if a <= item < b:
            return p
    raise IndexError(item)


DISPATCH_MODES = ("auto", "all_to_all", "all_reduce")
LOW_LATENCY_TOKENS = 16


class ExpertDispatcher:
    """Moves routed tokens to their expert owners and the partial outputs back (one MoE group)."""

    def __init__(self, comm: GroupComm, coherent: bool = False, mode: str = "auto") -> None:
        if mode not in DISPATCH_MODES:
            raise ConfigError(f"MoE dispatch mode {mode!r} is unknown; use one of {', '.join(DISPATCH_MODES)}")
        self.comm, self.rank, self.size = comm, comm.rank, comm.size
        self.coherent = coherent
        self.mode = mode
        self.rows_sent = 0  # (token, choice) rows this rank sent to other ranks, both directions

    @staticmethod
    def destinations(token_index: torch.Tensor, ids: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        """[tokens, k, slices] group ranks computing each choice (replicas: copy = token index mod copies)."""
        if owners.dim() == 3:
            counts = (owners[:, :, 0] >= 0).sum(1)
            return owners[ids, token_index.unsqueeze(1) % counts[ids]]
        return owners[ids]

    def __call__(
        self,
        x: torch.Tensor,  # [T, H], identical on every rank of the group
        topk_ids: torch.Tensor,  # [T, k]
        topk_w: torch.Tensor,  # [T, k]
        owners: torch.Tensor,  # [E, slices] group ranks
        compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],  # (rows, expert ids) -> rows
    ) -> torch.Tensor:
        T, H = x.shape
        if self.size > 1 and not self.coherent and (
            self.mode == "all_reduce"
            or (self.mode == "auto" and (T <= LOW_LATENCY_TOKENS or 2 * topk_ids.shape[1] * owners.shape[-1] >= self.size))
        ):
            return self._all_reduce(x, topk_ids, topk_w, owners, compute)
        if self.coherent and self.size > 1:
            # Context-coherent: x is replicated, so the rank that computes a token's
            # top-1 expert can own the token at no cost; only its other choices move.
            all_dest = self.destinations(torch.arange(T, device=x.device), topk_ids, owners)
            anchor = all_dest[:, 0, 0]
            mine = torch.nonzero(anchor == self.rank).squeeze(1)
            xs, ids, w, dest = x[mine], topk_ids[mine], topk_w[mine], all_dest[mine].reshape(-1)
            a, b = 0, len(mine)
        else:
            anchor = None
            a, b = split_range(T, self.size, self.rank)
            xs, ids, w = x[a:b], topk_ids[a:b], topk_w[a:b]
            dest = self.destinations(torch.arange(a, b, device=x.device), ids, owners).reshape(-1)  # [(t, k, s)]
        k, slices = ids.shape[1], owners.shape[-1]
        token = torch.arange(b - a, device=x.device).repeat_interleave(k * slices)
        expert = ids.repeat_interleave(slices, dim=1).reshape(-1)
        weight = w.repeat_interleave(slices, dim=1).reshape(-1)
        order = torch.argsort(dest, stable=True)
        dest, token, expert, weight = dest[order], token[order], expert[order], weight[order]
        send_rows = xs[token]
        if self.size == 1:
            back = compute(send_rows, expert)
        else:
            ones = [1] * self.size
            send_counts = torch.bincount(dest, minlength=self.size)
            recv_counts = self.comm.all_to_all_rows(send_counts, ones, ones)
            sc, rc = send_counts.tolist(), recv_counts.tolist()
            self.rows_sent += (sum(sc) - sc[self.rank]) + (sum(rc) - rc[self.rank])
            recv_rows = self.comm.all_to_all_rows(send_rows, sc, rc)
            recv_expert = self.comm.all_to_all_rows(expert, sc, rc)
            out_rows = compute(recv_rows, recv_expert)
            back = self.comm.all_to_all_rows(out_rows, rc, sc)
        share = x.new_zeros((b - a, H))
        share.index_add_(0, token, back * weight.unsqueeze(1).to(back.dtype))
        if self.size == 1:
            return share
        if anchor is not None:
            return self._gather_by_anchor(share, anchor, T, H)
        part = -(-T // self.size)
        padded = torch.cat([share, share.new_zeros((part - share.shape[0], H))]) if share.shape[0] < part else share
        gathered = self.comm.all_gather_cat(padded.contiguous())
        pieces = []
        for r in range(self.size):
            ra, rb = split_range(T, self.size, r)
            pieces.append(gathered[r * part : r * part + (rb - ra)])
        return torch.cat(pieces, 0)

    def _gather_by_anchor(self, share: torch.Tensor, anchor: torch.Tensor, T: int, H: int) -> torch.Tensor:
        """All-gather uneven per-rank shares; every rank knows every token's anchor, so no counts travel."""
        counts = torch.bincount(anchor, minlength=self.size).tolist()
        part = max(counts)
        padded = torch.cat([share, share.new_zeros((part - share.shape[0], H))]) if share.shape[0] < part else share
        gathered = self.comm.all_gather_cat(padded.contiguous())
        # Rank r's share holds its tokens in ascending index order: a stable sort by anchor lines them up.
        order = torch.argsort(anchor, stable=True)
        out = share.new_empty((T, H))
        out[order] = torch.cat([gathered[r * part : r * part + counts[r]] for r in range(self.size)])
        return out

    def _all_reduce(self, x, topk_ids, topk_w, owners, compute) -> torch.Tensor:
        dest = self.destinations(torch.arange(x.shape[0], device=x.device), topk_ids, owners)  # [T, k, slices]
        mine = (dest == self.rank).any(-1)  # [T, k]: choices whose expert slice (or replica) is here
        token, choice = mine.nonzero(as_tuple=True)
        out = x.new_zeros(x.shape)
        if token.numel():
            rows = compute(x[token], topk_ids[token, choice])
            out.index_add_(0, token, rows * topk_w[token, choice].unsqueeze(1).to(rows.dtype))
        self.comm.all_reduce(out)
        return out
