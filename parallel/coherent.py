"""Context-coherent expert parallel (ExFlow): hidden states stay token-sharded over the ep group.

The standard MoE forward keeps every token's hidden state on every rank of the
MoE group and, per MoE layer, moves (token, choice) rows to the expert owners
and back, then all-gathers (or all-reduces) the result so every rank again
holds every token. ExFlow (Yao et al., 2024) instead lets a token *live* on one
rank and follow its experts:

- Between layers rank ``r`` holds only its *resident* tokens (rows of ``h``);
  at the start of a stage the batch is split by index.
- Attention for a resident runs on its current rank (attention weights are
  replicated over ep, so tp must be 1 inside the group). The *attention
  context*: a query needs the K/V of every earlier token of its sequence,
  wherever that token lives. After computing K/V for its residents, a rank
  all-gathers the new K/V rows (with their cache slots) over the group and
  writes all of them, so every rank's paged cache holds the whole context.
  That costs ``kv_heads x (k_dim + v_dim)`` values per token and layer, less
  than a hidden row on GQA models (Mixtral 2048 vs 4096, Qwen3-MoE 1024 vs
  2048). The cheaper-looking alternatives are not: keeping a sequence's tokens
  on one rank breaks the "follow your expert" rule, and fetching K/V on demand
  needs a request round before every attention.
- MoE: residents are routed where they live. One ``all_to_all_single``
  (uneven splits) carries, per token, a *home* row to its *anchor* (the rank of
  its top-1 expert: the residual ``h``, from which the anchor recomputes the
  normed input and computes every choice whose expert it holds) and one row of
  the normed input to each *other* rank holding one of its experts. The
  token's new home is its anchor. Partial outputs of choices computed away
  from the anchor return to it in a second exchange, which is skipped when no
  such choice exists anywhere (always for top_k = 1, and often under an
  affinity placement that puts a token's experts together).
- At the end of the stage the residents are all-gathered back into the
  original token order, so the LM head, the pipeline and the engine see what
  the standard path produces.

Per MoE layer this is one tiny all_gather of row counts, one K/V all-gather,
one all_to_all, and the second all_to_all only when needed; every exchange
packs its integer metadata and float payload into one byte tensor, so each is
a single collective. Numerically it is the standard computation with the sums
of a token's expert outputs taken in another order (fp32 logits agree to
~1e-6). ``check_exflow`` refuses the plans it does not cover.

How it plugs in: :class:`ExFlowTokens` is the stage's token-layout strategy
(``ShardOps.tokens``, see ``models.moe_layers.ReplicatedTokens``): ``enter``
splits the batch, ``attention`` runs the stage's own ``MoEStage.attention``
(one implementation of the model math) with resident-only metadata and a
K/V stand-in whose ``write`` does the context all-gather, ``moe`` is the
exchange below (it reuses the stage's ``route``, ``run_experts`` and shared
expert), ``exit`` gathers the batch back. ``tests/test_affinity_exflow.py``
checks the result against transformers and the standard path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.distributed as dist

from tessera.errors import ConfigError
from tessera.parallel.comm import GroupComm
from tessera.parallel.expert import ExpertDispatcher
from tessera.parallel.tensor import split_range

EXFLOW = "exflow"


def check_exflow(plan, arch, record_routing: bool = False) -> None:
    """Refuse, naming the fix, what the token-sharded forward does not support."""
    ep, tp = plan.degree("ep"), plan.degree("tp")
    if tp != 1:
        raise ConfigError(
            f"expert_parallel_mode='exflow' shards tokens over the ep group with attention replicated, so it needs tp=1 "
            f"(plan {plan} has tp={tp}); use a plan with ep={ep * tp} and tp=1, or expert_parallel_mode='standard'"
        )
    if ep < 2:
        raise ConfigError(f"expert_parallel_mode='exflow' needs ep >= 2 (plan {plan}); with one ep rank use 'standard'")
    if arch.num_experts < ep:
        raise ConfigError(
            f"expert_parallel_mode='exflow' needs at least one whole expert per ep rank ({arch.num_experts} experts, "
            f"ep={ep}); use ep <= {arch.num_experts} or expert_parallel_mode='standard'"
        )
    if record_routing:
        raise ConfigError(
            "record_routing is not available with expert_parallel_mode='exflow' (routing happens where tokens live); "
            "record traces with expert_parallel_mode='standard' (same routing, same tokens)"
        )


@dataclass
class CoherentStats:
    """What this rank handed to torch.distributed in the token-sharded forward."""

    moe_rows: int = 0  # rows sent to other ranks by the MoE exchanges (dispatch + partial combine)
    moe_bytes: int = 0
    kv_bytes: int = 0  # K/V rows (with slots) this rank contributed to the context all-gathers
    gather_bytes: int = 0  # the end-of-stage all-gather back to token order
    second_exchanges: int = 0  # MoE layers that needed the partial-output exchange
    moe_layer_calls: int = 0

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)


# -- byte packing: ints and floats of one row travel in one collective --------------------


def _pack(*parts: torch.Tensor) -> torch.Tensor:
    """[n, bytes] uint8 rows from tensors of n rows (any dtypes)."""
    n = parts[0].shape[0]
    return torch.cat([p.contiguous().reshape(n, p[0].numel() if n else _cols(p)).view(torch.uint8) for p in parts], dim=1)


def _cols(t: torch.Tensor) -> int:
    c = 1
    for d in t.shape[1:]:
        c *= d
    return c


def _unpack(rows: torch.Tensor, specs: Sequence[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """Inverse of ``_pack``: ``specs`` = (dtype, columns) per part."""
    out, at = [], 0
    for dtype, cols in specs:
        width = cols * torch.empty((), dtype=dtype).element_size()
        if width == 0:  # e.g. MLA's latent cache has no separate values
            out.append(rows.new_empty((rows.shape[0], 0), dtype=dtype))
            continue
        out.append(rows[:, at : at + width].clone(memory_format=torch.contiguous_format).view(dtype))
        at += width
    return out


def _all_gather_rows(rows: torch.Tensor, counts: Sequence[int], comm: GroupComm) -> torch.Tensor:
    """All-gather uneven [count_r, bytes] rows (every rank knows every count); concatenated in rank order."""
    longest = max(counts)
    if rows.shape[0] < longest:
        rows = torch.cat([rows, rows.new_zeros((longest - rows.shape[0], rows.shape[1]))])
    out = comm.all_gather_cat(rows.contiguous())
    return torch.cat([out[i * longest : i * longest + n] for i, n in enumerate(counts)])


# -- attention over a resident subset ------------------------------------------------------


def resident_metadata(meta, index: torch.Tensor):
    """The metadata of ``meta`` restricted to the packed tokens ``index`` (their sequences' full context)."""
    Tq = meta.q_index.shape[1]
    seq, row = meta.out_index[index] // Tq, meta.out_index[index] % Tq
    seqs = torch.unique(seq)  # sorted
    b = torch.searchsorted(seqs, seq)
    q_index = torch.full((len(seqs), Tq), len(index), dtype=torch.int64, device=index.device)
    q_index[b, row] = torch.arange(len(index), device=index.device)
    return replace(
        meta,
        positions=meta.positions[index],
        slot_mapping=meta.slot_mapping[index],
        key_slots=meta.key_slots[seqs],
        mask=meta.mask[seqs],  # a non-resident query row keeps its own (non-empty) mask; its output is dropped
        q_index=q_index,
        out_index=b * Tq + row,
        last_index=index.new_zeros(0),
    )


class _ContextCache:
    """Stands in for the stage's paged cache during one attention call: writes gather every rank's new K/V."""

    def __init__(self, cache, comm: GroupComm, counts: list[int], stats: CoherentStats) -> None:
        self._cache, self._comm, self._counts, self._stats = cache, comm, counts, stats

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        kc, vc = self._cache.k[layer], self._cache.v[layer]
        k, v = k.to(kc.dtype), v.to(vc.dtype)
        rows = _pack(k, v, slots.to(torch.int64))
        self._stats.kv_bytes += rows.numel() * (len(self._counts) - 1)
        both = _all_gather_rows(rows, self._counts, self._comm)
        K, V, S = _unpack(both, [(kc.dtype, kc[0].numel()), (vc.dtype, vc[0].numel()), (torch.int64, 1)])
        n = S.shape[0]  # V may have no columns (an MLA latent cache keeps keys only)
        self._cache.write(layer, K.reshape(n, *kc.shape[1:]), V.reshape(n, *vc.shape[1:]), S.view(-1))


@dataclass
class _Residents:
    """Where this rank's tokens are: ``index`` (positions in the batch, ascending), every rank's count,
    and the batch-wide attention metadata and RoPE rows they are cut from."""

    index: torch.Tensor
    counts: list[int]
    meta: Any
    cos: torch.Tensor
    sin: torch.Tensor
    total: int


class ExFlowTokens:
    """The MoE stage's token layout under ExFlow: tokens live on one rank and follow their top-1 expert.

    Plugged into ``MoEStage`` as ``ShardOps.tokens`` by ``parallel/parallelize.py``
    (see the module docstring for the design).
    """

    def __init__(self, comm: GroupComm, dispatcher: ExpertDispatcher) -> None:
        self.comm = comm
        self.dispatcher = dispatcher  # its owner tables; its rows_sent counts ExFlow's rows too (benchmarks compare)
        self.stats = CoherentStats()

    def enter(self, stage, h: torch.Tensor, meta, cos, sin):
        N, P, me = h.shape[0], self.comm.size, self.comm.rank
        counts = [b - a for a, b in (split_range(N, P, r) for r in range(P))]
        lo, hi = split_range(N, P, me)
        return h[lo:hi], _Residents(torch.arange(lo, hi, device=h.device), counts, meta, cos, sin, N)

    def attention(self, stage, layer: int, x: torch.Tensor, at: _Residents) -> torch.Tensor:
        from tessera.models.moe_layers import LayerView

        kv = _ContextCache(stage.cache, self.comm, at.counts, self.stats)
        if at.index.numel() == 0:  # nothing resident here: still take part in the context all-gather
            kc, vc = stage.cache.k[layer], stage.cache.v[layer]
            kv.write(layer, kc.new_empty((0, *kc.shape[1:])), vc.new_empty((0, *vc.shape[1:])), at.index)
            return x.new_zeros((0, x.shape[1]))
        view = LayerView(resident_metadata(at.meta, at.index), at.cos[at.index], at.sin[at.index], kv)
        return stage.attention(layer, x, view)

    def moe(self, stage, layer: int, h: torch.Tensor, x: torch.Tensor, at: _Residents):
        h, index, counts = _moe(stage, layer, h, x, at.index, at.total, self.comm, self.dispatcher, self.stats)
        return h, replace(at, index=index, counts=counts)

    def exit(self, stage, h: torch.Tensor, at: _Residents) -> torch.Tensor:
        rows = _pack(h, at.index.unsqueeze(1))
        self.stats.gather_bytes += rows.numel() * (self.comm.size - 1)
        both = _all_gather_rows(rows, at.counts, self.comm)
        vals, idx = _unpack(both, [(h.dtype, h.shape[1]), (torch.int64, 1)])
        out = h.new_empty((at.total, h.shape[1]))
        out[idx.view(-1)] = vals
        return out


# -- the MoE exchange ------------------------------------------------------------------------


def _moe(stage, layer: int, h: torch.Tensor, x: torch.Tensor, index: torch.Tensor, N: int, comm: GroupComm,
         dispatcher: ExpertDispatcher, stats: CoherentStats):
    """Route residents, move them to their anchors, combine. Returns (new residents h, their indices, counts)."""
    from tessera.models.moe_layers import rms_norm, run_experts

    a, p = stage.arch, stage.params[layer]
    P, me, dev = comm.size, comm.rank, h.device
    H, k = h.shape[1], a.top_k
    owners = dispatcher.owners(layer, dev)
    topw, topi = stage.route(layer, x)
    dest = ExpertDispatcher.destinations(index, topi, owners)[..., 0]  # [n, k] ep rank of each choice
    n = h.shape[0]
    anchor = dest[:, 0]
    others = torch.zeros((n, P), dtype=torch.bool, device=dev)
    others[torch.arange(n, device=dev).unsqueeze(1).expand(n, k), dest] = True
    others[torch.arange(n, device=dev), anchor] = False
    o_tok, o_rank = others.nonzero(as_tuple=True)  # one row per (token, other rank holding one of its experts)

    # Round 1: counts (everyone learns everyone's: the next resident counts come with them), then one all_to_all.
    home_c = torch.bincount(anchor, minlength=P)
    other_c = torch.bincount(o_rank, minlength=P)
    C = comm.all_gather_cat(torch.stack([home_c, other_c])).view(P, 2, P).cpu()
    send = (C[me, 0] + C[me, 1]).tolist()
    recv = (C[:, 0, me] + C[:, 1, me]).tolist()
    counts = C[:, 0].sum(0).tolist()  # residents per rank after this layer

    to = torch.cat([anchor, o_rank])
    tok = torch.cat([torch.arange(n, device=dev), o_tok])
    payload = torch.cat([h, x[o_tok]])  # home rows carry the residual, the others the normed input
    order = torch.argsort(to, stable=True)
    tok, payload = tok[order], payload[order]
    meta = torch.cat([index[tok].unsqueeze(1), anchor[tok].unsqueeze(1), topi[tok]], 1)
    rows = _pack(meta, payload, topw[tok])
    got = comm.all_to_all_rows(rows, send, recv)
    sent_rows = sum(send) - send[me]
    stats.moe_rows += sent_rows
    dispatcher.rows_sent += sent_rows  # what the benchmark compares with the standard dispatcher
    stats.moe_bytes += sent_rows * rows.shape[1]
    g_meta, vec, w = _unpack(got, [(torch.int64, 2 + k), (h.dtype, H), (topw.dtype, k)])
    g_idx, g_anchor, g_ids = g_meta[:, 0], g_meta[:, 1], g_meta[:, 2:]
    home = g_anchor == me
    xin = vec.clone()
    xin[home] = rms_norm(vec[home], p["mlp_norm"], a.rms_eps)

    # Every choice whose expert is here, for home and visiting rows alike: one batched expert pass.
    g_dest = ExpertDispatcher.destinations(g_idx, g_ids, owners)[..., 0]
    r_i, r_j = (g_dest == me).nonzero(as_tuple=True)
    partial = vec.new_zeros(vec.shape)
    if r_i.numel():
        out = run_experts(stage.experts, layer, xin[r_i], g_ids[r_i, r_j])
        partial.index_add_(0, r_i, out * w[r_i, r_j].unsqueeze(1).to(out.dtype))

    home_pos = home.nonzero().squeeze(1)
    h_home, x_home, routed, idx_home = vec[home_pos], xin[home_pos], partial[home_pos], g_idx[home_pos]
    if int(C[:, 1].sum()) > 0:
        # Round 2: visiting rows' partial outputs go to their anchors. Both sides order them by
        # (anchor or source rank, token index), so no counts or indices travel.
        visit = (~home).nonzero().squeeze(1)
        key = g_anchor[visit] * (N + 1) + g_idx[visit]
        visit = visit[torch.argsort(key)]
        send2 = torch.bincount(g_anchor[visit], minlength=P).tolist()
        expect = torch.zeros((len(home_pos), P), dtype=torch.bool, device=dev)
        hd = g_dest[home_pos]
        expect[torch.arange(len(home_pos), device=dev).unsqueeze(1).expand_as(hd), hd] = True
        expect[:, me] = False
        e_row, e_rank = expect.nonzero(as_tuple=True)
        e_order = torch.argsort(e_rank * (N + 1) + idx_home[e_row])
        e_row, e_rank = e_row[e_order], e_rank[e_order]
        recv2 = torch.bincount(e_rank, minlength=P).tolist()
        back = comm.all_to_all_rows(partial[visit], send2, recv2)
        routed = routed.index_add(0, e_row, back)
        sent2 = sum(send2) - send2[me]
        stats.moe_rows += sent2
        dispatcher.rows_sent += sent2
        stats.moe_bytes += sent2 * H * vec.element_size()
        stats.second_exchanges += 1
    stats.moe_layer_calls += 1
    if a.shared_intermediate:
        routed = routed + stage.shared_expert(layer, x_home)
    h_new = h_home + routed
    order = torch.argsort(idx_home)
    return h_new[order], idx_home[order], counts
