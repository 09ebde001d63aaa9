"""Builds one rank's :class:`MoEStage` by reading only its slices of the checkpoint.

The family declares names (``CHECKPOINT_NAMES``) and split kinds (``TP_PLAN``);
``parallel.tensor`` turns a kind into a slice and ``parallel.expert`` says which
experts (and which slice of each) this rank holds; this module glues them to
``CheckpointReader.read`` so each tensor is read once, already sliced.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Sequence

import torch

from tessera.models.arch import MoEArch
from tessera.models.checkpoint import CheckpointError, CheckpointReader
from tessera.models.moe_layers import ExpertWeights, MoEStage, ParallelView
from tessera.parallel.expert import ExpertPlacement
from tessera.parallel.tensor import kv_head_range, pad_vocab_rows, split_range, tp_slice, vocab_range

log = logging.getLogger("tessera.models.loader")


def layer_param_names(arch: MoEArch, layer: int) -> list[str]:
    """The tessera names of the (non-routed-expert) weights of ``layer``."""
    names = ["attn_norm", "mlp_norm", "o"]
    if arch.attention == "mla":
        names += ["q_a", "q_a_norm", "q_b"] if arch.q_lora_rank else ["q"]
        names += ["kv_a", "kv_a_norm", "kv_b"]
    else:
        names += ["q", "k", "v"]
        names += ["q_bias", "k_bias", "v_bias"] if arch.qkv_bias else []
        names += ["q_norm", "k_norm"] if arch.qk_norm else []
    if arch.moe_layers[layer]:
        names += ["router"] + (["router_bias"] if arch.router_bias else [])
        if arch.shared_intermediate:
            names += ["shared_gate_proj", "shared_up", "shared_down"]
            names += ["shared_expert_gate"] if arch.shared_gate else []
    else:
        names += ["dense_gate", "dense_up", "dense_down"]
    return names


def expected_shape(arch: MoEArch, name: str) -> tuple[int, ...]:
    """Full checkpoint shape of a tessera-named weight, from config.json alone."""
    a, H, nh = arch, arch.hidden_size, arch.num_heads
    I, Is = a.dense_intermediate, a.shared_intermediate
    shapes = {
        "embed": (a.vocab_size, H), "lm_head": (a.vocab_size, H), "final_norm": (H,),
        "attn_norm": (H,), "mlp_norm": (H,),
        "q": (nh * a.qk_head_dim, H), "k": (a.num_kv_heads * a.qk_head_dim, H), "v": (a.num_kv_heads * a.v_head_dim, H),
        "q_bias": (nh * a.qk_head_dim,), "k_bias": (a.num_kv_heads * a.qk_head_dim,), "v_bias": (a.num_kv_heads * a.v_head_dim,),
        "q_norm": (a.qk_head_dim,), "k_norm": (a.qk_head_dim,), "o": (H, nh * a.v_head_dim),
        "q_a": (a.q_lora_rank or 0, H), "q_a_norm": (a.q_lora_rank or 0,), "q_b": (nh * a.qk_head_dim, a.q_lora_rank or 0),
        "kv_a": (a.kv_lora_rank + a.rope_dim, H), "kv_a_norm": (a.kv_lora_rank,),
        "kv_b": (nh * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank),
        "router": (a.num_experts, H), "router_bias": (a.num_experts,),
        "expert_gate": (a.moe_intermediate, H), "expert_up": (a.moe_intermediate, H), "expert_down": (H, a.moe_intermediate),
        "shared_gate_proj": (Is, H), "shared_up": (Is, H), "shared_down": (H, Is), "shared_expert_gate": (1, H),
        "dense_gate": (I, H), "dense_up": (I, H), "dense_down": (H, I),
    }
    return shapes[name]


def shard_unit(arch: MoEArch, name: str) -> int:
    """Granularity of a tp split: one attention head's rows/columns, or 1 for MLPs."""
    return {
        "q": arch.qk_head_dim, "q_bias": arch.qk_head_dim, "q_b": arch.qk_head_dim,
        "k": arch.qk_head_dim, "k_bias": arch.qk_head_dim, "v": arch.v_head_dim, "v_bias": arch.v_head_dim,
        "kv_b": arch.qk_nope_head_dim + arch.v_head_dim, "o": arch.v_head_dim,
    }.get(name, 1)


class _DeviceReader(CheckpointReader):
    """A CheckpointReader whose tensors land on the rank's device (sliced on the host first)."""

    def __init__(self, model_dir: str, expected_dtype: str, device) -> None:
        super().__init__(model_dir, expected_dtype=expected_dtype)
        self.device = torch.device(device)

    def read(self, *args, **kwargs) -> torch.Tensor:
        return super().read(*args, **kwargs).to(self.device)


def load_stage(
    model_dir: str,
    arch: MoEArch,
    family: ModuleType,
    layers: Sequence[int],
    first: bool,
    last: bool,
    pv: ParallelView,
    placement: ExpertPlacement | None,
    dtype: torch.dtype,
    expert_weights: ExpertWeights | None = None,
    dispatch_mode: str = "auto",
    device: torch.device | str = "cpu",
) -> tuple[MoEStage, int]:
    """(stage, bytes read) for the given layers on this rank; weights end on ``device``."""
    reader = _DeviceReader(model_dir, arch.dtype, device)
    names, plan = family.CHECKPOINT_NAMES, family.TP_PLAN
    tp, rank = pv.tp_size, pv.tp_rank

    def read(name: str, layer: int | None = None, expert: int | None = None, ckpt_name: str | None = None):
        key = ckpt_name or names[name].format(layer=layer, expert=expert)
        shape = expected_shape(arch, name)
        sl = tp_slice(plan[name], shape, shard_unit(arch, name), tp, rank, (arch.num_heads, arch.num_kv_heads))
        if sl is None:
            return reader.read(key, shape, dtype=dtype)
        return reader.read(key, shape, dim=sl[0], start=sl[1], stop=sl[2], dtype=dtype)

    glob: dict[str, torch.Tensor] = {}
    vstart, _, _ = vocab_range(arch.vocab_size, tp, rank)
    if first:
        glob["embed"] = read("embed")
    if last:
        glob["final_norm"] = read("final_norm")
        # The LM head is vocab-split over the whole stage (ep x tp ranks), not only tp:
        # with ep > 1 a replicated head would be read in full by every ep rank per token.
        head_name = names["embed" if arch.tie_word_embeddings else "lm_head"]
        hstart, hstop, hpart = vocab_range(arch.vocab_size, pv.moe_size, pv.moe_rank)
        head = reader.read(head_name, expected_shape(arch, "lm_head"), dim=0, start=hstart, stop=hstop, dtype=dtype)
        glob["lm_head"] = pad_vocab_rows(head, hpart)
    params: dict[int, dict[str, torch.Tensor]] = {}
    experts = expert_weights or ExpertWeights()
    for layer in layers:
        params[layer] = {name: read(name, layer) for name in layer_param_names(arch, layer)}
        if arch.moe_layers[layer]:
            assert placement is not None
            for expert, index, count in placement.local_experts(layer, pv.moe_rank):
                a, b = split_range(arch.moe_intermediate, count, index)
                key = lambda n: names[n].format(layer=layer, expert=expert)  # noqa: E731
                gate = reader.read(key("expert_gate"), expected_shape(arch, "expert_gate"), dim=0, start=a, stop=b, dtype=dtype)
                up = reader.read(key("expert_up"), expected_shape(arch, "expert_up"), dim=0, start=a, stop=b, dtype=dtype)
                down = reader.read(key("expert_down"), expected_shape(arch, "expert_down"), dim=1, start=a, stop=b, dtype=dtype)
                experts.put(layer, expert, torch.cat([gate, up], 0), down)
    if arch.attention == "mla" or arch.num_kv_heads >= tp:
        kv_local = arch.num_kv_heads // tp if arch.attention != "mla" else arch.num_heads // tp
    else:
        a, b = kv_head_range(arch.num_heads, arch.num_kv_heads, tp, rank)
        kv_local = b - a
    stage = MoEStage(
        arch=arch,
        layers=tuple(layers),
        params=params,
        globals=glob,
        vocab_start=vstart,
        experts=experts,
        placement=placement,
        pv=pv,
        local_heads=arch.num_heads // tp,
        local_kv_heads=kv_local,
        dispatch_mode=dispatch_mode,
    )
    bytes_read = reader.bytes_read
    reader.close()
    return stage, bytes_read


__all__ = ["CheckpointError", "load_stage", "layer_param_names", "expected_shape"]
