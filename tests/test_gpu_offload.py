"""Offload tiers on one GPU: host (page-locked) and NVMe tiers stream weights to the device, results equal
the same engine without offload on the same GPU, and the device budget holds by CUDA's own counters.

- MoE engine, experts offloaded with a device budget of 1/4 of the weights: prefill logits within
  1e-5 (fp32: the same math; CPU GEMMs round by alignment) and greedy tokens identical to no offload; the
  store's accounted device peak stays within the budget, and so does CUDA's: CUDA's peak allocation
  while generating, less what the same generation allocates without offload beyond its loaded
  weights and KV cache (activations, metadata), is at most the budget (+1 MiB of allocator slack).
- DiT blocks offloaded in stages (2 stages' worth of budget for 8): bitwise the same output, and
  every stage after the first arrives by prefetch.
- The host tier and the NVMe staging buffers are page-locked and the copies run on the side stream.

Run with ``pytest -m gpu``; skipped without CUDA (``TESSERA_GPU_TESTS_DEVICE=cpu`` runs the same code
on the CPU, without the CUDA-counter checks).
"""

from __future__ import annotations


import pytest
import torch

from tessera.models.tiny_moe import build_tiny_moe
from tessera.options import OffloadConfig
from tessera.tests.gpu_testing import DEVICE, full_fp32_matmuls, gpu_controller  # noqa: F401 - fixtures

pytestmark = pytest.mark.gpu

ON_CUDA = DEVICE == "cuda"
PROMPTS = ([5, 7, 9, 11, 13, 17, 19], [3, 1, 4, 1, 5])
OPTS = dict(dtype="float32", stop_at_eos=False, max_model_len=64, block_size=4)
NEW_TOKENS = 6
SLACK = 1 << 20


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    # 8 layers x 8 experts (hidden 128): experts are most of the weights, so a quarter of them
    # holds the dense layers plus the experts one layer routes to.
    return build_tiny_moe("mixtral", tmp_path_factory.mktemp("gpu-offload") / "moe", layers=8, experts=8, hidden=128)


def _weight_bytes(path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys())


def _allocated() -> int:
    """Bytes CUDA has allocated now (0 off CUDA), after the queued work has run."""
    if not ON_CUDA:
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _reset_peak() -> int:
    if ON_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    return _allocated()


def _peak() -> int:
    if not ON_CUDA:
        return 0
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def _generate(engine):
    from tessera.runtime.llm.engine import SamplingParams

    return [r.token_ids for r in engine.generate([list(p) for p in PROMPTS], SamplingParams(max_new_tokens=NEW_TOKENS))]


def _store_facts(worker, key):
    """Offload stats, the dense bytes kept resident, whether the host tier is page-locked, and the staging pool."""
    runner = worker.engines[key]  # the rank's ModelRunner (Worker.attach)
    store = runner.stage.experts.store
    host = [t for group in store._host.values() for t in group.values()]
    return {"stats": runner.offload_stats(), "resident": store.external_resident_bytes,
            "host_pinned": all(t.is_pinned() for t in host) if host else None,
            "staging": store.staging is not None}


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_moe_offload_equals_no_offload_and_keeps_the_budget(gpu_controller, moe_path, tmp_path, tier):
    from tessera.runtime.llm.engine import LLMEngine

    budget = _weight_bytes(moe_path) // 4
    # Without offload: the reference outputs, and what a generation allocates beyond the loaded
    # weights and KV cache (activations, metadata), measured after a warm-up (workspaces exist).
    ref = LLMEngine.load(gpu_controller, moe_path, **OPTS)
    ref.score(PROMPTS[0])
    start = _reset_peak()
    want_logits = ref.score(PROMPTS[0])
    want_tokens = _generate(ref)
    beyond_weights = _peak() - start
    ref.close()
    del ref
    if ON_CUDA:
        torch.cuda.empty_cache()

    cfg = OffloadConfig(device_budget_bytes=budget, nvme_dir=str(tmp_path) if tier == "nvme" else None,
                        reader="preadv", predictor="both")
    off = LLMEngine.load(gpu_controller, moe_path, offload=cfg, **OPTS)
    try:
        start = _reset_peak()  # dense weights (resident, charged to the budget) + KV cache are allocated now
        got_logits = off.score(PROMPTS[0])
        got_tokens = _generate(off)
        peak = _peak()
        assert got_tokens == want_tokens
        diff = (got_logits - want_logits).abs().max().item()
        assert diff <= 1e-5, f"offloaded prefill logits differ by {diff:.2e}"
        (facts,) = gpu_controller.collective_rpc(_store_facts, args=(off.key,))
        stats = facts["stats"]
        assert stats["store_device_peak"] <= budget, "the store's device accounting went over the budget"
        assert stats["cache_misses"] > 0 and stats["store_copier"]["side_stream"] is ON_CUDA
        if tier == "host":
            assert facts["host_pinned"] is ON_CUDA and not facts["staging"]
        else:
            assert stats["store_reads"] > 0 and facts["staging"] is ON_CUDA  # NVMe -> pinned staging -> device
        if ON_CUDA:
            assert stats["store_h2d_bytes"] > 0 and stats["store_cuda_peak_allocated"] >= peak
            # weights on the device at the peak = resident dense (in ``start``) + streamed experts
            weights_at_peak = peak - start - beyond_weights + facts["resident"]
            assert weights_at_peak <= budget + SLACK, (
                f"CUDA's peak while generating was {peak - start} bytes above the loaded state; less the "
                f"{beyond_weights} bytes generation needs beyond weights, plus the {facts['resident']} resident dense "
                f"bytes, that is {weights_at_peak} bytes of weights against a {budget}-byte device budget")
    finally:
        off.close()


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_dit_blocks_offloaded_on_the_device_are_bitwise_equal(tmp_path, tier):
    from tessera.models.pixart import PixArtConfig, PixArtTransformer
    from tessera.offload.modules import OffloadedBlocks
    from tessera.offload.store import group_spec

    torch.manual_seed(0)
    cfg = PixArtConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=8,
                       cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=24)
    model = PixArtTransformer(cfg).eval().to(DEVICE)
    latent, text, t = (torch.randn(2, 4, 8, 8, device=DEVICE), torch.randn(2, 5, 24, device=DEVICE),
                       torch.tensor(500.0, device=DEVICE))
    with torch.no_grad():
        want = model(latent, text, t)
    blocks = list(model.transformer_blocks)
    stage_bytes = group_spec("s", {f"0.{k}": v for k, v in blocks[0].named_parameters()}).nbytes
    config = OffloadConfig(device_budget_bytes=2 * stage_bytes, nvme_dir=str(tmp_path) if tier == "nvme" else None,
                           reader="preadv")
    off = OffloadedBlocks(blocks, config, blocks_per_stage=1, device=DEVICE)
    try:
        assert all(p.numel() == 0 and p.device.type == DEVICE for b in blocks for p in b.parameters())
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(model(latent, text, t), want)
        s = off.stats()
        assert s["device_peak"] <= config.device_budget_bytes
        assert s["stream_uses"] == 16 and s["stream_prefetch_hits"] >= 14
        assert s["copier"]["side_stream"] is ON_CUDA
    finally:
        off.close()
