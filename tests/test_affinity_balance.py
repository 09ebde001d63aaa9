"""Load balance with redundant replicas, and placement files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tessera.memory.affinity.balance import add_replicas, balancedness, rank_loads
from tessera.memory.expert_placement import ExpertPlacement, PlacementInvalid
from tessera.memory.affinity.placement_file import load_placement, save_placement
from tessera.memory.affinity.problem import PlacementProblem
from tessera.memory.affinity.solvers import get_solver
from tessera.memory.affinity.stats import AffinityStats
from tessera.memory.affinity.synthetic import planted_affinity_trace


@pytest.fixture(scope="module")
def skewed():
    syn = planted_affinity_trace(num_layers=3, num_experts=8, num_groups=4, top_k=2, num_tokens=2000, affinity=0.3, skew=1.5, seed=21)
    stats = AffinityStats.from_trace(syn.trace)
    return stats, get_solver("greedy").solve(PlacementProblem(stats, 4))


def test_rank_loads_sum_to_the_routed_tokens(skewed):
    stats, placement = skewed
    loads = rank_loads(stats.load, placement)
    assert loads.shape == (3, 4)
    np.testing.assert_allclose(loads.sum(axis=1), stats.load.sum(axis=1))
    np.testing.assert_allclose(balancedness(np.array([[1.0, 1.0], [1.0, 3.0], [0.0, 0.0]])), [1.0, 2 / 3, 1.0])


def test_replicas_split_hot_expert_load(skewed):
    stats, placement = skewed
    before = balancedness(rank_loads(stats.load, placement))
    replicated = add_replicas(placement, stats.load, slots_per_rank=1)
    loads = rank_loads(stats.load, replicated)
    after = balancedness(loads)
    np.testing.assert_allclose(loads.sum(axis=1), stats.load.sum(axis=1))  # tokens are split, not lost
    assert np.all(after >= before - 1e-9) and after.mean() > before.mean()
    np.testing.assert_array_equal(replicated.rank_of, placement.rank_of)  # primaries (affinity) do not move
    for layer in range(3):
        hottest = int(np.argmax(stats.load[layer]))
        assert replicated.replicas[layer][hottest], "the hottest expert gets a copy"
        slots = np.zeros(4, dtype=int)
        for e in range(8):
            holders = replicated.ranks_holding(layer, e)
            assert len(set(holders)) == len(holders)
            for r in holders[1:]:
                slots[r] += 1
        assert slots.tolist() == [1, 1, 1, 1]
    assert replicated.info["balancedness_after"] > replicated.info["balancedness_before"]


def test_more_replica_slots_than_usable_is_refused(skewed):
    stats, placement = skewed
    with pytest.raises(ValueError, match="lower --replicas"):
        add_replicas(placement, stats.load, slots_per_rank=7)
    add_replicas(placement, stats.load, slots_per_rank=6)  # the most a rank can use: the 6 experts it lacks


def test_placement_file_round_trip(tmp_path, skewed):
    stats, placement = skewed
    replicated = add_replicas(placement, stats.load, slots_per_rank=2)
    path = save_placement(tmp_path / "p.json", replicated, model="m", layer_ids=(1, 2, 3))
    back, meta = load_placement(path)
    np.testing.assert_array_equal(back.rank_of, replicated.rank_of)
    assert back.replicas == replicated.replicas
    assert back.num_ranks == 4 and back.solver == "greedy"
    assert meta["model"] == "m" and meta["layer_ids"] == [1, 2, 3]
    assert back.expert_map() == replicated.rank_of.tolist()


def test_placement_file_errors(tmp_path):
    with pytest.raises(PlacementInvalid, match="no placement file"):
        load_placement(tmp_path / "nope.json")
    doc = tmp_path / "bad.json"
    doc.write_text(json.dumps({"format": "tessera-expert-placement", "version": 1, "num_layers": 1, "num_experts": 4,
                               "num_ranks": 2, "expert_map": [[0, 0, 0, 1]]}))
    with pytest.raises(PlacementInvalid, match="every rank must hold 2"):
        load_placement(doc)
    with pytest.raises(PlacementInvalid, match="replica slots per rank differ"):
        ExpertPlacement(np.array([[0, 0, 1, 1]]), 2, replicas=(((1,), (), (), ()),))
