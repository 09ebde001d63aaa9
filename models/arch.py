"""The typed description of one MoE language model, shared by every family.

A family file (``models/mixtral.py``, ``qwen_moe.py``, ``deepseek.py``) reads a
Hugging Face ``config.json`` into one frozen :class:`MoEArch`; everything
downstream (loader, parallel plans, model math, KV cache sizing) reads only
this type, so adding a family never touches the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tessera.models.fp8 import FP8Quantization
from tessera.models.rope import RopeScaling, parse_rope, softmax_scale
from tessera.config import ConfigError


@dataclass(frozen=True)
class MoEArch:
    """Shape and behaviour of a decoder-only MoE transformer (validated at construction)."""

    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    qk_head_dim: int  # per-head dim of queries/keys (MLA: nope + rope)
    v_head_dim: int
    rope_dim: int  # how many dims of each q/k head are rotated
    rope_theta: float
    rms_eps: float
    moe_layers: tuple[bool, ...]  # per layer: routed-expert block (True) or dense MLP
    num_experts: int
    top_k: int
    moe_intermediate: int
    dense_intermediate: int
    router: str = "softmax"  # "softmax" | "softmax_group" | "sigmoid_group"
    norm_topk_prob: bool = False
    routed_scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    router_bias: bool = False  # DeepSeek-V3 e_score_correction_bias
    shared_intermediate: int = 0  # 0: no shared expert
    shared_gate: bool = False  # Qwen2-MoE: sigmoid gate on the shared expert
    attention: str = "gqa"  # "gqa" | "mla"
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_interleave: bool = False  # rotate adjacent pairs (DeepSeek) instead of halves
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    max_position_embeddings: int = 4096
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # not implemented: contexts must fit inside it
    rope_scaling: RopeScaling | None = None  # None: plain RoPE; else YaRN (models.rope)
    quantization: FP8Quantization | None = None  # block-FP8 checkpoint, dequantized on load (models.fp8)
    mtp_layers: int = 0  # DeepSeek-V3 multi-token-prediction modules stored after the last layer; never run

    def __post_init__(self) -> None:
        if len(self.moe_layers) != self.num_layers:
            raise ConfigError(f"{self.architecture}: moe_layers has {len(self.moe_layers)} entries for {self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{self.architecture}: {self.num_heads} attention heads are not a multiple of "
                f"{self.num_kv_heads} key/value heads; the checkpoint's config.json is inconsistent"
            )
        if any(self.moe_layers) and not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"{self.architecture}: top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.router not in ("softmax", "softmax_group", "sigmoid_group"):
            raise ConfigError(f"unknown router kind {self.router!r}")
        if self.router != "softmax" and self.num_experts % self.n_group:
            raise ConfigError(f"{self.architecture}: {self.num_experts} experts do not split into n_group={self.n_group} groups")
        if self.attention not in ("gqa", "mla"):
            raise ConfigError(f"unknown attention kind {self.attention!r}")

    @property
    def softmax_scale(self) -> float:
        """Scale of attention scores: qk_head_dim**-0.5, adjusted for YaRN's mscale_all_dim (DeepSeek)."""
        return softmax_scale(self.qk_head_dim, self.rope_scaling)

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.moe_layers) if m)

    def kv_geometry(self, local_kv_heads: int) -> tuple[int, int, int]:
        """(heads, key dim, value dim) cached per token and layer on a rank holding ``local_kv_heads``.

        Multi-head latent attention (DeepSeek) caches one latent plus the shared
        roped key (``kv_lora_rank + rope_dim``, no separate values, replicated
        over tp); GQA caches every local kv head's K and V.
        """
        if self.attention == "mla":
            return 1, self.kv_lora_rank + self.rope_dim, 0
        return local_kv_heads, self.qk_head_dim, self.v_head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV-cache bytes of one token over all layers, on one rank holding every kv head."""
        heads, k, v = self.kv_geometry(self.num_kv_heads)
        return self.num_layers * heads * (k + v) * dtype_bytes


@dataclass(frozen=True)
class Refuse:
    """A config.json key whose value tessera supports only within ``ok`` (an absent key is always fine:
    the reference implementation's default applies); any other value is refused, naming the key, with ``fix``."""

    key: str
    ok: tuple[Any, ...]
    fix: str


def check_refusals(cfg: dict, rules: tuple[Refuse, ...]) -> None:
    """Raise a ConfigError naming the first key of ``rules`` whose value tessera does not implement."""
    arch = (cfg.get("architectures") or ["this model"])[0]
    for rule in rules:
        if rule.key in cfg and cfg[rule.key] not in rule.ok:
            raise ConfigError(
                f"{arch}: config.json sets {rule.key}={cfg[rule.key]!r}, which tessera does not implement "
                f"(supported: {', '.join(repr(v) for v in rule.ok)}); {rule.fix}"
            )


# Keys every MoE family refuses the same way.
COMMON_REFUSALS = (
    Refuse("hidden_act", ("silu",), "the MLPs and experts are SwiGLU (silu); use a checkpoint whose hidden_act is silu"),
)


def rope_theta_of(cfg: dict) -> float:
    """rope theta of a family that implements only plain RoPE; any rope scaling is refused, naming its type."""
    return parse_rope(cfg, supported=("default",))[0]


def sliding_window_of(cfg: dict) -> int | None:
    """The attention window when the config turns sliding-window attention on, else None."""
    window = cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return None
    return int(window)


def eos_of(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def dtype_of(cfg: dict) -> str:
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
