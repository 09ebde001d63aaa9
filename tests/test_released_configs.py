"""Released MoE configs (tests/data/released/llm): parsed, counted like the releases publish them, every flag
supported or refused by name, and a scaled-down twin of each matching transformers on 1 rank and on tp2 x ep2.

The table below is the contract: per release, tessera's parameter count (exact; it also equals what
transformers instantiates from the same config), the published figure it must be within 0.5% of, the
published ``model.safetensors.index.json`` ``metadata.total_size`` where one was found (equal to the byte),
the behaviour flags the config carries (all supported), and variants of it with one flag changed that
tessera must refuse with a ConfigError naming that flag. Sources: tests/data/released/llm/README.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tessera.config import ConfigError
from tessera.memory.footprint import checkpoint_bytes, checkpoint_inventory, config_model_spec, parameter_count
from tessera.models.registry import family_for
from tessera.models.tiny_moe import build_released_twin, released_twin_config
from tessera.runtime.llm.engine import LLMEngine
from tessera.tests.llm_testing import _reference, check_against_reference, local_controller  # noqa: F401

RELEASED = Path(__file__).resolve().parent / "data" / "released" / "llm"

# Keys that size the model (read by every family's parse_config) rather than switch behaviour.
SHAPE_KEYS = {
    "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "moe_intermediate_size", "num_experts", "num_local_experts", "n_routed_experts",
    "num_experts_per_tok", "shared_expert_intermediate_size", "n_shared_experts", "kv_lora_rank", "q_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "torch_dtype", "eos_token_id",
}
# Keys with no effect on inference, and why.
IGNORED = {
    "model_type": "transformers' registry key; architectures[0] picks the family",
    "transformers_version": "metadata",
    "auto_map": "remote-code pointers; transformers and tessera implement these architectures natively",
    "bos_token_id": "the tokenizer's business",
    "use_cache": "generation default",
    "initializer_range": "training",
    "attention_dropout": "training",
    "router_aux_loss_coef": "training",
    "aux_loss_alpha": "training",
    "seq_aux": "training",
    "output_router_logits": "training",
    "router_jitter_noise": "training",
    "ep_size": "DeepSeek's training-time expert parallelism",
    "pretraining_tp": "training-time tensor parallelism; not used by DeepSeek's modeling",
    "max_window_layers": "which layers use the sliding window; tessera requires every context to fit the window",
}


@dataclass(frozen=True)
class Release:
    name: str
    count: int  # main model (what the engine loads)
    published: float  # published total, compared with count (+ mtp when the published figure includes it)
    mtp: int = 0
    published_main: float | None = None  # DeepSeek-V3/R1: 671B without the MTP module
    total_size: int | None = None  # published index metadata.total_size
    supported: tuple[str, ...] = ()  # behaviour flags present in config.json, all implemented
    refused: tuple[tuple[str, Any, str], ...] = ()  # (key, value, regex the ConfigError must match)
    accepted: tuple[tuple[str, Any], ...] = ()  # variants that stay supported (e.g. Qwen3's FP8 release)
    arch: dict[str, Any] = field(default_factory=dict)  # what parse_config must make of the release


YARN_QWEN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}
FP8_BLOCK = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
FP8_PER_TENSOR = {"activation_scheme": "dynamic", "quant_method": "fp8"}
GQA_REFUSED = (
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_scaling", YARN_QWEN, "rope_type 'yarn'"),  # YaRN is implemented for DeepSeek only
    ("quantization_config", GPTQ, "quant_method"),
    ("quantization_config", FP8_PER_TENSOR, "weight_block_size"),
)
MIXTRAL_FLAGS = ("sliding_window", "tie_word_embeddings", "hidden_act")
QWEN2_FLAGS = ("decoder_sparse_step", "shared_expert_intermediate_size", "norm_topk_prob", "sliding_window",
               "use_sliding_window", "tie_word_embeddings", "hidden_act")
QWEN3_FLAGS = ("decoder_sparse_step", "mlp_only_layers", "norm_topk_prob", "attention_bias", "rope_scaling",
               "sliding_window", "use_sliding_window", "tie_word_embeddings", "hidden_act")
DEEPSEEK_FLAGS = ("first_k_dense_replace", "moe_layer_freq", "n_group", "topk_group", "topk_method", "scoring_func",
                  "routed_scaling_factor", "norm_topk_prob", "q_lora_rank", "rope_scaling", "attention_bias",
                  "tie_word_embeddings", "hidden_act")
V2_REFUSED = (
    ("scoring_func", "sigmoid", "scoring_func"),
    ("topk_method", "noaux_tc", "topk_method"),
    ("norm_topk_prob", True, "norm_topk_prob"),
    ("attention_bias", True, "attention_bias"),
    ("moe_layer_freq", 2, "moe_layer_freq"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope_type 'dynamic'"),
    ("quantization_config", AWQ, "quant_method"),
)
V3_REFUSED = (
    ("scoring_func", "softmax", "scoring_func"),
    ("topk_method", "greedy", "topk_method"),
    ("attention_bias", True, "attention_bias"),
    ("moe_layer_freq", 3, "moe_layer_freq"),
    ("hidden_act", "gelu", "hidden_act"),
    ("quantization_config", dict(FP8_BLOCK, fmt="e5m2"), "fmt"),
    ("quantization_config", dict(FP8_BLOCK, activation_scheme="static"), "activation_scheme"),
    ("quantization_config", FP8_PER_TENSOR, "weight_block_size"),
)
V3_ARCH = {"router": "sigmoid_group", "n_group": 8, "topk_group": 4, "norm_topk_prob": True, "routed_scaling": 2.5,
           "router_bias": True, "shared_intermediate": 2048, "moe_dense_prefix": 3, "mtp_layers": 1,
           "quantization": (128, 128), "yarn": True}

TABLE = [
    Release("Mixtral-8x7B-v0.1", 46_702_792_704, 46.7e9, total_size=93_405_585_408, supported=MIXTRAL_FLAGS,
            refused=GQA_REFUSED, arch={"router": "softmax", "norm_topk_prob": True, "num_kv_heads": 8}),
    Release("Mixtral-8x22B-v0.1", 140_620_634_112, 141e9, total_size=281_241_268_224, supported=MIXTRAL_FLAGS,
            refused=GQA_REFUSED, arch={"router": "softmax", "norm_topk_prob": True, "num_kv_heads": 8}),
    Release("Qwen1.5-MoE-A2.7B", 14_315_784_192, 14.3e9, total_size=28_631_568_384, supported=QWEN2_FLAGS,
            refused=GQA_REFUSED, arch={"shared_intermediate": 5632, "shared_gate": True, "qkv_bias": True,
                                       "qk_norm": False, "norm_topk_prob": False}),
    Release("Qwen2-57B-A14B", 57_408_658_944, 57.409e9, supported=QWEN2_FLAGS, refused=GQA_REFUSED,
            arch={"shared_intermediate": 20480, "shared_gate": True, "qkv_bias": True, "qk_norm": False,
                  "num_kv_heads": 4}),
    Release("Qwen3-30B-A3B", 30_532_122_624, 30.5e9, total_size=61_064_245_248, supported=QWEN3_FLAGS,
            refused=GQA_REFUSED + (("attention_bias", True, "attention_bias"),),
            accepted=(("quantization_config", FP8_BLOCK), ("mlp_only_layers", [0, 47]), ("decoder_sparse_step", 2)),
            arch={"qk_norm": True, "qkv_bias": False, "shared_intermediate": 0, "norm_topk_prob": True,
                  "qk_head_dim": 128}),
    Release("Qwen3-235B-A22B", 235_093_634_560, 235e9, total_size=470_187_269_120, supported=QWEN3_FLAGS,
            refused=GQA_REFUSED + (("attention_bias", True, "attention_bias"),),
            accepted=(("quantization_config", FP8_BLOCK),),
            arch={"qk_norm": True, "qkv_bias": False, "qk_head_dim": 128, "num_heads": 64}),
    Release("DeepSeek-V2-Lite", 15_706_484_224, 15.7e9, total_size=31_412_968_448, supported=DEEPSEEK_FLAGS,
            refused=V2_REFUSED, arch={"router": "softmax", "q_lora_rank": None, "shared_intermediate": 2 * 1408,
                                      "moe_dense_prefix": 1, "routed_scaling": 1.0, "yarn": True, "mtp_layers": 0}),
    Release("DeepSeek-V2", 235_741_434_880, 236e9, supported=DEEPSEEK_FLAGS, refused=V2_REFUSED,
            arch={"router": "softmax_group", "n_group": 8, "topk_group": 3, "routed_scaling": 16.0, "q_lora_rank": 1536,
                  "norm_topk_prob": False, "yarn": True}),
    Release("DeepSeek-V3", 671_026_419_200, 685e9, mtp=13_463_426_304, published_main=671e9,
            supported=DEEPSEEK_FLAGS + ("quantization_config", "num_nextn_predict_layers"), refused=V3_REFUSED,
            arch=V3_ARCH),
    Release("DeepSeek-R1", 671_026_419_200, 685e9, mtp=13_463_426_304, published_main=671e9,
            supported=DEEPSEEK_FLAGS + ("quantization_config", "num_nextn_predict_layers"), refused=V3_REFUSED,
            arch=V3_ARCH),
]
BY_NAME = {r.name: r for r in TABLE}
# DeepSeek-V3 release files: 688,586,727,753 bytes including each file's JSON header (91,991 tensors);
# the tensor data can only be bounded by it (README).
V3_FILE_BYTES, V3_HEADER_BOUND = 688_586_727_753, 16 * 2**20


def _config(name: str) -> dict[str, Any]:
    return json.loads((RELEASED / name / "config.json").read_text())


def _parse(cfg: dict[str, Any]):
    return family_for(cfg["architectures"][0]).parse_config(cfg)


def test_table_covers_every_release_folder():
    assert sorted(p.name for p in RELEASED.iterdir() if p.is_dir()) == sorted(BY_NAME)


@pytest.mark.parametrize("release", TABLE, ids=[r.name for r in TABLE])
def test_parameter_count_and_bytes_from_config(release):
    cfg = _config(release.name)
    count = parameter_count(cfg)
    assert (count.main, count.mtp) == (release.count, release.mtp)
    assert abs(count.total - release.published) <= 0.005 * release.published
    if release.published_main is not None:
        assert abs(count.main - release.published_main) <= 0.005 * release.published_main
    stored = checkpoint_bytes(cfg)
    if release.total_size is not None:
        assert stored == release.total_size
    if release.name in ("DeepSeek-V3", "DeepSeek-R1"):
        assert 0 < V3_FILE_BYTES - stored < V3_HEADER_BOUND
        spec = config_model_spec(RELEASED / release.name)  # planned at stored precision: FP8 + scales, MTP apart
        assert spec.quantization == "fp8_e4m3_block128x128"
        assert spec.total_bytes + spec.unused_bytes == stored
        assert spec.dequantized_bytes > 1.9 * spec.total_bytes  # bf16 once dequantized


@pytest.mark.parametrize("release", TABLE, ids=[r.name for r in TABLE])
def test_count_equals_transformers_own_model(release):
    """transformers instantiates the same config on the meta device: the same number of parameters, exactly."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    cfg = {k: v for k, v in _config(release.name).items() if k not in ("auto_map", "quantization_config")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg))
    hf = sum(p.numel() for p in model.parameters())
    hf += sum(b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))
    moe_layers = tuple(hasattr(getattr(layer, "mlp", None) or layer.block_sparse_moe, "experts") for layer in model.model.layers)
    assert hf == release.count
    assert _parse(cfg).moe_layers == moe_layers


@pytest.mark.parametrize("release", TABLE, ids=[r.name for r in TABLE])
def test_every_flag_supported_or_refused_by_name(release):
    cfg = _config(release.name)
    arch = _parse(cfg)
    unclassified = set(cfg) - SHAPE_KEYS - set(IGNORED) - set(release.supported)
    assert not unclassified, f"config keys neither supported nor known to be inert: {sorted(unclassified)}"
    assert set(release.supported) <= set(cfg), "the table lists a flag the release does not carry"
    expected = dict(release.arch)
    if "moe_dense_prefix" in expected:
        k = expected.pop("moe_dense_prefix")
        assert arch.moe_layers == (False,) * k + (True,) * (arch.num_layers - k)
    if "yarn" in expected:
        assert (arch.rope_scaling is not None) == expected.pop("yarn")
    if "quantization" in expected:
        assert arch.quantization is not None and arch.quantization.block == expected.pop("quantization")
    for key, value in expected.items():
        assert getattr(arch, key) == value, key
    for key, value, message in release.refused:
        with pytest.raises(ConfigError, match=message) as err:
            _parse({**cfg, key: value})
        assert cfg["architectures"][0] in str(err.value)  # names the model, the flag and (per family) the fix
    for key, value in release.accepted:
        _parse({**cfg, key: value})


def test_qwen_sparse_step_and_mlp_only_layers_follow_transformers():
    """Variants of Qwen3-30B-A3B: the dense/MoE layer pattern equals transformers' own."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    base = released_twin_config(_config("Qwen3-30B-A3B"), num_hidden_layers=6)
    for variant in ({"mlp_only_layers": [0, 3]}, {"decoder_sparse_step": 2}, {"decoder_sparse_step": 3, "mlp_only_layers": [5]}):
        cfg = {**base, **variant}
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(CONFIG_MAPPING["qwen3_moe"].from_dict(dict(cfg)))
        assert _parse(cfg).moe_layers == tuple(hasattr(layer.mlp, "experts") for layer in model.model.layers), variant


# -- scaled-down twins against transformers --------------------------------------------------------------------

# R1's config.json is DeepSeek-V3's: one twin serves both. Variants exercise supported flags the releases leave
# off: tied embeddings, a dense layer from decoder_sparse_step, sliding-window attention (contexts inside it).
TWINS = {name: (name, {}) for name in BY_NAME if name != "DeepSeek-R1"}
TWINS.update({
    "Qwen3-30B-A3B+tied": ("Qwen3-30B-A3B", {"tie_word_embeddings": True}),
    "Qwen3-30B-A3B+sparse-step": ("Qwen3-30B-A3B", {"num_hidden_layers": 3, "decoder_sparse_step": 2,
                                                    "mlp_only_layers": [2]}),
    "Qwen1.5-MoE-A2.7B+sliding": ("Qwen1.5-MoE-A2.7B", {"use_sliding_window": True, "sliding_window": 64}),
})


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    root = tmp_path_factory.mktemp("released-twins")
    refs = {}
    for twin, (release, overrides) in TWINS.items():
        path = build_released_twin(_config(release), root / twin, **overrides)
        refs[twin] = _reference(path)
    return refs


def test_twin_config_keeps_the_release_flags():
    """A twin differs from its release only in sizes; parsing its released-format config.json and the one
    transformers writes gives the same architecture."""
    from transformers import CONFIG_MAPPING

    assert _config("DeepSeek-R1") == _config("DeepSeek-V3")
    for twin_name, (name, overrides) in TWINS.items():
        cfg = _config(name)
        twin = released_twin_config(cfg, **overrides)
        for flag in BY_NAME[name].supported:
            if flag in overrides or flag in ("quantization_config", "q_lora_rank", "first_k_dense_replace",
                                             "shared_expert_intermediate_size"):
                continue  # dropped (quantization), resized, or the variant's point
            assert twin[flag] == cfg[flag], (twin_name, flag)
        hf = CONFIG_MAPPING[twin["model_type"]].from_dict(dict(twin)).to_dict()
        assert _parse(hf) == _parse(twin), twin_name
    assert _parse(released_twin_config(_config("Qwen3-30B-A3B"), **TWINS["Qwen3-30B-A3B+sparse-step"][1])).moe_layers == (
        False, True, False)
    assert _parse(released_twin_config(_config("Qwen1.5-MoE-A2.7B"), **TWINS["Qwen1.5-MoE-A2.7B+sliding"][1])).sliding_window == 64
    assert _parse(_config("Qwen2-57B-A14B")).sliding_window is None  # sliding_window set, use_sliding_window false


@pytest.mark.parametrize("name", list(TWINS))
def test_twin_single_rank_matches_transformers(local_controller, twins, name):  # noqa: F811
    ref = twins[name]
    twin_cfg = json.loads((ref.path / "config.json").read_text())
    # the saved tensors are exactly the inventory tessera derives from config.json (MTP modules aside:
    # transformers does not build them), in the dtype the twin was saved in
    with open(ref.path / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    inventory = [e for e in checkpoint_inventory({**twin_cfg, "torch_dtype": "float32"}) if not e.mtp]
    assert {e.name: (e.dtype, list(e.shape)) for e in inventory} == {k: (v["dtype"], v["shape"]) for k, v in header.items()}
    engine = LLMEngine.load(local_controller, ref.path, dtype="float32", stop_at_eos=False, max_model_len=64, block_size=4)
    try:
        check_against_reference(engine, ref)
    finally:
        engine.close()


def test_twins_tp2_ep2_match_transformers(make_controller, twins):
    """Every twin on one 4-worker plan (tp2 x ep2, real Ray workers): prefill logits 1e-4, greedy tokens equal."""
    ctl = make_controller({"tp": 2, "ep": 2})
    for name, ref in twins.items():
        engine = LLMEngine.load(ctl, ref.path, dtype="float32", stop_at_eos=False, max_model_len=64, block_size=4)
        try:
            check_against_reference(engine, ref)
        finally:
            engine.close()
