"""Tensor-parallel weight sharding (tp=2) combined with patch parallel (sp=2): exact, and 1/tp of the weights."""

from __future__ import annotations

import pytest

from tessera.tests.diffusion_fixtures import engine_on, tiny_pixart  # noqa: F401 (fixture)
from tessera.tests.diffusion_reference import pixart_reference_pred

G = 4.0


@pytest.mark.timeout(900)
def test_tp2_x_sp2_shards_weights_and_matches_diffusers(make_controller, tiny_pixart):
    from tessera.models.diffusers_loader import DiffusersDir, load_transformer

    engine = engine_on(make_controller, {"sp": 2, "tp": 2}, tiny_pixart)
    full = sum(p.numel() * p.element_size() for p in load_transformer(DiffusersDir.open(tiny_pixart)).parameters())
    per_rank = engine.stats()["param_bytes_per_rank"]
    assert all(b < full for b in per_rank)
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
