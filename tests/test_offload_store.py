"""Tier budgets: enforced, tracked (instrumented peak), and refused up front when they cannot work."""

from __future__ import annotations

import threading

import pytest
import torch

from tessera.offload.buffers import BufferPool
from tessera.options import OffloadConfig, Tier
from tessera.offload.errors import BudgetError, BudgetExceeded, OffloadConfigError
from tessera.offload.store import TieredStore, assign_tiers, group_spec
from tessera.offload.tiers import TierBudget
from tessera.tests.test_offload_helpers import one_torch_thread  # noqa: F401 - fixture


def _specs(n=6, rows=128):
    g = torch.Generator().manual_seed(2)
    return [group_spec(f"layers.{i}", {"w": torch.randn(rows, 64, generator=g)}) for i in range(n)]


def test_budget_reserve_release_peak_and_refusal():
    b = TierBudget("device", 100)
    b.reserve(60)
    assert not b.try_reserve(50)
    with pytest.raises(BudgetExceeded, match="device tier.*100-byte budget"):
        b.reserve(41)
    b.reserve(40)
    b.release(70)
    assert (b.used, b.peak) == (30, 100)
    # A waiting reservation proceeds once another thread releases.
    threading.Timer(0.2, b.release, args=(30,)).start()
    b.reserve(90, timeout_s=30)
    assert b.used == 90 and b.peak == 100


def test_pool_reuses_buffers_and_drops_free_ones_to_make_room():
    b = TierBudget("device", 3 * 4096)
    pool = BufferPool(b)
    x = pool.acquire(8192, "x")
    assert x.data_ptr() % 4096 == 0
    pool.give_back(x)
    assert pool.acquire(8192, "again").data_ptr() == x.data_ptr()  # reused, no new charge
    assert b.used == 8192
    pool.give_back(x)
    y = pool.acquire(3 * 4096, "big")  # needs the free 8 KiB dropped first
    assert y.numel() == 3 * 4096 and b.used == 3 * 4096 == b.peak


def test_streaming_never_exceeds_the_device_budget(tmp_path):
    specs = _specs()
    largest = max(s.nbytes for s in specs)
    cfg = OffloadConfig(device_budget_bytes=2 * largest, nvme_dir=str(tmp_path), reader="preadv")
    store = TieredStore(cfg, specs, {s.name: Tier.NVME for s in specs})
    try:
        held = []
        for s in specs:  # hold up to two at a time, like double buffering
            held.append(store.fetch(s.name))
            if len(held) == 2:
                held.pop(0).release()
            assert store.budgets[Tier.DEVICE].used <= cfg.device_budget_bytes
        with pytest.raises(BudgetExceeded):
            held.append(store.fetch(specs[0].name))
            held.append(store.fetch(specs[1].name))
        for h in held:
            h.release()
        stats = store.stats()
        assert 0 < stats["device_peak"] <= cfg.device_budget_bytes
        assert stats["bytes_read"] >= len(specs) * largest
    finally:
        store.close()
    assert store.budgets[Tier.DEVICE].used == 0


def test_budget_smaller_than_the_largest_group_is_refused_at_build(tmp_path):
    specs = _specs()
    largest = max(s.nbytes for s in specs)
    cfg = OffloadConfig(device_budget_bytes=largest - 4096, nvme_dir=str(tmp_path), reader="preadv")
    with pytest.raises(BudgetError, match="smaller than .* largest offloaded weight group"):
        TieredStore(cfg, specs, {s.name: Tier.NVME for s in specs})
    resident = OffloadConfig(device_budget_bytes=largest * 2, nvme_dir=str(tmp_path), reader="preadv")
    with pytest.raises(BudgetError, match="raise device_budget_bytes to at least"):
        TieredStore(resident, specs, {s.name: Tier.DEVICE if i < 2 else Tier.NVME for i, s in enumerate(specs)})
    host = OffloadConfig(device_budget_bytes=largest * 2, host_budget_bytes=largest, reader="preadv")
    with pytest.raises(BudgetError, match="host budget"):
        TieredStore(host, specs)  # no NVMe dir: everything would go to host memory


def test_host_tier_is_charged_to_both_budgets(tmp_path):
    specs = _specs(4)
    size = specs[0].nbytes
    cfg = OffloadConfig(device_budget_bytes=2 * size, host_budget_bytes=2 * size, nvme_dir=str(tmp_path), reader="preadv")
    tiers = assign_tiers(specs, cfg)
    assert [tiers[s.name] for s in specs] == [Tier.HOST, Tier.HOST, Tier.NVME, Tier.NVME]
    store = TieredStore(cfg, specs, tiers)
    try:
        assert store.budgets[Tier.HOST].used == 2 * size
        with store.fetch("layers.0") as a, store.fetch("layers.3") as b:
            assert torch.equal(a.tensors["w"], specs[0].load()["w"])
            assert torch.equal(b.tensors["w"], specs[3].load()["w"])
            assert store.budgets[Tier.DEVICE].used == 2 * size
        assert store.stats()["device_peak"] <= cfg.device_budget_bytes
    finally:
        store.close()


def test_config_is_validated_at_the_edge():
    with pytest.raises(OffloadConfigError, match="device_budget_bytes"):
        OffloadConfig(device_budget_bytes=0)
    with pytest.raises(OffloadConfigError, match="reader"):
        OffloadConfig(device_budget_bytes=1, reader="mmap")
    with pytest.raises(OffloadConfigError, match="multiple of 4096"):
        OffloadConfig(device_budget_bytes=1, chunk_bytes=1000)
    cfg = OffloadConfig(device_budget_bytes=1)
    with pytest.raises(Exception):
        cfg.device_budget_bytes = 2  # frozen
