"""Single-process checks: tessera's PixArt/Flux/SD3 modules vs diffusers, the diffusers-directory loader,
sliced reads of sharded checkpoints, and validation that fails before any worker starts."""

from __future__ import annotations

import json

import pytest
import torch

from tessera.models.diffusers_loader import DiffusersDir, ModelDirError, load_transformer
from tessera.models.dit_layers import TokenShard, patchify, split_rows
from tessera.parallel.patch import PatchConfig
from tessera.runtime.diffusion.request import DiffusionRequest
from tessera.tests.diffusion_fixtures import tiny_pixart, tiny_sd3  # noqa: F401 - fixtures


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    return model.eval()


def test_pixart_matches_diffusers_on_odd_grid():
    from diffusers import PixArtTransformer2DModel

    from tessera.models.pixart import PixArtConfig, PixArtTransformer

    ref = _perturb(PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                            num_layers=2, cross_attention_dim=16, sample_size=8, caption_channels=12))
    mine = PixArtTransformer(PixArtConfig.from_dict(dict(ref.config))).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    x, txt, t = torch.randn(2, 4, 10, 14), torch.randn(2, 5, 12), torch.tensor([500.0, 20.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=txt, timestep=t, encoder_attention_mask=mask).sample
        got = mine(x, txt, t, text_mask=mask)
    assert (want - got).abs().max().item() <= 1e-4


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_flux_matches_diffusers(guidance_embeds):
    from diffusers import FluxTransformer2DModel

    from tessera.models.flux import FluxConfig, FluxTransformer

    ref = _perturb(FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                          attention_head_dim=8, num_attention_heads=4, joint_attention_dim=12,
                                          pooled_projection_dim=10, guidance_embeds=guidance_embeds,
                                          axes_dims_rope=(2, 2, 4)))
    mine = FluxTransformer(FluxConfig.from_dict(dict(ref.config))).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    lat, txt, pooled, t = torch.randn(2, 4, 6, 10), torch.randn(2, 5, 12), torch.randn(2, 10), torch.tensor([0.7, 0.3])
    g = torch.tensor([3.5, 3.5]) if guidance_embeds else None
    ids = torch.zeros(3, 5, 3)
    ids[..., 1], ids[..., 2] = torch.arange(3)[:, None], torch.arange(5)[None]
    with torch.no_grad():
        want = ref(patchify(lat, 2), encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                   img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(5, 3), guidance=g).sample
        got = patchify(mine(lat, txt, pooled, t, guidance=g), 2)
    assert (want - got).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("qk_norm,dual", [(None, ()), ("rms_norm", ()), ("rms_norm", (0, 2))],
                         ids=["sd3", "qk-norm", "sd3.5-dual-attention"])
def test_sd3_matches_diffusers(qk_norm, dual):
    from diffusers import SD3Transformer2DModel

    from tessera.models.sd3 import SD3Config, SD3Transformer

    ref = _perturb(SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=3 if dual else 2,
                                         attention_head_dim=4, num_attention_heads=4, joint_attention_dim=12,
                                         caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
                                         pos_embed_max_size=24, qk_norm=qk_norm, dual_attention_layers=dual))
    ref.pos_embed.pos_embed.data = SD3Transformer2DModel(  # the table is a fixed buffer, not a weight
        sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=4, num_attention_heads=4,
        caption_projection_dim=16, pos_embed_max_size=24).pos_embed.pos_embed
    mine = SD3Transformer(SD3Config.from_dict(dict(ref.config))).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    assert torch.allclose(mine.pos_embed.pos_embed, ref.pos_embed.pos_embed, atol=1e-6)  # own table == diffusers'
    x, txt, pooled, t = torch.randn(2, 4, 10, 14), torch.randn(2, 5, 12), torch.randn(2, 10), torch.tensor([700.0, 3.0])
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t).sample
        got = mine(x, txt, pooled, t)
    assert (want - got).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def test_loader_reads_sharded_checkpoint_and_slices(tmp_path):
    from diffusers import PixArtTransformer2DModel

    ref = _perturb(PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                            num_layers=2, cross_attention_dim=16, sample_size=8, caption_channels=12))
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "vae": ["diffusers", "AutoencoderKL"]}))
    model_dir = DiffusersDir.open(tmp_path)
    assert model_dir.family == "pixart"
    assert len(set(model_dir.weight_files().values())) > 1  # really sharded
    mine = load_transformer(model_dir)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(mine.state_dict()[name], tensor), name
    name = "transformer_blocks.1.attn1.to_q.weight"
    part = model_dir.read_tensors([name], slicer=lambda n, shape: (slice(8, 16), slice(None)))[name]
    assert torch.equal(part, ref.state_dict()[name][8:16])


def test_loader_errors_name_the_fix(tmp_path):
    with pytest.raises(ModelDirError, match="no model_index.json"):
        DiffusersDir.open(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "UNet2DConditionModel"],
                                                           "scheduler": ["diffusers", "X"], "vae": ["diffusers", "Y"]}))
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelDirError, match="not supported; tessera runs"):
        DiffusersDir.open(tmp_path)


def test_bands_and_request_validation():
    assert split_rows(11, 3) == [(0, 4), (4, 8), (8, 11)]
    assert split_rows(7, 4) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    with pytest.raises(ValueError, match="at most 2 ranks"):
        split_rows(2, 3)
    with pytest.raises(ValueError, match="not inside"):
        TokenShard(4, 4, 3, 3)
    with pytest.raises(ValueError, match="warmup_steps"):
        PatchConfig(mode="displaced", warmup_steps=-1)
    with pytest.raises(ValueError, match="unknown"):
        PatchConfig(mode="ring")
    with pytest.raises(ValueError, match="negative prompts"):
        DiffusionRequest(prompts=("a", "b"), negative_prompts=("",))
    with pytest.raises(ValueError, match="steps"):
        DiffusionRequest(prompts=("a",), negative_prompts=("",), steps=0)


def test_tiny_pipeline_is_cached(tmp_path):
    from tessera.models.tiny_diffusion import build_tiny_diffusion

    path = build_tiny_diffusion("pixart", tmp_path / "p")
    stamp = (path / "model_index.json").stat().st_mtime_ns
    assert build_tiny_diffusion("pixart", tmp_path / "p") == path
    assert (path / "model_index.json").stat().st_mtime_ns == stamp
    assert {"transformer", "scheduler", "vae", "text_encoder", "tokenizer"} <= {p.name for p in path.iterdir()}
    with pytest.raises(ValueError, match="unknown diffusion family"):
        build_tiny_diffusion("unet", tmp_path / "u")


# -- requests refused on the driver, before any worker runs ----------------------------------------------------

BAD_REQUESTS = [
    ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ({"guidance_scale": -1.0}, "guidance_scale must be a finite number >= 0"),
    ({"guidance_scale": "4.5"}, "guidance_scale"),
    ({"guidance_scale": True}, "guidance_scale"),
    ({"height": 0}, "height must be an integer >= 8"),
    ({"width": -64}, "width must be an integer >= 8"),
    ({"height": 64.0}, "height must be an integer"),
    ({"width": "64"}, "width must be an integer"),
    ({"height": 34}, "multiples of 4 pixels"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"steps": -3}, "steps must be an integer >= 1"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"steps": True}, "steps must be an integer"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*64 - 1\]"),
    ({"seed": 2**64}, "seed must be an integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"seed": "7"}, "seed must be an integer"),
    ({"max_sequence_length": 0}, "max_sequence_length must be an integer >= 1"),
    ({"max_sequence_length": -8}, "max_sequence_length must be an integer >= 1"),
    ({"max_sequence_length": 16.0}, "max_sequence_length must be an integer"),
    ({"max_sequence_length": 513}, "max_sequence_length 513 exceeds 512"),
    ({"max_sequence_length": 100_000}, "use at most 512"),
    ({"prompts": 123}, "prompts must be a string or a list of strings, got int"),
    ({"prompts": None}, "prompts must be a string or a list of strings, got NoneType"),
    ({"prompts": b"a cat"}, "got bytes"),
    ({"prompts": []}, "prompts must be a non-empty list"),
    ({"prompts": ["a cat", 3]}, r"prompts\[1\] must be a string, got int"),
    ({"negative_prompt": [None]}, r"negative_prompt\[0\] must be a string"),
    ({"negative_prompt": ["x", "y"]}, "2 negative prompts for 1 prompts"),
    ({"negative_prompt": 5}, "negative_prompt must be a string or a list of strings"),
    ({"mode": 3}, "mode 3 is unknown"),
    ({"output": "png"}, "output must be 'image' or 'latent'"),
    ({"trace": "yes"}, "trace must be true or false"),
    ({"partial_fraction": float("nan")}, "partial_fraction"),
    ({"warmup_steps": -1}, "warmup_steps"),
]


def _driver_only_engine(path):
    """A DiffusionEngine whose controller has no workers: only driver-side validation can run."""
    from tessera.options import DiffusionOptions
    from tessera.runtime.diffusion.engine import DiffusionEngine
    from tessera.runtime.diffusion.protocol import LoadSpec
    from tessera.tests.diffusion_fixtures import NoWorkers

    return DiffusionEngine(NoWorkers({}), DiffusersDir.open(path), [], DiffusionOptions(progress=False),
                           LoadSpec(str(path)))


@pytest.mark.parametrize("bad,match", BAD_REQUESTS, ids=[f"{next(iter(b))}={b[next(iter(b))]!r}" for b, _ in BAD_REQUESTS])
def test_bad_requests_are_refused_before_any_worker_runs(tiny_pixart, bad, match):
    engine = _driver_only_engine(tiny_pixart)
    kw = {"prompts": "a cat", "steps": 2, "height": 32, "width": 32, **bad}
    with pytest.raises(ValueError, match=match):
        engine.generate_images(kw.pop("prompts"), **kw)


def test_image_beyond_the_sd3_position_table_is_refused_on_the_driver(tiny_sd3):
    engine = _driver_only_engine(tiny_sd3)
    # tiny SD3: VAE factor 2 x patch 2, a 32-patch table: 128 pixels a side at most
    with pytest.raises(ValueError, match="exceeds this SD3 checkpoint's position table"):
        engine.generate_images("a cat", steps=1, height=132, width=64)
