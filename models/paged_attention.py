"""Attention over a paged KV cache: the per-rank block storage, the batch's index tensors, the kernel.

Model math (``models/moe_layers.py``) reads and writes K/V only through
:class:`PagedKVCache` and computes attention with :func:`paged_attention` over
the :class:`AttentionMetadata` of one (micro-)batch. The cache is a pool of
fixed-size blocks; each sequence owns a *block table* (list of block ids), so
sequences of any length share one pool and join or leave the batch between
steps. Which blocks a sequence owns is decided on the driver
(``memory/kv_cache.BlockAllocator``); workers only receive block tables and
write/read the slots those tables name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's part of a step: its new tokens start at ``start`` in a sequence with ``block_table``."""

    start: int
    num_new: int
    block_table: tuple[int, ...]


@dataclass
class AttentionMetadata:
    """Index tensors for one (micro-)batch, built once and shared by every layer."""

    positions: torch.Tensor  # [N] position of every packed new token
    slot_mapping: torch.Tensor  # [N] cache slot each new token's k/v goes to
    key_slots: torch.Tensor  # [B, L] cache slots of each sequence's context (padded)
    mask: torch.Tensor  # [B, 1, Tq, L] True where a query may attend a key
    q_index: torch.Tensor  # [B, Tq] packed token index of each padded query (pad -> N)
    out_index: torch.Tensor  # [N] flat index into [B * Tq] of each packed token
    last_index: torch.Tensor  # [B] packed index of each sequence's last new token

    def to(self, device) -> "AttentionMetadata":
        """The same metadata on ``device`` (built on the CPU, used where the cache lives)."""
        if torch.device(device).type == "cpu":
            return self
        return AttentionMetadata(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})


def build_metadata(seqs: Sequence[SeqSlice], block_size: int) -> AttentionMetadata:
    positions, slots, out_idx, last = [], [], [], []
    B = len(seqs)
    Tq = max(s.num_new for s in seqs)
    L = max(s.start + s.num_new for s in seqs)
    key_slots = torch.zeros((B, L), dtype=torch.int64)
    mask = torch.zeros((B, 1, Tq, L), dtype=torch.bool)
    q_index = torch.full((B, Tq), -1, dtype=torch.int64)
    n = 0
    for b, s in enumerate(seqs):
        ctx = s.start + s.num_new
        if ctx > len(s.block_table) * block_size:
            raise RuntimeError(f"sequence needs {ctx} KV slots but its block table holds {len(s.block_table)} blocks")
        table = torch.tensor(s.block_table, dtype=torch.int64)
        pos = torch.arange(ctx)
        seq_slots = table[pos // block_size] * block_size + pos % block_size
        key_slots[b, :ctx] = seq_slots
        new_pos = torch.arange(s.start, ctx)
        positions.append(new_pos)
        slots.append(seq_slots[s.start :])
        q_index[b, : s.num_new] = torch.arange(n, n + s.num_new)
        mask[b, 0, : s.num_new, :ctx] = torch.arange(ctx).unsqueeze(0) <= new_pos.unsqueeze(1)
        out_idx.append(b * Tq + torch.arange(s.num_new))
        n += s.num_new
        last.append(n - 1)
    mask[:, 0, :, 0] |= q_index < 0  # padded queries see one key (no NaN); their output is dropped
    q_index[q_index < 0] = n
    return AttentionMetadata(
        positions=torch.cat(positions),
        slot_mapping=torch.cat(slots),
        key_slots=key_slots,
        mask=mask,
        q_index=q_index,
        out_index=torch.cat(out_idx),
        last_index=torch.tensor(last, dtype=torch.int64),
    )


class PagedKVCache:
    """K and V block storage for the layers of one stage on one rank: [blocks * block_size, heads, dim]."""

    def __init__(self, layers: Sequence[int], num_blocks: int, block_size: int, heads: int, k_dim: int, v_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        slots = num_blocks * block_size
        self.block_size = block_size
        self.device = torch.device(device)
        self.k = {l: torch.zeros((slots, heads, k_dim), dtype=dtype, device=device) for l in layers}
        self.v = {l: torch.zeros((slots, heads, v_dim), dtype=dtype, device=device) for l in layers}

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(0, slots, v.to(self.v[layer].dtype))

    def gather(self, layer: int, key_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, heads, dim] keys and values of every sequence's context."""
        return self.k[layer][key_slots], self.v[layer][key_slots]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of packed queries [N, h, d] over paged context [B, L, kvh, d] -> [N, h, dv]."""
    N, h, d = q.shape
    B, L, kvh, _ = k.shape
    qp = torch.cat([q, q.new_zeros((1, h, d))])[meta.q_index]  # [B, Tq, h, d]
    if qp.shape[1] == 1:
        # Decode (one query per sequence): plain fp32 matmuls beat the CPU SDPA kernels'
        # per-call overhead by ~10x at these sizes (and fp32 softmax is what SDPA does anyway).
        # The query heads sharing a kv head are one matmul row block, so the context
        # is never expanded to every query head (GQA: h / kvh times fewer bytes).
        g = h // kvh
        qg = qp.view(B, kvh, g, d).float()
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1).float()) * scale  # [B, kvh, g, L]
        scores = scores.masked_fill(~meta.mask, float("-inf")).softmax(-1)
        out = torch.matmul(scores, v.transpose(1, 2).float()).to(q.dtype).reshape(B, h, 1, -1)  # [B, h, 1, dv]
    else:  # prefill: SDPA shares each kv head among its query heads itself (no expanded copy)
        out = torch.nn.functional.scaled_dot_product_attention(
            qp.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype), attn_mask=meta.mask,
            scale=scale, enable_gqa=kvh != h,
        )  # [B, h, Tq, dv]
    out = out.transpose(1, 2).reshape(B * qp.shape[1], h, -1)
    return out[meta.out_index]
