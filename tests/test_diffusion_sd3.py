"""SD3 (MMDiT joint attention, cropped position table) with CFG on cfg=2 x sp=2 vs diffusers."""

from __future__ import annotations

import pytest

from tessera.models.tiny_diffusion import build_tiny_diffusion
from tessera.tests.diffusion_fixtures import engine_on
from tessera.tests.diffusion_reference import assert_latents_close, sd3_reference_latents, sd3_reference_pred

STEPS, H, W, G = 3, 40, 24, 5.0


@pytest.fixture(scope="session")
def tiny_sd3(session_tmp):
    return str(build_tiny_diffusion("sd3", session_tmp / "tiny-sd3"))


@pytest.mark.timeout(900)
def test_sd3_cfg_parallel_with_patches_matches_diffusers(make_controller, tiny_sd3):
    engine = engine_on(make_controller, {"cfg": 2, "sp": 2}, tiny_sd3)
    ref = sd3_reference_latents(tiny_sd3, "a white boat", STEPS, H, W, G, seed=4)
    for mode in ("exact", "ulysses"):
        engine.generate_images("a white boat", steps=STEPS, height=H, width=W, guidance_scale=G, mode=mode, seed=4,
                               output="latent", trace=True)
        last = engine.last
        for step in last["trace"]:
            want = sd3_reference_pred(tiny_sd3, step["latents"], step["t"], last["embeds"], G)
            assert (want - step["pred"]).abs().max().item() <= 1e-4, f"{mode} t={step['t']}"
        assert_latents_close(last["latents"], ref)
    images = engine.generate_images("a white boat", steps=2, height=H, width=W, guidance_scale=G, mode="displaced",
                                    warmup_steps=1)
    assert images[0].size == (W, H)
