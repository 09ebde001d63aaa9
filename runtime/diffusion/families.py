"""Per-family glue between a denoising loop and a tessera transformer.

Why here and not in ``models/``: this is pipeline logic (prompt encoding
with the checkpoint's text encoders, timestep schedules, latent layout,
VAE scaling), mirroring what the matching diffusers pipeline does so that a
tessera run and a diffusers run of the same directory agree. The model files
stay pure modules.

Every adapter works on *rows* of the VAE latent (``[B, C, rows, W]``):
patch/sequence parallel bands are whole rows of the patch grid, so
``row_unit`` latent rows make one grid row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tessera.models.diffusers_loader import DiffusersDir
from tessera.models.dit_layers import TokenShard, whole_model


@dataclass
class Conditioning:
    """Text conditioning of one branch (cond or uncond) for a batch of prompts."""

    tensors: dict[str, torch.Tensor]

    def cat(self, other: "Conditioning") -> "Conditioning":
        return Conditioning({k: torch.cat([v, other.tensors[k]]) for k, v in self.tensors.items()})

    def select(self, rows: slice) -> "Conditioning":
        """Batch rows ``rows`` (a pipeline micro-batch)."""
        return Conditioning({k: v[rows] for k, v in self.tensors.items()})


class PixArtAdapter:
    """PixArt-alpha/Sigma: T5 prompt embeddings + mask, DPM-Solver (or any) scheduler, learned sigma dropped."""

    family = "pixart"
    uses_cfg = True

    def __init__(self, model_dir: DiffusersDir, model: Any) -> None:
        self.dir = model_dir
        self.model = model
        self._text: tuple[Any, Any] | None = None

    @property
    def row_unit(self) -> int:
        return self.model.config.patch_size

    @property
    def latent_channels(self) -> int:
        return self.model.config.in_channels

    def encode(self, prompts: list[str], negative: list[str], max_sequence_length: int = 300) -> tuple[Conditioning, Conditioning]:
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
        if self.model.config.additional_conditions:
            h, w = image_hw
            dev = latent_rows.device
            extra = {"resolution": torch.tensor([[h, w]], dtype=torch.float32, device=dev).repeat(b, 1),
                     "aspect_ratio": torch.tensor([[h / w]], dtype=torch.float32, device=dev).repeat(b, 1)}
        timestep = t.reshape(1).expand(b)
        out = self.model(latent_rows, cond.tensors["text"].to(latent_rows.dtype), timestep, shard=shard,
                         text_mask=cond.tensors["mask"], self_attn=self_attn, stage=stage, **extra)
        if out is not None and self.model.config.out_ch // 2 == self.latent_channels:
            out = out.chunk(2, dim=1)[0]  # learned variance channels are not used for sampling
        return out

    def to_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        return latents / vae.config.scaling_factor


def flow_shift_mu(image_seq_len: int, config: Any) -> float:
    """Flux's resolution-dependent timestep shift (linear in the token count)."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def adapter_for(model_dir: DiffusersDir, model: Any):
    if model_dir.family == "pixart":
        return PixArtAdapter(model_dir, model)
    if model_dir.family == "flux":
        from tessera.runtime.diffusion.flow_families import FluxAdapter

        return FluxAdapter(model_dir, model)
    if model_dir.family == "sd3":
        from tessera.runtime.diffusion.flow_families import SD3Adapter

        return SD3Adapter(model_dir, model)
    raise ValueError(f"no pipeline adapter for family {model_dir.family!r}")

