"""Single-rank plan (tp = ep = pp = 1) of every family against transformers, in process."""

from __future__ import annotations

import pytest

from tessera.runtime.llm.engine import LLMEngine
from tessera.tests.llm_testing import MODELS, check_against_reference, local_controller, tiny_refs  # noqa: F401


@pytest.mark.parametrize("name", list(MODELS))
def test_single_rank_matches_transformers(local_controller, tiny_refs, name):  # noqa: F811
    engine = LLMEngine.load(local_controller, tiny_refs[name].path, dtype="float32", stop_at_eos=False,
                            max_model_len=64, block_size=4)
    try:
        check_against_reference(engine, tiny_refs[name])
    finally:
        engine.close()


def test_sharded_checkpoint_loads(local_controller, tiny_refs, tmp_path):  # noqa: F811
    """A checkpoint split over several safetensors files (model.safetensors.index.json) loads the same."""
    from transformers import AutoModelForCausalLM

    ref = tiny_refs["deepseek_v3"]
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(ref.path).save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    engine = LLMEngine.load(local_controller, sharded, dtype="float32", stop_at_eos=False, max_model_len=64, block_size=4)
    try:
        check_against_reference(engine, ref)
    finally:
        engine.close()


@pytest.mark.parametrize("name", [n for n in MODELS if n.startswith("deepseek")])
def test_mla_caches_latents_not_per_head_kv(local_controller, tiny_refs, name):  # noqa: F811
    """Multi-head latent attention keeps kv_lora_rank + rope_dim values per token and layer (vLLM's MLA cache),
    and the planner's KV estimate is the same figure."""
    from tessera.memory.footprint import read_model_spec

    engine = LLMEngine.load(local_controller, tiny_refs[name].path, dtype="float32", stop_at_eos=False,
                            max_model_len=64, block_size=4)
    try:
        a, opts = engine.arch, engine.options
        slots = opts.num_kv_blocks * opts.block_size
        assert engine.shards[0].kv_cache_bytes == a.num_layers * slots * (a.kv_lora_rank + a.rope_dim) * 4
        expanded = a.num_heads * (a.qk_head_dim + a.v_head_dim)
        assert a.kv_lora_rank + a.rope_dim < expanded  # what per-head K/V would have cost
        spec = read_model_spec(tiny_refs[name].path)
        dtype_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}.get(a.dtype, 4)  # the checkpoint's own dtype
        assert spec.kv_bytes_per_token == a.num_layers * (a.kv_lora_rank + a.rope_dim) * dtype_bytes
        assert not spec.kv_split_over_tp
    finally:
        engine.close()
