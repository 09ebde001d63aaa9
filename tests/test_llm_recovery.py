"""A worker that dies mid-generation: the engine rebuilds the ranks and replays; no token is lost or changed."""

from __future__ import annotations

import os
import signal

from tessera.memory.placement import Placement
from tessera.models.tiny_moe import build_tiny_moe
from tessera.config import ParallelPlan, Timeouts
from tessera.runtime.controller import Controller
from tessera.runtime.llm.engine import LLMEngine, SamplingParams


def test_worker_death_mid_generation_is_recovered_with_identical_tokens(ray_session, session_tmp):
    path = build_tiny_moe("mixtral", session_tmp / "recovery-mixtral")
    # Its own controller: this test kills a worker, so it must not use the session cache.
    ctl = Controller(Placement(ParallelPlan({"ep": 2})), timeouts=Timeouts(call_s=120, process_group_s=60)).start()
    try:
        engine = LLMEngine.load(ctl, path, decode_steps=1)  # one token per step: the kill lands mid-generation
        prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
        greedy = SamplingParams(max_new_tokens=8)
        sampled = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, seed=11)
        want = [r.token_ids for r in engine.generate(prompts, [greedy, sampled])]
        assert all(len(t) == 8 for t in want)

        ids = [engine.add_request(p, s) for p, s in zip(prompts, [greedy, sampled])]
        engine.step()  # prefill
        engine.step()  # one decode
        victim = ctl.describe()[1]
        os.kill(victim.pid, signal.SIGKILL)
        for _ in range(50):
            if not engine.has_unfinished():
                break
            engine.step()
        assert [engine.result(i).token_ids for i in ids] == want
        assert engine.stats()["recoveries"] == 1
        assert victim.pid not in {info.pid for info in ctl.describe()}
        assert ctl.health() == {0: "alive", 1: "alive"}
    finally:
        ctl.shutdown()
