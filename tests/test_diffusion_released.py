"""Released diffusion models: their published transformer configs, and tiny twins of them against diffusers.

1. Each published ``transformer/config.json`` in ``tests/data/released/diffusers/`` (PixArt-Sigma,
   SD3-medium, SD3.5-medium/large, FLUX.1-dev/schnell) parses with every flag supported (the table
   says which would be refused: none), and tessera's transformer built on the meta device has the
   published parameter count (within the tolerance ``released.json`` gives and sources) and, where
   published, the checkpoint's tensor count and bytes.
2. Flags tessera does not implement are refused by name, before any worker starts.
3. A scaled-down twin of each (same flags and structure, tiny sizes, saved by diffusers) matches the
   diffusers pipeline per step and end to end on 1 rank, on sp=2 (exact patches; Ulysses for the SD3.5
   twins) and on tp=2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tessera.errors import ConfigError
from tessera.models.diffusers_loader import ModelDirError, build_transformer, family_of
from tessera.models.dit_family import parameter_count
from tessera.models.tiny_diffusion import build_tiny_twin
from tessera.tests.diffusion_reference import (
    assert_latents_close,
    flux_reference_latents,
    flux_reference_pred,
    pixart_reference_latents,
    pixart_reference_pred,
    sd3_reference_latents,
    sd3_reference_pred,
)
from tessera.tests.llm_testing import local_controller  # noqa: F401 - fixture

RELEASED = Path(__file__).resolve().parent / "data" / "released" / "diffusers"
MANIFEST = json.loads((RELEASED / "released.json").read_text())
NAMES = sorted(k for k in MANIFEST if not k.startswith("_"))
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# name -> (family, flags of its config tessera refuses). Every released flag is supported.
TABLE = {
    "pixart-sigma-xl-2-1024-ms": ("pixart", set()),
    "sd3-medium": ("sd3", set()),
    "sd3.5-medium": ("sd3", set()),
    "sd3.5-large": ("sd3", set()),
    "flux.1-dev": ("flux", set()),
    "flux.1-schnell": ("flux", set()),
}
STEPS, H, W, PROMPT = 2, 32, 32, "a small red house"
GUIDANCE = {"pixart": 4.0, "sd3": 4.0, "flux.1-dev": 3.5, "flux.1-schnell": 0.0}


def released_config(name: str) -> dict:
    return json.loads((RELEASED / name / "transformer" / "config.json").read_text())


def support_list(name: str) -> dict[str, str]:
    """How tessera treats each key of ``name``'s config: metadata, read, checked, no effect or refused."""
    cfg = released_config(name)
    return {key: family_of(cfg).CONFIG_KEYS.classify(key, value) for key, value in cfg.items()}


def test_the_table_covers_every_released_config():
    assert sorted(TABLE) == NAMES == sorted(p.name for p in RELEASED.iterdir() if p.is_dir())


@pytest.mark.parametrize("name", NAMES)
def test_released_config_parses_with_every_flag_and_has_the_published_size(name):
    family, refused = TABLE[name]
    cfg, facts = released_config(name), MANIFEST[name]
    module = family_of(cfg)
    assert module.NAME == family
    support = support_list(name)
    print(f"{name}: {support}")
    assert {k for k, how in support.items() if how == "refused"} == refused
    module.parse(cfg)  # the whole config: nothing refused
    model = build_transformer(family, cfg)  # meta device: no memory
    state = model.state_dict()
    count = parameter_count(model) if facts["counts"] == "parameters" else sum(t.numel() for t in state.values())
    published = facts["published_count"]
    print(f"{name}: tessera {count:,} vs published {published:,} ({facts['counts']}); {len(state)} tensors")
    assert abs(count - published) <= facts["tolerance"] * published, (count, published)
    if "checkpoint_tensors" in facts:
        assert len(state) == facts["checkpoint_tensors"]
    if "checkpoint_bytes" in facts:
        stored = sum(t.numel() for t in state.values()) * DTYPE_BYTES[facts["checkpoint_dtype"]]
        assert stored == facts["checkpoint_bytes"]  # the checkpoint's tensor list, to the byte


@pytest.mark.parametrize("name,change,match", [
    ("pixart-sigma-xl-2-1024-ms", {"norm_type": "ada_norm_zero"}, "not supported"),
    ("pixart-sigma-xl-2-1024-ms", {"attention_type": "gated"}, "attention_type='gated'"),
    ("pixart-sigma-xl-2-1024-ms", {"norm_elementwise_affine": True}, "norm_elementwise_affine=True"),
    ("pixart-sigma-xl-2-1024-ms", {"use_rope": True}, "'use_rope'"),
    ("sd3.5-large", {"qk_norm": "layer_norm"}, "qk_norm='layer_norm'"),
    ("sd3.5-medium", {"dual_attention_layers": [0, 24]}, "dual_attention_layers"),
    ("sd3-medium", {"pos_embed_max_size": None}, "pos_embed_max_size"),
    ("sd3-medium", {"skip_layers": [7]}, "'skip_layers'"),
    ("flux.1-dev", {"patch_size": 2}, "patch_size=2"),
    ("flux.1-dev", {"axes_dims_rope": [16, 56, 64]}, "axes_dims_rope"),
    ("flux.1-schnell", {"_class_name": "Flux2Transformer2DModel"}, "not supported"),
])
def test_unsupported_flags_are_refused_by_name(name, change, match):
    cfg = {**released_config(name), **change}
    with pytest.raises((ConfigError, ModelDirError), match=match):
        family_of(cfg).parse(cfg)


def test_unsupported_flag_is_refused_before_workers_start(tmp_path):
    """The driver parses the config before any rpc: a controller whose workers must not be called."""
    from tessera.models.tiny_diffusion import build_tiny_diffusion
    from tessera.runtime.diffusion.engine import DiffusionEngine
    from tessera.tests.diffusion_fixtures import NoWorkers

    path = build_tiny_diffusion("sd3", tmp_path / "sd3")
    cfg_file = path / "transformer" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "qk_norm": "layer_norm"}))
    with pytest.raises(ConfigError, match="qk_norm='layer_norm'"):
        DiffusionEngine.load(NoWorkers({}), path)


# -- tiny twins against diffusers ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def twins(session_tmp) -> dict[str, str]:
    return {name: str(build_tiny_twin(released_config(name), session_tmp / f"twin-{name}")) for name in NAMES}


def _guidance(name: str, family: str) -> float:
    return GUIDANCE.get(name, GUIDANCE.get(family))


def _check_twin(engine, name: str, model_dir: str, mode: str = "exact") -> None:
    family = TABLE[name][0]
    g = _guidance(name, family)
    engine.generate_images(PROMPT, steps=STEPS, height=H, width=W, guidance_scale=g, seed=1, mode=mode,
                           output="latent", trace=True)
    last = engine.last
    assert len(last["trace"]) == STEPS
    for step in last["trace"]:
        if family == "pixart":
            want = pixart_reference_pred(model_dir, step["latents"], step["t"], last["embeds"], g)
        elif family == "sd3":
            want = sd3_reference_pred(model_dir, step["latents"], step["t"], last["embeds"], g)
        else:
            want = flux_reference_pred(model_dir, step["latents"], step["t"], last["embeds"], guidance_scale=g)
        assert (want - step["pred"]).abs().max().item() <= 1e-4, f"{name} {mode} t={step['t']}"
    if family == "pixart":
        ref = pixart_reference_latents(model_dir, PROMPT, STEPS, H, W, g, seed=1)
    elif family == "sd3":
        ref = sd3_reference_latents(model_dir, PROMPT, STEPS, H, W, g, seed=1)
    else:
        ref = flux_reference_latents(model_dir, PROMPT, STEPS, H, W, seed=1, guidance_scale=g)
    assert_latents_close(last["latents"], ref)


def test_twin_configs_keep_every_released_flag(twins):
    for name, path in twins.items():
        twin = json.loads((Path(path) / "transformer" / "config.json").read_text())
        released = released_config(name)
        assert set(released) <= set(twin), name
        sizes = {"num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "in_channels",
                 "out_channels", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
                 "cross_attention_dim", "caption_channels", "pos_embed_max_size", "axes_dims_rope",
                 "dual_attention_layers"}
        assert {k: v for k, v in twin.items() if k in released and k not in sizes} == \
            {k: v for k, v in released.items() if k not in sizes}, name
        assert bool(twin.get("dual_attention_layers")) == bool(released.get("dual_attention_layers"))


@pytest.mark.timeout(900)
def test_twins_on_one_rank_match_diffusers(local_controller, twins):  # noqa: F811
    from tessera.runtime.diffusion.engine import DiffusionEngine

    for name in NAMES:
        engine = DiffusionEngine.load(local_controller, twins[name], progress=False)
        try:
            _check_twin(engine, name, twins[name])
        finally:
            engine.close()


@pytest.mark.timeout(900)
def test_twins_on_sp2_match_diffusers(make_controller, twins):
    from tessera.tests.diffusion_fixtures import engine_on

    for name in NAMES:
        engine = engine_on(make_controller, {"sp": 2}, twins[name])
        _check_twin(engine, name, twins[name], "exact")
        if name.startswith("sd3.5"):  # the new MMDiT-X attention under sequence parallelism, too
            _check_twin(engine, name, twins[name], "ulysses")


@pytest.mark.timeout(900)
def test_twins_on_tp2_match_diffusers(make_controller, twins):
    from tessera.tests.diffusion_fixtures import engine_on

    for name in NAMES:
        engine = engine_on(make_controller, {"tp": 2}, twins[name])
        _check_twin(engine, name, twins[name])
        if name == "sd3.5-medium":  # attn2 is sharded: its q/k/v by heads, its output row-split
            kinds = engine.last["comm_by_rank"][0]["by_kind"]
            # per step: 3 blocks x 4 row-split linears (+ to_add_out, ff_context on the 2 non-last blocks)
            # + attn2.to_out on the 2 dual blocks
            assert kinds["tp_all_reduce"]["calls"] == STEPS * (3 * 2 + 2 * 2 + 2), kinds
