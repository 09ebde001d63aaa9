"""Pipeline stages over pp for DiTs: each stage reads only its blocks, and the output is exact vs diffusers.

PixArt (2 blocks: one per stage), Flux (1 double + 2 single blocks, cut by
bytes: the double block and the embeddings, then both single blocks) and SD3 on pp=2; Flux on pp=2 x tp=2; PixArt on
pp=2 x sp=2. Guided PixArt/SD3 steps run their CFG halves as two micro-batches,
so the stages overlap. Bad plans fail on the driver with a ConfigError.
"""

from __future__ import annotations

import pytest

from tessera.tests.diffusion_fixtures import NoWorkers as _NoWorkers
from tessera.tests.diffusion_fixtures import engine_on, tiny_flux3, tiny_pixart, tiny_sd3  # noqa: F401
from tessera.tests.diffusion_reference import (
    assert_latents_close,
    flux_reference_latents,
    flux_reference_pred,
    pixart_reference_latents,
    pixart_reference_pred,
    sd3_reference_pred,
)

G = 4.0
STEPS = 2


def _checkpoint_bytes(model_dir: str) -> int:
    from tessera.models.diffusers_loader import DiffusersDir, load_transformer

    report: dict = {}
    load_transformer(DiffusersDir.open(model_dir), report=report)
    return report["bytes_read"]


def _pixart(engine, model_dir, mode="exact", height=32, width=32):
    engine.generate_images("a red cube", steps=STEPS, height=height, width=width, guidance_scale=G, seed=3,
                           mode=mode, output="latent", trace=True)
    last = engine.last
    for step in last["trace"]:
        ref = pixart_reference_pred(model_dir, step["latents"], step["t"], last["embeds"], G)
        assert (ref - step["pred"]).abs().max().item() <= 1e-4, f"{mode} t={step['t']}"
    ref = pixart_reference_latents(model_dir, "a red cube", STEPS, height, width, G, seed=3)
    assert_latents_close(last["latents"], ref)
    return last


def _flux(engine, model_dir):
    engine.generate_images("a green tree", steps=STEPS, height=40, width=32, guidance_scale=0.0, seed=2,
                           output="latent", trace=True)
    last = engine.last
    for step in last["trace"]:
        ref = flux_reference_pred(model_dir, step["latents"], step["t"], last["embeds"])
        assert (ref - step["pred"]).abs().max().item() <= 1e-4, f"t={step['t']}"
    assert_latents_close(last["latents"], flux_reference_latents(model_dir, "a green tree", STEPS, 40, 32, seed=2))
    return last


@pytest.mark.timeout(900)
def test_pp2_reads_only_its_stage_and_matches_diffusers(make_controller, tiny_pixart, tiny_flux3, tiny_sd3):
    ctl = make_controller({"pp": 2})
    for model_dir, blocks in ((tiny_pixart, [[0, 1], [1, 2]]), (tiny_flux3, [[0, 1], [1, 3]]),
                              (tiny_sd3, [[0, 1], [1, 2]])):
        engine = engine_on(lambda _: ctl, {"pp": 2}, model_dir)
        total = _checkpoint_bytes(model_dir)
        loaded = engine.stats()["loaded_bytes_per_rank"]
        print(f"pp=2 {engine.dir.family}: bytes read per rank {loaded}, single device {total}")
        assert sum(loaded) == total and max(loaded) < total  # every tensor read by exactly one stage
        assert [list(i.blocks) for i in engine.info] == blocks
        if engine.dir.family == "pixart":
            last = _pixart(engine, model_dir)
            kinds = last["comm_by_rank"][0]["by_kind"]
            # CFG halves as two micro-batches: stage 0 sends two carries per step
            assert kinds["pp_activations"]["calls"] == STEPS * 2 * 4  # x, text, t6, t_emb
            assert kinds["pp_pred"]["calls"] == STEPS
        elif engine.dir.family == "flux":
            _flux(engine, model_dir)
        else:
            engine.generate_images("a white boat", steps=STEPS, height=32, width=32, guidance_scale=G, seed=4,
                                   output="latent", trace=True)
            for step in engine.last["trace"]:
                ref = sd3_reference_pred(model_dir, step["latents"], step["t"], engine.last["embeds"], G)
                assert (ref - step["pred"]).abs().max().item() <= 1e-4
        engine.close()


@pytest.mark.timeout(900)
def test_flux_pp2_x_tp2(make_controller, tiny_flux3):
    from tessera.tests.diffusion_fixtures import tp_split_bytes

    engine = engine_on(make_controller, {"pp": 2, "tp": 2}, tiny_flux3)
    full, _ = tp_split_bytes(tiny_flux3)
    per_rank = engine.stats()["param_bytes_per_rank"]
    print(f"flux pp=2 x tp=2: params per rank {per_rank}, single device {full}")
    assert max(per_rank) < 0.5 * full
    assert engine.stats()["loaded_bytes_per_rank"] == per_rank
    _flux(engine, tiny_flux3)


@pytest.mark.timeout(900)
def test_pixart_pp2_x_sp2(make_controller, tiny_pixart):
    engine = engine_on(make_controller, {"pp": 2, "sp": 2}, tiny_pixart)
    exact = _pixart(engine, tiny_pixart, "exact", height=40, width=32)["latents"]
    assert engine.last["comm_by_rank"][0]["by_kind"]["pp_activations"]["calls"] == STEPS * 2 * 4  # 2 micro-batches
    # stale patch K/V keep per-layer state: one micro-batch per step, still exact with a full warm-up
    engine.generate_images("a red cube", steps=STEPS, height=40, width=32, guidance_scale=G, seed=3,
                           mode="displaced", warmup_steps=STEPS, output="latent")
    assert engine.last["comm_by_rank"][0]["by_kind"]["pp_activations"]["calls"] == STEPS * 4
    assert_latents_close(engine.last["latents"], exact)


def test_bad_plans_fail_on_the_driver(tiny_pixart, tiny_flux3):
    from tessera.config import ConfigError
    from tessera.runtime.diffusion.engine import DiffusionEngine

    with pytest.raises(ConfigError, match=r"pp=3 pipeline stages for a transformer of 2 blocks.*use pp <= 2"):
        DiffusionEngine.load(_NoWorkers({"pp": 3}), tiny_pixart)
    with pytest.raises(ConfigError, match=r"pp=4 .* of 3 blocks.*use pp <= 3"):
        DiffusionEngine.load(_NoWorkers({"pp": 4}), tiny_flux3)
    with pytest.raises(ConfigError, match=r"tp=4 does not divide the model's 6 attention heads; "
                                          r"use a tp in \[1, 2, 3, 6\]"):
        DiffusionEngine.load(_NoWorkers({"tp": 4}), tiny_flux3)
    with pytest.raises(ConfigError, match="use pp or offload"):
        from tessera.options import OffloadConfig

        DiffusionEngine.load(_NoWorkers({"pp": 2}), tiny_pixart, offload=OffloadConfig(device_budget_bytes=1 << 20))


def test_stages_cut_both_flux_lists_as_one_sequence_by_bytes():
    """No workers: the stage models of a meta Flux partition its state dict; a stage may span both lists."""
    from tessera.models import flux
    from tessera.models.diffusers_loader import build_transformer
    from tessera.models.dit_layers import OnOtherStage
    from tessera.parallel.dit_pipeline import apply_pipeline_stages, stage_ranges

    cfg = {"in_channels": 16, "num_layers": 3, "num_single_layers": 6, "attention_head_dim": 8,
           "num_attention_heads": 2, "joint_attention_dim": 16, "pooled_projection_dim": 16,
           "axes_dims_rope": [2, 2, 4]}
    full = set(build_transformer("flux", cfg).state_dict())
    seen: list[set] = []
    ranges = []
    for stage in range(3):
        model = build_transformer("flux", cfg)
        ranges.append(apply_pipeline_stages(model, flux.STAGES, stage, 3))
        blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
        here = [isinstance(b, OnOtherStage) for b in blocks]
        assert [i for i, absent in enumerate(here) if not absent] == list(ranges[-1])
        seen.append(set(model.state_dict()))
    assert set().union(*seen) == full and sum(len(s) for s in seen) == len(full)  # each tensor on one stage
    assert any(r.start < 3 < r.stop for r in ranges)  # one stage holds double and single blocks
    assert "x_embedder.weight" in seen[0] and "proj_out.weight" in seen[2] and "proj_out.weight" not in seen[0]
    # a double block weighs about two single blocks: balanced by bytes, not by count
    assert stage_ranges([2] * 19 + [1] * 38, 2) == [range(0, 19), range(19, 57)]
