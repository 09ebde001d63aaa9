"""Flux: double-stream (MMDiT) blocks, then single-stream blocks, with 3-axis RoPE.

The whole family in one file (contract: ``models/dit_family.py``). Own
compact implementation with diffusers' ``FluxTransformer2DModel`` checkpoint
names. It takes this rank's rows of the *unpacked* VAE latent
(``[B, C, rows, W]``) and packs 2x2 latent pixels into one token itself, so
a band of latent rows is a band of token rows. Joint attention calls the
pluggable ``self_attn(q, k_img, v_img, extra_kv=(k_txt, v_txt))`` with ``q``
= text queries followed by this rank's image queries; RoPE is applied before
the exchange, so gathered K carry their own positions. Guidance-distilled
checkpoints (FLUX.1-dev, ``guidance_embeds``) embed the guidance scale; the
others (FLUX.1-schnell) run without guidance, or with true CFG when asked.

Parallel plan (what is parallel; ``parallel/`` says how), ``TP_PLAN``:
- double-stream blocks: column q/k/v of both streams and the MLP inputs; row the attention outputs and
  MLP outputs;
- single-stream blocks: column q/k/v (by heads) and ``proj_mlp``; ``proj_out`` reads
  ``[attention heads | MLP columns]``, so it is row-split in two pieces (``rowwise_pieces``, widths 1:4 in
  ``TP_PIECES``): a rank holds the input columns of its heads and of its MLP columns, in its concat's order;
- adaLN modulation (``norm1``, ``norm1_context``, single ``norm``): column-split, the small modulation
  vectors all-gathered (``colwise_gather``), so no block weight is replicated.
``STAGES``: pipeline stages cut the double and single block lists as one sequence; the first stage holds
the time/text/image embedders, the last ``norm_out`` and ``proj_out``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tessera.errors import ConfigError
from tessera.models.dit_family import Conditioning, ConfigKeys, DiTDefaults, StagePlan, flow_shift_mu

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
    patchify,
    timestep_embedding,
    whole_model,
)

NAME = "flux"
DIFFUSERS_CLASSES = ("FluxTransformer2DModel",)
JOINT_TEXT = True  # text tokens are a stream of joint attention: sharded with the image under sp

_DOUBLE, _SINGLE = "transformer_blocks.*.", "single_transformer_blocks.*."
TP_PLAN = {
    **{_DOUBLE + n: "colwise" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                                         "attn.add_v_proj", "ff.net.0.proj", "ff_context.net.0.proj")},
    **{_DOUBLE + n: "rowwise" for n in ("attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2")},
    **{_DOUBLE + n: "colwise_gather" for n in ("norm1.linear", "norm1_context.linear")},
    **{_SINGLE + n: "colwise" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")},
    _SINGLE + "proj_out": "rowwise_pieces",
    _SINGLE + "norm.linear": "colwise_gather",
}
TP_PIECES = {_SINGLE + "proj_out": (1, 4)}  # input = [attention (d) | MLP (4d)]
STAGES = StagePlan(blocks=("transformer_blocks", "single_transformer_blocks"),
                   embed=("time_text_embed", "context_embedder", "x_embedder"), head=("norm_out", "proj_out"))


@dataclass(frozen=True)
class FluxConfig:
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: Sequence[int] = (16, 56, 56)

    def __post_init__(self) -> None:
        if self.patch_size != 1:
            raise ConfigError(f"Flux: patch_size={self.patch_size}; tessera implements patch_size 1 (2x2 packing "
                              "happens on the latent), as every released Flux uses")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ConfigError(f"Flux: axes_dims_rope {tuple(self.axes_dims_rope)} must sum to attention_head_dim "
                              f"{self.attention_head_dim}")
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "FluxConfig":
        CONFIG_KEYS.check("Flux", cfg)
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    # -- what the driver checks before any worker runs --------------------------------------

    @property
    def num_heads(self) -> int:
        return self.num_attention_heads

    @property
    def row_unit(self) -> int:
        """Latent rows per token row: 2x2 latent pixels are packed into one token."""
        return 2

    @property
    def uses_cfg(self) -> bool:
        """Guidance-distilled checkpoints embed the scale instead of running a second branch."""
        return not self.guidance_embeds

    def check_grid(self, grid_h: int, grid_w: int) -> None:
        """Any grid works: RoPE positions are computed for the image."""


# Every key of diffusers' Flux config is a field tessera reads.
CONFIG_KEYS = ConfigKeys(read=frozenset(FluxConfig.__dataclass_fields__))


def parse(config: Mapping[str, Any]) -> FluxConfig:
    return FluxConfig.from_dict(config)


def defaults(config: FluxConfig) -> DiTDefaults:
    """FluxPipeline's defaults: 28 steps, 512 T5 tokens; guidance 3.5 when embedded (FLUX.1-dev), else none."""
    return DiTDefaults(guidance_scale=3.5 if config.guidance_embeds else 0.0, steps=28, max_sequence_length=512)


def rope_tables(ids: torch.Tensor, axes_dims: Sequence[int], theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[S, head_dim]`` for positions ``ids [S, n_axes]``, pairs interleaved (Flux's layout)."""
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = torch.outer(ids[:, axis].double(), freqs)
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, S, H, d]`` pairwise (even, odd) by the per-position angles."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-odd, even], dim=-1).flatten(-2)
    return (x.float() * cos[None, :, None] + rotated.float() * sin[None, :, None]).to(x.dtype)


class _JointAttention(Attention):
    def __init__(self, dim: int, heads: int, head_dim: int, context: bool) -> None:
        super().__init__(dim, heads, head_dim, qk_norm=True, out=context)
        if context:
            self.add_q_proj = nn.Linear(dim, heads * head_dim)
            self.add_k_proj = nn.Linear(dim, heads * head_dim)
            self.add_v_proj = nn.Linear(dim, heads * head_dim)
            self.norm_added_q = nn.RMSNorm(head_dim, eps=1e-6)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=1e-6)
            self.to_add_out = nn.Linear(heads * head_dim, dim)


def _joint(self_attn, layer, q_txt, k_txt, v_txt, q_img, k_img, v_img, rope_txt, rope_img):
    q_txt, k_txt = apply_rope(q_txt, *rope_txt), apply_rope(k_txt, *rope_txt)
    q_img, k_img = apply_rope(q_img, *rope_img), apply_rope(k_img, *rope_img)
    out = self_attn(torch.cat([q_txt, q_img], dim=1), k_img, v_img, layer=layer, extra_kv=(k_txt, v_txt))
    n_txt = q_txt.shape[1]
    return out[:, :n_txt].flatten(2), out[:, n_txt:].flatten(2)


class FluxDoubleBlock(nn.Module):
    """Separate weights for text and image streams, one joint attention over both."""

    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        d = cfg.inner_dim
        self.norm1, self.norm1_context = AdaNorm(d, 6), AdaNorm(d, 6)
        self.attn = _JointAttention(d, cfg.num_attention_heads, cfg.attention_head_dim, context=True)
        self.ff, self.ff_context = GeluMLP(d, 4 * d), GeluMLP(d, 4 * d)

    def forward(self, img, txt, temb, rope_txt, rope_img, self_attn, layer):
        sh, sc, g, sh2, sc2, g2 = self.norm1(temb)
        csh, csc, cg, csh2, csc2, cg2 = self.norm1_context(temb)
        h = norm_modulate(img, sh, sc)
        c = norm_modulate(txt, csh, csc)
        a = self.attn
        q, k, v = a.qkv(h)
        cq, ck, cv = a.heads(a.add_q_proj(c)), a.heads(a.add_k_proj(c)), a.heads(a.add_v_proj(c))
        cq, ck = a.norm_added_q(cq), a.norm_added_k(ck)
        out_txt, out_img = _joint(self_attn, layer, cq, ck, cv, q, k, v, rope_txt, rope_img)
        img = joint_stream_update(img, out_img, a.to_out[0], self.ff, g, sh2, sc2, g2)
        txt = joint_stream_update(txt, out_txt, a.to_add_out, self.ff_context, cg, csh2, csc2, cg2)
        return img, txt


class FluxSingleBlock(nn.Module):
    """Shared weights for both streams; attention and MLP in parallel, one output projection."""

    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        d = cfg.inner_dim
        self.norm = AdaNorm(d, 3)
        self.proj_mlp = nn.Linear(d, 4 * d)
        self.proj_out = nn.Linear(5 * d, d)
        self.attn = _JointAttention(d, cfg.num_attention_heads, cfg.attention_head_dim, context=False)

    def forward(self, img, txt, temb, rope_txt, rope_img, self_attn, layer):
        sh, sc, g = self.norm(temb)
        h_img = norm_modulate(img, sh, sc)
        h_txt = norm_modulate(txt, sh, sc)
        q, k, v = self.attn.qkv(h_img)
        cq, ck, cv = self.attn.qkv(h_txt)
        out_txt, out_img = _joint(self_attn, layer, cq, ck, cv, q, k, v, rope_txt, rope_img)
        # both streams through one MLP and one output projection (one all-reduce under tp), as diffusers
        # runs the joint [text, image] sequence; the attention part comes first in proj_out's input
        n_txt = txt.shape[1]
        mlp = F.gelu(self.proj_mlp(torch.cat([h_txt, h_img], dim=1)), approximate="tanh")
        mixed = g * self.proj_out(torch.cat([torch.cat([out_txt, out_img], dim=1), mlp], dim=-1))
        return img + mixed[:, n_txt:], txt + mixed[:, :n_txt]


class _TimeTextEmbed(nn.Module):
    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        d = cfg.inner_dim
        self.timestep_embedder = TimestepMLP(256, d)
        if cfg.guidance_embeds:
            self.guidance_embedder = TimestepMLP(256, d)
        self.text_embedder = TimestepMLP(cfg.pooled_projection_dim, d)


class FluxTransformer(nn.Module):
    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.inner_dim
        self.time_text_embed = _TimeTextEmbed(cfg)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, d)
        self.x_embedder = nn.Linear(cfg.in_channels, d)
        self.transformer_blocks = nn.ModuleList(FluxDoubleBlock(cfg) for _ in range(cfg.num_layers))
        self.single_transformer_blocks = nn.ModuleList(FluxSingleBlock(cfg) for _ in range(cfg.num_single_layers))
        self.norm_out = nn.Module()
        self.norm_out.linear = nn.Linear(d, 2 * d)
        self.proj_out = nn.Linear(d, cfg.out_channels or cfg.in_channels)

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    def temb(self, timestep: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        emb = self.time_text_embed
        t = emb.timestep_embedder(timestep_embedding(timestep * 1000, 256).to(pooled.dtype))
        if self.config.guidance_embeds:
            if guidance is None:
                raise ValueError("this Flux checkpoint embeds guidance (guidance_embeds=True); pass guidance")
            t = t + emb.guidance_embedder(timestep_embedding(guidance * 1000, 256).to(pooled.dtype))
        return t + emb.text_embedder(pooled)

    def forward(self, latent_rows: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor,
                shard: TokenShard | None = None, self_attn=local_self_attention,
                guidance: torch.Tensor | None = None, stage=whole_model) -> torch.Tensor:
        """``latent_rows [B, C, 2*rows, 2*W']`` -> velocity of the same rows (same shape)."""
        b, c, h, w = latent_rows.shape
        if shard is None:
            shard = TokenShard.full(h // 2, w // 2)
        rows = torch.arange(shard.row_start, shard.row_end)
        img_ids = torch.stack([torch.zeros(shard.rows, shard.grid_w), rows[:, None].expand(-1, shard.grid_w).float(),
                               torch.arange(shard.grid_w)[None].expand(shard.rows, -1).float()], dim=-1).reshape(-1, 3)
        axes = self.config.axes_dims_rope
        rope_img = tuple(x.to(latent_rows.device) for x in rope_tables(img_ids, axes))
        rope_txt = tuple(x.to(latent_rows.device) for x in rope_tables(torch.zeros(text.shape[1], 3), axes))

        def embed():
            img = self.x_embedder(patchify(latent_rows, 2))
            return {"img": img, "txt": self.context_embedder(text), "temb": self.temb(timestep, pooled, guidance)}

        def body(carry):
            for layer, block in local_blocks(self.transformer_blocks, self.single_transformer_blocks):
                carry["img"], carry["txt"] = block(carry["img"], carry["txt"], carry["temb"], rope_txt, rope_img,
                                                   self_attn, layer)
            return carry

        def head(carry):
            img, temb = carry["img"], carry["temb"]
            scale, shift = self.norm_out.linear(F.silu(temb))[:, None].chunk(2, dim=-1)
            out = self.proj_out(norm_modulate(img, shift, scale))
            return out.view(b, shard.rows, shard.grid_w, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

        return stage(embed, body, head)


def build(config: Mapping[str, Any]) -> FluxTransformer:
    """The transformer on the current default device (the loader builds it on ``meta``)."""
    return FluxTransformer(parse(config))


class Pipeline:
    """FluxPipeline's steps around the transformer: CLIP pooled embedding + T5 sequence, resolution-shifted
    sigmas (``mu``), timestep passed as sigma, embedded guidance (FLUX.1-dev) or true CFG with a negative
    prompt; latents un-scaled and shifted for the VAE. Works on rows of the unpacked latent."""

    def __init__(self, model_dir: Any, model: FluxTransformer) -> None:
        self.dir = model_dir  # a DiffusersDir: load_component reads the encoders with their own library
        self.model = model
        self.config = model.config
        self._enc: dict[str, Any] = {}

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels // 4

    def _component(self, name: str):
        if name not in self._enc:
            comp = self.dir.load_component(name)
            self._enc[name] = comp.eval() if hasattr(comp, "eval") else comp
        return self._enc[name]

    def encode(self, prompts: list[str], negative: list[str], max_sequence_length: int):
        tok, clip = self._component("tokenizer"), self._component("text_encoder")
        tok2, t5 = self._component("tokenizer_2"), self._component("text_encoder_2")

        def run(texts: list[str]) -> Conditioning:
            ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            ids2 = tok2(texts, padding="max_length", max_length=max_sequence_length, truncation=True,
                        return_tensors="pt").input_ids
            with torch.no_grad():
                pooled = clip(ids, output_hidden_states=False).pooler_output
                seq = t5(ids2, output_hidden_states=False)[0]
            return Conditioning({"text": seq.float(), "pooled": pooled.float()})

        return run(prompts), run(negative)

    def set_timesteps(self, scheduler: Any, steps: int, latent_h: int, latent_w: int) -> torch.Tensor:
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        mu = flow_shift_mu((latent_h // 2) * (latent_w // 2), scheduler.config)
        scheduler.set_timesteps(sigmas=sigmas, device="cpu", mu=mu)
        return scheduler.timesteps

    def predict(self, latent_rows, cond: Conditioning, t, shard: TokenShard, self_attn, image_hw, guidance=None,
                stage=whole_model):
        b = latent_rows.shape[0]
        timestep = t.reshape(1).expand(b).to(latent_rows.dtype) / 1000
        g = None
        if self.config.guidance_embeds:
            g = torch.full((b,), float(guidance if guidance is not None else 3.5), dtype=latent_rows.dtype,
                           device=latent_rows.device)
        return self.model(latent_rows, cond.tensors["text"].to(latent_rows.dtype),
                          cond.tensors["pooled"].to(latent_rows.dtype), timestep, shard=shard, self_attn=self_attn,
                          guidance=g, stage=stage)

    def to_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        return latents / vae.config.scaling_factor + vae.config.shift_factor


# -- tiny random pipelines (tests, demos) ----------------------------------------------------------------


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Split a head into (index, row, column) RoPE axes of even widths, like Flux's (16, 56, 56) of 128."""
    if head_dim == 8:
        return (2, 2, 4)
    side = (head_dim * 7 // 16) // 2 * 2
    return (head_dim - 2 * side, side, side)


def tiny_config(layers: int, heads: int, head_dim: int) -> dict[str, Any]:
    """``layers`` blocks split into double and single ones; half the heads of twice the width."""
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 16,
            "num_layers": max(1, layers // 2), "num_single_layers": max(1, layers - layers // 2),
            "attention_head_dim": head_dim * 2, "num_attention_heads": heads // 2, "joint_attention_dim": 16,
            "pooled_projection_dim": 16, "guidance_embeds": False, "axes_dims_rope": list(_rope_axes(head_dim * 2))}


def tiny_twin_config(released: Mapping[str, Any]) -> dict[str, Any]:
    """``released`` with tiny sizes and its flags kept (guidance embedding, patch size, channel packing)."""
    return {**released, "in_channels": 16, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 8,
            "num_attention_heads": 4, "joint_attention_dim": 16, "pooled_projection_dim": 16,
            "axes_dims_rope": list(_rope_axes(8))}


def tiny_pipeline(config: Mapping[str, Any]):
    """A diffusers FluxPipeline around a random transformer of ``config`` (tiny CLIP, T5, VAE)."""
    import inspect

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from tessera.models.tiny_diffusion import tiny_clip, tiny_t5, tiny_vae

    enc, tok = tiny_t5(config["joint_attention_dim"])
    clip, ctok = tiny_clip(hidden=config["pooled_projection_dim"])
    accepted = inspect.signature(FluxTransformer2DModel.__init__).parameters
    transformer = FluxTransformer2DModel(**{k: v for k, v in config.items() if k in accepted})
    vae = tiny_vae(config["in_channels"] // 4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1,
                   scaling_factor=0.9)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=ctok,
                        text_encoder_2=enc, tokenizer_2=tok, transformer=transformer)
