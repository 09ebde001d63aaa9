"""CFG parallel (cfg=2 x sp=2) and world sizes 3 and 4 with uneven bands, against diffusers."""

from __future__ import annotations

import pytest

from tessera.tests.diffusion_fixtures import engine_on, tiny_pixart  # noqa: F401 (fixture)
from tessera.tests.diffusion_reference import assert_latents_close, pixart_reference_latents, pixart_reference_pred, psnr

G = 4.0


def _check_against_diffusers(engine, model_dir, mode, steps, height, width, seed=5):
    engine.generate_images("a blue ball", mode=mode, output="latent", trace=True, steps=steps, height=height,
                           width=width, guidance_scale=G, seed=seed)
    last = engine.last
    worst = max((pixart_reference_pred(model_dir, s["latents"], s["t"], last["embeds"], G) - s["pred"]).abs().max().item()
                for s in last["trace"])
    assert worst <= 1e-4, f"{mode}: per-step max abs diff {worst}"
    ref = pixart_reference_latents(model_dir, "a blue ball", steps, height, width, G, seed)
    assert_latents_close(last["latents"], ref)
    return last


@pytest.mark.timeout(900)
def test_cfg2_x_sp2_matches_diffusers(make_controller, tiny_pixart):
    engine = engine_on(make_controller, {"cfg": 2, "sp": 2}, tiny_pixart)
    for mode in ("exact", "ulysses"):
        last = _check_against_diffusers(engine, tiny_pixart, mode, steps=3, height=40, width=32)
        kinds = last["comm_by_rank"][0]["by_kind"]
        assert kinds["cfg_pred"]["calls"] == 3  # one guidance exchange per step
    # each rank holds one branch of a half image: the cfg exchange carries a quarter of the latent
    cfg_bytes = last["comm_by_rank"][0]["by_kind"]["cfg_pred"]["sent"]
    assert cfg_bytes == 3 * 1 * 4 * (40 // 2 // 2) * (32 // 2) * 4


@pytest.mark.timeout(900)
@pytest.mark.parametrize("sp,height,width", [(3, 56, 40), (4, 40, 24)])
def test_uneven_bands_on_odd_world_sizes(make_controller, tiny_pixart, sp, height, width):
    engine = engine_on(make_controller, {"sp": sp}, tiny_pixart)
    rows = height // 4
    assert rows % sp, "the size must not divide evenly for this test"
    exact = _check_against_diffusers(engine, tiny_pixart, "exact", steps=3, height=height, width=width)
    _check_against_diffusers(engine, tiny_pixart, "ulysses", steps=3, height=height, width=width)
    kw = dict(steps=3, height=height, width=width, guidance_scale=G, seed=5, output="latent")
    engine.generate_images("a blue ball", mode="displaced", warmup_steps=1, **kw)
    displaced = dict(engine.last)
    engine.generate_images("a blue ball", mode="partial", warmup_steps=1, partial_fraction=0.5, **kw)
    partial = dict(engine.last)
    assert 0 < partial["sent_bytes_total"] < displaced["sent_bytes_total"]
    print(f"sp={sp}: PSNR vs exact displaced {psnr(displaced['latents'], exact['latents']):.2f} dB, "
          f"partial {psnr(partial['latents'], exact['latents']):.2f} dB")
    with pytest.raises(ValueError, match=f"fewer than sp={sp}"):
        engine.generate_images("x", height=8, width=32, steps=1)


@pytest.mark.timeout(900)
def test_flux_text_sharded_over_odd_sp_matches_diffusers(make_controller, session_tmp):
    """Ulysses and exact shard Flux's text stream over the sp ranks (512 text tokens: 171/171/170) like the
    image rows (10 token rows: 4/3/3); every step still matches the single-device diffusers transformer."""
    from tessera.models.tiny_diffusion import build_tiny_diffusion
    from tessera.tests.diffusion_reference import flux_reference_latents, flux_reference_pred

    model_dir = str(build_tiny_diffusion("flux", session_tmp / "tiny-flux"))
    engine = engine_on(make_controller, {"sp": 3}, model_dir)
    steps, height, width = 2, 40, 32
    ref = flux_reference_latents(model_dir, "a green tree", steps, height, width, seed=2)
    for mode in ("exact", "ulysses"):
        engine.generate_images("a green tree", steps=steps, height=height, width=width, guidance_scale=0.0,
                               mode=mode, seed=2, output="latent", trace=True)
        last = engine.last
        for step in last["trace"]:
            want = flux_reference_pred(model_dir, step["latents"], step["t"], last["embeds"])
            assert (want - step["pred"]).abs().max().item() <= 1e-4, f"{mode} t={step['t']}"
        assert_latents_close(last["latents"], ref)
        kinds = last["comm_by_rank"][0]["by_kind"]
        assert "ulysses_text" not in kinds  # sharded text rides in the q/k/v exchange, no output gather
