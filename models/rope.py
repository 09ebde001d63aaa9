"""Rotary position embeddings of the MoE language models: plain RoPE and YaRN.

``parse_rope`` reads a Hugging Face ``config.json`` (transformers 5 ``rope_parameters``
or 4 ``rope_scaling`` + ``rope_theta``) into ``(theta, RopeScaling | None)`` and refuses
any rope type the family does not list as supported, naming it. ``frequencies`` gives
the inverse frequencies and the cos/sin "attention factor" as transformers computes them
(``modeling_rope_utils._compute_yarn_parameters``), and ``softmax_scale`` the attention
softmax scale, which DeepSeek-V2/V3 multiply by ``mscale(factor, mscale_all_dim)**2``
under YaRN (transformers' ``yarn_apply_mscale``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from tessera.config import ConfigError

ROPE_TYPES = ("default", "yarn")  # what this module can compute


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (the only scaled RoPE implemented), resolved from the config."""

    rope_type: str
    factor: float
    original_max_positions: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0  # 0: unset
    mscale_all_dim: float = 0.0  # 0: unset
    attention_factor: float | None = None  # None: derived from factor / mscale / mscale_all_dim
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type != "yarn":
            raise ConfigError(f"rope_type {self.rope_type!r} is not implemented; supported: {', '.join(ROPE_TYPES)}")
        if not self.factor > 0 or self.original_max_positions <= 0:
            raise ConfigError(
                f"yarn rope scaling needs factor > 0 and original_max_position_embeddings > 0, got "
                f"factor={self.factor}, original_max_position_embeddings={self.original_max_positions}"
            )


def parse_rope(cfg: dict, supported: tuple[str, ...] = ("default",)) -> tuple[float, RopeScaling | None]:
    """(rope theta, scaling or None) of a config; a rope type outside ``supported`` is a ConfigError."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    arch = (cfg.get("architectures") or ["this model"])[0]
    if any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{arch}: per-layer-type rope parameters in config.json are not supported by tessera")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in supported:
        raise ConfigError(
            f"{arch}: rope_type {rope_type!r} in config.json is not supported by tessera for this model family "
            f"(supported: {', '.join(supported)}); use a checkpoint without that rope scaling"
        )
    theta = float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    if rope_type == "default":
        return theta, None
    # transformers gives a top-level original_max_position_embeddings priority over the rope dict's
    max_pos = cfg.get("max_position_embeddings", 4096)
    original = cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(factor if factor is not None else max_pos / original),
        original_max_positions=int(original),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=None if params.get("attention_factor") is None else float(params["attention_factor"]),
        truncate=bool(params.get("truncate", True)),
    )


def _mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context ``scale`` times longer (1 when not longer)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_factor(scaling: RopeScaling | None) -> float:
    """The factor transformers multiplies cos and sin by."""
    if scaling is None:
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    if scaling.mscale and scaling.mscale_all_dim:
        return _mscale(scaling.factor, scaling.mscale) / _mscale(scaling.factor, scaling.mscale_all_dim)
    return _mscale(scaling.factor)


def softmax_scale(head_dim: int, scaling: RopeScaling | None) -> float:
    """Attention softmax scale: head_dim**-0.5, times mscale(factor, mscale_all_dim)**2 under YaRN (DeepSeek)."""
    scale = head_dim ** -0.5
    if scaling is not None and scaling.mscale_all_dim:
        scale *= _mscale(scaling.factor, scaling.mscale_all_dim) ** 2
    return scale


def inv_freq(dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies [dim/2] (float32, CPU) of plain RoPE or YaRN."""
    wavelength = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # per rotated pair, over 2 pi
    if scaling is None:
        return 1.0 / wavelength
    s = scaling

    def dim_of(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times in the original context
        return dim * math.log(s.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    # 0 below `low` (high frequencies: kept as trained), 1 above `high` (low frequencies: interpolated)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    return (1.0 / (s.factor * wavelength)) * (1 - keep) + (1.0 / wavelength) * keep


@functools.lru_cache(maxsize=32)
def frequencies(dim: int, theta: float, scaling: RopeScaling | None, device: torch.device) -> tuple[torch.Tensor, float]:
    """(inv_freq on ``device``, attention factor), computed once per device (on the CPU, as transformers does)."""
    return inv_freq(dim, theta, scaling).to(device), attention_factor(scaling)


def cos_sin(positions: torch.Tensor, dim: int, theta: float, scaling: RopeScaling | None = None):
    """cos, sin [N, dim/2] (float32) for positions [N], scaled by the attention factor."""
    freq, factor = frequencies(dim, float(theta), scaling, positions.device)
    angles = positions.float().unsqueeze(-1) * freq
    if factor == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * factor, angles.sin() * factor
