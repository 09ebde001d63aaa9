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
import torch

from tessera.models.diffusers_loader import DiffusersDir
from tessera.models.dit_layers import TokenShard
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

    def predict(self, latent_rows, cond: Conditioning, t, shard: TokenShard, self_attn, image_hw, guidance=None):
        b = latent_rows.shape[0]
        timestep = t.reshape(1).expand(b).to(latent_rows.dtype) / 1000
        g = None
        if self.model.config.guidance_embeds:
            g = torch.full((b,), float(guidance if guidance is not None else 3.5), dtype=latent_rows.dtype)
        return self.model(latent_rows, cond.tensors["text"].to(latent_rows.dtype),
                          cond.tensors["pooled"].to(latent_rows.dtype), timestep, shard=shard, self_attn=self_attn,
                          guidance=g)

    def to_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        return latents / vae.config.scaling_factor + vae.config.shift_factor
