"""Predicting which experts the next MoE layer will use, so the cache can prefetch them.

Two sources, usable alone or together:

- :class:`AffinityPredictor`: inter-layer affinity statistics. Experts chosen
  at layer l strongly predict those chosen at layer l+1 for the same tokens
  (the co-activation structure ``memory/affinity`` places experts by). Counts
  of (expert at l -> expert at l+1) transitions are learned online from the
  routing the cache observes, and can be seeded from recorded traces.
- :class:`GatePredictor`: applies the next layer's router (gate) to the
  current hidden state. The residual stream changes little from one layer to
  the next, so this is usually the sharper signal, at the cost of one small
  matmul per layer.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class AffinityPredictor:
    """Transition counts between consecutive layers' expert choices."""

    def __init__(self, num_layers: int, num_experts: int, counts: torch.Tensor | None = None) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        shape = (max(num_layers - 1, 0), num_experts, num_experts)
        if counts is not None and tuple(counts.shape) != shape:
            raise ValueError(f"affinity counts have shape {tuple(counts.shape)}, expected {shape} (layers-1, E, E)")
        self.counts = counts.to(torch.float64).clone() if counts is not None else torch.zeros(shape, dtype=torch.float64)

    def observe(self, layer: int, prev_ids: Sequence[int], ids: Sequence[int], routing: torch.Tensor | None = None) -> None:
        """Record transitions from layer-1 to ``layer``.

        ``routing`` (optional): per-token expert ids of both layers as a pair
        ``[prev [T, k], cur [T, k]]`` stacked on dim 0; without it every
        expert of the previous set is linked to every expert of this set.
        """
        if layer < 1 or layer >= self.num_layers:
            return
        c = self.counts[layer - 1]
        if routing is not None:
            prev, cur = routing[0], routing[1]
            for a_row, b_row in zip(prev.tolist(), cur.tolist()):
                for a in a_row:
                    for b in b_row:
                        c[a, b] += 1.0
            return
        if prev_ids and ids:
            p = torch.as_tensor(list(prev_ids), dtype=torch.long)
            q = torch.as_tensor(list(ids), dtype=torch.long)
            c[p.unsqueeze(1), q.unsqueeze(0)] += 1.0

    def scores(self, next_layer: int, ids: Sequence[int]) -> torch.Tensor | None:
        if next_layer < 1 or next_layer >= self.num_layers or not ids:
            return None
        s = self.counts[next_layer - 1][torch.as_tensor(list(ids), dtype=torch.long)].sum(0)
        return s if float(s.sum()) > 0 else None


class GatePredictor:
    """Top-k of the next layer's router applied to the current hidden state."""

    def __init__(self, gate_weight: Callable[[int], torch.Tensor | None], top_k: int) -> None:
        self.gate_weight = gate_weight  # layer -> router weight [E, H] (None: layer has no router)
        self.top_k = top_k

    def scores(self, next_layer: int, hidden: torch.Tensor | None) -> torch.Tensor | None:
        if hidden is None:
            return None
        w = self.gate_weight(next_layer)
        if w is None:
            return None
        h = hidden.reshape(-1, hidden.shape[-1]).to(w.dtype)
        logits = h @ w.t()
        top = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices
        return torch.bincount(top.reshape(-1), minlength=w.shape[0]).to(torch.float64)


def rank_experts(scores: torch.Tensor | None, k: int) -> list[int]:
    """The ``k`` highest-scoring experts with a positive score."""
    if scores is None or k <= 0:
        return []
    k = min(k, int((scores > 0).sum()))
    if k == 0:
        return []
    return [int(i) for i in scores.topk(k).indices.tolist()]
