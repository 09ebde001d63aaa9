"""Mixtral: GQA attention, every layer a top-k softmax MoE (renormalised), no shared expert.

What is parallel (``parallel/`` says how): attention q/k/v are column-split by
heads (k/v replicated when there are fewer kv heads than tp ranks), o is
row-split; embedding and LM head are vocab-split; the MoE block
``block_sparse_moe`` spreads experts over ``ep`` and slices each expert's
intermediate dim over the remaining ranks. Pipeline stages may cut at any
layer boundary.
"""

from __future__ import annotations

from tessera.models.arch import COMMON_REFUSALS, MoEArch, check_refusals, dtype_of, eos_of, rope_theta_of, sliding_window_of
from tessera.models.fp8 import parse_quantization

ARCHITECTURES = ("MixtralForCausalLM",)

CHECKPOINT_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{layer}.input_layernorm.weight",
    "mlp_norm": "model.layers.{layer}.post_attention_layernorm.weight",
    "q": "model.layers.{layer}.self_attn.q_proj.weight",
    "k": "model.layers.{layer}.self_attn.k_proj.weight",
    "v": "model.layers.{layer}.self_attn.v_proj.weight",
    "o": "model.layers.{layer}.self_attn.o_proj.weight",
    "router": "model.layers.{layer}.block_sparse_moe.gate.weight",
    "expert_gate": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
    "expert_down": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
    "expert_up": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
}

# tessera name -> how it is split over tp (see tessera.parallel.tensor.SHARD_KINDS).
TP_PLAN = {
    "embed": "vocab", "lm_head": "vocab", "final_norm": "replicate",
    "attn_norm": "replicate", "mlp_norm": "replicate",
    "q": "colwise", "k": "colwise_kv", "v": "colwise_kv", "o": "rowwise",
    "router": "replicate",
}


def parse_config(cfg: dict) -> MoEArch:
    check_refusals(cfg, COMMON_REFUSALS)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    layers = cfg["num_hidden_layers"]
    return MoEArch(
        family="mixtral",
        architecture=cfg["architectures"][0],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        qk_head_dim=head_dim,
        v_head_dim=head_dim,
        rope_dim=head_dim,
        rope_theta=rope_theta_of(cfg),
        rms_eps=cfg.get("rms_norm_eps", 1e-5),
        moe_layers=(True,) * layers,
        num_experts=cfg["num_local_experts"],
        top_k=cfg["num_experts_per_tok"],
        moe_intermediate=cfg["intermediate_size"],
        dense_intermediate=cfg["intermediate_size"],
        router="softmax",
        norm_topk_prob=True,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dtype=dtype_of(cfg),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        eos_token_ids=eos_of(cfg),
        sliding_window=sliding_window_of(cfg),
        quantization=parse_quantization(cfg),
    )
