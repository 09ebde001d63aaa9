"""Expert parallelism: the dispatch / combine of routed tokens to the ranks that own their experts.

Ranks of one pipeline stage form the *MoE group* (``ep`` x ``tp`` ranks, group
rank ``g = ep_rank * tp + tp_rank``). Who owns which expert (or slice of one)
is ``memory/expert_placement.ExpertPlacement``'s answer, handed to the
dispatcher as an owner table per layer. Every owner of an expert computes a
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

from typing import Callable

import torch

from tessera.errors import ConfigError
from tessera.options import MOE_DISPATCH_MODES as DISPATCH_MODES
from tessera.parallel.comm import GroupComm
from tessera.parallel.tensor import split_range


LOW_LATENCY_TOKENS = 16


class ExpertDispatcher:
    """Moves routed tokens to their expert owners and the partial outputs back (one MoE group).

    Called as the MoE block's ``ShardOps.dispatch(layer, x, topi, topw, compute)``
    when built with an :class:`~tessera.memory.expert_placement.ExpertPlacement`
    (its owner tables, per layer, moved to the device once); :meth:`exchange`
    takes an explicit owner table.
    """

    def __init__(self, comm: GroupComm, coherent: bool = False, mode: str = "auto", placement=None,
                 tp: int = 1) -> None:
        if mode not in DISPATCH_MODES:
            raise ConfigError(f"MoE dispatch mode {mode!r} is unknown; use one of {', '.join(DISPATCH_MODES)}")
        self.comm, self.rank, self.size = comm, comm.rank, comm.size
        self.coherent = coherent
        self.mode = mode
        self.placement, self.tp = placement, tp
        self._owners: dict[int, torch.Tensor] = {}
        self.rows_sent = 0  # (token, choice) rows this rank sent to other ranks, both directions

    def owners(self, layer: int, device: torch.device) -> torch.Tensor:
        """The owner table of ``layer`` (built on the CPU from the placement; moved to ``device`` once)."""
        table = self._owners.get(layer)
        if table is None or table.device != device:
            table = self._owners[layer] = self.placement.owner_table(layer, self.tp).to(device)
        return table

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
                 compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return self.exchange(x, topk_ids, topk_w, self.owners(layer, x.device), compute)

    @staticmethod
    def destinations(token_index: torch.Tensor, ids: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        """[tokens, k, slices] group ranks computing each choice (replicas: copy = token index mod copies)."""
        if owners.dim() == 3:
            counts = (owners[:, :, 0] >= 0).sum(1)
            return owners[ids, token_index.unsqueeze(1) % counts[ids]]
        return owners[ids]

    def exchange(
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
