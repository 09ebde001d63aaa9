"""Dense-layer streaming: identical results to no offload, budget respected, and I/O overlapping compute."""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest
import torch

from tessera.options import OffloadConfig, Tier
from tessera.offload.prefetch import LayerStreamer
from tessera.offload.store import TieredStore, group_spec
from tessera.tests.test_offload_helpers import InMemoryDense, InMemoryExperts, TinyMoE, total_bytes, aio_ready, one_torch_thread  # noqa: F401 - fixtures


@pytest.mark.parametrize("reader", ["preadv", "aio"])
def test_streamed_dense_layers_give_identical_logits(tmp_path, reader, aio_ready):
    if reader == "aio" and aio_ready is not None:
        pytest.skip(aio_ready)
    model = TinyMoE(layers=4, seed=3)
    specs = model.dense_specs()
    largest = max(s.nbytes for s in specs)
    cfg = OffloadConfig(device_budget_bytes=2 * largest, nvme_dir=str(tmp_path), reader=reader)
    assert total_bytes(specs) >= 2 * cfg.device_budget_bytes
    store = TieredStore(cfg, specs, {s.name: Tier.NVME for s in specs})
    streamer = LayerStreamer(store, [s.name for s in specs])
    try:
        ref_tokens, ref_logits = model.generate([1, 2, 3], 4, InMemoryDense(model), InMemoryExperts(model))
        tokens, logits = model.generate([1, 2, 3], 4, streamer, InMemoryExperts(model))
        assert tokens == ref_tokens
        assert torch.equal(logits, ref_logits)
        assert streamer.counters["prefetch_hits"] >= streamer.counters["uses"] - 1  # all but the first were prefetched
        assert store.stats()["device_peak"] <= cfg.device_budget_bytes
        assert store.stats()["reader"] == reader
    finally:
        streamer.close()
        store.close()


def test_budget_for_one_group_degrades_to_synchronous_reads(tmp_path):
    model = TinyMoE(layers=3, seed=4)
    specs = model.dense_specs()
    cfg = OffloadConfig(device_budget_bytes=max(s.nbytes for s in specs), nvme_dir=str(tmp_path), reader="preadv")
    store = TieredStore(cfg, specs, {s.name: Tier.NVME for s in specs})
    streamer = LayerStreamer(store, [s.name for s in specs])
    try:
        ref = model.generate([5, 6], 2, InMemoryDense(model), InMemoryExperts(model))
        got = model.generate([5, 6], 2, streamer, InMemoryExperts(model))
        assert got[0] == ref[0] and torch.equal(got[1], ref[1])
        assert store.stats()["device_peak"] <= cfg.device_budget_bytes
    finally:
        streamer.close()
        store.close()


def _run_layers(source, names, compute_s):
    started = time.perf_counter()
    for name in names:
        with source.use(name) as h:
            assert h.tensors["w"].numel() > 0
            time.sleep(compute_s)  # stands in for this layer's compute
    return time.perf_counter() - started


class _NoPrefetch:
    """The same store, fetched synchronously: the sum of I/O and compute."""

    def __init__(self, store):
        self.store = store

    @contextmanager
    def use(self, name):
        with self.store.fetch(name) as h:
            yield h


def test_prefetch_overlaps_io_with_compute(tmp_path):
    # An artificially slow disk (each read waits io_s) and compute of the same length:
    # sequential costs ~n*(io+compute); double buffering ~io + n*max(io, compute).
    io_s = compute_s = 0.25
    n = 8
    specs = [group_spec(f"layers.{i}", {"w": torch.full((256, 256), float(i))}) for i in range(n)]
    cfg = OffloadConfig(device_budget_bytes=3 * specs[0].nbytes, nvme_dir=str(tmp_path), reader="preadv")
    store = TieredStore(cfg, specs, {s.name: Tier.NVME for s in specs}, read_delay_s=io_s)
    names = [s.name for s in specs]
    try:
        sequential = _run_layers(_NoPrefetch(store), names, compute_s)
        streamer = LayerStreamer(store, names, cyclic=False)
        overlapped = _run_layers(streamer, names, compute_s)
        streamer.close()
    finally:
        store.close()
    bound_sum = n * (io_s + compute_s)
    bound_max = io_s + n * max(io_s, compute_s)
    assert sequential >= 0.95 * bound_sum
    # Generous margin for a loaded 2-core machine, still far below the sum.
    assert overlapped < 0.8 * sequential, (overlapped, sequential)
    assert overlapped < bound_max + 0.5 * n * io_s, (overlapped, bound_max)
    assert store.stats()["device_peak"] <= cfg.device_budget_bytes
