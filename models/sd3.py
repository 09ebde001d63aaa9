"""Stable Diffusion 3: MMDiT blocks with joint attention over text and image tokens.

Own compact implementation with diffusers' ``SD3Transformer2DModel`` names
(SD3-medium layout: optional per-head RMS q/k norms as in SD3.5; the SD3.5
"dual attention" layers are refused with a clear error). It takes this
rank's rows of the latent; the position table is the checkpoint's
``pos_embed_max_size`` grid cropped to the image and then to the band.
Text tokens are replicated, image tokens sharded; joint attention goes
through the pluggable ``self_attn`` (text queries first, then image).

Parallel plan (what is parallel):
- patch/sequence parallel: ``transformer_blocks.*.attn``
- tensor parallel: column q/k/v of both streams and the MLP inputs; row attention and MLP outputs;
  adaLN modulation linears column-split with an all-gather of their small output
- pipeline stages may cut between ``transformer_blocks``; embeddings on the first stage, ``norm_out`` /
  ``proj_out`` on the last
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tessera.models.dit_layers import (
    AdaNorm,
    Attention,
    GeluMLP,
    TimestepMLP,
    TokenShard,
    local_blocks,
    joint_stream_update,
    local_self_attention,
    norm_modulate,
    sincos_pos_embed_2d,
    timestep_embedding,
    unpatchify,
    whole_model,
)
from tessera.models.pixart import DiffusionParallelSpec

PARALLEL_SPEC = DiffusionParallelSpec(
    patch_attention=("transformer_blocks.*.attn",),
    colwise=tuple(f"transformer_blocks.*.{n}" for n in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
        "ff.net.0.proj", "ff_context.net.0.proj")),
    rowwise=tuple(f"transformer_blocks.*.{n}" for n in ("attn.to_out.0", "attn.to_add_out", "ff.net.2",
                                                         "ff_context.net.2")),
    colwise_gather=("transformer_blocks.*.norm1.linear", "transformer_blocks.*.norm1_context.linear"),
    stage_blocks=("transformer_blocks",),
    embed=("pos_embed", "time_text_embed", "context_embedder"),
    head=("norm_out", "proj_out"),
)


@dataclass(frozen=True)
class SD3Config:
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    qk_norm: str | None = None
    dual_attention_layers: tuple = ()

    def __post_init__(self) -> None:
        if self.dual_attention_layers:
            raise ValueError("SD3.5 dual-attention layers are not implemented in tessera's SD3; "
                             "use an SD3-medium/SD3.5-large style checkpoint without dual_attention_layers")
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm {self.qk_norm!r} is not supported; SD3 uses None or 'rms_norm'")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "SD3Config":
        out = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        out["dual_attention_layers"] = tuple(out.get("dual_attention_layers") or ())
        return cls(**out)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


class SD3Block(nn.Module):
    """MMDiT block; the last one is ``context_pre_only`` (text stream is not updated)."""

    def __init__(self, cfg: SD3Config, last: bool) -> None:
        super().__init__()
        d, heads, hd = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        qk = cfg.qk_norm == "rms_norm"
        self.last = last
        self.norm1 = AdaNorm(d, 6)
        self.norm1_context = AdaNorm(d, 2 if last else 6)
        self.attn = Attention(d, heads, hd, qk_norm=qk)
        self.attn.add_q_proj = nn.Linear(d, heads * hd)
        self.attn.add_k_proj = nn.Linear(d, heads * hd)
        self.attn.add_v_proj = nn.Linear(d, heads * hd)
        if qk:
            self.attn.norm_added_q = nn.RMSNorm(hd, eps=1e-6)
            self.attn.norm_added_k = nn.RMSNorm(hd, eps=1e-6)
        if not last:
            self.attn.to_add_out = nn.Linear(heads * hd, d)
            self.ff_context = GeluMLP(d, 4 * d)
        self.ff = GeluMLP(d, 4 * d)

    def forward(self, img, txt, temb, self_attn, layer):
        a = self.attn
        sh, sc, g, sh2, sc2, g2 = self.norm1(temb)
        h = norm_modulate(img, sh, sc)
        if self.last:
            c_scale, c_shift = self.norm1_context(temb)
            c = norm_modulate(txt, c_shift, c_scale)
        else:
            csh, csc, cg, csh2, csc2, cg2 = self.norm1_context(temb)
            c = norm_modulate(txt, csh, csc)
        q, k, v = a.qkv(h)
        cq, ck, cv = a.heads(a.add_q_proj(c)), a.heads(a.add_k_proj(c)), a.heads(a.add_v_proj(c))
        if getattr(a, "norm_added_q", None) is not None:
            cq, ck = a.norm_added_q(cq), a.norm_added_k(ck)
        out = self_attn(torch.cat([cq, q], dim=1), k, v, layer=layer, extra_kv=(ck, cv))
        n_txt = cq.shape[1]
        out_txt, out_img = out[:, :n_txt].flatten(2), out[:, n_txt:].flatten(2)
        img = joint_stream_update(img, out_img, a.to_out[0], self.ff, g, sh2, sc2, g2)
        if self.last:
            return img, txt
        return img, joint_stream_update(txt, out_txt, a.to_add_out, self.ff_context, cg, csh2, csc2, cg2)


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: SD3Config) -> None:
        super().__init__()
        d, n = cfg.inner_dim, cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, d, cfg.patch_size, stride=cfg.patch_size)
        table = sincos_pos_embed_2d(d, n, n, cfg.sample_size // cfg.patch_size, 1.0)
        self.register_buffer("pos_embed", table[None], persistent=True)


class _TimeTextEmbed(nn.Module):
    def __init__(self, cfg: SD3Config) -> None:
        super().__init__()
        self.timestep_embedder = TimestepMLP(256, cfg.inner_dim)
        self.text_embedder = TimestepMLP(cfg.pooled_projection_dim, cfg.inner_dim)


class SD3Transformer(nn.Module):
    family = "sd3"
    parallel_spec = PARALLEL_SPEC

    def __init__(self, cfg: SD3Config) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.inner_dim
        self.pos_embed = _PatchEmbed(cfg)
        self.time_text_embed = _TimeTextEmbed(cfg)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(SD3Block(cfg, i == cfg.num_layers - 1) for i in range(cfg.num_layers))
        self.norm_out = nn.Module()
        self.norm_out.linear = nn.Linear(d, 2 * d)
        self.proj_out = nn.Linear(d, cfg.patch_size**2 * cfg.out_channels)

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    def band_positions(self, shard: TokenShard) -> torch.Tensor:
        """The centred crop of the ``pos_embed_max_size`` table for the image, then this band's rows."""
        n = self.config.pos_embed_max_size
        if shard.grid_h > n or shard.grid_w > n:
            raise ValueError(f"image of {shard.grid_h}x{shard.grid_w} patches exceeds pos_embed_max_size {n}; "
                             "use a smaller image")
        top, left = (n - shard.grid_h) // 2, (n - shard.grid_w) // 2
        table = self.pos_embed.pos_embed.reshape(n, n, -1)
        rows = table[top + shard.row_start: top + shard.row_end, left: left + shard.grid_w]
        return rows.reshape(1, -1, table.shape[-1])

    def forward(self, latent_rows: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor,
                shard: TokenShard | None = None, self_attn=local_self_attention, stage=whole_model) -> torch.Tensor:
        p = self.config.patch_size
        if shard is None:
            shard = TokenShard.full(latent_rows.shape[-2] // p, latent_rows.shape[-1] // p)

        def embed():
            img = self.pos_embed.proj(latent_rows).flatten(2).transpose(1, 2)
            img = img + self.band_positions(shard).to(img)
            emb = self.time_text_embed
            temb = emb.timestep_embedder(timestep_embedding(timestep, 256).to(img.dtype)) + emb.text_embedder(pooled)
            return {"img": img, "txt": self.context_embedder(text), "temb": temb}

        def body(c):
            for i, block in local_blocks(self.transformer_blocks):
                c["img"], c["txt"] = block(c["img"], c["txt"], c["temb"], self_attn, i)
            return c

        def head(c):
            img = c["img"]
            scale, shift = self.norm_out.linear(F.silu(c["temb"]))[:, None].chunk(2, dim=-1)
            out = self.proj_out(norm_modulate(img, shift, scale))
            return unpatchify(out, shard.rows, shard.grid_w, p, self.config.out_channels)

        return stage(embed, body, head)
