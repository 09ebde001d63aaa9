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
