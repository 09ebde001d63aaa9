"""RoPE scaling of the MoE families: DeepSeek-V2/V3 YaRN against transformers, and clear refusals.

The YaRN checkpoints have original_max_position_embeddings=16 and factor 4, and the
prompts run past position 16, so extrapolated and interpolated frequencies, the cos/sin
attention factor and the mscale_all_dim softmax scale all count. V3 uses the released
V3 mscale values (1.0 / 1.0); V2 uses mscale != mscale_all_dim so the cos/sin factor is not 1.
"""

from __future__ import annotations

import pytest
import torch

from tessera.models import deepseek, mixtral, qwen_moe, rope
from tessera.models.tiny_moe import build_tiny_moe
from tessera.config import ConfigError
from tessera.runtime.llm.engine import LLMEngine
from tessera.tests.llm_testing import _reference, check_against_reference, local_controller  # noqa: F401

LONG_PROMPTS = ([(7 * i + 3) % 120 + 3 for i in range(22)], [(11 * i + 5) % 120 + 3 for i in range(17)])
YARN = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}
YARN_MODELS = {
    "deepseek_v3_yarn": ("deepseek_v3", {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "deepseek_v2_yarn": ("deepseek_v2", {**YARN, "mscale": 1.0, "mscale_all_dim": 0.707}),
}

# (hub-style DeepSeek config fields, qk_rope_head_dim, max_position_embeddings)
UNIT_CASES = [
    ({"rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}, 64, 163840),
    ({"rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                              "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}, 64, 163840),
    ({"rope_theta": 10000.0, "rope_scaling": dict(YARN_MODELS["deepseek_v2_yarn"][1])}, 8, 64),
    ({"rope_theta": 100.0, "rope_scaling": {"type": "yarn", "factor": 8, "original_max_position_embeddings": 256,
                                            "beta_fast": 16, "beta_slow": 2, "truncate": False}}, 32, 2048),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 2.5, "attention_factor": 0.9,
                          "original_max_position_embeddings": 64, "mscale_all_dim": 0.5}}, 16, 160),
]


@pytest.fixture(scope="module")
def yarn_refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("yarn")
    refs = {}
    for name, (family, scaling) in YARN_MODELS.items():
        path = build_tiny_moe(family, root / name, max_positions=64, rope_scaling=scaling)
        refs[name] = _reference(path, LONG_PROMPTS)
    return refs


def _hub_config(arch: str, fields: dict, rope_dim: int, max_pos: int) -> dict:
    return {"architectures": [arch], "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128, "moe_intermediate_size": 64,
            "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
            "kv_lora_rank": 32, "q_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": rope_dim, "v_head_dim": 16,
            "n_group": 2, "topk_group": 1, "max_position_embeddings": max_pos, **fields}


@pytest.mark.parametrize("case", range(len(UNIT_CASES)))
def test_yarn_frequencies_match_transformers(case):
    """inv_freq, cos/sin attention factor and softmax scale equal transformers' for DeepSeek-V2/V3 configs."""
    from transformers import DeepseekV2Config, DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    fields, rope_dim, max_pos = UNIT_CASES[case]
    for arch, config_cls in (("DeepseekV3ForCausalLM", DeepseekV3Config), ("DeepseekV2ForCausalLM", DeepseekV2Config)):
        cfg = _hub_config(arch, fields, rope_dim, max_pos)
        ours = deepseek.parse_config(cfg)
        assert ours.rope_scaling is not None and ours.rope_dim == rope_dim
        hf = config_cls.from_dict({k: v for k, v in cfg.items() if k != "architectures"})
        want_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
        got_freq = rope.inv_freq(ours.rope_dim, ours.rope_theta, ours.rope_scaling)
        torch.testing.assert_close(got_freq, want_freq.float(), rtol=0, atol=0)
        assert rope.attention_factor(ours.rope_scaling) == pytest.approx(want_factor, rel=1e-12)
        assert ours.softmax_scale == pytest.approx(yarn_apply_mscale(hf.rope_parameters, ours.qk_head_dim ** -0.5), rel=1e-12)
        cos, sin = rope.cos_sin(torch.arange(40), ours.rope_dim, ours.rope_theta, ours.rope_scaling)
        angles = torch.arange(40).float()[:, None] * want_freq.float()
        torch.testing.assert_close(cos, angles.cos() * want_factor)
        torch.testing.assert_close(sin, angles.sin() * want_factor)


def test_default_rope_unchanged():
    cfg = _hub_config("DeepseekV3ForCausalLM", {"rope_theta": 5000.0}, 8, 64)
    arch = deepseek.parse_config(cfg)
    assert arch.rope_scaling is None and arch.rope_theta == 5000.0 and arch.softmax_scale == arch.qk_head_dim ** -0.5
    torch.testing.assert_close(rope.inv_freq(8, 5000.0), 1.0 / (5000.0 ** (torch.arange(0, 8, 2).float() / 8)), rtol=0, atol=0)


@pytest.mark.parametrize("rope_type", ["longrope", "dynamic", "llama3"])
def test_deepseek_refuses_other_rope_types(rope_type):
    cfg = _hub_config("DeepseekV3ForCausalLM", {"rope_scaling": {"type": rope_type, "factor": 2.0}}, 8, 64)
    with pytest.raises(ConfigError, match=rf"rope_type '{rope_type}'.*supported: default, yarn"):
        deepseek.parse_config(cfg)


@pytest.mark.parametrize("family", [mixtral, qwen_moe])
@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"type": "linear", "factor": 2.0},
    {"type": "dynamic", "factor": 2.0},
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},  # Qwen's yarn: not implemented here
])
def test_gqa_families_refuse_rope_scaling(family, scaling):
    from transformers import MixtralConfig, Qwen3MoeConfig

    config_cls = MixtralConfig if family is mixtral else Qwen3MoeConfig
    cfg = config_cls(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     rope_scaling=dict(scaling)).to_dict()
    cfg["architectures"] = [family.ARCHITECTURES[0]]
    rope_type = scaling.get("rope_type", scaling.get("type"))
    with pytest.raises(ConfigError, match=rf"rope_type '{rope_type}'.*supported: default\)"):
        family.parse_config(cfg)
    for legacy in ({"rope_scaling": dict(scaling), "rope_theta": 1e6}, {"rope_parameters": dict(scaling)}):  # v4 / v5 forms
        with pytest.raises(ConfigError, match=rf"rope_type '{rope_type}'"):
            family.parse_config({**{k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling")}, **legacy})


@pytest.mark.parametrize("name", list(YARN_MODELS))
def test_yarn_single_rank_matches_transformers(local_controller, yarn_refs, name):  # noqa: F811
    engine = LLMEngine.load(local_controller, yarn_refs[name].path, dtype="float32", stop_at_eos=False,
                            max_model_len=64, block_size=4)
    try:
        assert engine.arch.rope_scaling is not None and engine.arch.rope_scaling.original_max_positions == 16
        check_against_reference(engine, yarn_refs[name])
    finally:
        engine.close()


def test_yarn_tp2_matches_transformers(make_controller, yarn_refs):
    for name in YARN_MODELS:
        engine = LLMEngine.load(make_controller({"tp": 2}), yarn_refs[name].path, dtype="float32", stop_at_eos=False,
                                max_model_len=64, block_size=4)
        try:
            check_against_reference(engine, yarn_refs[name])
        finally:
            engine.close()
