"""Flux (double/single-stream blocks, RoPE, joint attention with replicated text) on sp=2 vs diffusers."""

from __future__ import annotations

import pytest
import torch

from tessera.models.tiny_diffusion import build_tiny_diffusion
from tessera.tests.diffusion_fixtures import engine_on
from tessera.tests.diffusion_reference import assert_latents_close, flux_reference_latents, flux_reference_pred

STEPS, H, W = 3, 40, 32   # latent 20x16 -> 10 token rows of 8


@pytest.fixture(scope="session")
def tiny_flux(session_tmp):
    return str(build_tiny_diffusion("flux", session_tmp / "tiny-flux"))


@pytest.mark.timeout(900)
def test_flux_exact_and_ulysses_match_diffusers(make_controller, tiny_flux):
    engine = engine_on(make_controller, {"sp": 2}, tiny_flux)
    ref = flux_reference_latents(tiny_flux, "a green tree", STEPS, H, W, seed=2)
    for mode in ("exact", "ulysses"):
        engine.generate_images("a green tree", steps=STEPS, height=H, width=W, guidance_scale=0.0, mode=mode,
                               seed=2, output="latent", trace=True)
        last = engine.last
        for step in last["trace"]:
            want = flux_reference_pred(tiny_flux, step["latents"], step["t"], last["embeds"])
            assert (want - step["pred"]).abs().max().item() <= 1e-4, f"{mode} t={step['t']}"
        assert_latents_close(last["latents"], ref)
    engine.generate_images("a green tree", steps=STEPS, height=H, width=W, guidance_scale=0.0, mode="displaced",
                           warmup_steps=STEPS, seed=2, output="latent")
    assert_latents_close(engine.last["latents"], ref)  # full warm-up is exact
    engine.generate_images("a green tree", steps=STEPS, height=H, width=W, guidance_scale=0.0, mode="partial",
                           warmup_steps=1, seed=2, output="latent")
    partial_bytes = engine.last["sent_bytes_total"]
    engine.generate_images("a green tree", steps=STEPS, height=H, width=W, guidance_scale=0.0, mode="displaced",
                           warmup_steps=1, seed=2, output="latent")
    assert 0 < partial_bytes < engine.last["sent_bytes_total"]
    images = engine.generate_images("a green tree", steps=2, height=H, width=W, guidance_scale=3.0)  # true CFG
    assert images[0].size == (W, H) and torch.tensor(list(images[0].getdata())).float().std() > 0
