"""Tensor-parallel weight sharding over tp: exact against diffusers, and 1/tp of the sharded layers per rank.

PixArt: tp=2 x sp=2. Flux: tp=2 and tp=2 x sp=2, including the single-stream
blocks whose ``proj_out`` is row-split in two pieces (attention heads | MLP)
and the adaLN modulation linears (column-split, output all-gathered). SD3: tp=2.
"""

from __future__ import annotations

import pytest

from tessera.tests.diffusion_fixtures import engine_on, tiny_flux3, tiny_pixart, tiny_sd3, tp_split_bytes  # noqa: F401
from tessera.tests.diffusion_reference import (
    assert_latents_close,
    flux_reference_latents,
    flux_reference_pred,
    pixart_reference_pred,
    sd3_reference_pred,
)

G = 4.0
FLUX_STEPS, FLUX_H, FLUX_W = 2, 40, 32   # latent 20x16 -> 10 token rows of 8


@pytest.mark.timeout(900)
def test_tp2_x_sp2_shards_weights_and_matches_diffusers(make_controller, tiny_pixart):
    engine = engine_on(make_controller, {"sp": 2, "tp": 2}, tiny_pixart)
    full, split = tp_split_bytes(tiny_pixart)
    per_rank = engine.stats()["param_bytes_per_rank"]
    assert per_rank == [full - split + split // 2] * 4, (per_rank, full, split)
    # the block linears are ~all the weights: each rank holds well under 3/4 of them
    assert max(per_rank) < 0.75 * full, (per_rank, full)
    for mode in ("exact", "ulysses"):
        engine.generate_images("a yellow star", steps=2, height=32, width=32, guidance_scale=G, seed=7, mode=mode,
                               output="latent", trace=True)
        last = engine.last
        for step in last["trace"]:
            ref = pixart_reference_pred(tiny_pixart, step["latents"], step["t"], last["embeds"], G)
            assert (ref - step["pred"]).abs().max().item() <= 1e-4
        assert last["comm_by_rank"][0]["by_kind"]["tp_all_reduce"]["calls"] > 0


@pytest.mark.timeout(900)
@pytest.mark.parametrize("degrees", [{"tp": 2}, {"tp": 2, "sp": 2}], ids=["tp2", "tp2xsp2"])
def test_flux_tp_shards_single_blocks_and_matches_diffusers(make_controller, tiny_flux3, degrees):
    from tessera.models.diffusers_loader import DiffusersDir, load_transformer

    engine = engine_on(make_controller, degrees, tiny_flux3)
    full, split = tp_split_bytes(tiny_flux3)
    model = load_transformer(DiffusersDir.open(tiny_flux3))
    single = model.single_transformer_blocks
    blocks = sum(p.numel() * p.element_size() for p in
                 list(model.transformer_blocks.parameters()) + list(single.parameters()))
    single_split = sum(p.numel() * p.element_size() for n, p in single.named_parameters()
                       if n.split(".", 1)[1] in ("attn.to_q.weight", "attn.to_q.bias", "attn.to_k.weight",
                                                 "attn.to_k.bias", "attn.to_v.weight", "attn.to_v.bias",
                                                 "proj_mlp.weight", "proj_mlp.bias", "proj_out.weight",
                                                 "norm.linear.weight", "norm.linear.bias"))
    assert single_split > 0.4 * split  # the single-stream blocks are sharded, not replicated
    # no block linear is replicated: what tp leaves whole in the blocks is row biases and q/k norms only
    assert blocks - split < 0.02 * blocks, (blocks, split)
    stats = engine.stats()
    ranks = len(stats["param_bytes_per_rank"])
    want = full - split + split // 2
    print(f"flux {degrees}: params per rank {stats['param_bytes_per_rank']}, single device {full}")
    assert stats["param_bytes_per_rank"] == [want] * ranks, (stats["param_bytes_per_rank"], full, split)
    assert stats["loaded_bytes_per_rank"] == [want] * ranks  # only this rank's slices were read
    engine.generate_images("a green tree", steps=FLUX_STEPS, height=FLUX_H, width=FLUX_W, guidance_scale=0.0,
                           seed=2, output="latent", trace=True)
    last = engine.last
    for step in last["trace"]:
        ref = flux_reference_pred(tiny_flux3, step["latents"], step["t"], last["embeds"])
        assert (ref - step["pred"]).abs().max().item() <= 1e-4, f"t={step['t']}"
    assert_latents_close(last["latents"], flux_reference_latents(tiny_flux3, "a green tree", FLUX_STEPS, FLUX_H,
                                                                 FLUX_W, seed=2))
    # one all-reduce per row-split linear call: double block 4, each single block 1 (both streams at once)
    kinds = last["comm_by_rank"][0]["by_kind"]
    assert kinds["tp_all_reduce"]["calls"] == FLUX_STEPS * (4 + 2), kinds
    # adaLN modulation is sharded too: one small all-gather per modulation linear (double 2, single 1)
    assert kinds["tp_all_gather"]["calls"] == FLUX_STEPS * (2 + 2), kinds


@pytest.mark.timeout(900)
def test_sd3_tp2_shards_modulation_and_matches_diffusers(make_controller, tiny_sd3):
    engine = engine_on(make_controller, {"tp": 2}, tiny_sd3)
    full, split = tp_split_bytes(tiny_sd3)
    assert engine.stats()["param_bytes_per_rank"] == [full - split + split // 2] * 2
    engine.generate_images("a white boat", steps=2, height=32, width=32, guidance_scale=G, seed=4, output="latent",
                           trace=True)
    for step in engine.last["trace"]:
        ref = sd3_reference_pred(tiny_sd3, step["latents"], step["t"], engine.last["embeds"], G)
        assert (ref - step["pred"]).abs().max().item() <= 1e-4
    assert engine.last["comm_by_rank"][0]["by_kind"]["tp_all_gather"]["calls"] == 2 * 2 * 2  # 2 steps, 2 blocks
