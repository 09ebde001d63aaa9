"""Tensor parallelism for diffusion transformers over the ``tp`` mesh dim, with sliced loading.

Why not DTensor's ``parallelize_module``: it shards a module that already
holds full weights, so each rank would first read and hold the whole
transformer. Here the model is built on the meta device, the linears a
family declares (``parallel_spec.colwise`` / ``rowwise``) are swapped for
local shards, and the loader reads only this rank's slice of each tensor
from safetensors, so per-rank memory is about ``1/tp`` of the sharded
layers and never more than a single-device run.

- column-split linear: this rank's rows of ``weight`` (output features): its
  attention heads or MLP columns. Heads are inferred from widths downstream.
- row-split linear: this rank's columns of ``weight``; partial outputs are
  summed with one all-reduce over ``tp`` and the bias is added once.
- column-split linear, gathered (``parallel_spec.colwise_gather``): the
  adaLN modulation linears (``d -> 6d`` per block in Flux/SD3, a third of a
  Flux double block) feed every token, so each rank computes its rows of the
  output and one small all-gather of ``[B, 6d/tp]`` rebuilds the vector.
- row-split linear in pieces (``parallel_spec.rowwise_pieces``): the input is
  a concat of parts that were column-split separately (Flux's single-block
  ``proj_out`` reads ``[attention | MLP]``), so this rank's input columns are
  its slice of each part, read as two slices and joined in the same order.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable

import torch
from torch import nn

from tessera.models.diffusers_loader import Pieces
from tessera.parallel.comm import GroupComm
from tessera.parallel.counted import CommCounter
from tessera.config import ConfigError


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


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def shard_linears(model: nn.Module, tp_rank: int, tp: int, comm: GroupComm,
                  counter: CommCounter | None = None) -> Callable[[str, tuple[int, ...]], tuple | None]:
    """Swap the declared linears of ``model`` (on meta) for local shards; return the slicer for loading."""
    spec = model.parallel_spec
    pieces_of = dict(getattr(spec, "rowwise_pieces", ()))
    plan: dict[str, str] = {}
    piece_widths: dict[str, list[int]] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        pattern = next((p for p in pieces_of if fnmatch.fnmatchcase(name, p)), None)
        kind = ("col" if _matches(name, spec.colwise) else "row" if _matches(name, spec.rowwise)
                else "gather" if _matches(name, getattr(spec, "colwise_gather", ()))
                else "pieces" if pattern is not None else None)
        if kind is None:
            continue
        out_f, in_f = module.out_features, module.in_features
        if kind == "pieces":
            weights = pieces_of[pattern]
            widths = [in_f * w // sum(weights) for w in weights]
            if sum(widths) != in_f or any(w % tp for w in widths):
                raise ConfigError(f"{name} reads {in_f} input features in parts {widths}, not each divisible "
                                  f"by tp={tp}; use a tp that divides the head count and MLP width")
            piece_widths[name] = widths
        else:
            size = in_f if kind == "row" else out_f
            if size % tp:
                raise ConfigError(f"{name} has {size} {'input' if kind == 'row' else 'output'} features, not "
                                  f"divisible by tp={tp}; use a tp that divides the head count and MLP width")
        with torch.device("meta"):
            if kind == "col":
                new = nn.Linear(in_f, out_f // tp, bias=module.bias is not None)
            elif kind == "gather":
                new = GatheredColumnLinear(in_f, out_f // tp, module.bias is not None, comm, counter)
            else:
                new = RowParallelLinear(in_f // tp, out_f, module.bias is not None, comm, counter)
        _replace(model, name, new)
        plan[name] = kind

    def slicer(tensor_name: str, shape: tuple[int, ...]):
        module_name, _, param = tensor_name.rpartition(".")
        kind = plan.get(module_name)
        if kind is None:
            return None
        if kind in ("col", "gather"):
            n = shape[0] // tp
            rows = slice(tp_rank * n, (tp_rank + 1) * n)
            return (rows, slice(None)) if param == "weight" else (rows,)
        if param != "weight":
            return None  # row-split bias is whole (added once after the all-reduce)
        if kind == "pieces":
            parts, start = [], 0
            for width in piece_widths[module_name]:
                n = width // tp
                parts.append((slice(None), slice(start + tp_rank * n, start + (tp_rank + 1) * n)))
                start += width
            return Pieces(dim=1, parts=tuple(parts))
        n = shape[1] // tp
        return (slice(None), slice(tp_rank * n, (tp_rank + 1) * n))

    return slicer


def tensor_parallel_prepare(comm: GroupComm, tp_rank: int, tp: int, counter: CommCounter | None = None):
    """A ``prepare`` hook for :func:`tessera.models.diffusers_loader.load_transformer`."""

    def prepare(model: nn.Module):
        return shard_linears(model, tp_rank, tp, comm, counter)

    return prepare
