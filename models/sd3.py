"""Stable Diffusion 3 / 3.5: MMDiT blocks with joint attention over text and image tokens.

The whole family in one file (contract: ``models/dit_family.py``). Own
compact implementation with diffusers' ``SD3Transformer2DModel`` names,
covering SD3-medium and SD3.5 (MMDiT-X): optional per-head RMS q/k norms
(``qk_norm: "rms_norm"``) and, in the blocks listed by
``dual_attention_layers``, a second image-only self-attention (``attn2``)
fed by its own adaLN modulation (the block's ``norm1`` then yields nine
vectors instead of six). It takes this rank's rows of the latent; the
position table is the checkpoint's ``pos_embed_max_size`` grid cropped to
the image and then to the band. Text tokens are a joint-attention stream,
image tokens sharded; joint attention and ``attn2`` both go through the
pluggable ``self_attn`` (text queries first, then image).

Parallel plan (what is parallel; ``parallel/`` says how), ``TP_PLAN``:
column q/k/v of both streams (and of ``attn2``) and the MLP inputs; row the
attention and MLP outputs; the adaLN modulation linears column-split with an
all-gather of their small output (``colwise_gather``). ``STAGES``: pipeline
stages may cut between ``transformer_blocks``; embeddings on the first
stage, ``norm_out`` / ``proj_out`` on the last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

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
    joint_stream_update,
    local_blocks,
    local_self_attention,
    modulate,
    norm_modulate,
    sincos_pos_embed_2d,
    timestep_embedding,
    unpatchify,
    whole_model,
)

NAME = "sd3"
DIFFUSERS_CLASSES = ("SD3Transformer2DModel",)
JOINT_TEXT = True  # text tokens are a stream of joint attention: sharded with the image under sp

_BLOCK = "transformer_blocks.*."
TP_PLAN = {
    **{_BLOCK + n: "colwise" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                                        "attn.add_v_proj", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                                        "ff.net.0.proj", "ff_context.net.0.proj")},
    **{_BLOCK + n: "rowwise" for n in ("attn.to_out.0", "attn.to_add_out", "attn2.to_out.0", "ff.net.2",
                                        "ff_context.net.2")},
    **{_BLOCK + n: "colwise_gather" for n in ("norm1.linear", "norm1_context.linear")},
}
TP_PIECES: dict[str, tuple[int, ...]] = {}
STAGES = StagePlan(blocks=("transformer_blocks",), embed=("pos_embed", "time_text_embed", "context_embedder"),
                   head=("norm_out", "proj_out"))


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
    out_channels: int | None = 16
    pos_embed_max_size: int | None = 96
    qk_norm: str | None = None
    dual_attention_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers or ()))
        if self.qk_norm not in (None, "rms_norm"):
            raise ConfigError(f"SD3: qk_norm={self.qk_norm!r}; tessera implements None (SD3) and 'rms_norm' (SD3.5)")
        if self.pos_embed_max_size is None:
            raise ConfigError("SD3: pos_embed_max_size is null; tessera implements the cropped position table of the "
                              "released SD3/SD3.5 checkpoints (pos_embed_max_size set)")
        if self.caption_projection_dim != self.inner_dim:
            raise ConfigError(f"SD3: caption_projection_dim={self.caption_projection_dim} differs from heads x "
                              f"head_dim = {self.inner_dim}; the joint attention needs them equal")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"SD3: dual_attention_layers {bad} are not blocks of this {self.num_layers}-block "
                              "transformer; the config is inconsistent")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "SD3Config":
        CONFIG_KEYS.check("SD3", cfg)
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_ch(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

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
        """The position table covers ``pos_embed_max_size`` patches a side."""
        n = self.pos_embed_max_size
        if grid_h > n or grid_w > n:
            raise ValueError(f"an image of {grid_h}x{grid_w} patches exceeds this SD3 checkpoint's position table "
                             f"(pos_embed_max_size {n} patches a side, {n * self.patch_size} latent pixels); "
                             "use a smaller height/width")


# Every key of diffusers' SD3 config is a field tessera reads.
CONFIG_KEYS = ConfigKeys(read=frozenset(SD3Config.__dataclass_fields__))


def parse(config: Mapping[str, Any]) -> SD3Config:
    return SD3Config.from_dict(config)


def defaults(config: SD3Config) -> DiTDefaults:
    """StableDiffusion3Pipeline's defaults: 28 steps, guidance 7.0, 256 T5 tokens."""
    return DiTDefaults(guidance_scale=7.0, steps=28, max_sequence_length=256)


class SD3Block(nn.Module):
    """MMDiT block (MMDiT-X when ``dual``); the last one is ``context_pre_only`` (text stream not updated)."""

    def __init__(self, cfg: SD3Config, index: int) -> None:
        super().__init__()
        d, heads, hd = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        qk = cfg.qk_norm == "rms_norm"
        self.last = index == cfg.num_layers - 1
        self.dual = index in cfg.dual_attention_layers
        self.attn2_layer = cfg.num_layers + index  # its own id for stale-K/V buffers of patch parallelism
        self.norm1 = AdaNorm(d, 9 if self.dual else 6)
        self.norm1_context = AdaNorm(d, 2 if self.last else 6)
        self.attn = Attention(d, heads, hd, qk_norm=qk)
        self.attn.add_q_proj = nn.Linear(d, heads * hd)
        self.attn.add_k_proj = nn.Linear(d, heads * hd)
        self.attn.add_v_proj = nn.Linear(d, heads * hd)
        if qk:
            self.attn.norm_added_q = nn.RMSNorm(hd, eps=1e-6)
            self.attn.norm_added_k = nn.RMSNorm(hd, eps=1e-6)
        if self.dual:
            self.attn2 = Attention(d, heads, hd, qk_norm=qk)
        if not self.last:
            self.attn.to_add_out = nn.Linear(heads * hd, d)
            self.ff_context = GeluMLP(d, 4 * d)
        self.ff = GeluMLP(d, 4 * d)

    def forward(self, img, txt, temb, self_attn, layer):
        a = self.attn
        mods = self.norm1(temb)
        sh, sc, g, sh2, sc2, g2 = mods[:6]
        normed = F.layer_norm(img, (img.shape[-1],), eps=1e-6)
        h = modulate(normed, sh, sc)
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
        img = img + g * a.to_out[0](out_img)
        if self.dual:  # MMDiT-X: image-only self-attention on the same normed input, its own modulation
            sh3, sc3, g3 = mods[6:]
            q2, k2, v2 = self.attn2.qkv(modulate(normed, sh3, sc3))
            img = img + g3 * self.attn2.to_out[0](self_attn(q2, k2, v2, layer=self.attn2_layer).flatten(2))
        img = img + g2 * self.ff(norm_modulate(img, sh2, sc2))
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
    def __init__(self, cfg: SD3Config) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.inner_dim
        self.pos_embed = _PatchEmbed(cfg)
        self.time_text_embed = _TimeTextEmbed(cfg)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(SD3Block(cfg, i) for i in range(cfg.num_layers))
        self.norm_out = nn.Module()
        self.norm_out.linear = nn.Linear(d, 2 * d)
        self.proj_out = nn.Linear(d, cfg.patch_size**2 * cfg.out_ch)

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    def band_positions(self, shard: TokenShard) -> torch.Tensor:
        """The centred crop of the ``pos_embed_max_size`` table for the image, then this band's rows."""
        n = self.config.pos_embed_max_size
        self.config.check_grid(shard.grid_h, shard.grid_w)
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
            return unpatchify(out, shard.rows, shard.grid_w, p, self.config.out_ch)

        return stage(embed, body, head)


def build(config: Mapping[str, Any]) -> SD3Transformer:
    """The transformer on the current default device (the loader builds it on ``meta``)."""
    return SD3Transformer(parse(config))


class Pipeline:
    """StableDiffusion3Pipeline's steps around the transformer: two CLIP encoders (pooled + penultimate
    hidden states) and T5 joined as diffusers does, the checkpoint's flow-matching scheduler (dynamic shift
    when configured), CFG with a negative prompt, latents un-scaled and shifted for the VAE."""

    def __init__(self, model_dir: Any, model: SD3Transformer) -> None:
        self.dir = model_dir  # a DiffusersDir: load_component reads the encoders with their own library
        self.model = model
        self.config = model.config
        self._enc: dict[str, Any] = {}

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels

    def _component(self, name: str):
        if name not in self._enc:
            comp = self.dir.load_component(name)
            self._enc[name] = comp.eval() if hasattr(comp, "eval") else comp
        return self._enc[name]

    def encode(self, prompts: list[str], negative: list[str], max_sequence_length: int):
        def clip(texts, tok_name, enc_name):
            tok, enc = self._component(tok_name), self._component(enc_name)
            ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids, output_hidden_states=True)
            return out[0], out.hidden_states[-2]  # pooled (projected), penultimate hidden states

        def run(texts: list[str]) -> Conditioning:
            with torch.no_grad():
                pooled1, h1 = clip(texts, "tokenizer", "text_encoder")
                pooled2, h2 = clip(texts, "tokenizer_2", "text_encoder_2")
                clip_seq = torch.cat([h1, h2], dim=-1)
                if "text_encoder_3" in self.dir.components:
                    tok3, t5 = self._component("tokenizer_3"), self._component("text_encoder_3")
                    ids = tok3(texts, padding="max_length", max_length=max_sequence_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
                    t5_seq = t5(ids)[0]
                else:  # SD3 without T5: zeros of the joint width, as diffusers does
                    t5_seq = torch.zeros(len(texts), max_sequence_length, self.config.joint_attention_dim)
                clip_seq = F.pad(clip_seq, (0, t5_seq.shape[-1] - clip_seq.shape[-1]))
                text = torch.cat([clip_seq, t5_seq], dim=-2)
            return Conditioning({"text": text.float(), "pooled": torch.cat([pooled1, pooled2], dim=-1).float()})

        return run(prompts), run(negative)

    def set_timesteps(self, scheduler: Any, steps: int, latent_h: int, latent_w: int) -> torch.Tensor:
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting"):
            p = self.config.patch_size
            kwargs["mu"] = flow_shift_mu((latent_h // p) * (latent_w // p), scheduler.config)
        scheduler.set_timesteps(steps, device="cpu", **kwargs)
        return scheduler.timesteps

    def predict(self, latent_rows, cond: Conditioning, t, shard: TokenShard, self_attn, image_hw, guidance=None,
                stage=whole_model):
        b = latent_rows.shape[0]
        timestep = t.reshape(1).expand(b).to(latent_rows.dtype)
        return self.model(latent_rows, cond.tensors["text"].to(latent_rows.dtype),
                          cond.tensors["pooled"].to(latent_rows.dtype), timestep, shard=shard, self_attn=self_attn,
                          stage=stage)

    def to_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        return latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)


# -- tiny random pipelines (tests, demos) ----------------------------------------------------------------


def tiny_config(layers: int, heads: int, head_dim: int) -> dict[str, Any]:
    return {"_class_name": "SD3Transformer2DModel", "sample_size": 16, "patch_size": 2, "in_channels": 4,
            "num_layers": layers, "attention_head_dim": head_dim, "num_attention_heads": heads,
            "joint_attention_dim": 32, "caption_projection_dim": heads * head_dim, "pooled_projection_dim": 32,
            "out_channels": 4, "pos_embed_max_size": 32}


def tiny_twin_config(released: Mapping[str, Any]) -> dict[str, Any]:
    """``released`` with tiny sizes and its flags kept: q/k norm, and dual attention in the leading blocks
    (all but the last, as SD3.5-medium has it in blocks 0-12 of 24) when the release has any."""
    layers = 3
    dual = [0, 1] if released.get("dual_attention_layers") else []
    return {**released, "in_channels": 4, "out_channels": 4, "num_layers": layers, "attention_head_dim": 8,
            "num_attention_heads": 4, "joint_attention_dim": 32, "caption_projection_dim": 32,
            "pooled_projection_dim": 32, "pos_embed_max_size": 32,
            **({"dual_attention_layers": dual} if "dual_attention_layers" in released else {})}


def tiny_pipeline(config: Mapping[str, Any]):
    """A diffusers StableDiffusion3Pipeline around a random transformer of ``config`` (tiny CLIPs, T5, VAE)."""
    import inspect

    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from tessera.models.tiny_diffusion import tiny_clip, tiny_t5, tiny_vae

    enc, tok = tiny_t5(config["joint_attention_dim"])
    half = config["pooled_projection_dim"] // 2
    clip1, ctok = tiny_clip(hidden=16, projection_dim=half)
    clip2, _ = tiny_clip(hidden=16, projection_dim=half)
    accepted = inspect.signature(SD3Transformer2DModel.__init__).parameters
    transformer = SD3Transformer2DModel(**{k: v for k, v in config.items() if k in accepted})
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=tiny_vae(config["in_channels"], shift_factor=0.1, scaling_factor=0.9),
                                    text_encoder=clip1, tokenizer=ctok, text_encoder_2=clip2, tokenizer_2=ctok,
                                    text_encoder_3=enc, tokenizer_3=tok)
