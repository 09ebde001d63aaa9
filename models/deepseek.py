"""DeepSeek-V2 / V3 style: multi-head latent attention (MLA), shared experts, first dense layers,
group-limited top-k routing (V2: softmax + ``group_limited_greedy``; V3: sigmoid scores with
``e_score_correction_bias``, top-2-sum group scores, ``norm_topk_prob``, routed scaling),
plain RoPE or YaRN (``models.rope``; also scales the attention softmax by ``mscale_all_dim``).

What is parallel: the low-rank projections ``q_a``/``kv_a`` and their norms are
replicated (small); ``q_b`` and ``kv_b`` are column-split by heads, ``o`` is
row-split; shared experts and the first dense MLPs split like a dense MLP;
routed experts as in Mixtral. The MoE block is ``model.layers.{layer}.mlp``;
stages may cut at any layer boundary (the dense prefix included).
"""

from __future__ import annotations

from tessera.models.arch import COMMON_REFUSALS, MoEArch, Refuse, check_refusals, dtype_of, eos_of
from tessera.models.fp8 import parse_quantization
from tessera.models.rope import parse_rope

ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")

_L = "model.layers.{layer}."
CHECKPOINT_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": _L + "input_layernorm.weight",
    "mlp_norm": _L + "post_attention_layernorm.weight",
    "q": _L + "self_attn.q_proj.weight",  # only when q_lora_rank is None
    "q_a": _L + "self_attn.q_a_proj.weight",
    "q_a_norm": _L + "self_attn.q_a_layernorm.weight",
    "q_b": _L + "self_attn.q_b_proj.weight",
    "kv_a": _L + "self_attn.kv_a_proj_with_mqa.weight",
    "kv_a_norm": _L + "self_attn.kv_a_layernorm.weight",
    "kv_b": _L + "self_attn.kv_b_proj.weight",
    "o": _L + "self_attn.o_proj.weight",
    "router": _L + "mlp.gate.weight",
    "router_bias": _L + "mlp.gate.e_score_correction_bias",
    "expert_gate": _L + "mlp.experts.{expert}.gate_proj.weight",
    "expert_up": _L + "mlp.experts.{expert}.up_proj.weight",
    "expert_down": _L + "mlp.experts.{expert}.down_proj.weight",
    "shared_gate_proj": _L + "mlp.shared_experts.gate_proj.weight",
    "shared_up": _L + "mlp.shared_experts.up_proj.weight",
    "shared_down": _L + "mlp.shared_experts.down_proj.weight",
    "dense_gate": _L + "mlp.gate_proj.weight",
    "dense_up": _L + "mlp.up_proj.weight",
    "dense_down": _L + "mlp.down_proj.weight",
}

TP_PLAN = {
    "embed": "vocab", "lm_head": "vocab", "final_norm": "replicate",
    "attn_norm": "replicate", "mlp_norm": "replicate",
    "q": "colwise", "q_a": "replicate", "q_a_norm": "replicate", "q_b": "colwise",
    "kv_a": "replicate", "kv_a_norm": "replicate", "kv_b": "colwise", "o": "rowwise",
    "router": "replicate", "router_bias": "replicate",
    "shared_gate_proj": "colwise", "shared_up": "colwise", "shared_down": "rowwise",
    "dense_gate": "colwise", "dense_up": "colwise", "dense_down": "rowwise",
}


_NO_ATTENTION_BIAS = Refuse("attention_bias", (False,), "biases on the MLA projections (q_a/kv_a/o) are not "
                            "implemented; use a checkpoint with attention_bias false")
# Every release has 1; DeepSeek's own code would put MoE only on every freq-th layer, transformers ignores the key.
_MOE_EVERY_LAYER = Refuse("moe_layer_freq", (1,), "MoE on every moe_layer_freq-th layer is not implemented (no "
                          "release uses it and transformers, the reference, ignores it); use moe_layer_freq 1")
# DeepSeek-V2: softmax scores, greedy or group-limited top-k, no renormalisation (what transformers implements).
V2_REFUSALS = COMMON_REFUSALS + (
    Refuse("scoring_func", ("softmax",), "DeepSeek-V2 routers score with softmax; sigmoid scoring is DeepSeek-V3's "
           "(architectures DeepseekV3ForCausalLM)"),
    Refuse("topk_method", ("greedy", "group_limited_greedy"), "use greedy or group_limited_greedy"),
    Refuse("norm_topk_prob", (False,), "renormalised top-k weights on DeepSeek-V2 are not implemented (transformers "
           "ignores the key, the original code applies it); use a checkpoint with norm_topk_prob false"),
    _NO_ATTENTION_BIAS,
    _MOE_EVERY_LAYER,
)
# DeepSeek-V3/R1: sigmoid scores + e_score_correction_bias, top-2-sum group limit ("noaux_tc").
V3_REFUSALS = COMMON_REFUSALS + (
    Refuse("scoring_func", ("sigmoid",), "DeepSeek-V3 routers score with sigmoid plus e_score_correction_bias"),
    Refuse("topk_method", ("noaux_tc",), "DeepSeek-V3 routing is noaux_tc (bias-corrected, group-limited top-k)"),
    _NO_ATTENTION_BIAS,
    _MOE_EVERY_LAYER,
)

# Multi-token-prediction modules (num_nextn_predict_layers) sit after the last layer, at
# model.layers.{num_hidden_layers + i}: a full MoE decoder layer plus these tensors. tessera,
# like transformers, never runs them (they serve speculative decoding) and never loads them;
# memory.footprint counts them, as the released parameter totals do (DeepSeek-V3: 671B + 14B).
MTP_NAMES = {
    "mtp_embed": _L + "embed_tokens.weight",  # a stored copy of the embedding
    "mtp_enorm": _L + "enorm.weight",
    "mtp_hnorm": _L + "hnorm.weight",
    "mtp_eh_proj": _L + "eh_proj.weight",
    "mtp_norm": _L + "shared_head.norm.weight",
    "mtp_head": _L + "shared_head.head.weight",  # a stored copy of the LM head
}


def mtp_shapes(arch: MoEArch) -> dict[str, tuple[int, ...]]:
    """Full shapes of one MTP module's own tensors (besides its decoder layer), from config.json alone."""
    H, V = arch.hidden_size, arch.vocab_size
    return {"mtp_embed": (V, H), "mtp_enorm": (H,), "mtp_hnorm": (H,), "mtp_eh_proj": (H, 2 * H),
            "mtp_norm": (H,), "mtp_head": (V, H)}


def parse_config(cfg: dict) -> MoEArch:
    arch = cfg["architectures"][0]
    v3 = "V3" in arch
    check_refusals(cfg, V3_REFUSALS if v3 else V2_REFUSALS)
    heads = cfg["num_attention_heads"]
    layers = cfg["num_hidden_layers"]
    first_dense = cfg.get("first_k_dense_replace", 0)
    experts = cfg.get("n_routed_experts") or 0
    moe = tuple(experts > 0 and i >= first_dense for i in range(layers))  # moe_layer_freq is 1 (refused otherwise)
    nope, rope = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"]
    if v3:
        router = "sigmoid_group"
    else:
        router = "softmax" if cfg.get("topk_method", "greedy") == "greedy" else "softmax_group"
    # The released V2/V3 checkpoints use YaRN (rope_scaling type "yarn", with mscale/mscale_all_dim).
    rope_theta, rope_scaling = parse_rope(cfg, supported=("default", "yarn"))
    return MoEArch(
        family="deepseek",
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,  # MLA expands the latent to every head
        qk_head_dim=nope + rope,
        v_head_dim=cfg["v_head_dim"],
        rope_dim=rope,
        rope_theta=rope_theta,
        rms_eps=cfg.get("rms_norm_eps", 1e-6),
        moe_layers=moe,
        num_experts=experts,
        top_k=cfg["num_experts_per_tok"],
        moe_intermediate=cfg["moe_intermediate_size"],
        dense_intermediate=cfg["intermediate_size"],
        router=router,
        # V2's router never renormalises (transformers ignores norm_topk_prob there).
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)) if v3 else False,
        routed_scaling=float(cfg.get("routed_scaling_factor", 1.0)),
        n_group=cfg.get("n_group") or 1,
        topk_group=cfg.get("topk_group") or 1,
        router_bias=v3,
        shared_intermediate=cfg["moe_intermediate_size"] * (cfg.get("n_shared_experts") or 0),
        attention="mla",
        rope_interleave=bool(cfg.get("rope_interleave", True)) if v3 else True,
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=cfg["kv_lora_rank"],
        qk_nope_head_dim=nope,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dtype=dtype_of(cfg),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        eos_token_ids=eos_of(cfg),
        rope_scaling=rope_scaling,
        quantization=parse_quantization(cfg),
        mtp_layers=int(cfg.get("num_nextn_predict_layers") or 0),
    )
