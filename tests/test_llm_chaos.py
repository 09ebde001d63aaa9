"""Faults on real Ray workers (issue 12): deaths, stalls, deaths during recovery, poison requests, a spent budget.

Every test starts its own controller (it kills or stops workers, so it must
not share the session cache) and stops it; worker processes are killed by
pid. Tokens after a fault must equal the fault-free run (greedy and seeded:
sampling is a pure function of the request's seed and the token index).
"""

from __future__ import annotations

import os
import random
import signal

import pytest

from tessera.config import ParallelPlan, Timeouts
from tessera.memory.placement import Placement
from tessera.models.tiny_moe import build_tiny_moe
from tessera.options import RecoveryPolicy
from tessera.runtime.controller import Controller
from tessera.runtime.llm.engine import LLMEngine, SamplingParams

pytestmark = pytest.mark.timeout(900)
POISON = 99  # a prompt holding this token id kills rank 1 (see poison_runner)
TIMEOUTS = Timeouts(call_s=120, process_group_s=60, worker_start_s=180)


@pytest.fixture(scope="module")
def tiny(session_tmp):
    return build_tiny_moe("mixtral", session_tmp / "chaos-mixtral")


@pytest.fixture
def controller(ray_session):
    ctl = Controller(Placement(ParallelPlan({"ep": 2})), timeouts=TIMEOUTS).start()
    yield ctl
    pids = [r.pid for r in ctl.describe()]
    ctl.shutdown()
    for pid in pids:  # nothing of ours survives the test, stopped or not
        _kill(pid, signal.SIGKILL)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def poison_runner(worker, spec):
    """The engine's runner, except that rank 1 dies (os._exit) when a batch's tokens hold POISON."""
    import os as _os

    from tessera.runtime.llm.model_runner import load_runner

    runner = load_runner(worker, spec)
    embed = runner.stage.embed

    def poisoned_embed(ids):
        if worker.rank == 1 and bool((ids == POISON).any()):
            _os._exit(1)
        return embed(ids)

    runner.stage.embed = poisoned_embed
    return runner


class PoisonEngine(LLMEngine):
    runner_factory = staticmethod(poison_runner)


def _mixed(n: int, seed: int = 0):
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(n):
        prompts.append([rng.randrange(1, 90) for _ in range(rng.randrange(3, 12))])
        if i % 2:
            params.append(SamplingParams(max_new_tokens=rng.randrange(6, 14), temperature=0.9, top_k=30, seed=1000 + i))
        else:
            params.append(SamplingParams(max_new_tokens=rng.randrange(6, 14)))
    return prompts, params


def test_a_poison_request_is_failed_alone(controller, tiny):
    good = [[5, 7, 9], [3, 1, 4, 1]]
    reference = LLMEngine.load(controller, tiny, max_num_seqs=4)
    want = [r.token_ids for r in reference.generate(good, SamplingParams(max_new_tokens=6))]
    reference.close()
    engine = PoisonEngine.load(controller, tiny, max_num_seqs=4)
    results = engine.generate([good[0], [2, POISON, 4], good[1]], SamplingParams(max_new_tokens=6))
    assert [r.token_ids for r in (results[0], results[2])] == want
    assert results[1].finish_reason == "error" and "crashed the workers 2 times when run alone" in results[1].error
    assert engine.broken is None and engine.stats()["recoveries"] >= 3
    # The engine (and its new workers) go on serving.
    assert [r.token_ids for r in engine.generate(good, SamplingParams(max_new_tokens=6))] == want
    engine.close()


def test_a_spent_restart_budget_fails_the_requests_clearly_and_stays_closable(controller, tiny):
    policy = RecoveryPolicy(max_restarts=2, poison_faults=10, backoff_s=0.0)
    engine = PoisonEngine.load(controller, tiny, max_num_seqs=4, recovery=policy)
    results = engine.generate([[5, 7, 9], [2, POISON, 4]], SamplingParams(max_new_tokens=6))
    assert [r.finish_reason for r in results] == ["error", "error"]
    assert all("could not be recovered" in r.error and "2 restarts" in r.error for r in results)
    assert engine.broken is not None
    later = engine.generate([5, 7, 9], SamplingParams(max_new_tokens=2))[0]
    assert later.finish_reason == "error" and "could not be recovered" in later.error
    engine.close()  # bounded, even with the workers in any state
    controller.shutdown()


def test_a_stalled_rank_is_detected_in_seconds_and_recovered(controller, tiny):
    policy = RecoveryPolicy(stall_floor_s=3.0, stall_factor=10.0)
    engine = LLMEngine.load(controller, tiny, decode_steps=1, step_timeout_s=120, recovery=policy)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    params = [SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=10, temperature=0.8, seed=5)]
    want = [r.token_ids for r in engine.generate(prompts, params)]
    ids = [engine.add_request(p, s) for p, s in zip(prompts, params)]
    for _ in range(4):
        engine.step()
    victim = controller.describe()[1].pid
    _kill(victim, signal.SIGSTOP)
    try:
        for _ in range(100):
            if not engine.has_unfinished():
                break
            engine.step()
    finally:
        _kill(victim, signal.SIGKILL)
    assert [engine.result(i).token_ids for i in ids] == want
    stalls = [r for r in engine.stats()["recovery"] if r["kind"] == "stall"]
    assert stalls, engine.stats()["recovery"]
    assert stalls[0]["detect_s"] < 3.0 + 10.0  # the floor plus what this loaded machine adds: seconds, not minutes
    assert victim not in {r.pid for r in controller.describe()}
    engine.close()


@pytest.mark.slow
def test_chaos_fifty_requests_three_kills_one_during_recovery(controller, tiny):
    prompts, params = _mixed(50)
    engine = LLMEngine.load(controller, tiny, max_num_seqs=16, max_model_len=64)
    want = [r.token_ids for r in engine.generate(prompts, params)]
    assert all(want)

    reload = engine.recovery.reload
    armed = {"during_recovery": False}

    def reload_with_a_kill():
        if armed["during_recovery"]:  # the restarted workers die while the engine reloads its shards
            armed["during_recovery"] = False
            _kill(controller.describe()[0].pid, signal.SIGKILL)
        reload()

    engine.recovery.reload = reload_with_a_kill
    ids = [engine.add_request(p, s) for p, s in zip(prompts, params)]
    kills, steps = 0, 0
    while engine.has_unfinished() and steps < 1000:
        steps += 1
        if steps in (3, 12) and kills < 2:
            kills += 1
            if kills == 1:
                armed["during_recovery"] = True
            _kill(controller.describe()[kills % 2].pid, signal.SIGKILL)
        engine.step()
    got = [engine.result(i) for i in ids]
    assert all(r.finish_reason in ("length", "stop") for r in got), [r.error for r in got if r.error]
    assert [r.token_ids for r in got] == want
    records = engine.stats()["recovery"]
    assert sum(r["attempts"] for r in records) >= 3  # two kills mid-step, one mid-recovery
    assert all(r["own_s"] >= 0 for r in records)
    engine.close()
