"""Expert cache: offloaded MoE generation is token- and logit-identical, policies, prediction, counters."""

from __future__ import annotations

import pytest
import torch

from tessera.options import OffloadConfig, Tier
from tessera.offload.expert_cache import ExpertCache
from tessera.offload.prefetch import LayerStreamer
from tessera.offload.store import TieredStore, group_spec
from tessera.tests.test_offload_helpers import InMemoryDense, InMemoryExperts, TinyMoE, total_bytes, one_torch_thread  # noqa: F401 - fixtures


def _store(tmp_path, specs, budget, **kw):
    cfg = OffloadConfig(device_budget_bytes=budget, nvme_dir=str(tmp_path), reader="preadv", **kw)
    return TieredStore(cfg, specs, {s.name: Tier.NVME for s in specs})


@pytest.mark.parametrize("policy,predictor", [("lru", "affinity"), ("lfu", "gate"), ("lru", "both"), ("lfu", "none")])
def test_moe_4x_over_budget_generates_identically(tmp_path, policy, predictor):
    model = TinyMoE(layers=6, experts=8, top_k=2, seed=5)
    specs = model.dense_specs() + model.expert_specs()
    expert_bytes = model.expert_specs()[0].nbytes
    dense_bytes = max(s.nbytes for s in model.dense_specs())
    budget = total_bytes(specs) // 4
    assert budget >= 2 * dense_bytes + 8 * expert_bytes  # a layer may use all 8 experts at once
    store = _store(tmp_path, specs, budget, cache_policy=policy, predictor=predictor)
    streamer = LayerStreamer(store, [s.name for s in model.dense_specs()])
    cache = ExpertCache(store, model.layers, model.experts, gate_weight=model.gate_weight, router_top_k=model.top_k)
    try:
        prompt = [3, 14, 15, 92, 65]
        ref_tokens, ref_logits = model.generate(prompt, 6, InMemoryDense(model), InMemoryExperts(model))
        tokens, logits = model.generate(prompt, 6, streamer, cache)
        assert tokens == ref_tokens
        assert torch.equal(logits, ref_logits)
        s = cache.stats()
        assert s["misses"] > 0 and s["evictions"] > 0  # it really was over budget
        assert s["hits"] + s["misses"] == sum(len(ids) for _, ids in _trace(model, prompt, tokens))
        assert store.stats()["device_peak"] <= budget
        if predictor != "none":
            assert s["prefetch_issued"] > 0 and 0 < s["prefetch_recall"] <= 1 and 0 < s["prefetch_precision"] <= 1
    finally:
        cache.close()
        streamer.close()
        store.close()


def _trace(model, prompt, tokens):
    trace = []
    ids = list(prompt)
    for t in tokens:
        model.forward(torch.tensor(ids), InMemoryDense(model), InMemoryExperts(model), trace)
        ids.append(t)
    return trace


def _expert_specs(layers, experts):
    return [group_spec(f"layers.{l}.experts.{e}", {"w": torch.full((64, 64), float(l * 100 + e))}) for l in range(layers) for e in range(experts)]


def test_lru_and_lfu_evict_the_right_expert(tmp_path):
    specs = _expert_specs(1, 4)
    size = specs[0].nbytes
    # A sequence where LRU and LFU disagree: 0 is used often but not recently.
    results = {}
    for policy in ("lru", "lfu"):
        d = tmp_path / f"d-{policy}"
        d.mkdir()
        store = _store(d, specs, 2 * size)
        cache = ExpertCache(store, 1, 4, policy=policy, predictor="none")
        try:
            for e in (0, 0, 0, 1, 2):
                cache.get(0, [e])
            results[policy] = sorted(k[1] for k in cache._entries)
            assert cache.stats()["evictions"] == 1
            assert store.stats()["device_peak"] <= 2 * size
        finally:
            cache.close()
            store.close()
    assert results["lru"] == [1, 2]  # 0 was least recently used
    assert results["lfu"] == [0, 2]  # 1 was least frequently used


def test_affinity_prediction_learns_a_fixed_routing_and_counts_are_exact(tmp_path):
    layers, experts = 3, 6
    specs = _expert_specs(layers, experts)
    size = specs[0].nbytes
    store = _store(tmp_path, specs, 4 * size)  # room for this layer's 2 experts and the next layer's 2
    cache = ExpertCache(store, layers, experts, predictor="affinity")
    route = {0: [0, 1], 1: [2, 3], 2: [4, 5]}  # every token takes the same path
    try:
        for _ in range(4):
            for layer in range(layers):
                got = cache.get(layer, route[layer])
                for e, w in got.items():
                    assert float(w["w"][0, 0]) == layer * 100 + e
        s = cache.stats()
        # After the first pass the predictor knows the path: all later layer-1/2 gets were predicted.
        assert s["prefetch_precision"] == 1.0
        assert s["prefetch_recall"] == 1.0
        assert s["predicted"] == 2 * 2 * 3  # 3 passes x 2 layers x 2 experts
        assert s["prefetch_used"] == s["prefetch_issued"] == 12 and s["prefetch_wasted"] == 0
        assert s["hits"] == 12
        assert s["hits"] + s["misses"] == 4 * layers * 2
        assert s["bytes_moved"] == (s["misses"] + s["prefetch_issued"]) * size
        assert store.stats()["device_peak"] <= 4 * size
    finally:
        cache.close()
        store.close()


def test_gate_prediction_uses_the_next_layers_router(tmp_path):
    layers, experts, hidden = 2, 4, 8
    specs = _expert_specs(layers, experts)
    store = _store(tmp_path, specs, 4 * specs[0].nbytes)
    gate1 = torch.zeros(experts, hidden)
    gate1[3, 0] = 1.0  # layer 1's router picks expert 3 (then 2) for hidden states along dim 0
    gate1[2, 1] = 0.5
    cache = ExpertCache(store, layers, experts, predictor="gate", gate_weight=lambda l: gate1 if l == 1 else None, router_top_k=2)
    try:
        h = torch.zeros(5, hidden)
        h[:, 0], h[:, 1] = 1.0, 1.0
        cache.get(0, [0], hidden=h)
        assert cache._predicted[1] == {2, 3}
        cache.get(1, [3])
        s = cache.stats()
        assert s["hits"] == 1 and s["prefetch_used"] == 1
        assert s["prefetch_recall"] == 1.0 and s["prefetch_precision"] == 0.5
    finally:
        cache.close()
        store.close()


def test_too_many_experts_at_once_is_a_clear_error(tmp_path):
    specs = _expert_specs(1, 4)
    store = _store(tmp_path, specs, 2 * specs[0].nbytes)
    cache = ExpertCache(store, 1, 4, predictor="none")
    try:
        with pytest.raises(Exception, match="needs 3 experts at once"):
            cache.get(0, [0, 1, 2])
    finally:
        cache.close()
        store.close()


def _passes(cache, layers, route, passes):
    for _ in range(passes):
        for layer in range(layers):
            got = cache.get(layer, route[layer])
            for e, w in got.items():
                assert float(w["w"][0, 0]) == layer * 100 + e  # the right expert's bytes


def test_cyclic_eviction_keeps_part_of_a_pass_that_does_not_fit(tmp_path):
    """One pass over the layers uses 8 experts, the cache holds 5: LRU evicts exactly the entry the cycle
    needs next and never hits; told that layers come round in order, the cache hits as often as Belady's optimum."""
    layers, experts, passes = 4, 4, 6
    specs = _expert_specs(layers, experts)
    size = specs[0].nbytes
    route = {l: [l % experts, (l + 1) % experts] for l in range(layers)}
    hits = {}
    for cyclic in (False, True):
        d = tmp_path / f"cyclic-{cyclic}"
        d.mkdir()
        store = _store(d, specs, 5 * size)
        cache = ExpertCache(store, layers, experts, predictor="none", cyclic=cyclic)
        try:
            _passes(cache, layers, route, passes)
            s = cache.stats()
            hits[cyclic] = s["hits"]
            assert s["hits"] + s["misses"] == passes * layers * 2
            assert store.stats()["bytes_read"] == s["misses"] * size
            assert store.stats()["device_peak"] <= 5 * size
        finally:
            cache.close()
            store.close()
    from tessera.benchmarks.bench_offload import simulate  # an independent offline replay

    steps = [(layer, route[layer]) for _ in range(passes) for layer in range(layers)]
    total = passes * layers * 2
    assert hits[False] == round(simulate(steps, 5, "lru") * total) == 0  # LRU on a cycle longer than the cache
    assert hits[True] == round(simulate(steps, 5, "belady") * total) > 0  # Belady's optimum, exactly


def test_prefetches_that_keep_missing_stop_being_issued(tmp_path):
    """Predictions that are always wrong (seeded affinity pointing elsewhere) cost a read each: after a
    few wasted reads the cache issues only one in PREFETCH_EXPLORE of them; right ones are not throttled."""
    from tessera.offload.expert_cache import PREFETCH_EXPLORE

    layers, experts, passes = 3, 6, 20
    specs = _expert_specs(layers, experts)
    size = specs[0].nbytes
    route = {0: [0, 1], 1: [2, 3], 2: [4, 5]}
    wrong = torch.zeros(layers - 1, experts, experts, dtype=torch.float64)
    wrong[0, 0, 4] = wrong[0, 1, 5] = wrong[1, 2, 0] = wrong[1, 3, 1] = 1e9  # never the experts used
    store = _store(tmp_path, specs, 8 * size)
    cache = ExpertCache(store, layers, experts, predictor="affinity", affinity_counts=wrong)
    try:
        _passes(cache, layers, route, passes)
        s = cache.stats()
        considered = s["prefetch_issued"] + s["prefetch_throttled"]
        assert s["prefetch_used"] == 0 and s["prefetch_throttled"] > 0
        # 1.0 * 0.9**7 < 0.5: seven wasted reads, then one in PREFETCH_EXPLORE
        assert s["prefetch_issued"] <= 7 + considered // PREFETCH_EXPLORE + 1
        assert s["prefetch_score"] < 0.5
    finally:
        cache.close()
        store.close()
