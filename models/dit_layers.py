"""Layers shared by the diffusion-transformer families (PixArt, SD3, Flux).

Why a shared module: the three families differ in how blocks are wired, but
they embed timesteps, positions and patches the same way, and all of them
route *image-token self-attention* through one pluggable function so that
``parallel/`` (patch parallel, Ulysses) can replace it without the model
knowing. Image tokens are always row-major over the patch grid, and a rank
holds a contiguous range of grid rows (``TokenShard``), so a row split of
the latent is a contiguous split of the token sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TokenShard:
    """Which grid rows of the patch grid this rank holds.

    ``grid_h`` x ``grid_w`` is the full patch grid; the rank owns rows
    ``[row_start, row_end)``. A single device holds all rows.
    """

    grid_h: int
    grid_w: int
    row_start: int
    row_end: int

    def __post_init__(self) -> None:
        if not 0 <= self.row_start < self.row_end <= self.grid_h:
            raise ValueError(
                f"row range [{self.row_start}, {self.row_end}) is not inside the {self.grid_h}-row patch grid; "
                "each rank needs at least one row: use fewer sp ranks or a taller image"
            )

    @classmethod
    def full(cls, grid_h: int, grid_w: int) -> "TokenShard":
        return cls(grid_h, grid_w, 0, grid_h)

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def num_tokens(self) -> int:
        return self.rows * self.grid_w

    @property
    def token_slice(self) -> slice:
        return slice(self.row_start * self.grid_w, self.row_end * self.grid_w)


def split_rows(total: int, parts: int) -> list[tuple[int, int]]:
    """Split ``total`` rows into ``parts`` contiguous ranges as evenly as possible (first ones larger)."""
    if parts > total:
        raise ValueError(
            f"cannot split {total} patch rows over {parts} ranks (each rank needs a row); "
            f"use at most {total} ranks on the sp dim or a larger height"
        )
    base, extra = divmod(total, parts)
    out, start = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append((start, start + n))
        start += n
    return out


class SelfAttentionFn(Protocol):
    """Image-token self-attention: q, k, v are ``[B, N_local, H, d]``; returns ``[B, N_local, H, d]``.

    ``layer`` identifies the attention call site (for stale K/V buffers).
    ``extra_kv`` (optional) is ``(k, v)`` of tokens every rank holds in full
    (text tokens of joint attention); they are attended to but never exchanged.
    """

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer: int,
                 extra_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor: ...


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention on ``[B, N, H, d]`` tensors (the layout every exchange in ``parallel/`` uses)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def local_self_attention(q, k, v, *, layer: int, extra_kv=None):
    """The single-device self-attention: every token is here."""
    if extra_kv is not None:
        k = torch.cat([extra_kv[0], k], dim=1)
        v = torch.cat([extra_kv[1], v], dim=1)
    return sdpa(q, k, v)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0,
                       scale: float = 1.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, ``[N] -> [N, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = scale * t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], -1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = torch.outer(pos.reshape(-1).double(), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float) -> torch.Tensor:
    """2-D sin-cos position table ``[grid_h*grid_w, dim]`` (row-major), as PixArt/SD3 were trained with.

    The first half of the channels encodes the column, the second the row.
    """
    rows = torch.arange(grid_h, dtype=torch.float32) / (grid_h / base_size) / interpolation_scale
    cols = torch.arange(grid_w, dtype=torch.float32) / (grid_w / base_size) / interpolation_scale
    col_grid = cols[None, :].expand(grid_h, grid_w)
    row_grid = rows[:, None].expand(grid_h, grid_w)
    return torch.cat([_sincos_1d(dim // 2, col_grid), _sincos_1d(dim // 2, row_grid)], dim=1).float()


class TimestepMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' ``TimestepEmbedding`` names)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class GeluMLP(nn.Module):
    """Feed-forward ``net.0.proj -> gelu(tanh) -> net.2`` (checkpoint names of diffusers' FeedForward).

    TP: ``net.0.proj`` is column-split, ``net.2`` row-split.
    """

    def __init__(self, dim: int, inner: int, approximate: str = "tanh") -> None:
        super().__init__()
        self.net = nn.ModuleList([_Proj(dim, inner), nn.Identity(), nn.Linear(inner, dim)])
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate=self.approximate))


class _Proj(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)


class Attention(nn.Module):
    """q/k/v/out projections with diffusers' names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``).

    Heads are inferred from the projected width, so the same code runs when
    tensor parallelism has column-split q/k/v (fewer local heads).
    Optional per-head RMS norms on q and k (SD3, Flux) and extra projections
    for a second stream (``add_q_proj`` ... ``to_add_out``) for joint attention.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, kv_dim: int | None = None, bias: bool = True,
                 qk_norm: bool = False, eps: float = 1e-6, out: bool = True, out_bias: bool = True) -> None:
        super().__init__()
        inner = heads * head_dim
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim or dim, inner, bias=bias)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps) if qk_norm else None
        self.norm_k = nn.RMSNorm(head_dim, eps=eps) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=out_bias)]) if out else None

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim))

    def qkv(self, x: torch.Tensor, ctx: torch.Tensor | None = None):
        """Project to ``[B, N, H, d]`` q, k, v (k/v from ``ctx`` for cross-attention)."""
        src = x if ctx is None else ctx
        q, k, v = self.heads(self.to_q(x)), self.heads(self.to_k(src)), self.heads(self.to_v(src))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        return q, k, v


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: LayerNorm without affine weights (eps 1e-6, as the DiT families use), then ``modulate``."""
    return modulate(F.layer_norm(x, (x.shape[-1],), eps=1e-6), shift, scale)


class AdaNorm(nn.Module):
    """``linear(silu(temb))`` chunked into ``n`` modulation vectors (adaLN-Zero of MMDiT / Flux blocks)."""

    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, n * dim)
        self.n = n

    def forward(self, temb: torch.Tensor):
        return self.linear(F.silu(temb))[:, None].chunk(self.n, dim=-1)


def joint_stream_update(x, attn_out, to_out, ff, gate, shift2, scale2, gate2):
    """One stream of an MMDiT / Flux double block after joint attention: gated attention output,
    then the gated MLP on the re-modulated stream."""
    x = x + gate * to_out(attn_out)
    return x + gate2 * ff(norm_modulate(x, shift2, scale2))


def patchify(latent: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, (H/p)(W/p), C p p]`` with Flux's channel order (c, ph, pw)."""
    b, c, h, w = latent.shape
    x = latent.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, rows: int, cols: int, p: int, channels: int) -> torch.Tensor:
    """Inverse of the DiT head: ``[B, rows*cols, p*p*C]`` (order ph, pw, c) -> ``[B, C, rows*p, cols*p]``."""
    b = tokens.shape[0]
    x = tokens.reshape(b, rows, cols, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, rows * p, cols * p)


AttnFactory = Callable[[], SelfAttentionFn]


class OnOtherStage(nn.Module):
    """Stand-in for a block or embedding that another pipeline stage holds.

    It has no parameters, so nothing of it appears in this rank's state dict
    and the loader never reads its tensors; calling it is a bug in the schedule.
    """

    def forward(self, *args, **kwargs):
        raise RuntimeError("this module is held by another pipeline stage; it cannot run on this rank")


def local_blocks(*block_lists: nn.ModuleList):
    """``(global index, block)`` over the block lists as one sequence, skipping other stages' blocks."""
    index = 0
    for blocks in block_lists:
        for block in blocks:
            if not isinstance(block, OnOtherStage):
                yield index, block
            index += 1


def whole_model(embed: Callable, body: Callable, head: Callable):
    """The single-stage schedule ``head(body(embed()))``; ``parallel/dit_pipeline.py`` supplies the staged one.

    Every family's ``forward`` is written as these three closures over a
    ``carry`` dict of tensors (hidden states plus the conditioning later
    blocks need), so a pipeline stage can run only its part and ship the carry.
    """
    return head(body(embed()))
