"""Ulysses sequence parallelism over the ``sp`` mesh dim (exact).

Each rank holds a contiguous range of image tokens (any lengths). For
attention, one all-to-all turns "my tokens, all heads" into "all tokens, my
heads", attention runs on whole sequences for a slice of heads, and a second
all-to-all turns it back. Only q/k/v and the output cross the wire (4 x the
local activations per layer, independent of the number of ranks), and the
result equals single-device attention because every head sees every token.
Needs the (local) head count to be divisible by the ``sp`` degree.

Joint attention (Flux, SD3) also attends to text tokens. With
``text_counts`` the text stream is sharded over the ranks like the image
(as diffusers' context parallelism does), so no rank repeats the text
stream's linears; its q/k/v ride in the same all-to-all. Without it the text
is replicated: each rank takes its heads of the text locally and the text
output is all-gathered by heads. Either way attention sees the keys in the
single-device order ``[all text, all image]``.

Copies are kept to one per direction: q/k/v are written straight into the
all-to-all send buffer, and what arrives is written once into the
``[3, B, heads, N, d]`` layout the attention kernel reads contiguously.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from tessera.parallel.comm import GroupComm
from tessera.parallel.counted import CommCounter, all_to_all_tokens, gather_tokens


def check_ulysses_heads(heads: int, sp: int) -> None:
    """Raise before workers run when heads cannot be split over ``sp``."""
    if heads % sp:
        raise ValueError(
            f"Ulysses needs the attention head count ({heads}) divisible by sp={sp}; "
            f"use mode='exact' (patch parallel works with any sp) or an sp degree dividing {heads}"
        )


def _offsets(counts: Sequence[int]) -> list[int]:
    out, at = [], 0
    for n in counts:
        out.append(at)
        at += n
    return out


class UlyssesAttention:
    """The ``self_attn`` function: all-to-all tokens->heads, attend, all-to-all back.

    ``token_counts``: image tokens of every rank (group order). ``text_counts``
    (optional): text tokens of every rank when the caller sharded the text
    stream; then ``extra_kv`` holds only this rank's text tokens.
    """

    def __init__(self, comm: GroupComm, group_rank: int, token_counts: Sequence[int], counter: CommCounter | None = None,
                 text_counts: Sequence[int] | None = None) -> None:
        self.comm = comm
        self.me = group_rank
        self.counts = list(token_counts)
        self.world = len(self.counts)
        self.counter = counter
        self.text_counts = None if text_counts is None else list(text_counts)
        if self.text_counts is not None and len(self.text_counts) != self.world:
            raise ValueError(f"text_counts has {len(self.text_counts)} entries for {self.world} ranks")

    def start_step(self, step: int) -> None:  # stateless across steps
        return None

    def finish(self) -> None:
        return None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer: int, extra_kv=None) -> torch.Tensor:
        """``q`` may start with text queries (as many as ``extra_kv`` has tokens; joint attention)."""
        n_txt = 0 if extra_kv is None else extra_kv[0].shape[1]
        b, n_q, heads, d = q.shape
        sp = self.world
        check_ulysses_heads(heads, sp)
        hs = heads // sp
        sharded = bool(n_txt) and self.text_counts is not None
        if sharded and n_txt != self.text_counts[self.me]:
            raise ValueError(f"rank {self.me} holds {n_txt} text tokens, text_counts says {self.text_counts[self.me]}")
        # what crosses the wire: [my text, my image] tokens (sharded text) or my image tokens only
        n_send = n_q if sharded else n_q - n_txt
        parts_k = (extra_kv[0], k) if sharded else (k,)
        parts_v = (extra_kv[1], v) if sharded else (v,)
        send = q.new_empty((sp, n_send, b, 3, hs, d))
        dst = send.permute(2, 1, 3, 0, 4, 5)  # [B, n_send, 3, sp, hs, d]: chunk j (heads of rank j) goes to rank j
        dst[:, :, 0] = q[:, n_q - n_send:].unflatten(2, (sp, hs))
        at = 0
        for pk, pv in zip(parts_k, parts_v):
            n = pk.shape[1]
            dst[:, at:at + n, 1] = pk.unflatten(2, (sp, hs))
            dst[:, at:at + n, 2] = pv.unflatten(2, (sp, hs))
            at += n
        in_counts = [t + i for t, i in zip(self.text_counts, self.counts)] if sharded else self.counts
        recv = all_to_all_tokens(send.view(sp * n_send, b, 3, hs, d), [n_send] * sp, in_counts, self.comm,
                                 self.counter, "ulysses_qkv", self.me)
        # global order [all text, all image], written once into the layout attention reads
        t_total = sum(self.text_counts) if sharded else n_txt
        n_img = sum(self.counts)
        qkv = q.new_empty((3, b, hs, t_total + n_img, d))
        blocks = self._blocks(sharded, t_total)  # (row in recv, position in the sequence, length)
        for row, pos, n in blocks:
            qkv[:, :, :, pos:pos + n] = recv[row:row + n].permute(2, 1, 3, 0, 4)
        mine = slice(self.me * hs, (self.me + 1) * hs)
        if n_txt and not sharded:  # replicated text: this rank's heads of it are already here
            qkv[0, :, :, :n_txt] = q[:, :n_txt, mine].transpose(1, 2)
            qkv[1, :, :, :n_txt] = extra_kv[0][:, :, mine].transpose(1, 2)
            qkv[2, :, :, :n_txt] = extra_kv[1][:, :, mine].transpose(1, 2)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, hs, N, d]
        back_send = out.new_empty((sum(in_counts), b, hs, d))
        for row, pos, n in blocks:
            back_send[row:row + n] = out[:, :, pos:pos + n].permute(2, 0, 1, 3)
        back = all_to_all_tokens(back_send, in_counts, [n_send] * sp, self.comm, self.counter, "ulysses_out", self.me)
        result = out.new_empty((b, n_q, heads, d))
        # [sp, n_send, B, hs, d] -> [B, n_send, sp, hs, d] = [B, n_send, H, d]
        result[:, n_q - n_send:] = back.view(sp, n_send, b, hs, d).permute(2, 1, 0, 3, 4).flatten(2, 3)
        if n_txt and not sharded:
            # every rank needs the text stream's output for all heads: gather the head slices
            _, finish = gather_tokens(out[:, :, :n_txt].permute(1, 0, 2, 3), [hs] * sp, self.comm, self.counter,
                                      "ulysses_text")
            result[:, :n_txt] = finish().permute(1, 2, 0, 3)
        return result

    def _blocks(self, sharded: bool, t_total: int) -> list[tuple[int, int, int]]:
        """Where each rank's tokens sit in the received buffer and in the attention sequence."""
        out = []
        row = 0
        text_at = _offsets(self.text_counts) if sharded else None
        img_at = _offsets(self.counts)
        for r in range(self.world):
            if sharded:
                out.append((row, text_at[r], self.text_counts[r]))
                row += self.text_counts[r]
            out.append((row, t_total + img_at[r], self.counts[r]))
            row += self.counts[r]
        return [blk for blk in out if blk[2]]
