"""diffusers references for the diffusion tests: the single-device transformer and pipeline."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=12)
def reference_transformer(model_dir: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_reference_pred(model_dir: str, latents, t: float, embeds, guidance_scale: float) -> torch.Tensor:
    """What PixArtSigmaPipeline computes for one step from the same latents and text embeddings."""
    pipe = reference_transformer(model_dir)
    cond, uncond = embeds
    guided = guidance_scale > 1.0
    x = torch.cat([latents, latents]) if guided else latents
    text = torch.cat([uncond["text"], cond["text"]]) if guided else cond["text"]
    mask = torch.cat([uncond["mask"], cond["mask"]]) if guided else cond["mask"]
    ts = torch.tensor([t]).expand(x.shape[0])
    with torch.no_grad():
        out = pipe.transformer(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=ts,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    if guided:
        u, c = out.chunk(2)
        out = u + guidance_scale * (c - u)
    return out.chunk(2, dim=1)[0]


def pixart_reference_latents(model_dir: str, prompt: str, steps: int, height: int, width: int, guidance_scale: float,
                             seed: int) -> torch.Tensor:
    pipe = reference_transformer(model_dir)
    out = pipe(prompt, num_inference_steps=steps, height=height, width=width, guidance_scale=guidance_scale,
               generator=torch.Generator().manual_seed(seed), output_type="latent", use_resolution_binning=False,
               max_sequence_length=300)
    return out.images


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of ``a`` against ``b`` with the peak taken from ``b``'s range."""
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    peak = (b.max() - b.min()).item()
    if mse == 0:
        return float("inf")
    import math

    return 10 * math.log10(peak**2 / mse)


def assert_latents_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """End-to-end check: max abs diff <= 1e-4 relative to the latents' scale.

    Random tiny models drive DPM-Solver latents to |x| ~ 1e2, where one fp32
    ulp is ~1e-5 and the solver's 1/alpha amplifies per-step rounding, so the
    bound is scaled by max(1, max|ref|); per-step checks stay absolute.
    """
    worst = (got.float() - ref.float()).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert worst <= 1e-4 * scale, f"end-to-end latents differ by {worst} (scale {scale:.1f})"


def flux_reference_pred(model_dir: str, latents: torch.Tensor, t: float, embeds,
                        guidance_scale: float = 3.5) -> torch.Tensor:
    """FluxPipeline's transformer call (no CFG) on tessera's unpacked latents; returned unpacked.
    ``guidance_scale`` is embedded when the checkpoint embeds guidance (FLUX.1-dev), as FluxPipeline does."""
    pipe = reference_transformer(model_dir)
    cond, _ = embeds
    b, c, h, w = latents.shape
    packed = pipe._pack_latents(latents, b, c, h, w)
    ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    txt_ids = torch.zeros(cond["text"].shape[1], 3)
    guidance = torch.full([b], float(guidance_scale)) if pipe.transformer.config.guidance_embeds else None
    with torch.no_grad():
        out = pipe.transformer(packed, timestep=torch.tensor([t / 1000]).expand(b), guidance=guidance,
                               pooled_projections=cond["pooled"], encoder_hidden_states=cond["text"],
                               txt_ids=txt_ids, img_ids=ids, return_dict=False)[0]
    return pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)


def flux_reference_latents(model_dir: str, prompt: str, steps: int, height: int, width: int, seed: int,
                           guidance_scale: float = 0.0) -> torch.Tensor:
    pipe = reference_transformer(model_dir)
    out = pipe(prompt, num_inference_steps=steps, height=height, width=width, guidance_scale=guidance_scale,
               generator=torch.Generator().manual_seed(seed), output_type="latent", max_sequence_length=512)
    return pipe._unpack_latents(out.images, height, width, pipe.vae_scale_factor)


def sd3_reference_pred(model_dir: str, latents: torch.Tensor, t: float, embeds, guidance_scale: float) -> torch.Tensor:
    """StableDiffusion3Pipeline's batched-CFG transformer call for one step."""
    pipe = reference_transformer(model_dir)
    cond, uncond = embeds
    x = torch.cat([latents, latents])
    with torch.no_grad():
        out = pipe.transformer(x, encoder_hidden_states=torch.cat([uncond["text"], cond["text"]]),
                               pooled_projections=torch.cat([uncond["pooled"], cond["pooled"]]),
                               timestep=torch.tensor([t]).expand(2), return_dict=False)[0]
    u, c = out.chunk(2)
    return u + guidance_scale * (c - u)


def sd3_reference_latents(model_dir: str, prompt: str, steps: int, height: int, width: int, guidance_scale: float,
                          seed: int) -> torch.Tensor:
    pipe = reference_transformer(model_dir)
    return pipe(prompt, num_inference_steps=steps, height=height, width=width, guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed), output_type="latent", max_sequence_length=256).images
