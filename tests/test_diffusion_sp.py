"""Patch parallel (exact, displaced, partial) and Ulysses on sp=2 against diffusers, per step and end to end."""

from __future__ import annotations

import pytest
import torch

from tessera.tests.diffusion_fixtures import engine_on, tiny_pixart  # noqa: F401 (fixture)
from tessera.tests.diffusion_reference import assert_latents_close, pixart_reference_latents, pixart_reference_pred, psnr

STEPS, H, W, G = 4, 56, 40, 4.0   # latent 28x20 -> 14 patch rows: bands of 7


@pytest.fixture
def sp2(make_controller, tiny_pixart):
    return engine_on(make_controller, {"sp": 2}, tiny_pixart)


def _run(engine, mode, **kw):
    kw = {"steps": STEPS, "height": H, "width": W, "guidance_scale": G, "seed": 3, **kw}
    engine.generate_images("a red cube", mode=mode, output="latent", trace=True, **kw)
    return engine.last


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["exact", "ulysses"])
def test_exact_modes_match_diffusers_per_step_and_end_to_end(sp2, tiny_pixart, mode):
    last = _run(sp2, mode)
    assert len(last["trace"]) == STEPS
    for step in last["trace"]:
        ref = pixart_reference_pred(tiny_pixart, step["latents"], step["t"], last["embeds"], G)
        assert (ref - step["pred"]).abs().max().item() <= 1e-4, f"step t={step['t']}"
    ref_latents = pixart_reference_latents(tiny_pixart, "a red cube", STEPS, H, W, G, seed=3)
    assert_latents_close(last["latents"], ref_latents)
    assert all(b > 0 for b in last["sent_bytes_per_step"])  # sp=2 really exchanged K/V every step


@pytest.mark.timeout(900)
def test_displaced_reduces_to_exact_with_full_warmup_and_differs_otherwise(sp2):
    exact = _run(sp2, "exact")["latents"]
    full_warmup = _run(sp2, "displaced", warmup_steps=STEPS)["latents"]
    assert (full_warmup - exact).abs().max().item() <= 1e-6
    stale = _run(sp2, "displaced", warmup_steps=1)
    assert (stale["latents"] - exact).abs().max().item() > 1e-4
    # the async gather of the last step would never be used, so it is not sent
    assert stale["sent_bytes_per_step"][-1] == 0
    quality = psnr(stale["latents"], exact)
    print(f"displaced warmup=1 PSNR vs exact: {quality:.2f} dB")
    assert quality > 10.0  # close to exact, not garbage


@pytest.mark.timeout(900)
def test_partial_sends_fewer_bytes_than_displaced(sp2):
    displaced = _run(sp2, "displaced", warmup_steps=1)
    partial = _run(sp2, "partial", warmup_steps=1, partial_fraction=0.25)
    d_bytes, p_bytes = displaced["sent_bytes_total"], partial["sent_bytes_total"]
    print(f"bytes sent: displaced {d_bytes}, partial {p_bytes}; "
          f"partial PSNR vs displaced {psnr(partial['latents'], displaced['latents']):.2f} dB")
    assert 0 < p_bytes < d_bytes
    # warm-up steps are exact in both, so the difference is in the stale steps
    assert partial["sent_bytes_per_step"][0] == displaced["sent_bytes_per_step"][0]
    assert partial["sent_bytes_per_step"][1] < displaced["sent_bytes_per_step"][1]
    kinds = partial["comm_by_rank"][0]["by_kind"]
    assert "patch_kv_p2p" in kinds and "patch_kv_async" not in kinds


@pytest.mark.timeout(900)
def test_full_pipeline_writes_png(sp2, tmp_path):
    from PIL import Image

    images = sp2.generate_images(["a cat", "a dog"], steps=2, height=32, width=48, guidance_scale=G)
    assert [im.size for im in images] == [(48, 32), (48, 32)]
    path = tmp_path / "cat.png"
    images[0].save(path)
    assert Image.open(path).size == (48, 32)
    stats = sp2.stats()
    assert len(stats["last"]["step_seconds"]) == 2 and stats["family"] == "pixart"


def test_bad_requests_fail_on_the_driver(sp2):
    with pytest.raises(ValueError, match="mode 'nope' is unknown"):
        sp2.generate_images("x", mode="nope", steps=1)
    with pytest.raises(ValueError, match="partial_fraction"):
        sp2.generate_images("x", mode="partial", partial_fraction=0.0, steps=1)
    with pytest.raises(ValueError, match="multiples of 4 pixels"):
        sp2.generate_images("x", height=34, width=32, steps=1)
