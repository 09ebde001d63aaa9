"""Tensor parallelism over the ``tp`` mesh dim: which slice of a weight a rank owns, and the
collectives that put split results back together.

A model family declares a kind per weight (``TP_PLAN``); this module turns the
kind into a (dim, start, stop) slice read straight from the checkpoint, so no
rank holds more than its share:

- ``replicate``: whole tensor on every rank.
- ``colwise``: output rows split (by heads for attention, evenly for MLPs); no collective.
- ``colwise_kv``: key/value heads; when there are fewer kv heads than tp ranks each
  rank holds the one kv head its query heads use (replicated, GQA-correct).
- ``rowwise``: input columns split; the partial outputs are summed with all_reduce.
- ``vocab``: embedding rows split by vocabulary range over tp (last part padded),
  lookups masked and all-reduced; the LM head uses the same ranges over all ep x tp
  ranks of the last stage, logits all-gathered.

Routed experts are not in ``TP_PLAN``: which experts a rank holds, and which
rows of each one's intermediate dim, come from the Placement's
``ExpertPlacement`` (:meth:`TensorSlicer.expert_rows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from tessera.errors import ConfigError
from tessera.models.packed_linear import linear
from tessera.parallel.comm import GroupComm

SHARD_KINDS = ("replicate", "colwise", "colwise_kv", "rowwise", "vocab")


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """Balanced contiguous split of ``range(n)`` into ``parts``; the ``index``-th piece."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def vocab_range(vocab: int, tp: int, rank: int) -> tuple[int, int, int]:
    """(start, stop, padded part size) of the vocabulary rows owned by ``rank``."""
    part = math.ceil(vocab / tp)
    start = min(vocab, rank * part)
    return start, min(vocab, start + part), part


def kv_head_range(num_heads: int, num_kv: int, tp: int, rank: int) -> tuple[int, int]:
    """The kv heads that the query heads of ``rank`` attend with."""
    if num_kv >= tp:
        return split_range(num_kv, tp, rank)
    q_per_kv = num_heads // num_kv
    head = (rank * (num_heads // tp)) // q_per_kv
    return head, head + 1


def check_tp(num_heads: int, num_kv: int, tp: int, what: str) -> None:
    """Refuse a tp degree that cannot split the heads, naming the fix."""
    if num_heads % tp:
        raise ConfigError(f"{what}: {num_heads} attention heads cannot be split over tp={tp}; use a tp that divides {num_heads}")
    if num_kv % tp and tp % num_kv:
        raise ConfigError(
            f"{what}: {num_kv} key/value heads and tp={tp}: one must divide the other so kv heads can be split or replicated"
        )


def tp_slice(kind: str, shape: tuple[int, ...], unit: int, tp: int, rank: int, heads: tuple[int, int] | None = None):
    """(dim, start, stop) of this rank's piece of a weight of ``shape``; None for the whole tensor."""
    if tp == 1 or kind == "replicate":
        return None
    if kind == "colwise":
        a, b = split_range(shape[0] // unit, tp, rank)
        return 0, a * unit, b * unit
    if kind == "colwise_kv":
        assert heads is not None
        num_heads, num_kv = heads
        a, b = kv_head_range(num_heads, num_kv, tp, rank)
        return 0, a * unit, b * unit
    if kind == "rowwise":
        a, b = split_range(shape[1] // unit, tp, rank)
        return 1, a * unit, b * unit
    if kind == "vocab":
        a, b, _ = vocab_range(shape[0], tp, rank)
        return 0, a, b
    raise ConfigError(f"unknown tensor-parallel kind {kind!r}; use one of {', '.join(SHARD_KINDS)}")


@dataclass(frozen=True)
class TensorSlicer:
    """This rank's piece of every weight of a MoE language-model stage, from the family's ``TP_PLAN``.

    ``models/loader.py`` asks it, per weight name, which slice to read from the
    checkpoint; it answers from the kind the family declared and the rank's
    place in ``tp`` (and, for the LM head and the experts, in the stage's MoE
    group). The DiT families use the same kinds through :func:`tp_slice`
    (``parallel/dit_tensor.py`` swaps their modules instead of slicing weight
    dicts: see there).
    """

    arch: Any  # models.arch.MoEArch
    plan: Mapping[str, str]  # the family's TP_PLAN
    tp: int = 1
    tp_rank: int = 0
    moe_size: int = 1
    moe_rank: int = 0

    def slice(self, name: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """(dim, start, stop) of this rank's piece of weight ``name`` (full ``shape``); None: the whole tensor."""
        from tessera.models.loader import shard_unit

        a = self.arch
        return tp_slice(self.plan[name], shape, shard_unit(a, name), self.tp, self.tp_rank, (a.num_heads, a.num_kv_heads))

    def head_rows(self) -> tuple[int, int, int]:
        """(start, stop, padded rows) of the LM head: vocab-split over the whole MoE group (ep x tp ranks).

        With ep > 1 a replicated head would be read in full by every ep rank per token."""
        return vocab_range(self.arch.vocab_size, self.moe_size, self.moe_rank)

    @property
    def vocab_start(self) -> int:
        return vocab_range(self.arch.vocab_size, self.tp, self.tp_rank)[0]

    @property
    def local_heads(self) -> int:
        return self.arch.num_heads // self.tp

    @property
    def local_kv_heads(self) -> int:
        a = self.arch
        if a.attention == "mla":
            return a.num_heads // self.tp
        lo, hi = kv_head_range(a.num_heads, a.num_kv_heads, self.tp, self.tp_rank)
        return hi - lo

    def expert_rows(self, index: int, count: int) -> tuple[int, int]:
        """Rows of an expert's intermediate dim held as slice ``index`` of ``count``."""
        return split_range(self.arch.moe_intermediate, count, index)


def tensor_parallel_hooks(tp: GroupComm, moe: GroupComm) -> dict[str, Any]:
    """The ``ShardOps`` hooks of tensor parallelism: sum row-split partial outputs over ``tp``, embed with
    the vocabulary split over ``tp``, and the LM head split over the whole MoE group ``moe``."""
    return {
        "reduce": tp.all_reduce,
        "embed": lambda ids, table, start: vocab_embed(ids, table, start, tp),
        "logits": lambda h, head, vocab: vocab_logits(h, head, vocab, moe),
    }


def vocab_embed(ids: torch.Tensor, weight: torch.Tensor, start: int, comm: GroupComm) -> torch.Tensor:
    """Embedding lookup with the table split by vocabulary range over tp."""
    if comm.size == 1:
        return weight[ids]
    local = ids - start
    inside = (local >= 0) & (local < weight.shape[0])
    out = weight[local.clamp(0, weight.shape[0] - 1)] * inside.unsqueeze(-1).to(weight.dtype)
    return comm.all_reduce(out)


def vocab_logits(h: torch.Tensor, weight: torch.Tensor, vocab: int, comm: GroupComm) -> torch.Tensor:
    """LM head with vocab-split rows: local logits, all-gathered and trimmed to the real vocabulary."""
    local = linear(h, weight)
    return comm.all_gather_cat(local.contiguous(), dim=1)[:, :vocab]


# -- kinds the diffusion transformers add (models/pixart.py, sd3.py, flux.py declare them in TP_PLAN) ----------
#
# - ``colwise_gather``: a ``colwise`` split whose whole output every rank needs (adaLN modulation vectors
#   feed every token): each rank computes its rows of the output, one small all-gather rebuilds it.
# - ``rowwise_pieces``: a ``rowwise`` split of an input that is a concat of separately ``colwise``-split
#   parts (Flux's single-block ``proj_out`` reads ``[attention heads | MLP columns]``): the rank's input
#   columns are its share of each part, in the order its own concat has; the part widths are relative
#   (``pieces``, e.g. ``(1, 4)``).
# A linear's bias follows its weight for column kinds and is whole for row kinds (added once after the sum).

DIT_SHARD_KINDS = ("colwise_gather", "rowwise_pieces")


def tp_slices(kind: str, shape: tuple[int, ...], unit: int, tp: int, rank: int,
              pieces: tuple[int, ...] = ()) -> tuple[tuple[int, int, int], ...] | None:
    """This rank's share of a weight as (dim, start, stop) ranges joined in order along dim (None: all of it).

    The LLM kinds give one range (:func:`tp_slice`); ``rowwise_pieces`` gives one range per piece.
    """
    if tp == 1 or kind == "replicate":
        return None
    if kind == "colwise_gather":
        kind = "colwise"
    if kind == "rowwise_pieces":
        total = sum(pieces)
        if not pieces or shape[1] % total:
            raise ConfigError(f"rowwise_pieces: {shape[1]} input features do not split into parts {pieces}")
        out, start = [], 0
        for width in (shape[1] * p // total for p in pieces):
            a, b = split_range(width // unit, tp, rank)
            out.append((1, start + a * unit, start + b * unit))
            start += width
        return tuple(out)
    one = tp_slice(kind, shape, unit, tp, rank)
    return None if one is None else (one,)


def bias_kind(kind: str) -> str:
    """How a linear's bias is split when its weight is split by ``kind``."""
    if kind == "colwise_gather":
        return "colwise"
    return kind if kind in ("colwise", "colwise_kv") else "replicate"
