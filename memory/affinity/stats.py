"""Affinity statistics of a routing trace.

For every pair of consecutive MoE layers we count transitions: a token that
chose expert ``p`` at layer ``l`` and ``q`` at layer ``l+1`` adds one to
``transitions[l, p, q]`` for each of its k x k (p, q) pairs. That is the
quantity the ExFlow objective weighs: a pair whose experts live on different
ranks moves the token between ranks. From the counts follow the conditional
probabilities P(q at l+1 | p at l), their row entropies (how predictable the
next expert is: the *affinity strength*), and the per-expert load per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tessera.memory.affinity.trace import RoutingTrace


@dataclass(frozen=True, eq=False)
class AffinityStats:
    """Transition counts ``[L-1, E, E]`` and loads ``[L, E]`` of one trace."""

    num_layers: int
    num_experts: int
    top_k: int
    num_tokens: int
    transitions: np.ndarray = field(repr=False)
    load: np.ndarray = field(repr=False)
    model: str = ""

    @classmethod
    def from_trace(cls, trace: RoutingTrace, max_tokens: int | None = None, seed: int = 0) -> "AffinityStats":
        """Counts over the whole trace, or over ``max_tokens`` sampled tokens (to bound solver inputs)."""
        if max_tokens is not None:
            trace = trace.sample(max_tokens, seed=seed)
        h = trace.header
        ids = trace.expert_ids.astype(np.int64)
        num_experts = h.num_experts
        transitions = np.zeros((max(h.num_layers - 1, 0), num_experts, num_experts), dtype=np.float64)
        for layer in range(h.num_layers - 1):
            here, there = ids[:, layer, :], ids[:, layer + 1, :]
            flat = (here[:, :, None] * num_experts + there[:, None, :]).ravel()
            transitions[layer] = np.bincount(flat, minlength=num_experts * num_experts).reshape(
                num_experts, num_experts
            )
        load = np.stack(
            [np.bincount(ids[:, layer, :].ravel(), minlength=num_experts) for layer in range(h.num_layers)]
        ).astype(np.float64)
        return cls(h.num_layers, num_experts, h.top_k, trace.num_tokens, transitions, load, h.model)

    @property
    def total_transitions(self) -> float:
        return float(self.transitions.sum())

    def conditional(self) -> np.ndarray:
        """P(q at l+1 | p at l), ``[L-1, E, E]``; rows of experts never chosen are 0."""
        rows = self.transitions.sum(axis=2, keepdims=True)
        return np.divide(self.transitions, rows, out=np.zeros_like(self.transitions), where=rows > 0)

    def row_entropy(self) -> np.ndarray:
        """Entropy (bits) of each conditional row, ``[L-1, E]``: 0 = fully predictable next expert."""
        p = self.conditional()
        logp = np.log2(p, out=np.zeros_like(p), where=p > 0)
        return -(p * logp).sum(axis=2)

    def affinity_strength(self) -> float:
        """1 - (load-weighted mean row entropy) / (entropy of an affinity-free row), in [0, 1].

        An affinity-free top-k router has rows spread uniformly over E experts
        (log2 E bits); 0 means no affinity, 1 means each expert has one
        successor. Finite samples bias it slightly above 0 on random traces.
        """
        if self.num_layers < 2 or self.num_experts < 2:
            return 0.0
        weights = self.transitions.sum(axis=2)
        if weights.sum() == 0:
            return 0.0
        mean_h = float((self.row_entropy() * weights).sum() / weights.sum())
        return max(0.0, 1.0 - mean_h / np.log2(self.num_experts))

    def summary(self) -> dict:
        return {
            "model": self.model,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "num_tokens": self.num_tokens,
            "transitions": self.total_transitions,
            "affinity_strength": round(self.affinity_strength(), 4),
        }
