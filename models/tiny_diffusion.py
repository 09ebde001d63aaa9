"""Tiny random diffusers pipelines on disk, built with no download.

Why: tests, the demo and the benchmarks need complete diffusers-format
directories (``model_index.json``, ``transformer/``, ``scheduler/``, ``vae/``,
text encoders and tokenizers) to load through the same path as a real
checkpoint, and no PyPI package ships diffusion weights. Parts are random,
seeded, and saved with ``save_pretrained`` (safetensors). A directory that
already holds a ``model_index.json`` is reused as is (the cache).

The family-specific part (transformer config, pipeline class, which encoders)
is each family file's ``tiny_config`` / ``tiny_twin_config`` /
``tiny_pipeline``; the shared parts (tiny T5, CLIP, VAE) are here.
Default sizes let the parallel tests run any sp in {2, 3, 4}: 12 attention
heads (divisible by 2, 3 and 4 for Ulysses).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from tessera.models.diffusers_loader import FAMILIES, family_of


def default_cache_dir() -> Path:
    """``$TESSERA_CACHE`` or ``~/.cache/tessera``."""
    return Path(os.environ.get("TESSERA_CACHE", str(Path.home() / ".cache" / "tessera")))


def build_tiny_diffusion(family: str, path: str | os.PathLike, *, layers: int = 2, heads: int = 12,
                         head_dim: int = 4, seed: int = 0) -> Path:
    """Write (once) a tiny random ``family`` pipeline directory at ``path`` and return it."""
    if family not in FAMILIES:
        raise ValueError(f"unknown diffusion family {family!r}; choose one of {', '.join(FAMILIES)}")
    module = FAMILIES[family]
    return _write(Path(path), lambda: module.tiny_pipeline(module.tiny_config(layers, heads, head_dim)), seed)


def build_tiny_twin(released: Mapping[str, Any], path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write (once) a tiny random pipeline whose transformer has ``released``'s flags and structure at tiny sizes.

    ``released`` is a published ``transformer/config.json``. The saved config keeps every key of it
    (class name included: PixArt-Sigma's generic ``Transformer2DModel``), with the family's tiny sizes.
    """
    module = family_of(released)
    config = module.tiny_twin_config(released)
    return _write(Path(path), lambda: module.tiny_pipeline(config), seed, transformer_config=config)


def _write(path: Path, make, seed: int, transformer_config: Mapping[str, Any] | None = None) -> Path:
    if (path / "model_index.json").exists():
        return path
    import torch

    torch.manual_seed(seed)
    pipe = make()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    pipe.save_pretrained(tmp, safe_serialization=True)
    if transformer_config is not None:  # diffusers writes only its own class's keys: restore the release's
        cfg_file = tmp / "transformer" / "config.json"
        saved = json.loads(cfg_file.read_text())
        cfg_file.write_text(json.dumps({**saved, **transformer_config}, indent=2, sort_keys=True))
    try:
        tmp.replace(path)  # atomic publish: a concurrent builder may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_vae(latent_channels: int, **extra):
    """A two-level AutoencoderKL (factor 2) with ``latent_channels``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=32, **extra)


def tiny_t5(d_model: int = 16):
    """A one-layer T5 encoder of width ``d_model`` and the default (toy) T5 tokenizer."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    tok = T5TokenizerFast()
    enc = T5EncoderModel(T5Config(vocab_size=max(128, len(tok)), d_model=d_model, d_kv=8, d_ff=32, num_layers=1,
                                  num_heads=2, relative_attention_num_buckets=8)).eval()
    return enc, tok


def tiny_clip(hidden: int = 16, projection_dim: int | None = None):
    """A one-layer CLIP text encoder (with a projection of ``projection_dim`` when given) and its tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok = CLIPTokenizer(model_max_length=77)
    cfg = CLIPTextConfig(vocab_size=max(128, len(tok)), hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim or hidden)
    model = CLIPTextModelWithProjection(cfg) if projection_dim else CLIPTextModel(cfg)
    return model.eval(), tok
