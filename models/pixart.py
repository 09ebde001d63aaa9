"""PixArt-alpha / PixArt-Sigma: a DiT with cross-attention to T5 text and adaLN-single.

Own compact implementation whose parameter names equal diffusers'
``PixArtTransformer2DModel`` checkpoint names, so a diffusers ``transformer/``
directory loads as is. The forward works on a *shard* of image rows: the
patch embedding (a stride-p convolution), the position table, adaLN
modulation, cross-attention and the MLP are all token-local; only the
image-token self-attention (``attn1``) needs other ranks' tokens, and it calls
the pluggable ``self_attn`` function that ``parallel/`` provides.

Parallel plan (what is parallel; ``parallel/`` says how):
- patch/sequence parallel: ``transformer_blocks.*.attn1`` (image self-attention)
- tensor parallel: column ``attn1/attn2.to_q|to_k|to_v``, ``ff.net.0.proj``;
  row ``attn1/attn2.to_out.0``, ``ff.net.2``
- pipeline stages may cut between ``transformer_blocks``; the first stage holds the patch, time and
  caption embeddings, the last the final modulation and ``proj_out``
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tessera.models.dit_layers import (
    Attention,
    GeluMLP,
    TimestepMLP,
    TokenShard,
    local_blocks,
    local_self_attention,
    modulate,
    norm_modulate,
    sincos_pos_embed_2d,
    timestep_embedding,
    unpatchify,
    whole_model,
)


@dataclass(frozen=True)
class DiffusionParallelSpec:
    """What a family declares parallel: module-name patterns, read by ``parallel/``.

    ``colwise_gather``: column-split linears whose whole output every rank
    needs (adaLN modulation): each rank computes its rows, then all-gather.
    ``rowwise_pieces``: row-split linears whose input is a concatenation of
    separately column-split parts, as ``(pattern, relative widths)``; each
    part is split over ``tp`` on its own (Flux's single-block ``proj_out``
    reads ``[attention heads | MLP columns]`` = widths ``(1, 4)``).
    ``stage_blocks``: the block lists, in forward order, that pipeline stages
    cut as one sequence; ``embed`` / ``head``: top-level modules or
    parameters only the first / last stage holds.
    """

    patch_attention: tuple[str, ...]
    colwise: tuple[str, ...]
    rowwise: tuple[str, ...]
    stage_blocks: tuple[str, ...]
    heads_attr: str = "num_attention_heads"
    rowwise_pieces: tuple[tuple[str, tuple[int, ...]], ...] = ()
    colwise_gather: tuple[str, ...] = ()
    embed: tuple[str, ...] = ()
    head: tuple[str, ...] = ()


PARALLEL_SPEC = DiffusionParallelSpec(
    patch_attention=("transformer_blocks.*.attn1",),
    colwise=(
        "transformer_blocks.*.attn1.to_q", "transformer_blocks.*.attn1.to_k", "transformer_blocks.*.attn1.to_v",
        "transformer_blocks.*.attn2.to_q", "transformer_blocks.*.attn2.to_k", "transformer_blocks.*.attn2.to_v",
        "transformer_blocks.*.ff.net.0.proj",
    ),
    rowwise=("transformer_blocks.*.attn1.to_out.0", "transformer_blocks.*.attn2.to_out.0", "transformer_blocks.*.ff.net.2"),
    stage_blocks=("transformer_blocks",),
    embed=("pos_embed", "adaln_single", "caption_projection"),
    head=("scale_shift_table", "proj_out"),
)


@dataclass(frozen=True)
class PixArtConfig:
    """The fields of a diffusers PixArt ``transformer/config.json`` that change the math."""

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = 8
    num_layers: int = 28
    cross_attention_dim: int = 1152
    sample_size: int = 128
    patch_size: int = 2
    caption_channels: int | None = None
    interpolation_scale: float | None = None
    use_additional_conditions: bool | None = None
    norm_eps: float = 1e-6
    attention_bias: bool = True

    def __post_init__(self) -> None:
        if self.num_attention_heads * self.attention_head_dim % 2:
            raise ValueError("PixArt inner dim (heads x head_dim) must be even for the 2-D sin-cos table")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "PixArtConfig":
        if cfg.get("norm_type", "ada_norm_single") != "ada_norm_single":
            raise ValueError(f"PixArt needs norm_type 'ada_norm_single', config has {cfg.get('norm_type')!r}")
        names = cls.__dataclass_fields__
        return cls(**{k: cfg[k] for k in names if k in cfg})

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_ch(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def additional_conditions(self) -> bool:
        if self.use_additional_conditions is None:
            return self.sample_size == 128
        return bool(self.use_additional_conditions)


class PixArtBlock(nn.Module):
    """Self-attention (adaLN-single modulated) -> cross-attention to text -> MLP."""

    def __init__(self, cfg: PixArtConfig) -> None:
        super().__init__()
        d = cfg.inner_dim
        self.eps = cfg.norm_eps
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d**0.5)
        self.attn1 = Attention(d, cfg.num_attention_heads, cfg.attention_head_dim, bias=cfg.attention_bias)
        self.attn2 = Attention(d, cfg.num_attention_heads, cfg.attention_head_dim, kv_dim=cfg.cross_attention_dim,
                               bias=cfg.attention_bias)
        self.ff = GeluMLP(d, 4 * d)

    def forward(self, x, text, text_bias, t6, self_attn, layer: int):
        b, d = x.shape[0], x.shape[-1]
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = (self.scale_shift_table[None] + t6.reshape(b, 6, -1)).chunk(6, dim=1)
        h = modulate(F.layer_norm(x, (d,), eps=self.eps), sh_a, sc_a)
        q, k, v = self.attn1.qkv(h)
        x = x + g_a * self.attn1.to_out[0](self_attn(q, k, v, layer=layer).flatten(2))
        q, k, v = self.attn2.qkv(x, text)
        cross = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=text_bias).transpose(1, 2)
        x = x + self.attn2.to_out[0](cross.flatten(2))
        h = modulate(F.layer_norm(x, (d,), eps=self.eps), sh_m, sc_m)
        return x + g_m * self.ff(h)


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: PixArtConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.inner_dim, cfg.patch_size, stride=cfg.patch_size)


class _AdaLNSingle(nn.Module):
    def __init__(self, cfg: PixArtConfig) -> None:
        super().__init__()
        d = cfg.inner_dim
        self.emb = nn.Module()
        self.emb.timestep_embedder = TimestepMLP(256, d)
        if cfg.additional_conditions:
            self.emb.resolution_embedder = TimestepMLP(256, d // 3)
            self.emb.aspect_ratio_embedder = TimestepMLP(256, d // 3)
        self.linear = nn.Linear(d, 6 * d)


class _CaptionProjection(nn.Module):
    def __init__(self, cin: int, d: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(cin, d)
        self.linear_2 = nn.Linear(d, d)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class PixArtTransformer(nn.Module):
    """The denoiser. ``forward`` takes this rank's rows of the latent and returns its rows of the output."""

    family = "pixart"
    parallel_spec = PARALLEL_SPEC

    def __init__(self, cfg: PixArtConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.inner_dim
        self.pos_embed = _PatchEmbed(cfg)
        self.transformer_blocks = nn.ModuleList(PixArtBlock(cfg) for _ in range(cfg.num_layers))
        self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)
        self.proj_out = nn.Linear(d, cfg.patch_size**2 * cfg.out_ch)
        self.adaln_single = _AdaLNSingle(cfg)
        self.caption_projection = _CaptionProjection(cfg.caption_channels, d) if cfg.caption_channels else None

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    def grid(self, latent_h: int, latent_w: int) -> tuple[int, int]:
        p = self.config.patch_size
        if latent_h % p or latent_w % p:
            raise ValueError(f"latent size {latent_h}x{latent_w} is not a multiple of the patch size {p}")
        return latent_h // p, latent_w // p

    def pos_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        cfg = self.config
        interp = cfg.interpolation_scale if cfg.interpolation_scale is not None else max(cfg.sample_size // 64, 1)
        return sincos_pos_embed_2d(cfg.inner_dim, grid_h, grid_w, cfg.sample_size // cfg.patch_size, interp)

    def embed_time(self, timestep: torch.Tensor, batch: int, resolution=None, aspect_ratio=None):
        emb = self.adaln_single.emb
        dtype = emb.timestep_embedder.linear_1.weight.dtype  # sinusoids are fp32; a bf16 model takes bf16 (as diffusers)
        t = emb.timestep_embedder(timestep_embedding(timestep, 256).to(dtype))
        if self.config.additional_conditions:
            r = emb.resolution_embedder(timestep_embedding(resolution.flatten(), 256).to(dtype)).reshape(batch, -1)
            a = emb.aspect_ratio_embedder(timestep_embedding(aspect_ratio.flatten(), 256).to(dtype)).reshape(batch, -1)
            t = t + torch.cat([r, a], dim=1)
        return self.adaln_single.linear(F.silu(t)), t

    def forward(self, latent_rows: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor,
                shard: TokenShard | None = None, text_mask: torch.Tensor | None = None,
                self_attn=local_self_attention, resolution=None, aspect_ratio=None, stage=whole_model):
        """``latent_rows`` is ``[B, C, rows*p, W]``: rows ``shard.row_start..row_end`` of the patch grid.

        ``stage`` runs the embed/body/head closures (``whole_model`` here; a pipeline stage runs its part
        and returns ``None`` unless it is the last).
        """
        cfg, p = self.config, self.config.patch_size
        b = latent_rows.shape[0]
        if shard is None:
            shard = TokenShard.full(*self.grid(*latent_rows.shape[-2:]))
        bias = None
        if text_mask is not None:
            bias = ((1 - text_mask.to(latent_rows.dtype)) * -10000.0)[:, None, None, :]

        def embed():
            x = self.pos_embed.proj(latent_rows).flatten(2).transpose(1, 2)
            x = x + self.pos_table(shard.grid_h, shard.grid_w)[shard.token_slice].to(x)
            ts = timestep.expand(b) if timestep.ndim == 0 else timestep
            t6, t_emb = self.embed_time(ts.to(x.device), b, resolution, aspect_ratio)
            txt = self.caption_projection(text) if self.caption_projection is not None else text
            return {"x": x, "text": txt, "t6": t6, "t_emb": t_emb}

        def body(c):
            for i, block in local_blocks(self.transformer_blocks):
                c["x"] = block(c["x"], c["text"], bias, c["t6"], self_attn, i)
            return c

        def head(c):
            shift, scale = (self.scale_shift_table[None] + c["t_emb"][:, None]).chunk(2, dim=1)
            x = norm_modulate(c["x"], shift, scale)
            return unpatchify(self.proj_out(x), shard.rows, shard.grid_w, p, cfg.out_ch)

        return stage(embed, body, head)
