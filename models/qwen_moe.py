"""Qwen2-MoE and Qwen3-MoE: GQA attention (Qwen2: q/k/v bias; Qwen3: per-head q/k RMSNorm),
softmax top-k routing with optional ``norm_topk_prob``, Qwen2's gated shared expert,
dense MLP on ``mlp_only_layers`` / off the ``decoder_sparse_step``.

Parallel declarations as in Mixtral, plus the shared expert (column/row split
over tp like a dense MLP) and its scalar gate (replicated). The MoE block is
``model.layers.{layer}.mlp``; stages may cut at any layer boundary.
"""

from __future__ import annotations

from tessera.models.arch import (
    COMMON_REFUSALS, MoEArch, Refuse, check_refusals, dtype_of, eos_of, rope_theta_of, sliding_window_of,
)
from tessera.models.fp8 import parse_quantization

ARCHITECTURES = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")

_L = "model.layers.{layer}."
CHECKPOINT_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": _L + "input_layernorm.weight",
    "mlp_norm": _L + "post_attention_layernorm.weight",
    "q": _L + "self_attn.q_proj.weight",
    "k": _L + "self_attn.k_proj.weight",
    "v": _L + "self_attn.v_proj.weight",
    "q_bias": _L + "self_attn.q_proj.bias",
    "k_bias": _L + "self_attn.k_proj.bias",
    "v_bias": _L + "self_attn.v_proj.bias",
    "q_norm": _L + "self_attn.q_norm.weight",
    "k_norm": _L + "self_attn.k_norm.weight",
    "o": _L + "self_attn.o_proj.weight",
    "router": _L + "mlp.gate.weight",
    "expert_gate": _L + "mlp.experts.{expert}.gate_proj.weight",
    "expert_up": _L + "mlp.experts.{expert}.up_proj.weight",
    "expert_down": _L + "mlp.experts.{expert}.down_proj.weight",
    "shared_gate_proj": _L + "mlp.shared_expert.gate_proj.weight",
    "shared_up": _L + "mlp.shared_expert.up_proj.weight",
    "shared_down": _L + "mlp.shared_expert.down_proj.weight",
    "shared_expert_gate": _L + "mlp.shared_expert_gate.weight",
    "dense_gate": _L + "mlp.gate_proj.weight",
    "dense_up": _L + "mlp.up_proj.weight",
    "dense_down": _L + "mlp.down_proj.weight",
}

TP_PLAN = {
    "embed": "vocab", "lm_head": "vocab", "final_norm": "replicate",
    "attn_norm": "replicate", "mlp_norm": "replicate",
    "q": "colwise", "k": "colwise_kv", "v": "colwise_kv", "o": "rowwise",
    "q_bias": "colwise", "k_bias": "colwise_kv", "v_bias": "colwise_kv",
    "q_norm": "replicate", "k_norm": "replicate",
    "router": "replicate", "shared_expert_gate": "replicate",
    "shared_gate_proj": "colwise", "shared_up": "colwise", "shared_down": "rowwise",
    "dense_gate": "colwise", "dense_up": "colwise", "dense_down": "rowwise",
}


# Qwen3-MoE's attention_bias also adds a bias to o_proj, which the model math does not apply.
QWEN3_REFUSALS = COMMON_REFUSALS + (
    Refuse("attention_bias", (False,), "Qwen3-MoE attention biases (q/k/v and o_proj) are not implemented; "
           "use a checkpoint with attention_bias false"),
)


def parse_config(cfg: dict) -> MoEArch:
    arch = cfg["architectures"][0]
    qwen3 = arch.startswith("Qwen3")
    check_refusals(cfg, QWEN3_REFUSALS if qwen3 else COMMON_REFUSALS)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    layers = cfg["num_hidden_layers"]
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense_only = set(cfg.get("mlp_only_layers") or [])
    moe = tuple(i not in dense_only and experts > 0 and (i + 1) % step == 0 for i in range(layers))
    return MoEArch(
        family="qwen_moe",
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        qk_head_dim=head_dim,
        v_head_dim=head_dim,
        rope_dim=head_dim,
        rope_theta=rope_theta_of(cfg),
        rms_eps=cfg.get("rms_norm_eps", 1e-6),
        moe_layers=moe,
        num_experts=experts,
        top_k=cfg["num_experts_per_tok"],
        moe_intermediate=cfg["moe_intermediate_size"],
        dense_intermediate=cfg["intermediate_size"],
        router="softmax",
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        shared_intermediate=0 if qwen3 else int(cfg.get("shared_expert_intermediate_size") or 0),
        shared_gate=not qwen3 and bool(cfg.get("shared_expert_intermediate_size")),
        qkv_bias=not qwen3 and bool(cfg.get("qkv_bias", True)),  # Qwen2-MoE: q/k/v biases unless qkv_bias is false
        qk_norm=qwen3,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dtype=dtype_of(cfg),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        eos_token_ids=eos_of(cfg),
        sliding_window=sliding_window_of(cfg),
        quantization=parse_quantization(cfg),
    )
