"""A DiT (tessera's PixArt transformer) with its transformer blocks offloaded in stages runs and matches."""

from __future__ import annotations

import pytest
import torch

from tessera.models.pixart import PixArtConfig, PixArtTransformer
from tessera.options import OffloadConfig
from tessera.offload.modules import OffloadedBlocks
from tessera.offload.store import group_spec
from tessera.tests.llm_testing import local_controller  # noqa: F401 - fixture
from tessera.tests.test_offload_helpers import one_torch_thread  # noqa: F401 - fixture


def _dit():
    torch.manual_seed(0)
    cfg = PixArtConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=8,
                       cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=24)
    return PixArtTransformer(cfg).eval()


@pytest.mark.parametrize("nvme", [True, False], ids=["nvme", "host"])
def test_dit_with_offloaded_stages_matches(tmp_path, nvme):
    model = _dit()
    latent = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 5, 24)
    t = torch.tensor(500.0)
    with torch.no_grad():
        want = model(latent, text, t)
    blocks = list(model.transformer_blocks)
    stage_bytes = group_spec("s", {f"0.{k}": v for k, v in blocks[0].named_parameters()}).nbytes
    cfg = OffloadConfig(device_budget_bytes=2 * stage_bytes, nvme_dir=str(tmp_path) if nvme else None, reader="preadv")
    assert len(blocks) * stage_bytes == 4 * cfg.device_budget_bytes  # blocks 4x over the budget
    off = OffloadedBlocks(blocks, cfg, blocks_per_stage=1)
    try:
        assert all(p.numel() == 0 for b in blocks for p in b.parameters())  # the bytes live in the store
        with torch.no_grad():
            for _ in range(2):  # two denoising steps: the stream wraps around
                got = model(latent, text, t)
                assert torch.equal(got, want)
        s = off.stats()
        assert s["device_peak"] <= cfg.device_budget_bytes
        assert s["stream_uses"] == 16 and s["stream_prefetch_hits"] >= 14  # all but the first are prefetched
        if nvme:
            assert s["reads"] >= 16
    finally:
        off.close()


def test_diffusion_engine_with_offloaded_blocks_gives_the_same_latents(local_controller, session_tmp, tmp_path):  # noqa: F811
    from tessera.models.tiny_diffusion import build_tiny_diffusion
    from tessera.runtime.diffusion.engine import DiffusionEngine
    from tessera.runtime.diffusion.engine import ENGINE_ID

    path = str(build_tiny_diffusion("pixart", session_tmp / "offload-tiny-pixart"))
    args = dict(steps=2, height=64, width=64, seed=3, output="latent")
    ref = DiffusionEngine.load(local_controller, path, progress=False)
    try:
        blocks = list(local_controller.worker.engines[ENGINE_ID].model.transformer_blocks)
        sizes = [group_spec("s", {f"0.{k}": v for k, v in b.named_parameters()}).nbytes for b in blocks]
        want = ref.generate_images(["a red square"], **args)
    finally:
        ref.close()
    cfg = OffloadConfig(device_budget_bytes=2 * max(sizes), nvme_dir=str(tmp_path), reader="preadv")
    off = DiffusionEngine.load(local_controller, path, progress=False, offload=cfg)
    try:
        runner = local_controller.worker.engines[ENGINE_ID]
        blocks = list(runner.model.transformer_blocks)
        assert all(p.numel() == 0 for b in blocks for p in b.parameters())  # the blocks live in the tier file
        got = off.generate_images(["a red square"], **args)
        assert len(got) == len(want) == 1
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        s = runner.offloaded.stats()
        assert s["reads"] >= len(blocks) and s["device_peak"] <= cfg.device_budget_bytes
        if len(blocks) >= 3:
            assert sum(sizes) > 1.4 * cfg.device_budget_bytes  # the blocks do not fit at once
    finally:
        off.close()


def test_diffusion_engine_repairs_a_corrupt_stage_while_it_runs(local_controller, session_tmp, tmp_path):  # noqa: F811
    """A corrupt extent of the DiT's tier file (default on_corrupt="rebuild") is rewritten from the weights
    it was written from and used: the same latents as without offload, and the file verifies again."""
    from tessera.models.tiny_diffusion import build_tiny_diffusion
    from tessera.offload.tier_file import TierFile
    from tessera.runtime.diffusion.engine import ENGINE_ID, DiffusionEngine

    path = str(build_tiny_diffusion("pixart", session_tmp / "offload-tiny-pixart-repair"))
    args = dict(steps=2, height=64, width=64, seed=5, output="latent")
    ref = DiffusionEngine.load(local_controller, path, progress=False)
    try:
        blocks = list(local_controller.worker.engines[ENGINE_ID].model.transformer_blocks)
        sizes = [group_spec("s", {f"0.{k}": v for k, v in b.named_parameters()}).nbytes for b in blocks]
        want = ref.generate_images(["a blue circle"], **args)
    finally:
        ref.close()
    cfg = OffloadConfig(device_budget_bytes=2 * max(sizes), nvme_dir=str(tmp_path), reader="preadv")
    assert cfg.on_corrupt == "rebuild"
    DiffusionEngine.load(local_controller, path, progress=False, offload=cfg).close()  # writes the tier file
    (data,) = tmp_path.glob("*.tier")
    name = data.name.removesuffix(".tier")
    tf = TierFile.open(tmp_path, name)
    with open(data, "r+b") as f:  # one flipped byte in every stage's extent
        for g in tf.groups.values():
            f.seek(g.offset + g.nbytes // 3)
            byte = f.read(1)
            f.seek(g.offset + g.nbytes // 3)
            f.write(bytes([byte[0] ^ 0x5A]))
    assert sorted(tf.verify_all()) == sorted(tf.groups)
    off = DiffusionEngine.load(local_controller, path, progress=False, offload=cfg)
    try:
        runner = local_controller.worker.engines[ENGINE_ID]
        got = off.generate_images(["a blue circle"], **args)
        assert len(got) == len(want) == 1
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        s = runner.offloaded.stats()
        assert s["repaired"] == len(tf.groups)  # every stage was read, found corrupt and rewritten once
    finally:
        off.close()
    assert TierFile.open(tmp_path, name).verify_all() == []
