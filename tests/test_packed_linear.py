"""oneDNN pre-packed 16-bit linears (models/packed_linear.py) give bitwise the outputs of F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.models import packed_linear
from tessera.models.moe_layers import ExpertWeights, fuse_qkv, pack_linears

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="this torch build has no oneDNN linear packing")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 37])
def test_packed_linear_equals_f_linear(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=gen).to(dtype)
    b = torch.randn(96, generator=gen).to(dtype)
    x = torch.randn(rows, 64, generator=gen).to(dtype)
    packed = packed_linear.pack(w)
    if dtype == torch.bfloat16:  # fp16 packing needs AVX512-FP16; elsewhere the weight stays plain
        assert packed.is_mkldnn
    assert packed.shape == w.shape
    assert torch.equal(packed_linear.linear(x, packed), F.linear(x, w))
    assert torch.equal(packed_linear.linear(x, packed, b), F.linear(x, w, b))
    x3 = x.view(1, rows, 64)
    assert torch.equal(packed_linear.linear(x3, packed), F.linear(x3, w))


def test_fp32_and_disabled_weights_stay_plain(monkeypatch):
    w = torch.randn(8, 4)
    assert packed_linear.pack(w) is w  # MKL already runs fp32 at full speed
    monkeypatch.setenv("TESSERA_PACKED_LINEAR", "0")
    wb = w.bfloat16()
    assert packed_linear.pack(wb) is wb


def test_layer_weights_are_fused_then_packed():
    p = {n: torch.randn(s, 16).bfloat16() for n, s in (("q", 32), ("k", 8), ("v", 8), ("o", 16))}
    p["attn_norm"] = torch.ones(16).bfloat16()
    x = torch.randn(2, 16).bfloat16()
    want = torch.cat([F.linear(x, p[n]) for n in ("q", "k", "v")], -1)
    fuse_qkv(p)
    pack_linears(p)
    assert p["qkv"].is_mkldnn and p["o"].is_mkldnn and not p["attn_norm"].is_mkldnn
    assert "q" not in p  # the separate weights are replaced, not kept next to the fused one
    assert torch.equal(packed_linear.linear(x, p["qkv"]), want)
    experts = ExpertWeights()
    experts.put(0, 3, torch.randn(8, 16).bfloat16(), torch.randn(16, 4).bfloat16())
    gate_up, down = experts.get(0, [3])[0]
    assert gate_up.is_mkldnn and down.is_mkldnn and experts.nbytes() == (8 * 16 + 16 * 4) * 2
