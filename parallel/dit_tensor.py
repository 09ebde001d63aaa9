"""Tensor parallelism for diffusion transformers over the ``tp`` mesh dim, with sliced loading.

A family declares ``TP_PLAN`` (module-name pattern -> split kind) in the same
vocabulary as the LLM families (``parallel/tensor.py``: ``colwise``,
``rowwise``, plus the DiT kinds ``colwise_gather`` and ``rowwise_pieces``),
and every slice is computed by ``tensor.tp_slices``. What differs from the
LLM is only how the plan is applied, for one reason: a DiT runs a torch
forward per block over long token sequences, so its ``nn.Linear`` modules
(with biases, and gathered outputs for adaLN) are swapped for sharded ones on
the meta model and keep their checkpoint names; the LLM decodes a few tokens
per step on CPU, where reading pre-packed weight dicts (``models/loader.py``)
is what makes it fast.

Why not DTensor's ``parallelize_module``: it shards a module that already
holds full weights, so each rank would first read and hold the whole
transformer. Here the model is built on the meta device, the declared
linears are swapped for local shards, and the loader reads only this
rank's slice of each tensor from safetensors, so per-rank memory is about
``1/tp`` of the sharded layers and never more than a single-device run.

- ``colwise``: this rank's rows of ``weight`` (output features): its
  attention heads or MLP columns. Heads are inferred from widths downstream.
- ``rowwise``: this rank's columns of ``weight``; partial outputs are summed
  with one all-reduce over ``tp`` and the bias is added once.
- ``colwise_gather``: the adaLN modulation linears (``d -> 6d`` per block in
  Flux/SD3, a third of a Flux double block) feed every token, so each rank
  computes its rows of the output and one small all-gather of ``[B, 6d/tp]``
  rebuilds the vector.
- ``rowwise_pieces``: the input is a concat of parts that were column-split
  separately (Flux's single-block ``proj_out`` reads ``[attention | MLP]``),
  so this rank's input columns are its slice of each part, read as two
  slices and joined in the same order.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Mapping

import torch
from torch import nn

from tessera.errors import ConfigError
from tessera.models.diffusers_loader import Pieces
from tessera.parallel.comm import GroupComm
from tessera.parallel.counted import CommCounter
from tessera.parallel.tensor import DIT_SHARD_KINDS, bias_kind, tp_slices

DIT_KINDS = ("colwise", "rowwise") + DIT_SHARD_KINDS  # the kinds a DiT's TP_PLAN may use


def check_tp(heads: int, tp: int) -> None:
    """Driver-side check: a column split by heads needs ``tp`` to divide the head count."""
    if tp < 1 or heads % tp:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ConfigError(f"tp={tp} does not divide the model's {heads} attention heads; "
                          f"use a tp in {divisors} (or move the extra ranks to sp, cfg or pp)")


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_local @ W_local^T) + b``; same parameter names as ``nn.Linear``."""

    def __init__(self, in_local: int, out_features: int, bias: bool, comm: GroupComm, counter: CommCounter | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_local))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.comm = comm
        self.counter = counter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight)
        self.comm.all_reduce(y)  # shared memory on one CPU node, else the backend
        if self.counter is not None:
            self.counter.add("tp_all_reduce", y.nbytes, y.nbytes)
        return y + self.bias if self.bias is not None else y


class GatheredColumnLinear(nn.Module):
    """``y = all_gather_cat(x @ W_local^T + b_local)`` over ``tp`` (last dim); ``nn.Linear``'s parameter names."""

    def __init__(self, in_features: int, out_local: int, bias: bool, comm: GroupComm, counter: CommCounter | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_local, in_features))
        self.bias = nn.Parameter(torch.empty(out_local)) if bias else None
        self.comm = comm
        self.counter = counter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        out = self.comm.all_gather_cat(y, dim=-1)
        if self.counter is not None:
            self.counter.add("tp_all_gather", y.nbytes, out.nbytes - y.nbytes)
        return out


def plan_kind(name: str, plan: Mapping[str, str]) -> str | None:
    """The split kind ``plan`` declares for module ``name`` (fnmatch patterns), or None (replicated)."""
    return next((kind for pattern, kind in plan.items() if fnmatch.fnmatchcase(name, pattern)), None)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _pieces_of(name: str, pieces: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    return next((w for pattern, w in pieces.items() if fnmatch.fnmatchcase(name, pattern)), ())


def _check_divisible(name: str, kind: str, module: nn.Linear, pieces: tuple[int, ...], tp: int) -> None:
    """Every rank's share must be equal: gathered outputs and summed inputs need equal shapes."""
    if kind == "rowwise_pieces":
        widths = [module.in_features * p // sum(pieces) for p in pieces] if pieces else []
        if sum(widths) != module.in_features or any(w % tp for w in widths):
            raise ConfigError(f"{name} reads {module.in_features} input features in parts {widths or '(undeclared)'}, "
                              f"not each divisible by tp={tp}; use a tp that divides the head count and MLP width")
        return
    rows = kind == "rowwise"
    size = module.in_features if rows else module.out_features
    if size % tp:
        raise ConfigError(f"{name} has {size} {'input' if rows else 'output'} features, not divisible by tp={tp}; "
                          "use a tp that divides the head count and MLP width")


def shard_linears(model: nn.Module, plan: Mapping[str, str], pieces: Mapping[str, tuple[int, ...]], tp_rank: int,
                  tp: int, comm: GroupComm, counter: CommCounter | None = None
                  ) -> Callable[[str, tuple[int, ...]], tuple | Pieces | None]:
    """Swap the linears ``plan`` declares in ``model`` (on meta) for local shards; return the slicer for loading."""
    split: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, module in list(model.named_modules()):
        kind = plan_kind(name, plan) if isinstance(module, nn.Linear) else None
        if kind is None:
            continue
        if kind not in DIT_KINDS:
            raise ConfigError(f"{name}: split kind {kind!r} is not one a diffusion transformer uses; "
                              f"use one of {', '.join(DIT_KINDS)}")
        widths = _pieces_of(name, pieces)
        _check_divisible(name, kind, module, widths, tp)
        out_f, in_f, bias = module.out_features, module.in_features, module.bias is not None
        with torch.device("meta"):
            if kind == "colwise":
                new = nn.Linear(in_f, out_f // tp, bias=bias)
            elif kind == "colwise_gather":
                new = GatheredColumnLinear(in_f, out_f // tp, bias, comm, counter)
            else:
                new = RowParallelLinear(in_f // tp, out_f, bias, comm, counter)
        _replace(model, name, new)
        split[name] = (kind, widths)

    def slicer(tensor_name: str, shape: tuple[int, ...]):
        module_name, _, param = tensor_name.rpartition(".")
        if module_name not in split:
            return None
        kind, widths = split[module_name]
        ranges = tp_slices(kind if param == "weight" else bias_kind(kind), shape, 1, tp, tp_rank, widths)
        if ranges is None:
            return None
        parts = tuple(tuple(slice(a, b) if d == dim else slice(None) for d in range(len(shape))) for dim, a, b in ranges)
        return parts[0] if len(parts) == 1 else Pieces(dim=ranges[0][0], parts=parts)

    return slicer


def tensor_parallel_prepare(plan: Mapping[str, str], pieces: Mapping[str, tuple[int, ...]], comm: GroupComm,
                            tp_rank: int, tp: int, counter: CommCounter | None = None):
    """A ``prepare`` hook for :func:`tessera.models.diffusers_loader.load_transformer`."""

    def prepare(model: nn.Module):
        return shard_linears(model, plan, pieces, tp_rank, tp, comm, counter)

    return prepare
