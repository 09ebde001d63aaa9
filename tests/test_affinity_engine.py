"""Affinity placement applied in the MoE engine: record a trace, solve, reload with the map, same tokens."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.memory.affinity.balance import add_replicas
from tessera.memory.expert_placement import linear_rank_of
from tessera.memory.affinity.placement_file import placement_for_model, save_placement
from tessera.memory.affinity.problem import PlacementProblem
from tessera.memory.affinity.solvers import get_solver
from tessera.memory.affinity.stats import AffinityStats
from tessera.memory.affinity.trace import RoutingTrace, trace_from_engine

EP = 4
PROMPTS = [[1, 5, 9, 17, 33, 40, 7], [1, 60, 61, 62], [1, 11, 12, 13, 14, 15, 16, 17, 18], [1, 99]]


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    from tessera.models.tiny_moe import build_tiny_moe

    return build_tiny_moe("mixtral", tmp_path_factory.mktemp("affinity") / "mixtral", experts=8, layers=3, top_k=2)


def _generate(ctl, path, **options):
    from tessera.runtime.llm.engine import LLMEngine, SamplingParams

    engine = LLMEngine.load(ctl, path, **options)
    try:
        results = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8))
        trace = trace_from_engine(engine.routing_trace()) if options.get("record_routing") else None
        applied = [engine.placement.experts.ep_map(layer) for layer in engine.arch.moe_layer_ids]
    finally:
        engine.close()
    return [r.token_ids for r in results], trace, applied


@pytest.mark.timeout(900)
def test_solver_placement_generates_the_same_tokens_as_linear(make_controller, tiny_mixtral, tmp_path):
    ctl = make_controller({"ep": EP})
    base_tokens, trace, applied = _generate(ctl, tiny_mixtral, record_routing=True)
    assert applied == linear_rank_of(3, 8, EP).tolist()

    # The recorded trace: every prompt token and every decode step, at each of the 3 MoE layers.
    assert trace.header.num_layers == 3 and trace.header.num_experts == 8 and trace.header.top_k == 2
    assert trace.num_tokens >= sum(len(p) for p in PROMPTS) + len(PROMPTS) * 6
    back = RoutingTrace.load(trace.save(tmp_path / "engine_trace.npz"))
    np.testing.assert_array_equal(back.expert_ids, trace.expert_ids)

    stats = AffinityStats.from_trace(back)
    problem = PlacementProblem(stats, EP)
    placement = get_solver("ilp", time_limit_s=2.0).solve(problem)
    linear = get_solver("linear").solve(problem)
    assert placement.info["cost"] <= linear.info["cost"]
    path = save_placement(tmp_path / "ilp.json", placement, model=trace.header.model, layer_ids=trace.header.layer_ids)
    expert_map = placement_for_model(path, num_experts=8, moe_layers=trace.header.layer_ids, ep=EP).expert_map()
    assert expert_map != linear_rank_of(3, 8, EP).tolist(), "the test needs a placement that differs from linear"
    tokens, _, applied = _generate(ctl, tiny_mixtral, placement_file=str(path))  # the typed route of `tessera place`
    assert applied == expert_map, "the engine did not apply the placement"
    assert tokens == base_tokens, "generation with the ilp placement differs from the linear placement"

    # Replicas of hot experts (tokens split across copies) give the same tokens too.
    replicated = add_replicas(placement, stats.load, slots_per_rank=1)
    assert replicated.has_replicas
    tokens, _, applied = _generate(ctl, tiny_mixtral, **replicated.engine_options())
    assert applied == expert_map
    assert tokens == base_tokens, "generation with replicated hot experts differs from the linear placement"

    # Context-coherent expert parallel (tokens handled on their top-1 expert's rank), with replicas.
    tokens, _, _ = _generate(ctl, tiny_mixtral, expert_parallel_mode="coherent", **replicated.engine_options())
    assert tokens == base_tokens, "context-coherent expert parallel changed the generated tokens"
