"""Patch parallelism for diffusion transformers over the ``sp`` mesh dim.

Each rank of the ``sp`` group owns a contiguous band of patch-grid rows of
the image (uneven bands allowed: ``split_rows``). Everything in a DiT block is
token-local except image self-attention, so the model calls
:class:`PatchParallelAttention` there (``models/*`` declare which attention),
and that is the only place ranks exchange activations. Three modes, chosen
per request:

- ``exact``: every layer all-gathers the fresh K/V of every band before
  attending. Equals single-device attention.
- ``displaced`` (DistriFusion): the first ``warmup_steps`` steps are exact.
  Afterwards a rank attends with its own *fresh* K/V and the other bands'
  K/V from the previous step, and launches an asynchronous all-gather of its
  fresh K/V that completes while later layers compute; the result is used
  one step later. With ``warmup_steps >= steps`` it is ``exact``.
- ``partial`` (PCPP-style): like displaced, but a rank refreshes only a
  fraction ``partial_fraction`` of each adjacent band's rows - those nearest
  its own band - by point-to-point isend/irecv with its two neighbours; the
  rest of the image keeps the K/V of the last exact step. It communicates
  ``2 * fraction / (sp - 1)`` of what displaced does.

Tokens whose K/V were never received (no warm-up at all) are left out of
attention rather than guessed. Bytes are counted at the call sites
(:mod:`tessera.parallel.counted`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

import torch.nn.functional as F

from tessera.models.dit_layers import sdpa
from tessera.parallel.comm import GroupComm
from tessera.parallel.counted import CommCounter, exchange_p2p, gather_padded, gather_tokens

PATCH_MODES = ("exact", "displaced", "partial")


@dataclass(frozen=True)
class PatchConfig:
    """Per-request patch-parallel settings, validated here so bad values fail before any rank runs."""

    mode: str = "exact"
    warmup_steps: int = 1
    partial_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.mode not in PATCH_MODES:
            raise ValueError(f"patch mode {self.mode!r} is unknown; use one of {', '.join(PATCH_MODES)} "
                             "(or 'ulysses' for sequence parallel)")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not 0.0 < float(self.partial_fraction) <= 1.0:
            raise ValueError(f"partial_fraction must be in (0, 1], got {self.partial_fraction!r}; "
                             "e.g. 0.25 sends a quarter of each neighbour band")


class PatchParallelAttention:
    """The ``self_attn`` function for one request on one rank (holds its stale K/V buffers).

    ``bands`` are the ``(row_start, row_end)`` of every rank of ``comm`` in
    group-rank order; ``grid_w`` converts rows to tokens.
    """

    def __init__(self, comm: GroupComm, group_rank: int, bands: Sequence[tuple[int, int]], grid_w: int,
                 config: PatchConfig, total_steps: int, counter: CommCounter | None = None,
                 text_counts: Sequence[int] | None = None) -> None:
        self.comm = comm
        self.me = group_rank
        self.world = len(bands)
        self.bands = list(bands)
        self.grid_w = grid_w
        self.config = config
        self.total_steps = total_steps
        self.counter = counter
        self.counts = [(e - s) * grid_w for s, e in bands]
        self.offsets = [s * grid_w for s, _ in bands]
        self.total = sum(self.counts)
        self.own = slice(self.offsets[self.me], self.offsets[self.me] + self.counts[self.me])
        self.buffers: dict[int, torch.Tensor] = {}   # layer -> [N_total, B, 2, H, d]
        self.known: dict[int, torch.Tensor] = {}     # layer -> bool [N_total]
        self.pending: dict[int, tuple] = {}          # layer -> in-flight exchange
        self.step = 0
        self.sync = True
        # exact mode only: the text stream of joint attention is sharded too (``extra_kv`` holds this rank's
        # text tokens) and its K/V ride in the same all-gather; stale modes keep the text replicated
        self.text_counts = list(text_counts) if text_counts is not None and config.mode == "exact" else None

    # -- step bookkeeping --------------------------------------------------------

    def start_step(self, step: int) -> None:
        self.step = step
        self.sync = self.config.mode == "exact" or step < self.config.warmup_steps

    def finish(self) -> None:
        """Wait for every exchange still in flight, so no collective outlives the request."""
        for layer in list(self.pending):
            self._complete(layer)

    # -- the attention -----------------------------------------------------------

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer: int, extra_kv=None) -> torch.Tensor:
        if self.world > 1 and self.config.mode == "exact":
            return self._exact(q, k, v, extra_kv)
        fresh = torch.stack([k, v], dim=2).transpose(0, 1)  # [N_local, B, 2, H, d]
        if self.world == 1:
            full, known = fresh, None
        elif self.sync:
            _, gathered = gather_tokens(fresh, self.counts, self.comm, self.counter, "patch_kv_sync")
            full, known = gathered(), None
            if self.config.mode != "exact":
                self.buffers[layer] = full
                self.known[layer] = torch.ones(self.total, dtype=torch.bool)
        else:
            self._complete(layer)
            full, known = self._stale_view(layer, fresh)
            if self.step < self.total_steps - 1:  # the last step's K/V would never be used
                self._launch(layer, fresh)
        if known is not None and not bool(known.all()):
            full = full[known]
        kv = full.transpose(0, 1)  # [B, N, 2, H, d]
        keys, values = kv[:, :, 0], kv[:, :, 1]
        if extra_kv is not None:
            keys = torch.cat([extra_kv[0], keys], dim=1)
            values = torch.cat([extra_kv[1], values], dim=1)
        return sdpa(q, keys, values)

    def _exact(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_kv) -> torch.Tensor:
        """All-gather fresh K/V, attend. One copy into the send buffer, one into the layout attention reads."""
        b, _, heads, d = k.shape
        n_txt = 0 if extra_kv is None else extra_kv[0].shape[1]
        sharded = bool(n_txt) and self.text_counts is not None
        if sharded and n_txt != self.text_counts[self.me]:
            raise ValueError(f"rank {self.me} holds {n_txt} text tokens, text_counts says {self.text_counts[self.me]}")
        counts = [t + i for t, i in zip(self.text_counts, self.counts)] if sharded else self.counts
        longest = max(counts)
        send = k.new_empty((longest, b, 2, heads, d))  # rows past this rank's count are padding, never read
        at = 0
        for pk, pv in ((extra_kv[0], extra_kv[1]), (k, v)) if sharded else ((k, v),):
            n = pk.shape[1]
            send[at:at + n, :, 0] = pk.transpose(0, 1)
            send[at:at + n, :, 1] = pv.transpose(0, 1)
            at += n
        _, gathered, _ = gather_padded(send, counts, self.comm, self.counter, "patch_kv_sync")
        t_total = sum(self.text_counts) if sharded else n_txt
        kv = k.new_empty((2, b, heads, t_total + self.total, d))  # keys in single-device order [text, image]
        text_at = 0
        for r in range(self.world):
            row = r * longest
            if sharded:
                n = self.text_counts[r]
                kv[:, :, :, text_at:text_at + n] = gathered[row:row + n].permute(2, 1, 3, 0, 4)
                row, text_at = row + n, text_at + n
            pos = t_total + self.offsets[r]
            kv[:, :, :, pos:pos + self.counts[r]] = gathered[row:row + self.counts[r]].permute(2, 1, 3, 0, 4)
        if n_txt and not sharded:  # replicated text K/V: already here in full
            kv[0, :, :, :n_txt] = extra_kv[0].transpose(1, 2)
            kv[1, :, :, :n_txt] = extra_kv[1].transpose(1, 2)
        return F.scaled_dot_product_attention(q.transpose(1, 2), kv[0], kv[1]).transpose(1, 2)

    def _stale_view(self, layer: int, fresh: torch.Tensor):
        buf = self.buffers.get(layer)
        if buf is None or buf.shape[1:] != fresh.shape[1:]:
            buf = fresh.new_zeros((self.total, *fresh.shape[1:]))
            self.buffers[layer] = buf
            self.known[layer] = torch.zeros(self.total, dtype=torch.bool)
        full = buf.clone()
        full[self.own] = fresh
        known = self.known[layer].clone()
        known[self.own] = True
        return full, known

    # -- asynchronous exchanges ------------------------------------------------------

    def _launch(self, layer: int, fresh: torch.Tensor) -> None:
        if self.config.mode == "displaced":
            work, finish = gather_tokens(fresh, self.counts, self.comm, self.counter, "patch_kv_async", async_op=True)
            self.pending[layer] = ("gather", work, finish)
            return
        sends, recvs = [], []
        for peer in (self.me - 1, self.me + 1):
            if not 0 <= peer < self.world:
                continue
            n_send = self._boundary_rows(self.me) * self.grid_w
            mine = fresh[:n_send] if peer < self.me else fresh[fresh.shape[0] - n_send:]
            sends.append((mine.contiguous(), peer))
            n_recv = self._boundary_rows(peer) * self.grid_w
            start = self.offsets[peer] + (self.counts[peer] - n_recv if peer < self.me else 0)
            recvs.append((fresh.new_empty((n_recv, *fresh.shape[1:])), peer, start))
        works, ops = exchange_p2p(sends, [(t, p) for t, p, _ in recvs], self.comm, self.counter, "patch_kv_p2p")
        self.pending[layer] = ("p2p", works, (ops, recvs))

    def _boundary_rows(self, rank: int) -> int:
        rows = self.bands[rank][1] - self.bands[rank][0]
        return max(1, min(rows, math.ceil(self.config.partial_fraction * rows)))

    def _complete(self, layer: int) -> None:
        item = self.pending.pop(layer, None)
        if item is None:
            return
        kind, work, payload = item
        if kind == "gather":
            work.wait()
            self.buffers[layer] = payload()
            self.known[layer] = torch.ones(self.total, dtype=torch.bool)
            return
        for w in work:
            w.wait()
        _, recvs = payload
        for tensor, _, start in recvs:
            self.buffers[layer][start:start + tensor.shape[0]] = tensor
            self.known[layer][start:start + tensor.shape[0]] = True
