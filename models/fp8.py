"""Block-quantized FP8 weights (DeepSeek-V3 style): the config, the dequantization, block-aligned slices.

A released FP8 checkpoint stores a linear weight ``W [out, in]`` as ``float8_e4m3fn`` (safetensors
dtype ``F8_E4M3``) next to ``<name>_scale_inv`` (float32, ``[ceil(out/bo), ceil(in/bi)]``): one
scale per ``bo x bi`` block, ``quantization_config.weight_block_size = [bo, bi]`` (``[128, 128]``
in DeepSeek-V3/R1 and the Qwen3 FP8 releases). The real weight is ``fp8 * scale_inv`` block by
block (DeepSeek's ``inference/kernel.py:weight_dequant``, ``fp8_cast_bf16.py``); the last block
of a row or column may be partial. Norms, embeddings, the LM head and the routers stay in the
checkpoint's floating dtype (they have no ``_scale_inv``).

How a rank reads its slice: a tensor-parallel slice ``[start, stop)`` along one dim is widened to
whole blocks (:func:`block_range`), the FP8 bytes and the matching scale rows/columns are read,
dequantized, and the widening trimmed off (:class:`FP8Block`). A rank never reads more than one
extra block on each side, and never a whole tensor it does not own.

The seam for keeping FP8 resident (GPU, later): :meth:`CheckpointReader.read_fp8
<tessera.models.checkpoint.CheckpointReader.read_fp8>` returns the :class:`FP8Block` (FP8 data,
its scales and the trim) *without* dequantizing. Today :meth:`CheckpointReader.read` calls
:meth:`FP8Block.dequantize` on it and the model computes in its dtype. An FP8-resident loader
would keep the block-aligned ``FP8Block`` on the device instead and give ``(data, scale_inv,
block)`` to a block-scaled GEMM (``torch._scaled_mm`` / DeepGEMM-style kernels) behind the same
``linear`` call of ``models.packed_linear``; block-aligned tp slices (the common case: 128 divides
every released head and intermediate split) need no trim at all. Nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tessera.config import ConfigError

SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"
FP8_DTYPE = "F8_E4M3"  # safetensors' name for torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn

# tessera weight names that block-FP8 releases store in FP8: every linear projection of attention
# and the MLPs (dense, shared and routed experts). Routers, norms, biases, embeddings and the LM
# head stay in the checkpoint dtype (DeepSeek-V3; Qwen3-FP8's ``modules_to_not_convert``).
QUANTIZED_WEIGHTS = frozenset({
    "q", "k", "v", "o", "q_a", "q_b", "kv_a", "kv_b",
    "expert_gate", "expert_up", "expert_down",
    "shared_gate_proj", "shared_up", "shared_down",
    "dense_gate", "dense_up", "dense_down",
})


@dataclass(frozen=True)
class FP8Quantization:
    """``quantization_config`` of a block-quantized FP8 checkpoint (validated by :func:`parse_quantization`)."""

    block: tuple[int, int]  # (rows, cols) of W covered by one scale: weight_block_size
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"

    @property
    def name(self) -> str:
        return f"fp8_{self.fmt}_block{self.block[0]}x{self.block[1]}"

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Shape of ``weight_scale_inv`` for a weight of ``shape`` (partial last blocks round up)."""
        rows, cols = shape
        return -(-rows // self.block[0]), -(-cols // self.block[1])


def parse_quantization(cfg: dict[str, Any]) -> FP8Quantization | None:
    """The FP8 block quantization of a config, None when unquantized; anything else is refused by name."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    arch = (cfg.get("architectures") or ["this model"])[0]
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(
            f"{arch}: config.json quantization_config.quant_method={method!r} is not supported; tessera loads "
            "block-quantized FP8 checkpoints (quant_method 'fp8' with weight_block_size, as DeepSeek-V3 ships) "
            "or unquantized ones: use the original bf16/fp16 release of this model"
        )
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(
            f"{arch}: config.json quantization_config.fmt={fmt!r} is not supported (tessera reads float8_e4m3fn "
            "weights, fmt 'e4m3'); use an e4m3 or an unquantized checkpoint"
        )
    block = q.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(
            f"{arch}: config.json quantization_config.weight_block_size={block!r}: tessera reads block-quantized FP8 "
            "only (weight_block_size [rows, cols], e.g. [128, 128], with one weight_scale_inv per block); per-tensor "
            "and per-channel FP8 scales are not supported: use a block-quantized or an unquantized checkpoint"
        )
    scheme = q.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ConfigError(
            f"{arch}: config.json quantization_config.activation_scheme={scheme!r} is not supported: tessera "
            "dequantizes the weights and computes in the model dtype, which matches dynamic activation scaling "
            "only; use a checkpoint with activation_scheme 'dynamic'"
        )
    return FP8Quantization(block=(int(block[0]), int(block[1])), fmt=fmt, activation_scheme=scheme)


def dequantize(data: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``data * scale_inv`` block by block, computed in float32, then cast to ``dtype``.

    ``data`` [r, c] starts on a block boundary; ``scale_inv`` holds its ``ceil(r/bo) x ceil(c/bi)``
    scales (the last block of each dim may be partial).
    """
    rows, cols = data.shape
    want = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"{rows}x{cols} FP8 data with {block[0]}x{block[1]} blocks needs {want[0]}x{want[1]} scales, "
                         f"got {list(scale_inv.shape)}")
    scales = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (data.float() * scales).to(dtype)


def block_range(start: int, stop: int, size: int, block: int) -> tuple[int, int]:
    """``[start, stop)`` widened to whole blocks of ``block`` (the last one clipped at ``size``)."""
    return start // block * block, min(-(-stop // block) * block, size)


@dataclass(frozen=True)
class FP8Block:
    """A block-aligned piece of an FP8 weight, as read from the checkpoint, and the trim that makes it the slice.

    ``data`` covers rows/cols ``[lo, hi)`` of the full weight along ``dim`` (all of it when ``dim`` is
    None); ``scale_inv`` the scales of exactly those blocks; ``[trim_start, trim_stop)`` (relative to
    ``lo``) is the slice that was asked for.
    """

    data: torch.Tensor
    scale_inv: torch.Tensor
    block: tuple[int, int]
    dim: int | None = None
    trim_start: int = 0
    trim_stop: int | None = None

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale_inv.numel() * self.scale_inv.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        full = dequantize(self.data, self.scale_inv, self.block, dtype)
        if self.dim is None:
            return full
        return full.narrow(self.dim, self.trim_start, (self.trim_stop if self.trim_stop is not None
                                                       else full.shape[self.dim]) - self.trim_start)


def quantize(weight: torch.Tensor, block: tuple[int, int] = (128, 128), *,
             power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn data, float32 scale_inv) of ``weight`` with one scale per block (amax / 448).

    Used to build FP8 twins of tiny models in tests and benchmarks. ``power_of_two`` rounds each
    scale up to a power of two (UE8M0-style), so every dequantized value is exact in bfloat16.
    """
    rows, cols = weight.shape
    br, bc = -(-rows // block[0]), -(-cols // block[1])
    w = weight.float()
    padded = torch.zeros(br * block[0], bc * block[1])
    padded[:rows, :cols] = w
    amax = padded.view(br, block[0], bc, block[1]).abs().amax(dim=(1, 3)).clamp_min(1e-12)
    scale = amax / E4M3_MAX
    if power_of_two:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    expanded = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    data = (w / expanded).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return data, scale.float()
