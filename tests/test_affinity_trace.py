"""Routing traces (file format, recorder) and the affinity statistics computed from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera.memory.affinity.stats import AffinityStats
from tessera.memory.affinity.synthetic import planted_affinity_trace
from tessera.memory.affinity.trace import RoutingTrace, TraceError, TraceHeader, TraceRecorder


def _tiny_trace() -> RoutingTrace:
    # 3 tokens, 2 layers, top-2, 4 experts.
    ids = np.array([[[0, 1], [2, 3]], [[0, 2], [2, 1]], [[3, 1], [0, 0 + 1]]])
    return RoutingTrace(TraceHeader("tiny", 2, 4, 2, (1, 3)), ids)


def test_trace_file_round_trip(tmp_path):
    trace = planted_affinity_trace(num_layers=3, num_experts=8, num_groups=2, top_k=2, num_tokens=500, seed=1).trace
    path = trace.save(tmp_path / "t.npz")
    back = RoutingTrace.load(path)
    assert back.header == trace.header
    np.testing.assert_array_equal(back.expert_ids, trace.expert_ids)
    assert back.expert_ids.dtype == np.int16  # compact: 8 experts fit int16


def test_trace_rejects_bad_input(tmp_path):
    with pytest.raises(TraceError, match="expert ids range"):
        RoutingTrace(TraceHeader("m", 1, 4, 1), np.array([[[4]]]))
    with pytest.raises(TraceError, match="expected"):
        RoutingTrace(TraceHeader("m", 2, 4, 1), np.zeros((3, 1, 1), dtype=int))
    with pytest.raises(TraceError, match="no routing trace"):
        RoutingTrace.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, something=np.zeros(3))
    with pytest.raises(TraceError, match="not a tessera routing trace"):
        RoutingTrace.load(bad)


def test_recorder_builds_the_trace_layer_by_layer():
    trace = _tiny_trace()
    rec = TraceRecorder("tiny", num_experts=4, top_k=2, layer_ids=(1, 3))
    for step in (slice(0, 2), slice(2, 3)):  # two forward steps
        for col, layer_id in enumerate((1, 3)):
            rec.record(layer_id, torch.tensor(trace.expert_ids[step, col, :].astype(np.int64)))
    got = rec.trace()
    np.testing.assert_array_equal(got.expert_ids, trace.expert_ids)
    assert got.header.layer_ids == (1, 3)
    rec.record(1, torch.tensor([[0, 1]]))
    with pytest.raises(TraceError, match="different token counts"):
        rec.trace()
    with pytest.raises(TraceError, match="not an MoE layer"):
        rec.record(2, torch.tensor([[0, 1]]))


def test_stats_count_every_top_k_pair():
    stats = AffinityStats.from_trace(_tiny_trace())
    expected = np.zeros((4, 4))
    for here, there in (([0, 1], [2, 3]), ([0, 2], [2, 1]), ([3, 1], [0, 1])):
        for p in here:
            for q in there:
                expected[p, q] += 1
    np.testing.assert_array_equal(stats.transitions[0], expected)
    np.testing.assert_array_equal(stats.load, [[2, 2, 1, 1], [1, 2, 2, 1]])
    cond = stats.conditional()[0]
    np.testing.assert_allclose(cond.sum(axis=1), [1, 1, 1, 1])


def test_affinity_strength_separates_planted_from_random():
    kw = dict(num_layers=4, num_experts=8, num_groups=4, top_k=1, num_tokens=4000, seed=2)
    strong = AffinityStats.from_trace(planted_affinity_trace(affinity=1.0, **kw).trace)
    none = AffinityStats.from_trace(planted_affinity_trace(affinity=0.0, **kw).trace)
    # Top-1 within a group of 2: each row spreads over 2 of 8 experts -> 1 bit of 3: strength 2/3.
    assert strong.affinity_strength() == pytest.approx(2 / 3, abs=0.01)
    assert none.affinity_strength() < 0.02
    assert np.all(strong.row_entropy() <= 1.0 + 1e-9)


def test_sampling_bounds_the_token_count():
    trace = planted_affinity_trace(num_tokens=1000, seed=3).trace
    assert AffinityStats.from_trace(trace, max_tokens=100).num_tokens == 100
    assert AffinityStats.from_trace(trace, max_tokens=5000).num_tokens == 1000
