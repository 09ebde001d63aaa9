"""PixArt-alpha / PixArt-Sigma: a DiT with cross-attention to T5 text and adaLN-single.

The whole family in one file (the contract is ``models/dit_family.py``): its
config, modules, parallel declarations, pipeline adapter and tiny builder.
Own compact implementation whose parameter names equal diffusers'
``PixArtTransformer2DModel`` checkpoint names, so a diffusers ``transformer/``
directory loads as is (PixArt-Sigma ships the generic ``Transformer2DModel``
class name, which diffusers remaps by ``norm_type``; so does the registry).
The forward works on a *shard* of image rows: the patch embedding (a
stride-p convolution), the position table, adaLN modulation,
cross-attention and the MLP are all token-local; only the image-token
self-attention (``attn1``) needs other ranks' tokens, and it calls the
pluggable ``self_attn`` function that ``parallel/`` provides.

Parallel plan (what is parallel; ``parallel/`` says how): ``TP_PLAN`` splits
attention q/k/v by heads and the MLP input by columns (``colwise``), their
outputs by rows (``rowwise``); ``STAGES``: pipeline stages cut between
``transformer_blocks``, the first stage holds the patch, time and caption
embeddings, the last the final modulation and ``proj_out``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tessera.errors import ConfigError
from tessera.models.dit_family import Conditioning, ConfigKeys, DiTDefaults, StagePlan
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


NAME = "pixart"
DIFFUSERS_CLASSES = ("PixArtTransformer2DModel",)  # and the generic Transformer2DModel with ada_norm_single
JOINT_TEXT = False  # text is cross-attention keys only, replicated on every sp rank

TP_PLAN = {
    "transformer_blocks.*.attn1.to_q": "colwise", "transformer_blocks.*.attn1.to_k": "colwise",
    "transformer_blocks.*.attn1.to_v": "colwise", "transformer_blocks.*.attn1.to_out.0": "rowwise",
    "transformer_blocks.*.attn2.to_q": "colwise", "transformer_blocks.*.attn2.to_k": "colwise",
    "transformer_blocks.*.attn2.to_v": "colwise", "transformer_blocks.*.attn2.to_out.0": "rowwise",
    "transformer_blocks.*.ff.net.0.proj": "colwise", "transformer_blocks.*.ff.net.2": "rowwise",
}
TP_PIECES: dict[str, tuple[int, ...]] = {}
STAGES = StagePlan(blocks=("transformer_blocks",), embed=("pos_embed", "adaln_single", "caption_projection"),
                   head=("scale_shift_table", "proj_out"))


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
            raise ConfigError("PixArt inner dim (heads x head_dim) must be even for the 2-D sin-cos table")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "PixArtConfig":
        CONFIG_KEYS.check("PixArt", cfg)
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})

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

    # -- what the driver checks before any worker runs --------------------------------------

    @property
    def num_heads(self) -> int:
        return self.num_attention_heads

    @property
    def row_unit(self) -> int:
        """Latent rows per patch-grid row."""
        return self.patch_size

    @property
    def uses_cfg(self) -> bool:
        return True

    def check_grid(self, grid_h: int, grid_w: int) -> None:
        """Any grid works: the sin-cos position table is computed for the image."""


# Every key of diffusers' PixArt (and generic Transformer2DModel) config: read, checked or without effect.
CONFIG_KEYS = ConfigKeys(
    read=frozenset(PixArtConfig.__dataclass_fields__),
    fixed={"norm_type": ("ada_norm_single",), "activation_fn": ("gelu-approximate",), "attention_type": ("default",),
           "norm_elementwise_affine": (False,), "num_vector_embeds": (None,), "only_cross_attention": (False,),
           "double_self_attention": (False,), "upcast_attention": (False,)},
    no_effect={"dropout": "inference runs without dropout",
               "norm_num_groups": "group norm is used only for non-patch (continuous) inputs",
               "num_embeds_ada_norm": "adaLN-single embeds the timestep sinusoidally; the table size is unused",
               "use_linear_projection": "used only for non-patch (continuous) inputs"},
)


def parse(config: Mapping[str, Any]) -> PixArtConfig:
    return PixArtConfig.from_dict(config)


def defaults(config: PixArtConfig) -> DiTDefaults:
    """PixArtSigmaPipeline's defaults: 20 steps, guidance 4.5, 300 T5 tokens."""
    return DiTDefaults(guidance_scale=4.5, steps=20, max_sequence_length=300)


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


def build(config: Mapping[str, Any]) -> PixArtTransformer:
    """The transformer on the current default device (the loader builds it on ``meta``)."""
    return PixArtTransformer(parse(config))


class Pipeline:
    """PixArtSigmaPipeline's steps around the transformer: T5 prompt embeddings + mask, the checkpoint's
    scheduler, learned-sigma channels dropped, latents scaled for the VAE.

    Works on *rows* of the VAE latent (``[B, C, rows, W]``): patch/sequence-parallel bands are whole rows
    of the patch grid (``config.row_unit`` latent rows each).
    """

    def __init__(self, model_dir: Any, model: PixArtTransformer) -> None:
        self.dir = model_dir  # a DiffusersDir: load_component reads the encoders with their own library
        self.model = model
        self.config = model.config
        self._text: tuple[Any, Any] | None = None

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels

    def encode(self, prompts: list[str], negative: list[str], max_sequence_length: int) -> tuple[Conditioning, Conditioning]:
        if self._text is None:
            self._text = (self.dir.load_component("tokenizer"), self.dir.load_component("text_encoder").eval())
        tok, enc = self._text

        def run(texts: list[str]) -> Conditioning:
            ids = tok(texts, padding="max_length", max_length=max_sequence_length, truncation=True,
                      add_special_tokens=True, return_tensors="pt")
            with torch.no_grad():
                emb = enc(ids.input_ids, attention_mask=ids.attention_mask)[0]
            return Conditioning({"text": emb.float(), "mask": ids.attention_mask})

        return run(prompts), run(negative)

    def set_timesteps(self, scheduler: Any, steps: int, latent_h: int, latent_w: int) -> torch.Tensor:
        scheduler.set_timesteps(steps, device="cpu")
        return scheduler.timesteps

    def predict(self, latent_rows: torch.Tensor, cond: Conditioning, t: torch.Tensor, shard: TokenShard,
                self_attn: Any, image_hw: tuple[int, int], guidance: float | None = None,
                stage: Any = whole_model) -> torch.Tensor | None:
        """The model's prediction for these rows; ``None`` on a pipeline stage other than the last."""
        b = latent_rows.shape[0]
        extra = {}
        if self.config.additional_conditions:
            h, w = image_hw
            dev = latent_rows.device
            extra = {"resolution": torch.tensor([[h, w]], dtype=torch.float32, device=dev).repeat(b, 1),
                     "aspect_ratio": torch.tensor([[h / w]], dtype=torch.float32, device=dev).repeat(b, 1)}
        timestep = t.reshape(1).expand(b)
        out = self.model(latent_rows, cond.tensors["text"].to(latent_rows.dtype), timestep, shard=shard,
                         text_mask=cond.tensors["mask"], self_attn=self_attn, stage=stage, **extra)
        if out is not None and self.config.out_ch // 2 == self.latent_channels:
            out = out.chunk(2, dim=1)[0]  # learned variance channels are not used for sampling
        return out

    def to_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        return latents / vae.config.scaling_factor


# -- tiny random pipelines (tests, demos) ----------------------------------------------------------------


def tiny_config(layers: int, heads: int, head_dim: int) -> dict[str, Any]:
    d = heads * head_dim
    return {"_class_name": "PixArtTransformer2DModel", "num_attention_heads": heads, "attention_head_dim": head_dim,
            "in_channels": 4, "out_channels": 8, "num_layers": layers, "cross_attention_dim": d,
            "caption_channels": 16, "sample_size": 16, "patch_size": 2}


def tiny_twin_config(released: Mapping[str, Any]) -> dict[str, Any]:
    """``released`` with tiny sizes and every flag kept (learned sigma, interpolation, conditions, class)."""
    return {**released, "num_attention_heads": 4, "attention_head_dim": 8, "num_layers": 2,
            "cross_attention_dim": 32, "caption_channels": 16}


def tiny_pipeline(config: Mapping[str, Any]):
    """A diffusers PixArtSigmaPipeline around a random transformer of ``config`` (tiny T5, VAE)."""
    import inspect

    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    from tessera.models.tiny_diffusion import tiny_t5, tiny_vae

    enc, tok = tiny_t5(config["caption_channels"])
    accepted = inspect.signature(PixArtTransformer2DModel.__init__).parameters
    transformer = PixArtTransformer2DModel(**{k: v for k, v in config.items() if k in accepted})
    return PixArtSigmaPipeline(tokenizer=tok, text_encoder=enc, vae=tiny_vae(config["in_channels"]),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())
