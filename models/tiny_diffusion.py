"""Tiny random diffusers pipelines on disk, built with no download.

Why: tests, the demo and the benchmarks need complete diffusers-format
directories (``model_index.json``, ``transformer/``, ``scheduler/``, ``vae/``,
text encoders and tokenizers) to load through the same path as a real
checkpoint, and no PyPI package ships diffusion weights. Parts are random,
seeded, and saved with ``save_pretrained`` (safetensors). A directory that
already holds a ``model_index.json`` is reused as is (the cache).

Sizes are chosen so that the parallel tests can run any sp in {2, 3, 4}:
12 attention heads (divisible by 2, 3 and 4 for Ulysses).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

FAMILIES = ("pixart", "flux", "sd3")


def default_cache_dir() -> Path:
    """``$TESSERA_CACHE`` or ``~/.cache/tessera``."""
    return Path(os.environ.get("TESSERA_CACHE", str(Path.home() / ".cache" / "tessera")))


def build_tiny_diffusion(family: str, path: str | os.PathLike, *, layers: int = 2, heads: int = 12,
                         head_dim: int = 4, seed: int = 0) -> Path:
    """Write (once) a tiny random ``family`` pipeline directory at ``path`` and return it."""
    if family not in FAMILIES:
        raise ValueError(f"unknown diffusion family {family!r}; choose one of {', '.join(FAMILIES)}")
    path = Path(path)
    if (path / "model_index.json").exists():
        return path
    import torch

    torch.manual_seed(seed)
    builder: Callable = {"pixart": _pixart, "flux": _flux, "sd3": _sd3}[family]
    pipe = builder(layers, heads, head_dim)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    pipe.save_pretrained(tmp, safe_serialization=True)
    try:
        tmp.replace(path)  # atomic publish: a concurrent builder may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _vae(latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=32, **extra)


def _t5(d_model: int = 16):
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    tok = T5TokenizerFast()
    enc = T5EncoderModel(T5Config(vocab_size=max(128, len(tok)), d_model=d_model, d_kv=8, d_ff=32, num_layers=1,
                                  num_heads=2, relative_attention_num_buckets=8)).eval()
    return enc, tok


def _clip(hidden: int = 16, proj: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok = CLIPTokenizer(model_max_length=77)
    cfg = CLIPTextConfig(vocab_size=max(128, len(tok)), hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=proj)
    return cfg, tok, CLIPTextModel, CLIPTextModelWithProjection


def _pixart(layers: int, heads: int, head_dim: int):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    enc, tok = _t5()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
        cross_attention_dim=heads * head_dim, caption_channels=enc.config.d_model, sample_size=16, patch_size=2,
    )
    return PixArtSigmaPipeline(tokenizer=tok, text_encoder=enc, vae=_vae(4), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())


def _flux(layers: int, heads: int, head_dim: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    enc, tok = _t5()
    cfg, ctok, clip_cls, _ = _clip()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=max(1, layers // 2), num_single_layers=max(1, layers - layers // 2),
        attention_head_dim=head_dim * 2, num_attention_heads=heads // 2, joint_attention_dim=enc.config.d_model,
        pooled_projection_dim=cfg.hidden_size, guidance_embeds=False, axes_dims_rope=_rope_axes(head_dim * 2),
    )
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1, scaling_factor=0.9), text_encoder=clip_cls(cfg).eval(), tokenizer=ctok,
                        text_encoder_2=enc, tokenizer_2=tok, transformer=transformer)


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Split a Flux head into (index, row, column) RoPE axes of even widths, like Flux's (16, 56, 56)."""
    if head_dim == 8:
        return (2, 2, 4)
    side = (head_dim * 7 // 16) // 2 * 2
    return (head_dim - 2 * side, side, side)


def _sd3(layers: int, heads: int, head_dim: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    enc, tok = _t5(d_model=32)
    cfg, ctok, _, clip_proj = _clip()
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * cfg.projection_dim, out_channels=4, pos_embed_max_size=32,
    )
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=_vae(4, shift_factor=0.1, scaling_factor=0.9),
                                    text_encoder=clip_proj(cfg).eval(), tokenizer=ctok,
                                    text_encoder_2=clip_proj(cfg).eval(), tokenizer_2=ctok,
                                    text_encoder_3=enc, tokenizer_3=tok)
