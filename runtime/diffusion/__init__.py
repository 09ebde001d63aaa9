"""Diffusion engine: the denoising loop over a patch/sequence/CFG-parallel transformer."""
