"""ExFlow (token-sharded context-coherent expert parallel): same logits and tokens as the standard path.

Hidden states stay sharded over the ep group and follow each token's top-1
expert (``tessera.parallel.coherent``). Checked against transformers and
against tessera's standard path with the linear placement, at ep=2 and ep=4,
prefill (logits) and decode (greedy tokens), under a non-contiguous expert map,
with ranks that hold no token (one-sequence decode). Families: Qwen3-MoE
(qk-norm, ep=2), Mixtral (ep=4), DeepSeek-V2 (MLA, shared experts, a dense
first layer; top-1 routing, which needs no partial-output exchange).
"""

from __future__ import annotations

import pytest
import torch

from tessera.memory.expert_placement import linear_rank_of
from tessera.models.tiny_moe import build_tiny_moe
from tessera.parallel.coherent import check_exflow
from tessera.config import ConfigError, ParallelPlan
from tessera.tests.llm_testing import NEW_TOKENS, PROMPTS, _reference

BATCH = [*PROMPTS, [1, 60, 61, 62], [1, 11, 12, 13, 14, 15, 16, 17, 18], [1, 99]]


def _stats(worker, key: str):
    runner = worker.engines[key]
    ops = runner.stage.ops
    stats = getattr(ops.tokens, "stats", None)
    return {"rows_sent": getattr(ops.dispatch, "rows_sent", 0), "exflow": stats.snapshot() if stats else None}


def _scrambled_map(layers: int, experts: int, ep: int) -> list[list[int]]:
    """A balanced, non-contiguous map that differs per layer."""
    return [[(3 * e + layer) % ep for e in range(experts)] for layer in range(layers)]


def _arch(path):
    from tessera.models.checkpoint import read_config
    from tessera.models.registry import family_for

    cfg = read_config(path)
    return family_for(cfg["architectures"][0]).parse_config(cfg)


def _run(ctl, path, **options):
    from tessera.runtime.llm.engine import LLMEngine, SamplingParams

    engine = LLMEngine.load(ctl, path, **options)
    try:
        logits = engine.score(PROMPTS[0])
        batch = [r.token_ids for r in engine.generate(BATCH, SamplingParams(max_new_tokens=NEW_TOKENS))]
        single = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=NEW_TOKENS))[0].token_ids
        stats = ctl.collective_rpc(_stats, args=(engine.key,))
    finally:
        engine.close()
    return logits, batch, single, stats


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family,ep,top_k", [("qwen3_moe", 2, 2), ("mixtral", 4, 2), ("deepseek_v2", 2, 1)])
def test_exflow_matches_standard_and_transformers(make_controller, session_tmp, family, ep, top_k):
    path = build_tiny_moe(family, session_tmp / "exflow" / f"{family}-k{top_k}", experts=8, layers=3, top_k=top_k)
    ref = _reference(path)
    ctl = make_controller({"ep": ep})
    moe_layers = len(_arch(path).moe_layer_ids)  # DeepSeek's first layer is dense
    expert_map = _scrambled_map(moe_layers, 8, ep)
    assert expert_map != linear_rank_of(moe_layers, 8, ep).tolist()
    std_logits, std_batch, std_single, _ = _run(ctl, path)
    logits, batch, single, stats = _run(ctl, path, expert_map=expert_map, expert_parallel_mode="exflow")

    assert (logits - std_logits).abs().max().item() <= 1e-5, "exflow prefill logits differ from the standard path"
    assert (logits - ref.logits).abs().max().item() <= 1e-4
    assert batch == std_batch and single == std_single, "exflow decode tokens differ from the standard path"
    assert batch[: len(PROMPTS)] == ref.greedy and single == ref.greedy[1]
    exflow = [s["exflow"] for s in stats]
    assert all(e is not None and e["moe_layer_calls"] > 0 for e in exflow)
    assert sum(e["kv_bytes"] for e in exflow) > 0  # the attention context travelled
    if top_k == 1:
        assert all(e["second_exchanges"] == 0 for e in exflow), "top-1 routing needs no partial-output exchange"


def test_exflow_refuses_what_it_does_not_cover():
    from tessera.models.registry import family_for

    path_cfg = {"architectures": ["MixtralForCausalLM"]}  # a small config; no checkpoint needed
    family = family_for(path_cfg["architectures"][0])
    arch = family.parse_config({
        **path_cfg, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 128,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
    })
    with pytest.raises(ConfigError, match="tp=1"):
        check_exflow(ParallelPlan({"ep": 2, "tp": 2}), arch)
    with pytest.raises(ConfigError, match="whole expert"):
        check_exflow(ParallelPlan({"ep": 8}), arch)
    with pytest.raises(ConfigError, match="record traces"):
        check_exflow(ParallelPlan({"ep": 2}), arch, record_routing=True)
    check_exflow(ParallelPlan({"ep": 4}), arch)
