"""Request batching in the diffusion engine: one seed per prompt makes each image independent of its batch.

``tessera serve`` runs concurrent image requests that share a size, step count, mode and guidance as one
denoising loop; what makes that correct is that each prompt's noise is drawn alone from its own seed. Here a
batch of three prompts with seeds (5, 6, 7) must give, row by row, the latents each prompt makes alone with its
seed: to fp32 rounding (a larger batch changes the matmul blocking), on every family and on plans that split
patches (sp) and the guidance batch (cfg); with ``batch_invariant`` (one forward per image inside the shared
loop, what ``tessera serve`` does) bit for bit, latents and decoded images.
"""

from __future__ import annotations

import pytest
import torch

from tessera.tests.diffusion_fixtures import engine_on, tiny_flux3, tiny_pixart, tiny_sd3  # noqa: F401 (fixtures)
from tessera.tests.diffusion_reference import assert_latents_close

PROMPTS = ["a red cube", "a blue ball on grass", "a cat"]
SEEDS = [5, 6, 7]
CASES = [("tiny_pixart", {"sp": 2}, 4.0), ("tiny_flux3", {"sp": 2}, 3.5), ("tiny_sd3", {"cfg": 2, "sp": 2}, 4.0)]


def _latents(engine, prompts, seed, guidance):
    (latents,) = engine.generate_images(prompts, steps=3, height=32, width=48, guidance_scale=guidance, seed=seed,
                                        output="latent")
    return latents


@pytest.mark.timeout(900)
@pytest.mark.parametrize("model, plan, guidance", CASES, ids=[c[0] for c in CASES])
def test_a_batch_with_one_seed_per_prompt_equals_each_prompt_alone(request, make_controller, model, plan, guidance):
    engine = engine_on(make_controller, plan, request.getfixturevalue(model))
    batch = _latents(engine, PROMPTS, SEEDS, guidance)
    assert engine.last["batch"] == 3 and batch.shape[0] == 3
    for i, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS)):
        alone = _latents(engine, [prompt], seed, guidance)
        assert_latents_close(batch[i:i + 1], alone)
    # A list of one seed is the same draw as the seed itself (one row), so batching changes nothing for one prompt.
    assert torch.equal(_latents(engine, [PROMPTS[0]], [SEEDS[0]], guidance), _latents(engine, [PROMPTS[0]], 5, guidance))


def test_one_seed_keeps_the_batch_shaped_draw_of_diffusers():
    """One seed for many prompts is diffusers' single-generator draw: row 1 is not the draw of seed + 1 alone."""
    from tessera.runtime.diffusion.request import DiffusionRequest

    shared = DiffusionRequest(prompts=("a", "b"), negative_prompts=("", ""), seed=5).noise(4, 8, 8)
    assert torch.equal(shared, torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5)))
    per_prompt = DiffusionRequest(prompts=("a", "b"), negative_prompts=("", ""), seed=(5, 6)).noise(4, 8, 8)
    assert torch.equal(per_prompt[1:], torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(6)))
    assert torch.equal(per_prompt[:1], shared[:1])


@pytest.mark.parametrize("seed, message", [((1, 2, 3), "3 seeds for 2 prompts"), ((1, -1), "seed must be"),
                                           ((), "seed must be")])
def test_bad_per_prompt_seeds_name_the_fix(seed, message):
    from tessera.runtime.diffusion.request import DiffusionRequest

    with pytest.raises(ValueError, match=message):
        DiffusionRequest(prompts=("a", "b"), negative_prompts=("", ""), seed=seed)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("model, plan, guidance", CASES, ids=[c[0] for c in CASES])
def test_a_batch_invariant_batch_equals_each_prompt_alone_bit_for_bit(request, make_controller, model, plan,
                                                                      guidance):
    engine = engine_on(make_controller, plan, request.getfixturevalue(model))
    args = dict(steps=3, height=32, width=48, guidance_scale=guidance)
    batch = engine.generate_images(PROMPTS, seed=SEEDS, batch_invariant=True, **args)
    latents = engine.last["latents"]
    assert engine.last["batch"] == 3
    for i, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS)):
        (alone,) = engine.generate_images([prompt], seed=seed, **args)
        assert torch.equal(latents[i:i + 1], engine.last["latents"]), f"{prompt!r}: latents differ from alone"
        assert list(batch[i].getdata()) == list(alone.getdata()), f"{prompt!r}: image differs from alone"


def test_batch_invariance_is_refused_where_the_batch_shares_state(make_controller, tiny_pixart):
    engine = engine_on(make_controller, {"sp": 2}, tiny_pixart)
    assert engine.supports_batch_invariance("exact") and not engine.supports_batch_invariance("displaced")
    with pytest.raises(ValueError, match="stale K/V shared by the batch"):
        engine.generate_images(PROMPTS[:2], steps=2, height=32, width=48, seed=[1, 2], mode="displaced",
                               batch_invariant=True)
    (one,) = engine.generate_images(PROMPTS[:1], steps=2, height=32, width=48, seed=[1], mode="displaced",
                                    batch_invariant=True)  # one image: nothing shared, nothing refused
