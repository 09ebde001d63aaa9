"""Routing traces: which experts every token chose at every MoE layer.

A trace is the raw material of expert-affinity placement: the statistics in
:mod:`tessera.memory.affinity.stats` and every solver read it. It is stored
as one compressed ``.npz`` with a small JSON header (model, layers, experts,
top-k) and one ``int16``/``int32`` array ``[tokens, moe_layers, k]``, so a
million routed tokens of a 64-expert, 24-layer, top-2 model take ~100 MB
uncompressed and far less on disk.

Recording is a plain append of the router's top-k ids per layer
(:class:`TraceRecorder`); an engine that does not record never touches this
module, so recording costs nothing when off.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

TRACE_FORMAT = "tessera-routing-trace"
TRACE_VERSION = 1


class TraceError(ValueError):
    """A trace that is malformed or does not fit the model it claims to come from."""


@dataclass(frozen=True)
class TraceHeader:
    """What a trace was recorded from.

    ``layer_ids`` are the model's own layer indices of the MoE layers (a
    DeepSeek-style model has dense layers first); trace column ``i`` is MoE
    layer ``layer_ids[i]``.
    """

    model: str
    num_layers: int
    num_experts: int
    top_k: int
    layer_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.num_experts < 1 or self.top_k < 1:
            raise TraceError(
                f"trace header needs num_layers, num_experts, top_k >= 1, got "
                f"{self.num_layers}, {self.num_experts}, {self.top_k}"
            )
        if self.top_k > self.num_experts:
            raise TraceError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        ids = tuple(int(i) for i in self.layer_ids) or tuple(range(self.num_layers))
        if len(ids) != self.num_layers:
            raise TraceError(
                f"layer_ids has {len(ids)} entries but num_layers is {self.num_layers}; "
                "give one model layer index per MoE layer (or none)"
            )
        object.__setattr__(self, "layer_ids", ids)

    def to_json(self) -> dict:
        return {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "model": self.model,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "layer_ids": list(self.layer_ids),
        }


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """``expert_ids[t, l, j]`` = the j-th expert token ``t`` chose at MoE layer ``l``."""

    header: TraceHeader
    expert_ids: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        ids = np.asarray(self.expert_ids)
        h = self.header
        if ids.ndim != 3 or ids.shape[1:] != (h.num_layers, h.top_k):
            raise TraceError(
                f"expert_ids has shape {ids.shape}; expected [tokens, {h.num_layers}, {h.top_k}] "
                f"for a trace of {h.num_layers} MoE layers with top_k={h.top_k}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= h.num_experts):
            raise TraceError(
                f"expert ids range over [{ids.min()}, {ids.max()}] but the model has "
                f"{h.num_experts} experts (valid ids 0..{h.num_experts - 1})"
            )
        dtype = np.int16 if h.num_experts <= np.iinfo(np.int16).max else np.int32
        ids = np.ascontiguousarray(ids, dtype=dtype)
        ids.setflags(write=False)
        object.__setattr__(self, "expert_ids", ids)

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    def sample(self, max_tokens: int, seed: int = 0) -> "RoutingTrace":
        """A uniform random subset of ``max_tokens`` tokens (the whole trace if smaller).

        Solvers scale with the number of distinct transitions, not tokens, but
        statistics and ILP sizes shrink when a huge trace is sampled first.
        """
        if max_tokens <= 0:
            raise TraceError(f"max_tokens must be > 0, got {max_tokens}")
        if self.num_tokens <= max_tokens:
            return self
        rows = np.sort(np.random.default_rng(seed).choice(self.num_tokens, max_tokens, replace=False))
        return RoutingTrace(self.header, self.expert_ids[rows])

    @staticmethod
    def concat(traces: Sequence["RoutingTrace"]) -> "RoutingTrace":
        if not traces:
            raise TraceError("nothing to concatenate: no traces given")
        first = traces[0].header
        for t in traces[1:]:
            if (t.header.num_layers, t.header.num_experts, t.header.top_k) != (
                first.num_layers,
                first.num_experts,
                first.top_k,
            ):
                raise TraceError("cannot concatenate traces of different shapes (layers, experts, top_k)")
        return RoutingTrace(first, np.concatenate([t.expert_ids for t in traces], axis=0))

    # -- file format ---------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (``.npz``, compressed); returns the path written."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        header = np.frombuffer(json.dumps(self.header.to_json()).encode(), dtype=np.uint8)
        with open(path, "wb") as f:
            np.savez_compressed(f, header=header, expert_ids=self.expert_ids)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RoutingTrace":
        path = Path(path)
        if not path.is_file():
            raise TraceError(f"no routing trace at {path}; record one with LLMEngine.load(..., record_routing=True)")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["header"]).decode())
                ids = data["expert_ids"]
        except (KeyError, ValueError, OSError) as err:
            raise TraceError(f"{path} is not a tessera routing trace (.npz with header and expert_ids): {err}") from err
        if meta.get("format") != TRACE_FORMAT:
            raise TraceError(f"{path} has format {meta.get('format')!r}, expected {TRACE_FORMAT!r}")
        if int(meta.get("version", 0)) > TRACE_VERSION:
            raise TraceError(
                f"{path} is trace format version {meta['version']}; this tessera reads up to "
                f"{TRACE_VERSION}: upgrade tessera"
            )
        header = TraceHeader(
            model=str(meta["model"]),
            num_layers=int(meta["num_layers"]),
            num_experts=int(meta["num_experts"]),
            top_k=int(meta["top_k"]),
            layer_ids=tuple(meta.get("layer_ids") or ()),
        )
        return cls(header, ids)


class TraceRecorder:
    """Collects the router's top-k ids layer by layer and builds a :class:`RoutingTrace`.

    Call :meth:`record` once per MoE layer per forward step with the ids of
    the tokens that step routed (``[tokens, k]``); every layer must see the
    same tokens in the same order, which holds because tokens pass through
    all layers. Appending a reference is all recording costs per layer.
    """

    def __init__(self, model: str, num_experts: int, top_k: int, layer_ids: Iterable[int]) -> None:
        self.model = model
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.layer_ids = tuple(int(i) for i in layer_ids)
        self._chunks: dict[int, list[np.ndarray]] = {i: [] for i in self.layer_ids}

    def record(self, layer_id: int, topk_ids) -> None:
        if layer_id not in self._chunks:
            raise TraceError(f"layer {layer_id} is not an MoE layer of this recorder ({self.layer_ids})")
        ids = topk_ids.detach().cpu().numpy() if hasattr(topk_ids, "detach") else np.asarray(topk_ids)
        self._chunks[layer_id].append(ids.reshape(-1, self.top_k))

    def clear(self) -> None:
        for chunks in self._chunks.values():
            chunks.clear()

    def trace(self) -> RoutingTrace:
        per_layer = [
            np.concatenate(self._chunks[i]) if self._chunks[i] else np.zeros((0, self.top_k), np.int64)
            for i in self.layer_ids
        ]
        lengths = {len(a) for a in per_layer}
        if len(lengths) != 1:
            counts = dict(zip(self.layer_ids, (len(a) for a in per_layer)))
            raise TraceError(
                f"layers recorded different token counts {counts}; a recorder must see every "
                "routed token at every MoE layer"
            )
        header = TraceHeader(self.model, len(self.layer_ids), self.num_experts, self.top_k, self.layer_ids)
        return RoutingTrace(header, np.stack(per_layer, axis=1))


def trace_from_engine(routing: dict) -> RoutingTrace:
    """Turn ``LLMEngine.routing_trace()`` (per-layer ``[tokens, k]`` arrays) into a :class:`RoutingTrace`.

    The engine keeps one array per MoE layer, tokens in step order; every MoE
    layer saw the same tokens, so stacking them gives ``[tokens, layers, k]``.
    """
    try:
        moe_layers = [int(i) for i in routing["moe_layers"]]
        layers = routing["layers"]
        num_experts, top_k = int(routing["num_experts"]), int(routing["top_k"])
    except (KeyError, TypeError) as err:
        raise TraceError(
            f"not an engine routing trace (needs moe_layers, layers, num_experts, top_k): missing {err}"
        ) from err
    missing = [i for i in moe_layers if i not in layers]
    if missing:
        raise TraceError(
            f"the engine recorded no routing for MoE layer(s) {missing}; load it with record_routing=True and "
            "generate at least one token before reading the trace"
        )
    recorder = TraceRecorder(str(routing.get("model", "")), num_experts, top_k, moe_layers)
    for layer in moe_layers:
        recorder.record(layer, np.asarray(layers[layer]))
    return recorder.trace()
