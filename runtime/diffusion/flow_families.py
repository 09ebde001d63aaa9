"""Pipeline glue for the flow-matching families (Flux, SD3), mirroring their diffusers pipelines.

Flux: CLIP pooled embedding + T5 sequence, resolution-shifted sigmas
(``mu``), timestep passed as sigma; guidance-distilled checkpoints embed the
guidance scale (no CFG branches), others get true CFG with a negative prompt.
SD3: two CLIP encoders (pooled + penultimate hidden states) and T5, joined as
diffusers does; CFG with a negative prompt.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.nn.functional as F
import torch

from tessera.models.diffusers_loader import DiffusersDir
from tessera.models.dit_layers import TokenShard, whole_model
from tessera.runtime.diffusion.families import Conditioning, flow_shift_mu


class FluxAdapter:
    family = "flux"
    row_unit = 2  # 2x2 latent pixels per token

    def __init__(self, model_dir: DiffusersDir, model: Any) -> None:
        self.dir = model_dir
        self.model = model
        self.uses_cfg = not model.config.guidance_embeds
        self._enc: dict[str, Any] = {}

    @property
    def latent_channels(self) -> int:
        return self.model.config.in_channels // 4

    def _component(self, name: str):
        if name not in self._enc:
            comp = self.dir.load_component(name)
            self._enc[name] = comp.eval() if hasattr(comp, "eval") else comp
        return self._enc[name]

    def encode(self, prompts: list[str], negative: list[str], max_sequence_length: int = 512):
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
        if self.model.config.guidance_embeds:
            g = torch.full((b,), float(guidance if guidance is not None else 3.5), dtype=latent_rows.dtype,
                           device=latent_rows.device)
        return self.model(latent_rows, cond.tensors["text"].to(latent_rows.dtype),
                          cond.tensors["pooled"].to(latent_rows.dtype), timestep, shard=shard, self_attn=self_attn,
                          guidance=g, stage=stage)

    def to_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        return latents / vae.config.scaling_factor + vae.config.shift_factor


class SD3Adapter:
    family = "sd3"
    uses_cfg = True

    def __init__(self, model_dir: DiffusersDir, model: Any) -> None:
        self.dir = model_dir
        self.model = model
        self._enc: dict[str, Any] = {}

    @property
    def row_unit(self) -> int:
        return self.model.config.patch_size

    @property
    def latent_channels(self) -> int:
        return self.model.config.in_channels

    def _component(self, name: str):
        if name not in self._enc:
            comp = self.dir.load_component(name)
            self._enc[name] = comp.eval() if hasattr(comp, "eval") else comp
        return self._enc[name]

    def encode(self, prompts: list[str], negative: list[str], max_sequence_length: int = 256):
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
                    t5_seq = torch.zeros(len(texts), max_sequence_length, self.model.config.joint_attention_dim)
                clip_seq = F.pad(clip_seq, (0, t5_seq.shape[-1] - clip_seq.shape[-1]))
                text = torch.cat([clip_seq, t5_seq], dim=-2)
            return Conditioning({"text": text.float(), "pooled": torch.cat([pooled1, pooled2], dim=-1).float()})

        return run(prompts), run(negative)

    def set_timesteps(self, scheduler: Any, steps: int, latent_h: int, latent_w: int) -> torch.Tensor:
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting"):
            p = self.model.config.patch_size
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
