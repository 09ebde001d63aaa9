"""The NVMe tier file: exact round trips, aligned extents, reuse, corruption and directory errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tessera.options import OffloadConfig, Tier
from tessera.offload.errors import CorruptTierFileError, DiskSpaceError, TierDirError
from tessera.offload.store import TieredStore, fingerprint_of, group_spec
from tessera.offload.tier_file import TierFile, write_tier_file
from tessera.tests.test_offload_helpers import aio_ready, one_torch_thread  # noqa: F401 - fixtures


def _groups():
    g = torch.Generator().manual_seed(1)
    return {
        "layers.0.dense": {
            "w": torch.randn(33, 17, generator=g),  # odd sizes: padding inside the extent
            "b": torch.randn(17, generator=g).to(torch.bfloat16),
            "scale": torch.tensor(3.5, dtype=torch.float64),  # 0-d
        },
        "layers.0.experts.0": {
            "w1": torch.randint(-128, 127, (64, 48), generator=g, dtype=torch.int8),
            "w2": torch.randn(48, 64, generator=g).to(torch.float16),
        },
        "layers.1.experts.3": {"w": torch.randn(1000, generator=g)},
    }


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_round_trip_is_byte_exact_and_extents_are_aligned(tmp_path):
    groups = _groups()
    total = sum(group_spec(n, t).nbytes for n, t in groups.items())
    tf = write_tier_file(tmp_path, "w", groups.items(), "fp0", total)
    assert tf.path.stat().st_size == total == tf.file_bytes
    manifest = json.loads((tmp_path / "w.manifest.json").read_text())
    for g in manifest["groups"]:
        assert g["offset"] % 4096 == 0 and g["nbytes"] % 4096 == 0
        assert {"name", "dtype", "shape", "offset", "nbytes"} <= set(g["tensors"][0])
        assert isinstance(g["checksum"], int)
    reopened = TierFile.open(tmp_path, "w", fingerprint="fp0")
    assert reopened is not None
    for name, tensors in groups.items():
        back = reopened.read_group(name)
        assert list(back) == list(tensors)
        for k, t in tensors.items():
            assert back[k].dtype == t.dtype and back[k].shape == t.shape
            assert _bytes(back[k]) == _bytes(t)


@pytest.mark.parametrize("reader", ["preadv", "aio"])
def test_store_reads_match_the_checkpoint(tmp_path, reader, aio_ready):
    if reader == "aio" and aio_ready is not None:
        pytest.skip(aio_ready)
    groups = _groups()
    specs = [group_spec(n, t) for n, t in groups.items()]
    cfg = OffloadConfig(device_budget_bytes=2 * max(s.nbytes for s in specs), nvme_dir=str(tmp_path), reader=reader)
    with_store = TieredStore(cfg, specs, {s.name: Tier.NVME for s in specs})
    try:
        assert with_store.stats()["reader"] == reader
        for _ in range(2):  # second pass reuses pooled buffers
            for name, tensors in groups.items():
                with with_store.fetch(name) as h:
                    for k, t in tensors.items():
                        assert _bytes(h.tensors[k]) == _bytes(t)
        assert with_store.stats()["reads"] == 2 * len(groups)
    finally:
        with_store.close()


def test_tier_file_is_reused_when_checkpoint_unchanged_and_rebuilt_when_changed(tmp_path):
    ckpt = tmp_path / "model.bin"
    ckpt.write_bytes(b"v1")
    groups = _groups()
    specs = [group_spec(n, t) for n, t in groups.items()]
    layout = {s.name: s.nbytes for s in specs}
    cfg = OffloadConfig(device_budget_bytes=1 << 20, nvme_dir=str(tmp_path / "tiers"), reader="preadv")
    (tmp_path / "tiers").mkdir()
    tiers = {s.name: Tier.NVME for s in specs}
    TieredStore(cfg, specs, tiers, fingerprint=fingerprint_of([ckpt], layout)).close()
    data = tmp_path / "tiers" / "weights.tier"
    first = data.stat().st_mtime_ns, data.stat().st_ino

    TieredStore(cfg, specs, tiers, fingerprint=fingerprint_of([ckpt], layout)).close()
    assert (data.stat().st_mtime_ns, data.stat().st_ino) == first  # reused, not rewritten

    ckpt.write_bytes(b"v2 changed")
    TieredStore(cfg, specs, tiers, fingerprint=fingerprint_of([ckpt], layout)).close()
    assert (data.stat().st_mtime_ns, data.stat().st_ino) != first  # rebuilt


def _corrupt(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corruption_is_refused_never_returned(tmp_path):
    groups = _groups()
    specs = [group_spec(n, t) for n, t in groups.items()]
    cfg = OffloadConfig(device_budget_bytes=1 << 20, nvme_dir=str(tmp_path), reader="preadv", on_corrupt="refuse")
    store = TieredStore(cfg, specs, {s.name: Tier.NVME for s in specs})
    try:
        g = store.tier_file.groups["layers.0.experts.0"]
        _corrupt(store.tier_file.path, g.offset + 100)
        with pytest.raises(CorruptTierFileError, match="layers.0.experts.0"):
            store.fetch("layers.0.experts.0")
        with store.fetch("layers.0.dense") as h:  # other groups still fine
            assert torch.equal(h.tensors["w"], groups["layers.0.dense"]["w"])
        assert store.budgets[Tier.DEVICE].used <= cfg.device_budget_bytes
    finally:
        store.close()


def test_corruption_is_repaired_from_the_checkpoint(tmp_path):
    groups = _groups()
    specs = [group_spec(n, t) for n, t in groups.items()]
    cfg = OffloadConfig(device_budget_bytes=1 << 20, nvme_dir=str(tmp_path), reader="preadv", on_corrupt="rebuild")
    store = TieredStore(cfg, specs, {s.name: Tier.NVME for s in specs})
    try:
        g = store.tier_file.groups["layers.1.experts.3"]
        _corrupt(store.tier_file.path, g.offset + 7)
        with store.fetch("layers.1.experts.3") as h:
            assert _bytes(h.tensors["w"]) == _bytes(groups["layers.1.experts.3"]["w"])
        assert store.stats()["repaired"] == 1
        assert store.tier_file.verify_all() == []  # repaired on disk too
    finally:
        store.close()


def test_corruption_found_at_open_when_reads_are_not_verified(tmp_path):
    groups = _groups()
    specs = [group_spec(n, t) for n, t in groups.items()]
    tiers = {s.name: Tier.NVME for s in specs}
    cfg = OffloadConfig(device_budget_bytes=1 << 20, nvme_dir=str(tmp_path), reader="preadv", verify_reads=False, on_corrupt="refuse")
    TieredStore(cfg, specs, tiers).close()
    tf = TierFile.open(tmp_path, "weights")
    _corrupt(tf.path, tf.groups["layers.0.dense"].offset + 1)
    with pytest.raises(CorruptTierFileError, match="delete it to rebuild"):
        TieredStore(cfg, specs, tiers)
    rebuild = OffloadConfig(device_budget_bytes=1 << 20, nvme_dir=str(tmp_path), reader="preadv", verify_reads=False)
    store = TieredStore(rebuild, specs, tiers)
    try:
        with store.fetch("layers.0.dense") as h:
            assert torch.equal(h.tensors["w"], groups["layers.0.dense"]["w"])
    finally:
        store.close()


def test_truncated_tier_file_is_rebuilt(tmp_path):
    groups = _groups()
    specs = [group_spec(n, t) for n, t in groups.items()]
    tiers = {s.name: Tier.NVME for s in specs}
    cfg = OffloadConfig(device_budget_bytes=1 << 20, nvme_dir=str(tmp_path), reader="preadv")
    TieredStore(cfg, specs, tiers).close()
    path = tmp_path / "weights.tier"
    os.truncate(path, 4096)
    store = TieredStore(cfg, specs, tiers)
    try:
        assert path.stat().st_size == sum(s.nbytes for s in specs)
        with store.fetch("layers.1.experts.3") as h:
            assert torch.equal(h.tensors["w"], groups["layers.1.experts.3"]["w"])
    finally:
        store.close()


def test_tier_dir_errors_name_the_problem(tmp_path):
    specs = [group_spec(n, t) for n, t in _groups().items()]
    tiers = {s.name: Tier.NVME for s in specs}

    def make(d, **kw):
        return TieredStore(OffloadConfig(device_budget_bytes=1 << 20, nvme_dir=str(d), reader="preadv", **kw), specs, tiers)

    with pytest.raises(TierDirError, match="does not exist"):
        make(tmp_path / "missing")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(TierDirError, match="not a directory"):
        make(afile)
    with pytest.raises(TierDirError, match="not writable"):
        make("/proc/self")  # read-only even for root
    with pytest.raises(DiskSpaceError, match="GiB free"):
        make(tmp_path, min_free_bytes=1 << 60)
    assert not list(tmp_path.glob("*.tier*"))


def test_same_shapes_different_bytes_never_reuse_a_stale_file(tmp_path):
    # Without checkpoint files to fingerprint, the store fingerprints the bytes themselves.
    a = {"g": {"w": torch.zeros(64, 64)}}
    b = {"g": {"w": torch.ones(64, 64)}}
    cfg = OffloadConfig(device_budget_bytes=1 << 20, nvme_dir=str(tmp_path), reader="preadv")
    for groups in (a, b):
        specs = [group_spec(n, t) for n, t in groups.items()]
        store = TieredStore(cfg, specs, {"g": Tier.NVME})
        try:
            with store.fetch("g") as h:
                assert torch.equal(h.tensors["w"], groups["g"]["w"])
        finally:
            store.close()


@pytest.mark.parametrize("reader", ["preadv", "aio"])
def test_an_urgent_read_goes_ahead_of_queued_prefetches(tmp_path, reader, aio_ready):
    """A demanded read submitted after several prefetches is served before every prefetch still queued."""
    if reader == "aio" and aio_ready is not None:
        pytest.skip(aio_ready)
    from tessera.offload.aio import AioReader, PreadvReader
    from tessera.offload.buffers import aligned_empty

    data = tmp_path / "extents.bin"
    data.write_bytes(os.urandom(8 * 4096))
    # one read at a time, each held for 0.2 s: the queue's order is the order reads complete in
    r = PreadvReader(io_threads=1, chunk_bytes=4096, read_delay_s=0.2) if reader == "preadv" else \
        AioReader(block_size=4096, queue_depth=1, io_threads=1, read_delay_s=0.2)
    done: list[str] = []
    try:
        futs = [r.submit(str(data), i * 4096, aligned_empty(4096), then=lambda i=i: done.append(f"prefetch{i}"),
                         urgent=False) for i in range(4)]
        futs.append(r.submit(str(data), 7 * 4096, aligned_empty(4096), then=lambda: done.append("demand")))
        for f in futs:
            f.result(timeout=60)
    finally:
        r.close()
    assert sorted(done) == sorted(["demand"] + [f"prefetch{i}" for i in range(4)])
    assert done.index("demand") <= 1  # at most the prefetch already being read goes first
