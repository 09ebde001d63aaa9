"""Ulysses sequence parallelism over the ``sp`` mesh dim (exact).

Each rank holds a contiguous range of image tokens (any lengths). For
attention, one all-to-all turns "my tokens, all heads" into "all tokens, my
heads", attention runs on whole sequences for a slice of heads, and a second
all-to-all turns it back. Only q/k/v and the output cross the wire (4 x the
local activations per layer, independent of the number of ranks), and the
result equals single-device attention because every head sees every token.
Needs the (local) head count to be divisible by the ``sp`` degree.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from tessera.models.dit_layers import sdpa
from tessera.parallel.counted import CommCounter, all_to_all_tokens, gather_tokens


def check_ulysses_heads(heads: int, sp: int) -> None:
    """Raise before workers run when heads cannot be split over ``sp``."""
    if heads % sp:
        raise ValueError(
            f"Ulysses needs the attention head count ({heads}) divisible by sp={sp}; "
            f"use mode='exact' (patch parallel works with any sp) or an sp degree dividing {heads}"
        )


class UlyssesAttention:
    """The ``self_attn`` function: all-to-all tokens->heads, attend, all-to-all back."""

    def __init__(self, group: Any, group_rank: int, token_counts: Sequence[int], counter: CommCounter | None = None) -> None:
        self.group = group
        self.me = group_rank
        self.counts = list(token_counts)
        self.world = len(self.counts)
        self.counter = counter

    def start_step(self, step: int) -> None:  # stateless across steps
        return None

    def finish(self) -> None:
        return None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer: int, extra_kv=None) -> torch.Tensor:
        """``q`` may start with replicated text queries (as many as ``extra_kv`` has tokens; joint attention)."""
        n_txt = 0 if extra_kv is None else extra_kv[0].shape[1]
        q_txt, q = q[:, :n_txt], q[:, n_txt:]
        b, n_local, heads, d = q.shape
        sp = self.world
        check_ulysses_heads(heads, sp)
        hs = heads // sp
        mine = slice(self.me * hs, (self.me + 1) * hs)
        qkv = torch.stack([q, k, v], dim=2)  # [B, N_loc, 3, H, d]
        # [B, N_loc, 3, sp, hs, d] -> [sp, N_loc, B, 3, hs, d]: chunk j (heads of rank j) goes to rank j
        send = qkv.view(b, n_local, 3, sp, hs, d).permute(3, 1, 0, 2, 4, 5).reshape(sp * n_local, b, 3, hs, d)
        recv = all_to_all_tokens(send, [n_local] * sp, self.counts, self.group, self.counter, "ulysses_qkv", self.me)
        full = recv.transpose(0, 1)  # [B, N_total, 3, hs, d]
        fq, fk, fv = full[:, :, 0], full[:, :, 1], full[:, :, 2]
        if n_txt:
            # text tokens are on every rank: take this rank's heads locally, no exchange needed
            fq = torch.cat([q_txt[:, :, mine], fq], dim=1)
            fk = torch.cat([extra_kv[0][:, :, mine], fk], dim=1)
            fv = torch.cat([extra_kv[1][:, :, mine], fv], dim=1)
        out = sdpa(fq, fk, fv)
        txt_out, out = out[:, :n_txt], out[:, n_txt:].transpose(0, 1)  # image part: [N_total, B, hs, d]
        back = all_to_all_tokens(out, self.counts, [n_local] * sp, self.group, self.counter, "ulysses_out", self.me)
        # [sp, N_loc, B, hs, d] -> [B, N_loc, sp, hs, d] -> [B, N_loc, H, d]
        img_out = back.view(sp, n_local, b, hs, d).permute(2, 1, 0, 3, 4).reshape(b, n_local, heads, d)
        if not n_txt:
            return img_out
        # every rank needs the text stream's output for all heads: gather the head slices
        _, finish = gather_tokens(txt_out.permute(2, 0, 1, 3), [hs] * sp, self.group, self.counter, "ulysses_text")
        return torch.cat([finish().permute(1, 2, 0, 3), img_out], dim=1)
