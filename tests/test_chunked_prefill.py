"""Chunked prefill: a long prompt is prefilled in chunks of at most ``max_prefill_tokens`` interleaved with the
others' decode steps, with the tokens of a whole-prompt prefill (greedy and seeded), also across a worker death.

Step composition is read from the scheduler's own batches (not wall time): while other requests decode, no
step carries more prefill tokens than the budget, and every decoding request is in every step.
"""

from __future__ import annotations

import os
import signal

import pytest

from tessera.config import ParallelPlan, Timeouts
from tessera.memory.placement import Placement
from tessera.models.tiny_moe import build_tiny_moe
from tessera.runtime.controller import Controller
from tessera.runtime.llm.engine import LLMEngine, SamplingParams
from tessera.tests.llm_testing import local_controller  # noqa: F401 - fixture

LONG = [(7 * i + 3) % 120 + 3 for i in range(45)]  # 45 prompt tokens
SHORT = [[5, 7, 9, 11], [3, 1, 4, 1, 5], [9, 8, 7]]
GREEDY = SamplingParams(max_new_tokens=10)
SEEDED = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=30, seed=5)


def _record_steps(engine: LLMEngine) -> list[list[tuple[str, int, bool]]]:
    """Wrap the engine's scheduler: every step's batch as (request id, tokens, is_prefill) rows."""
    steps: list[list[tuple[str, int, bool]]] = []
    schedule = engine.scheduler.schedule

    def recording():
        batch = schedule()
        steps.append([(s.request.request_id, len(s.token_ids), s.is_prefill) for s in batch])
        return batch

    engine.scheduler.schedule = recording
    return steps


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return build_tiny_moe("qwen3_moe", tmp_path_factory.mktemp("chunked") / "qwen3", max_positions=256)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_chunked_prefill_is_token_identical(local_controller, tmp_path_factory, family):  # noqa: F811
    path = build_tiny_moe(family, tmp_path_factory.mktemp("chunked-" + family) / family, max_positions=256)
    prompts = [LONG, *SHORT, LONG[:20]]
    params = [GREEDY, SEEDED, GREEDY, SEEDED, SEEDED]
    whole = LLMEngine.load(local_controller, path, max_prefill_tokens=4096, decode_steps=1, stop_at_eos=False)
    try:
        want = [r.token_ids for r in whole.generate(prompts, params)]
    finally:
        whole.close()
    for budget in (7, 16):  # chunks that end mid-block and on a block boundary (block_size 16)
        chunked = LLMEngine.load(local_controller, path, max_prefill_tokens=budget, decode_steps=4, stop_at_eos=False)
        try:
            steps = _record_steps(chunked)
            got = [r.token_ids for r in chunked.generate(prompts, params)]
        finally:
            chunked.close()
        assert got == want, f"chunk budget {budget}"
        assert all(sum(n for _, n, pre in step if pre) <= budget for step in steps)
        assert sum(1 for step in steps for rid, _, pre in step if rid == "req-0" and pre) == -(-len(LONG) // budget)


def test_long_prompt_never_stalls_decoding_requests(local_controller, qwen3):  # noqa: F811
    budget = 8
    engine = LLMEngine.load(local_controller, qwen3, max_prefill_tokens=budget, decode_steps=1, stop_at_eos=False)
    try:
        steps = _record_steps(engine)
        short = [engine.add_request(p, SamplingParams(max_new_tokens=20)) for p in SHORT]
        engine.step()  # the short prompts' prefill (12 tokens > budget: one of them is chunked too)
        engine.step()
        assert all(not r.prefilling for r in engine.scheduler.running)
        steps.clear()
        long_id = engine.add_request(LONG, GREEDY)
        first_token_step = None
        for i in range(12):
            out = engine.step()
            if first_token_step is None and any(rid == long_id for rid, _, _ in out):
                first_token_step = i
        # The long prompt took ceil(45 / 8) = 6 steps; each of them also decoded all three short requests.
        assert first_token_step == 5
        prefill_steps = [s for s in steps if any(rid == long_id and pre for rid, _, pre in s)]
        assert len(prefill_steps) == 6
        for step in prefill_steps:
            assert sum(n for _, n, pre in step if pre) <= budget
            assert sorted(rid for rid, n, pre in step if not pre and n == 1) == sorted(short)
    finally:
        engine.close()
    # The same arrival without chunking: one step of 45 prefill tokens next to the decodes (what chunking prevents).
    whole = LLMEngine.load(local_controller, qwen3, max_prefill_tokens=4096, decode_steps=1, stop_at_eos=False)
    try:
        steps = _record_steps(whole)
        for p in SHORT:
            whole.add_request(p, SamplingParams(max_new_tokens=20))
        whole.step()
        steps.clear()
        whole.add_request(LONG, GREEDY)
        whole.step()
        assert sum(n for _, n, pre in steps[0] if pre) == len(LONG)
    finally:
        whole.close()


def test_worker_death_during_chunked_prefill_replays_identically(ray_session, qwen3):
    ctl = Controller(Placement(ParallelPlan({"ep": 2})), timeouts=Timeouts(call_s=120, process_group_s=60)).start()
    try:
        engine = LLMEngine.load(ctl, qwen3, max_prefill_tokens=8, decode_steps=1, stop_at_eos=False)
        prompts, params = [SHORT[0], LONG, LONG[5:30]], [GREEDY, SEEDED, GREEDY]
        want = [r.token_ids for r in engine.generate(prompts, params)]
        ids = [engine.add_request(p, s) for p, s in zip(prompts, params)]
        engine.step()
        engine.step()
        partial = [r for r in engine.scheduler.running if r.prefilling and r.num_computed > 0]
        assert partial, "the kill must land while a prompt is part-way through its prefill"
        victim = ctl.describe()[1]
        os.kill(victim.pid, signal.SIGKILL)
        for _ in range(60):
            if not engine.has_unfinished():
                break
            engine.step()
        assert [engine.result(i).token_ids for i in ids] == want
        assert engine.stats()["recoveries"] == 1
    finally:
        ctl.shutdown()
