"""The MoE engine with offloaded experts: weights 4x the device budget, same tokens and logits as in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tessera.models.tiny_moe import build_tiny_moe
from tessera.options import OffloadConfig
from tessera.offload.errors import BudgetError
from tessera.runtime.llm.engine import LLMEngine, SamplingParams
from tessera.tests.llm_testing import local_controller  # noqa: F401 - fixture
from tessera.tests.test_offload_helpers import one_torch_thread  # noqa: F401 - fixture

PROMPTS = ([5, 7, 9, 11, 13, 17, 19], [3, 1, 4, 1, 5])
OPTS = dict(dtype="float32", stop_at_eos=False, max_model_len=64, block_size=4)


@pytest.fixture(scope="module")
def moe_path(session_tmp) -> Path:
    # 8 layers x 8 experts: experts are ~93% of the weights, so a quarter of the weights
    # still holds the dense layers plus every expert one layer can route to.
    return build_tiny_moe("mixtral", session_tmp / "offload-moe", layers=8, experts=8)


def _weight_bytes(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys())


@pytest.mark.parametrize("nvme", [True, False], ids=["nvme", "host"])
def test_moe_4x_over_device_budget_is_token_and_logit_identical(local_controller, moe_path, tmp_path, nvme):  # noqa: F811
    budget = _weight_bytes(moe_path) // 4
    cfg = OffloadConfig(device_budget_bytes=budget, nvme_dir=str(tmp_path) if nvme else None, reader="preadv",
                        predictor="both")
    ref = LLMEngine.load(local_controller, moe_path, **OPTS)
    off = LLMEngine.load(local_controller, moe_path, offload=cfg, **OPTS)
    try:
        # Same bytes, different addresses: the in-memory reference multiplies by views into the
        # mmapped safetensors file (8-byte aligned), the tier file's extents are 64-byte aligned,
        # and MKL's GEMV rounds differently by alignment (~1e-7). Bitwise equality holds where the
        # alignment matches (host tier, and tests/test_offload_expert_cache.py).
        want_logits = ref.score(PROMPTS[0])
        got_logits = off.score(PROMPTS[0])
        if nvme:
            assert (got_logits - want_logits).abs().max().item() <= 1e-5
        else:
            assert torch.equal(got_logits, want_logits)
        sampling = SamplingParams(max_new_tokens=6)
        want = [r.token_ids for r in ref.generate(list(PROMPTS), sampling)]
        got = [r.token_ids for r in off.generate(list(PROMPTS), sampling)]
        assert got == want
        (stats,) = off.offload_stats()
        assert stats["store_device_peak"] <= budget
        assert stats["cache_misses"] > 0 and stats["cache_evictions"] > 0  # really over budget
        assert stats["cache_prefetch_issued"] > 0
        if nvme:
            assert stats["store_bytes_read"] > 0 and stats["store_reader"] == "preadv"
            assert len(list(tmp_path.glob("*.tier"))) == 1
        assert ref.offload_stats() == [None]
    finally:
        off.close()
        ref.close()


def test_tier_file_is_reused_across_loads(local_controller, moe_path, tmp_path):  # noqa: F811
    cfg = OffloadConfig(device_budget_bytes=_weight_bytes(moe_path) // 4, nvme_dir=str(tmp_path), reader="preadv")
    first = LLMEngine.load(local_controller, moe_path, offload=cfg, **OPTS)
    first.close()
    (tier,) = tmp_path.glob("*.tier")
    before = tier.stat().st_mtime_ns, tier.stat().st_ino
    second = LLMEngine.load(local_controller, moe_path, offload=cfg, **OPTS)
    try:
        assert (tier.stat().st_mtime_ns, tier.stat().st_ino) == before
        assert len(second.generate([PROMPTS[1]], SamplingParams(max_new_tokens=2))[0].token_ids) == 2
    finally:
        second.close()


def test_budget_too_small_for_the_dense_weights_is_refused(local_controller, moe_path, tmp_path):  # noqa: F811
    cfg = OffloadConfig(device_budget_bytes=64 << 10, nvme_dir=str(tmp_path), reader="preadv")
    with pytest.raises(BudgetError, match="device budget"):
        LLMEngine.load(local_controller, moe_path, offload=cfg, **OPTS)


def test_offload_on_real_workers_with_expert_parallel(make_controller, moe_path, tmp_path):
    """ep=2 on two Ray workers: each rank writes and reads its own tier file; same tokens as in memory."""
    ctl = make_controller({"ep": 2})
    total = _weight_bytes(moe_path)
    cfg = OffloadConfig(device_budget_bytes=total // 6, nvme_dir=str(tmp_path), reader="preadv")
    ref = LLMEngine.load(ctl, moe_path, **OPTS)
    off = LLMEngine.load(ctl, moe_path, offload=cfg, **OPTS)
    try:
        sampling = SamplingParams(max_new_tokens=5)
        want = [r.token_ids for r in ref.generate(list(PROMPTS), sampling)]
        assert [r.token_ids for r in off.generate(list(PROMPTS), sampling)] == want
        stats = off.offload_stats()
        assert len(stats) == 2 and len(list(tmp_path.glob("*.tier"))) == 2  # one tier file per rank
        for s in stats:
            assert s["store_device_peak"] <= cfg.device_budget_bytes
            assert s["cache_misses"] > 0 and s["store_bytes_read"] > 0
        # each rank holds half the experts: its weights are still > 3x its device budget
        assert total / 2 > 3 * cfg.device_budget_bytes
    finally:
        off.close()
        ref.close()


def _corrupt_layer(tier_dir: Path, layer: int) -> dict[Path, list[str]]:
    """Flip one byte in the middle of every extent of ``layer``'s experts in each tier file; returns the groups hit."""
    from tessera.offload.tier_file import TierFile

    hit: dict[Path, list[str]] = {}
    for data in sorted(tier_dir.glob("*.tier")):
        tf = TierFile.open(tier_dir, data.name.removesuffix(".tier"))
        assert tf is not None
        names = [n for n in tf.groups if n.startswith(f"layers.{layer}.experts.")]
        with open(data, "r+b") as f:
            for n in names:
                g = tf.groups[n]
                f.seek(g.offset + g.nbytes // 2)
                byte = f.read(1)
                f.seek(g.offset + g.nbytes // 2)
                f.write(bytes([byte[0] ^ 0xFF]))
        hit[data] = names
        assert tf.verify_all() == names  # really corrupt
    return hit


def test_corrupt_extent_is_repaired_while_the_engine_runs_at_ep2(make_controller, moe_path, tmp_path):
    """A corrupt tier-file extent found during decode (default on_corrupt="rebuild") is rewritten from the
    checkpoint and used, on both ranks of ep=2: the same tokens as in memory, and the file is whole again."""
    from tessera.offload.tier_file import TierFile

    ctl = make_controller({"ep": 2})
    cfg = OffloadConfig(device_budget_bytes=_weight_bytes(moe_path) // 6, nvme_dir=str(tmp_path), reader="preadv")
    assert cfg.on_corrupt == "rebuild" and cfg.verify_reads
    ref = LLMEngine.load(ctl, moe_path, **OPTS)
    try:
        sampling = SamplingParams(max_new_tokens=5)
        want = [r.token_ids for r in ref.generate(list(PROMPTS), sampling)]
    finally:
        ref.close()
    LLMEngine.load(ctl, moe_path, offload=cfg, **OPTS).close()  # writes one tier file per rank
    corrupted = _corrupt_layer(tmp_path, layer=0)  # every token's first MoE layer reads from these
    assert len(corrupted) == 2 and all(corrupted.values())
    off = LLMEngine.load(ctl, moe_path, offload=cfg, **OPTS)  # reuses the (corrupt) files: same fingerprint
    try:
        assert [r.token_ids for r in off.generate(list(PROMPTS), sampling)] == want
        stats = off.offload_stats()
    finally:
        off.close()
    assert sum(s["store_repaired"] for s in stats) >= 1
    for data, names in corrupted.items():
        tf = TierFile.open(tmp_path, data.name.removesuffix(".tier"))
        still_bad = tf.verify_all()
        repaired = [n for n in names if n not in still_bad]
        # every extent the rank read was rewritten in place (an unread one may stay corrupt until read)
        rank = int(data.name.split("-rank")[1].split("of")[0])
        assert len(repaired) == stats[rank]["store_repaired"]
        assert set(still_bad) <= set(names)
