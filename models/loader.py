"""Reads one rank's weights of a MoE language-model stage: only its slices of the checkpoint.

The family declares names (``CHECKPOINT_NAMES``); the caller hands a *slicer*
(``parallel.tensor.TensorSlicer``: which piece of each weight this rank holds,
from the family's ``TP_PLAN``) and the experts this rank holds with their
intermediate rows (from the Placement); this module reads each tensor once,
already sliced, through ``CheckpointReader.read``. It knows the weight names
and shapes of every family (from ``config.json`` alone) and nothing of the mesh.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Mapping, Sequence

import torch

from tessera.models.arch import MoEArch
from tessera.models.checkpoint import CheckpointError, CheckpointReader
from tessera.models.moe_layers import ExpertWeights

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


@dataclass
class StageWeights:
    """One rank's weights of one pipeline stage (before the model packs them)."""

    params: dict[int, dict[str, torch.Tensor]]  # layer -> tessera name -> local shard
    globals: dict[str, torch.Tensor]  # embed / final_norm / lm_head shards present on this stage
    bytes_read: int

    def nbytes(self) -> int:
        tensors = [*self.globals.values(), *(t for p in self.params.values() for t in p.values())]
        return sum(t.numel() * t.element_size() for t in tensors)


class _DeviceReader(CheckpointReader):
    """A CheckpointReader whose tensors land on the rank's device (sliced on the host first)."""

    def __init__(self, model_dir: str, expected_dtype: str, device) -> None:
        super().__init__(model_dir, expected_dtype=expected_dtype)
        self.device = torch.device(device)

    def read(self, *args, **kwargs) -> torch.Tensor:
        return super().read(*args, **kwargs).to(self.device)


def read_expert(reader: CheckpointReader, arch: MoEArch, names: dict, layer: int, expert: int, rows: tuple[int, int],
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [2*r, H], down [H, r]) of rows ``rows`` of one expert's intermediate dim."""
    key = lambda n: names[n].format(layer=layer, expert=expert)  # noqa: E731
    a, b = rows
    gate = reader.read(key("expert_gate"), expected_shape(arch, "expert_gate"), dim=0, start=a, stop=b, dtype=dtype)
    up = reader.read(key("expert_up"), expected_shape(arch, "expert_up"), dim=0, start=a, stop=b, dtype=dtype)
    down = reader.read(key("expert_down"), expected_shape(arch, "expert_down"), dim=1, start=a, stop=b, dtype=dtype)
    return torch.cat([gate, up], 0).contiguous(), down.contiguous()


def load_stage_weights(
    model_dir: str,
    arch: MoEArch,
    family: ModuleType,
    layers: Sequence[int],
    first: bool,
    last: bool,
    slicer,
    experts: Mapping[int, Sequence[tuple[int, tuple[int, int]]]],
    expert_sink: ExpertWeights,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> StageWeights:
    """Read this rank's slices of ``layers`` (and the embedding / head when first / last).

    ``slicer``: ``slice(name, shape) -> (dim, start, stop) | None``, ``head_rows() -> (start, stop, padded)``.
    ``experts[layer]``: (expert, intermediate rows) this rank holds; each is handed to ``expert_sink.put``
    (in memory, or an offload tier's writer) as it is read, so host memory never holds them all at once.
    """
    reader = _DeviceReader(model_dir, arch.dtype, device)
    names = family.CHECKPOINT_NAMES

    def read(name: str, layer: int | None = None):
        key = names[name].format(layer=layer)
        shape = expected_shape(arch, name)
        sl = slicer.slice(name, shape)
        if sl is None:
            return reader.read(key, shape, dtype=dtype)
        return reader.read(key, shape, dim=sl[0], start=sl[1], stop=sl[2], dtype=dtype)

    glob: dict[str, torch.Tensor] = {}
    if first:
        glob["embed"] = read("embed")
    if last:
        glob["final_norm"] = read("final_norm")
        head_name = names["embed" if arch.tie_word_embeddings else "lm_head"]
        start, stop, padded = slicer.head_rows()
        head = reader.read(head_name, expected_shape(arch, "lm_head"), dim=0, start=start, stop=stop, dtype=dtype)
        if head.shape[0] < padded:  # every rank all-gathers equal shapes
            head = torch.cat([head, head.new_zeros((padded - head.shape[0], *head.shape[1:]))])
        glob["lm_head"] = head
    params: dict[int, dict[str, torch.Tensor]] = {}
    try:
        for layer in layers:
            params[layer] = {name: read(name, layer) for name in layer_param_names(arch, layer)}
            for expert, rows in experts.get(layer, ()):
                expert_sink.put(layer, expert, *read_expert(reader, arch, names, layer, expert, rows, dtype))
    finally:
        reader.close()
    return StageWeights(params, glob, reader.bytes_read)


__all__ = ["CheckpointError", "StageWeights", "load_stage_weights", "read_expert", "layer_param_names",
           "expected_shape"]
