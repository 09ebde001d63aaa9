"""The shared math of tessera's MoE language models: norms, RoPE, GQA and MLA attention over a
paged KV cache, dense/shared MLPs, routers, and the MoE block. Pure: no collectives.

Weights arrive already sliced for this rank (``models/loader.py`` reads the
slices ``parallel/`` chose), so every function here works on local shards.
Where a rank's partial result meets the other ranks' (row-split linears, the
vocabulary-split embedding and head, routed tokens and their experts, the
token layout of expert-parallel ranks) the stage calls a hook of its
:class:`ShardOps`; the defaults here are the single-rank identities, and
``parallel/parallelize.py`` builds the hooks of a plan (torchtitan's
``parallelize_*`` applied to a functional model). Expert weights come through
the :class:`ExpertWeights` seam (offload plugs an expert cache in there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from tessera.models.arch import MoEArch
from tessera.models.packed_linear import linear, pack
from tessera.models.paged_attention import AttentionMetadata, PagedKVCache, paged_attention
from tessera.models.rope import RopeScaling, cos_sin


class ExpertWeights:
    """The one seam through which the MoE block obtains routed-expert weights.

    ``get(layer, expert_ids)`` returns, for each id, this rank's slice of that
    expert as ``(gate_up [2*I_slice, H], down [H, I_slice])``. The default keeps
    every local expert in memory. An offload tier (expert cache over host/NVMe
    stores) replaces this object with one that has the same ``get`` (and may
    prefetch on ``get``) without touching model math: the block asks only for
    the experts that received tokens in this step, in ascending id order.
    """

    def __init__(self) -> None:
        self._weights: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def put(self, layer: int, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        self._weights[(layer, expert)] = (pack(gate_up.contiguous()), pack(down.contiguous()))

    def local_experts(self, layer: int) -> list[int]:
        return sorted(e for (l, e) in self._weights if l == layer)

    def get(self, layer: int, expert_ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        try:
            return [self._weights[(layer, int(e))] for e in expert_ids]
        except KeyError as err:
            raise RuntimeError(f"expert {err.args[0][1]} of layer {layer} was dispatched to a rank that does not hold it") from None

    def observe(self, layer: int, hidden: torch.Tensor) -> None:
        """The MoE block's input at ``layer``, before routing (an expert cache predicts from it); in memory: nothing."""

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self._weights.values())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float,
                 scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return cos_sin(positions, dim, theta, scaling)  # [N, dim/2] each; plain RoPE or YaRN (models.rope)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate [N, heads, dim]. ``interleave`` pairs (x0, x1), (x2, x3)... (DeepSeek); else halves.

    The interleaved form writes rotated evens then odds: a fixed permutation applied to both
    queries and keys, so attention scores equal those of the interleaved layout.
    """
    c, s = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def route(arch: MoEArch, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None):
    """(weights [T, k], expert ids [T, k]) of the family's router."""
    logits = F.linear(x.float(), w.float())
    k, E = arch.top_k, arch.num_experts
    if arch.router == "softmax":
        probs = logits.softmax(-1)
        topw, topi = probs.topk(k, dim=-1)
    elif arch.router == "softmax_group":
        probs = logits.softmax(-1)
        groups = probs.view(-1, arch.n_group, E // arch.n_group).max(-1).values
        keep = torch.zeros_like(groups).scatter_(1, groups.topk(arch.topk_group, dim=-1).indices, 1.0)
        masked = probs * keep.repeat_interleave(E // arch.n_group, dim=1)
        topw, topi = masked.topk(k, dim=-1)
    else:  # sigmoid_group (DeepSeek-V3)
        scores = logits.sigmoid()
        choice = scores + (bias.float() if bias is not None else 0.0)
        groups = choice.view(-1, arch.n_group, E // arch.n_group).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(groups).scatter_(1, groups.topk(arch.topk_group, dim=-1).indices, 1.0)
        choice = choice.masked_fill(keep.repeat_interleave(E // arch.n_group, dim=1) == 0, float("-inf"))
        topi = choice.topk(k, dim=-1).indices
        topw = scores.gather(1, topi)
        if arch.norm_topk_prob:
            topw = topw / (topw.sum(-1, keepdim=True) + 1e-20)
    if arch.router != "sigmoid_group" and arch.norm_topk_prob:
        topw = topw / topw.sum(-1, keepdim=True)
    return (topw * arch.routed_scaling).to(x.dtype), topi


def run_experts(weights: ExpertWeights, layer: int, rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Batched expert compute: rows grouped per expert, one matmul pair per expert present."""
    if rows.shape[0] == 0:
        return rows.clone()
    order = torch.argsort(expert_ids, stable=True)
    sorted_rows = rows[order]
    present, counts = torch.unique_consecutive(expert_ids[order], return_counts=True)
    out = torch.empty_like(sorted_rows)
    offset = 0
    for (gate_up, down), count in zip(weights.get(layer, present.tolist()), counts.tolist()):
        chunk = sorted_rows[offset : offset + count]
        gate, up = linear(chunk, gate_up).chunk(2, dim=-1)
        out[offset : offset + count] = linear(F.silu(gate) * up, down)
        offset += count
    result = torch.empty_like(out)
    result[order] = out
    return result


def fuse_qkv(p: dict[str, torch.Tensor]) -> None:
    """One [q; k; v] weight (and bias) per layer, replacing the three: one matmul instead of three per step."""
    biases = [n in p for n in ("q_bias", "k_bias", "v_bias")]
    if "qkv" in p or not all(n in p for n in ("q", "k", "v")) or any(biases) != all(biases):
        return
    for suffix in ("", "_bias") if all(biases) else ("",):
        names = [f"{n}{suffix}" for n in ("q", "k", "v")]
        p[f"qkv{suffix}"] = torch.cat([p.pop(n) for n in names])


PACKED_LINEARS = ("qkv", "q", "o", "q_a", "q_b", "kv_a", "dense_gate", "dense_up", "dense_down",
                  "shared_gate_proj", "shared_up", "shared_down")


def pack_linears(p: dict[str, torch.Tensor]) -> None:
    """Pre-pack this layer's 16-bit CPU linear weights (``models.packed_linear``); the plain ones are dropped."""
    for name in PACKED_LINEARS:
        if name in p:
            p[name] = pack(p[name])


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP on this rank's columns (gate/up column-split, down row-split: a partial output under tp)."""
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


# -- where a rank's results meet the other ranks' (the single-rank identities) ----------------------------


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _local_embed(ids: torch.Tensor, table: torch.Tensor, start: int) -> torch.Tensor:
    return table[ids]


def _local_logits(h: torch.Tensor, head: torch.Tensor, vocab: int) -> torch.Tensor:
    return linear(h, head)[:, :vocab]


def _local_dispatch(layer: int, x: torch.Tensor, topi: torch.Tensor, topw: torch.Tensor,
                    compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Every expert is here: each (token, choice) row goes to its expert, outputs weighted and summed."""
    T, k = topi.shape
    token = torch.arange(T, device=x.device).repeat_interleave(k)
    rows = compute(x[token], topi.reshape(-1))
    out = x.new_zeros(x.shape)
    out.index_add_(0, token, rows * topw.reshape(-1, 1).to(rows.dtype))
    return out


@dataclass
class LayerView:
    """What one attention call sees: the batch's metadata, RoPE rows, and where K/V are written and read."""

    meta: AttentionMetadata
    cos: torch.Tensor
    sin: torch.Tensor
    kv: Any  # PagedKVCache, or a stand-in with the same write / gather (parallel.coherent)


class ReplicatedTokens:
    """The default token layout: every rank of the MoE group holds every token of the batch.

    A layout is the stage's strategy for where tokens live between layers:
    ``enter`` (start of the stage), ``attention``, ``moe`` (may move tokens),
    ``exit`` (back to the full batch in order). ``parallel/coherent.ExFlowTokens``
    keeps tokens sharded and moving with their experts instead.
    """

    def enter(self, stage: "MoEStage", h: torch.Tensor, meta: AttentionMetadata, cos, sin):
        return h, LayerView(meta, cos, sin, stage.cache)

    def attention(self, stage: "MoEStage", layer: int, x: torch.Tensor, view: LayerView) -> torch.Tensor:
        return stage.attention(layer, x, view)

    def moe(self, stage: "MoEStage", layer: int, h: torch.Tensor, x: torch.Tensor, view: LayerView):
        return h + stage.moe(layer, x), view

    def exit(self, stage: "MoEStage", h: torch.Tensor, view: LayerView) -> torch.Tensor:
        return h


@dataclass(frozen=True)
class ShardOps:
    """The hooks where this rank's results meet the other ranks' (single-rank identities by default).

    ``reduce``: sums the partial outputs of row-split linears over tp.
    ``embed(ids, table, vocab_start)`` / ``logits(h, head, vocab)``: the
    vocabulary-split embedding and LM head. ``dispatch(layer, x, topi, topw,
    compute)``: routed (token, choice) rows to the ranks holding their experts
    and the weighted sum back (``compute(rows, expert_ids)`` runs the local
    experts). ``tokens``: the token layout strategy (see ReplicatedTokens).
    """

    reduce: Callable[[torch.Tensor], torch.Tensor] = _identity
    embed: Callable[..., torch.Tensor] = _local_embed
    logits: Callable[..., torch.Tensor] = _local_logits
    dispatch: Callable[..., torch.Tensor] = _local_dispatch
    tokens: Any = field(default_factory=ReplicatedTokens)


class RoutingRecorder:
    """Top-k expert ids chosen at each MoE layer for every token processed (expert-affinity traces)."""

    def __init__(self) -> None:
        self.layers: dict[int, list[torch.Tensor]] = {}

    def record(self, layer: int, topi: torch.Tensor) -> None:
        self.layers.setdefault(layer, []).append(topi.to(torch.int32).cpu())

    def trace(self) -> dict[int, Any]:
        return {layer: torch.cat(parts).numpy() for layer, parts in self.layers.items()}

    def clear(self) -> None:
        self.layers.clear()


@dataclass
class MoEStage:
    """The layers of one pipeline stage on one rank: weights, KV cache, expert weights and shard hooks."""

    arch: MoEArch
    layers: tuple[int, ...]
    params: dict[int, dict[str, torch.Tensor]]  # layer -> tessera name -> local shard
    globals: dict[str, torch.Tensor]  # embed / final_norm / lm_head shards present on this stage
    vocab_start: int
    experts: ExpertWeights
    cache: PagedKVCache
    local_heads: int
    local_kv_heads: int
    ops: ShardOps = field(default_factory=ShardOps)
    routing: RoutingRecorder | None = None

    def __post_init__(self) -> None:
        self.mla_absorb = {}
        for layer, params in self.params.items():
            if self.arch.attention != "mla":
                fuse_qkv(params)
            else:  # kv_b [heads * (qk_nope + v), r] as the key and value up-projections (views)
                kv_b = params["kv_b"].view(self.local_heads, self.arch.qk_nope_head_dim + self.arch.v_head_dim, -1)
                self.mla_absorb[layer] = kv_b.split([self.arch.qk_nope_head_dim, self.arch.v_head_dim], dim=1)
            pack_linears(params)
        if "lm_head" in self.globals:
            self.globals["lm_head"] = pack(self.globals["lm_head"])

    # -- pieces -------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.ops.embed(ids, self.globals["embed"], self.vocab_start)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = rms_norm(h, self.globals["final_norm"], self.arch.rms_eps)
        return self.ops.logits(h, self.globals["lm_head"], self.arch.vocab_size).float()

    def attention(self, layer: int, x: torch.Tensor, view: LayerView) -> torch.Tensor:
        a, p = self.arch, self.params[layer]
        N, hl = x.shape[0], self.local_heads
        if a.attention == "mla":
            if a.q_lora_rank:
                q = linear(rms_norm(linear(x, p["q_a"]), p["q_a_norm"], a.rms_eps), p["q_b"])
            else:
                q = linear(x, p["q"])
            q = q.view(N, hl, a.qk_head_dim)
            q_nope, q_pe = q.split([a.qk_nope_head_dim, a.rope_dim], dim=-1)
            return self.latent_attention(layer, x, q_nope, q_pe, view)
        kvh = self.local_kv_heads
        if "qkv" in p:
            q, k, v = linear(x, p["qkv"], p.get("qkv_bias")).split(
                [hl * a.qk_head_dim, kvh * a.qk_head_dim, kvh * a.v_head_dim], dim=-1)
        else:
            q, k, v = (linear(x, p[n], p.get(f"{n}_bias")) for n in ("q", "k", "v"))
        q, k, v = q.view(N, hl, a.qk_head_dim), k.view(N, kvh, a.qk_head_dim), v.view(N, kvh, a.v_head_dim)
        if a.qk_norm:
            q, k = rms_norm(q, p["q_norm"], a.rms_eps), rms_norm(k, p["k_norm"], a.rms_eps)
        q, k = apply_rope(q, view.cos, view.sin, a.rope_interleave), apply_rope(k, view.cos, view.sin, a.rope_interleave)
        view.kv.write(layer, k, v, view.meta.slot_mapping)
        keys, values = view.kv.gather(layer, view.meta.key_slots)
        out = paged_attention(q, keys, values, view.meta, a.softmax_scale).reshape(N, -1)
        return self.ops.reduce(linear(out, p["o"]))

    def latent_attention(self, layer: int, x, q_nope, q_pe, view: LayerView) -> torch.Tensor:
        """Multi-head latent attention over a cache of latents, as DeepSeek-V2 describes and vLLM serves it.

        The cache holds per token only the normalised latent ``c`` and the roped
        shared key ``k_pe`` (``kv_lora_rank + rope_dim`` values, one "head") instead
        of every head's K and V. ``kv_b``'s key half is absorbed into the query
        (``q_nope . W_uk c = (W_uk^T q_nope) . c``) and its value half applied after
        attention (``W_uv (softmax . c)``): the same function, a cache
        ``heads * (qk_head_dim + v) / (kv_lora_rank + rope)`` times smaller than per-head
        K and V (71x for DeepSeek-V3: 128 * (192 + 128) values against 576). Latents are replicated over tp (each rank's heads use all of them).
        """
        a, p = self.arch, self.params[layer]
        N, r = x.shape[0], a.kv_lora_rank
        latent, k_pe = linear(x, p["kv_a"]).split([r, a.rope_dim], dim=-1)
        c = rms_norm(latent, p["kv_a_norm"], a.rms_eps)
        k_pe = apply_rope(k_pe.view(N, 1, a.rope_dim), view.cos, view.sin, a.rope_interleave)
        q_pe = apply_rope(q_pe, view.cos, view.sin, a.rope_interleave)
        w_uk, w_uv = self.mla_absorb[layer]  # [heads, qk_nope, r], [heads, v, r]
        q_lat = torch.einsum("nhd,hdr->nhr", q_nope, w_uk)
        q = torch.cat([q_lat, q_pe], -1)  # [N, heads, r + rope]
        k = torch.cat([c.unsqueeze(1), k_pe], -1)  # [N, 1, r + rope]
        view.kv.write(layer, k, k[..., :0], view.meta.slot_mapping)
        keys, _ = view.kv.gather(layer, view.meta.key_slots)
        out = paged_attention(q, keys, keys[..., :r], view.meta, a.softmax_scale)  # [N, heads, r]
        out = torch.einsum("nhr,hvr->nhv", out, w_uv).reshape(N, -1)
        return self.ops.reduce(linear(out, p["o"]))

    def moe(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MoE block on tokens replicated over the MoE group: route, dispatch to the experts' ranks, combine."""
        topw, topi = self.route(layer, x)
        out = self.ops.dispatch(layer, x, topi, topw, lambda rows, ids: run_experts(self.experts, layer, rows, ids))
        return out + self.shared_expert(layer, x) if self.arch.shared_intermediate else out

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids) [T, k] of this layer's router; recorded and shown to the expert weights."""
        p = self.params[layer]
        topw, topi = route(self.arch, x, p["router"], p.get("router_bias"))
        if self.routing is not None:
            self.routing.record(layer, topi)
        self.experts.observe(layer, x)
        return topw, topi

    def shared_expert(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        p = self.params[layer]
        shared = self.ops.reduce(swiglu(x, p["shared_gate_proj"], p["shared_up"], p["shared_down"]))
        if self.arch.shared_gate:
            shared = torch.sigmoid(F.linear(x, p["shared_expert_gate"])) * shared
        return shared

    def dense_mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        p = self.params[layer]
        return self.ops.reduce(swiglu(x, p["dense_gate"], p["dense_up"], p["dense_down"]))

    # -- the stage ----------------------------------------------------------------------

    def forward(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Run this stage's layers on packed hidden states [N, H]."""
        a, tokens = self.arch, self.ops.tokens
        cos, sin = rope_cos_sin(meta.positions, a.rope_dim, a.rope_theta, a.rope_scaling)
        h, view = tokens.enter(self, h, meta, cos, sin)
        for layer in self.layers:
            p = self.params[layer]
            h = h + tokens.attention(self, layer, rms_norm(h, p["attn_norm"], a.rms_eps), view)
            x = rms_norm(h, p["mlp_norm"], a.rms_eps)
            if a.moe_layers[layer]:
                h, view = tokens.moe(self, layer, h, x, view)
            else:
                h = h + self.dense_mlp(layer, x)
        return tokens.exit(self, h, view)
