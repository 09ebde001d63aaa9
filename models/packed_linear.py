"""16-bit linears on the CPU through oneDNN's pre-packed (blocked) weight layout.

Why: a bf16 ``F.linear`` at decode batch sizes reads a plain row-major weight
and runs at ~8 GB/s per core on this machine; the same weight reordered once
into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``, what
inductor's CPU freezing pass emits) runs at ~12 GB/s, 1.4-2x faster for the
shapes of an MoE decode step, with bitwise-identical outputs. Decode is bound
by reading weights, so this is most of a step.

The packed weight replaces the plain one (same bytes, opaque layout); ``linear``
dispatches on the tensor, so code paths that receive plain weights (offloaded
experts, fp32 models, GPUs) are unchanged. ``TESSERA_PACKED_LINEAR=0`` turns
packing off.
"""

from __future__ import annotations

import functools

import os

import torch
import torch.nn.functional as F

_DTYPES = (torch.bfloat16, torch.float16)


def available() -> bool:
    return (
        os.environ.get("TESSERA_PACKED_LINEAR", "1") != "0"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def packable(weight: torch.Tensor) -> bool:
    """A 2-D 16-bit CPU weight that oneDNN can reorder (fp32 already runs at full speed through MKL)."""
    return weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype in _DTYPES and not weight.is_mkldnn


@functools.cache
def cpu_packs(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN reorders a ``dtype`` weight (fp16 needs AVX512-FP16): a hardware fact,
    probed once on a small weight (memoised, so no module state is written by ``pack``)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
        return True
    except RuntimeError:
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's blocked layout, or unchanged when it cannot or need not be packed."""
    if not (packable(weight) and available() and cpu_packs(weight.dtype)):
        return weight
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
    except RuntimeError:  # a shape oneDNN refuses: plain F.linear for this weight
        return weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for plain or packed weights."""
    if not weight.is_mkldnn:
        return F.linear(x, weight, bias)
    if x.dim() != 2:
        return linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], -1)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
