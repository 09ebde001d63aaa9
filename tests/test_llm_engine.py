"""LLM engine behaviour: continuous batching, sampling, stop tokens, streaming, per-request errors,
routing trace, text prompts. Most run on the in-process one-rank controller (cheap); continuous
batching and the routing trace also run on tp2 x ep2 workers."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.models.tiny_moe import build_tiny_moe
from tessera.runtime.llm.engine import LLMEngine, SamplingParams
from tessera.tests.llm_testing import local_controller, tiny_refs  # noqa: F401

PROMPTS = [[5, 7, 9, 11, 13, 17, 19, 23, 29], [3, 1, 4], [2, 7, 1, 8, 2, 8]]
SAMPLED = SamplingParams(max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.9, seed=7)
GREEDY = SamplingParams(max_new_tokens=6)


def _recorded_layers(worker, key):
    routing = worker.engines[key].stage.routing  # None: no recorder was plugged in
    return 0 if routing is None else len(routing.layers)


def _engine(ctl, ref, **kw):
    kw = {"dtype": "float32", "stop_at_eos": False, "max_model_len": 32, "block_size": 4, **kw}
    return LLMEngine.load(ctl, ref.path, **kw)


def _continuous_batching_matches_alone(engine):
    params = [GREEDY, SAMPLED, GREEDY]
    alone = [engine.generate(p, s)[0].token_ids for p, s in zip(PROMPTS, params)]
    ids = [engine.add_request(PROMPTS[0], params[0])]
    for _ in range(2):
        engine.step()
    ids.append(engine.add_request(PROMPTS[1], params[1]))  # joins while the first decodes
    engine.step()
    ids.append(engine.add_request(PROMPTS[2], params[2]))
    finished = []
    while engine.has_unfinished():
        finished += [rid for rid, _, done in engine.step() if done]
    together = [engine.result(i).token_ids for i in ids]
    assert together == alone
    assert sorted(finished) == sorted(ids)  # each request reported finished exactly once
    assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]


def test_continuous_batching_one_rank(local_controller, tiny_refs):  # noqa: F811
    # decode_steps=1: one token per step, so requests join while the first is still decoding
    engine = _engine(local_controller, tiny_refs["qwen2_moe"], decode_steps=1)
    try:
        _continuous_batching_matches_alone(engine)
    finally:
        engine.close()


def test_continuous_batching_tp2_ep2(make_controller, tiny_refs):  # noqa: F811
    engine = _engine(make_controller({"tp": 2, "ep": 2}), tiny_refs["deepseek_v3"], max_num_seqs=2, decode_steps=1)
    try:
        _continuous_batching_matches_alone(engine)  # max_num_seqs=2: the third request waits for a slot
    finally:
        engine.close()


def _multi_step_matches_single_step(ctl, ref):
    """Workers running several decode steps per call give the tokens of one call per token."""
    results = {}
    for steps in (1, 4, 8):
        engine = _engine(ctl, ref, decode_steps=steps)
        try:
            if steps == 1:  # a stop token the greedy continuation of PROMPTS[0] meets at its third token
                stop_at = engine.generate(PROMPTS[0], GREEDY)[0].token_ids[2]
                params = [GREEDY, SAMPLED, SamplingParams(max_new_tokens=5, temperature=0.7, seed=3),
                          SamplingParams(max_new_tokens=6, stop_token_ids=[stop_at])]
            results[steps] = [(r.token_ids, r.finish_reason) for r in engine.generate(PROMPTS + [PROMPTS[0]], params)]
            stats = engine.stats()
            assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
        finally:
            engine.close()
    assert results[4] == results[1] and results[8] == results[1]
    assert [len(t) for t, _ in results[1][:3]] == [6, 6, 5] and results[1][3][1] == "stop"


def test_multi_step_decode_one_rank(local_controller, tiny_refs):  # noqa: F811
    _multi_step_matches_single_step(local_controller, tiny_refs["mixtral"])


def test_multi_step_decode_tp2_ep2(make_controller, tiny_refs):  # noqa: F811
    _multi_step_matches_single_step(make_controller({"tp": 2, "ep": 2}), tiny_refs["qwen3_moe"])


def test_sampling_is_seeded_and_bounded(local_controller, tiny_refs):  # noqa: F811
    engine = _engine(local_controller, tiny_refs["mixtral"])
    try:
        greedy = engine.generate(PROMPTS[0], GREEDY)[0].token_ids
        a, b = engine.generate([PROMPTS[0], PROMPTS[0]], [SAMPLED, SAMPLED])
        assert a.token_ids == b.token_ids  # same seed, same tokens, whatever the batch
        assert engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=6, temperature=1.0, top_k=1, seed=3))[0].token_ids == greedy
        assert engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=3))[0].token_ids == greedy
        seeds = {tuple(engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=6, temperature=5.0, seed=s))[0].token_ids)
                 for s in range(4)}
        assert len(seeds) > 1  # hot sampling with different seeds explores
    finally:
        engine.close()


def test_stop_tokens_and_max_new_tokens(local_controller, tiny_refs):  # noqa: F811
    engine = _engine(local_controller, tiny_refs["qwen3_moe"])
    try:
        full = engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=8))[0]
        assert len(full.token_ids) == 8 and full.finish_reason == "length"
        stop = full.token_ids[3]
        cut = full.token_ids.index(stop) + 1
        stopped = engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=8, stop_token_ids=(stop,)))[0]
        assert stopped.token_ids == full.token_ids[:cut] and stopped.finish_reason == "stop"
        # context end: the prompt fills all but 2 slots of max_model_len=32
        near_full = engine.generate([1] * 30, SamplingParams(max_new_tokens=8))[0]
        assert len(near_full.token_ids) == 2 and near_full.finish_reason == "length"
    finally:
        engine.close()


def test_streaming_yields_the_generated_tokens(local_controller, tiny_refs):  # noqa: F811
    engine = _engine(local_controller, tiny_refs["deepseek_v2"])
    try:
        expected = engine.generate(PROMPTS[1], SAMPLED)[0].token_ids
        stream = engine.stream(PROMPTS[1], SAMPLED)
        first = next(stream)
        assert first == expected[0]
        assert [first, *stream] == expected
        with pytest.raises(ValueError, match="max_model_len"):
            list(engine.stream([1] * 40))
        early = engine.stream(PROMPTS[0], SamplingParams(max_new_tokens=20))
        next(early)
        early.close()  # the caller stops early: the request is aborted and its blocks freed
        assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"] and not engine.has_unfinished()
    finally:
        engine.close()


def test_bad_requests_fail_alone(local_controller, tiny_refs):  # noqa: F811
    engine = _engine(local_controller, tiny_refs["mixtral"])
    try:
        good = engine.generate(PROMPTS[0], GREEDY)[0].token_ids
        results = engine.generate(
            [[1] * 40, PROMPTS[0], [], [5, 999], "text", PROMPTS[0], PROMPTS[0]],
            [GREEDY, GREEDY, GREEDY, GREEDY, GREEDY, {"temperature": -1.0}, {"top_p": 0.0}],
        )
        assert [r.finish_reason for r in results] == ["error", "length", "error", "error", "error", "error", "error"]
        assert results[1].token_ids == good
        assert "max_model_len=32" in results[0].error and "40 tokens" in results[0].error
        assert "empty" in results[2].error
        assert "999" in results[3].error and "vocabulary" in results[3].error
        assert "tokenizer" in results[4].error
        assert "temperature" in results[5].error
        assert "top_p" in results[6].error
        with pytest.raises(ValueError, match="top_k"):
            SamplingParams(top_k=-1)
        with pytest.raises(ValueError, match="max_new_tokens"):
            SamplingParams(max_new_tokens=0)
    finally:
        engine.close()


def test_routing_trace_and_expert_map(make_controller, tiny_refs):  # noqa: F811
    """tp2 x ep2: the trace has [tokens, k] expert ids per MoE layer; a different expert map gives
    the same trace and the same tokens."""
    ctl = make_controller({"tp": 2, "ep": 2})
    traces, tokens = [], []
    for emap in (None, [[1, 0, 0, 1], [0, 1, 1, 0]]):
        engine = _engine(ctl, tiny_refs["qwen3_moe"], record_routing=True, expert_map=emap)
        try:
            out = engine.generate(PROMPTS[:2], GREEDY)
            tokens.append([r.token_ids for r in out])
            traces.append(engine.routing_trace())
        finally:
            engine.close()
    trace = traces[0]
    assert trace["model"] == "Qwen3MoeForCausalLM" and trace["num_experts"] == 4 and trace["top_k"] == 2
    expected_tokens = sum(len(p) for p in PROMPTS[:2]) + 2 * (GREEDY.max_new_tokens - 1)
    assert sorted(trace["layers"]) == trace["moe_layers"] == [0, 1]
    for layer, ids in trace["layers"].items():
        assert ids.shape == (expected_tokens, 2)
        assert ids.min() >= 0 and ids.max() < 4
        assert np.array_equal(np.sort(ids, 1), np.sort(traces[1]["layers"][layer], 1))
    assert tokens[0] == tokens[1]


def test_routing_trace_is_off_by_default(local_controller, tiny_refs):  # noqa: F811
    engine = _engine(local_controller, tiny_refs["mixtral"])
    try:
        engine.generate(PROMPTS[1], GREEDY)
        assert local_controller.collective_rpc(_recorded_layers, args=(engine.key,)) == [0]
        with pytest.raises(RuntimeError, match="record_routing=True"):
            engine.routing_trace()
    finally:
        engine.close()


def test_text_prompts_with_tokenizer(local_controller, session_tmp):  # noqa: F811
    path = build_tiny_moe("qwen3_moe", session_tmp / "moe" / "qwen3_tok", tokenizer=True)
    engine = LLMEngine.load(local_controller, path, dtype="float32", stop_at_eos=False, max_model_len=64)
    try:
        result = engine.generate("the quick brown fox", SamplingParams(max_new_tokens=5))[0]
        assert result.prompt_token_ids == engine.tokenizer.encode("the quick brown fox").ids
        assert len(result.token_ids) == 5 and isinstance(result.text, str)
        assert result.text == engine.tokenizer.decode(result.token_ids)
    finally:
        engine.close()
