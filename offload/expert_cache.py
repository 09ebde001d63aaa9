"""A per-worker cache of expert weights in the device tier, with LRU/LFU eviction and predictive prefetch.

``get(layer, expert_ids)`` returns the experts' weights in the device tier:
hits come from the cache, misses are read (all in parallel) from the host or
NVMe tier through the :class:`~tessera.offload.store.TieredStore`. The experts
returned by one ``get`` stay pinned until the next ``get`` (the MoE block is
computing with them), so eviction never frees bytes in use.

After the demanded experts are in, the cache predicts the experts of the next
layer (affinity statistics, the next layer's gate on the current hidden
state, or both) and starts reading them, so they stream in while this layer
computes. Prefetched-but-unused entries are evicted last.

Capacity is the store's device budget (shared with resident weights and
streamed dense layers), optionally capped by ``capacity_bytes``. Counters:
hits, misses, bytes moved, evictions, prefetch issued/used/wasted/throttled,
the predictor's precision and recall, and ``stall_s``: how long ``get`` waited
for reads (what offload added to the model's time).

A prefetch is a bet: a right one hides a read behind compute, a wrong one
costs a read, a checksum and a cache slot, and delays the reads that follow
(measured on the benchmark's random Mixtral: 84% of the gate predictor's
reads unused, decode at 5 tok/s against 12 without prefetch). So the cache
keeps a running precision of the prefetches it *issued* (an exponential
average of used / wasted) and stops issuing while it is below
``min_prefetch_precision``, still issuing one in ``PREFETCH_EXPLORE`` to
notice when predictions become good again. Predictions of experts already
cached cost nothing and are still scored. Prefetch reads are queued behind
demanded ones (``urgent=False``).

``cyclic=True`` tells the cache that its caller visits the layers in order,
over and over (the MoE engine: every forward pass). Then, when one pass uses
more experts than the cache holds (a large batch routes to most experts of
every layer), it evicts the entry whose layer comes round last instead of the
least recently used one, which on a cycle is the next one needed: the
replayed cycle gets Belady's hit rate where LRU gets none
(tests/test_offload_expert_cache.py). Entries not used during the last pass
still go first, by the policy.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from tessera.offload.errors import BudgetExceeded
from tessera.offload.predict import AffinityPredictor, GatePredictor, rank_experts
from tessera.offload.store import TieredStore, WeightHandle

Key = tuple[int, int]  # (layer, expert)

PREFETCH_EWMA = 0.1  # weight of the latest issued prefetch's outcome in the running precision
PREFETCH_EXPLORE = 8  # while throttled, one prediction in this many is still issued


def expert_group_name(layer: int, expert: int) -> str:
    """The default weight-group name of one expert."""
    return f"layers.{layer}.experts.{expert}"


@dataclass
class _Entry:
    future: Future
    nbytes: int
    prefetched: bool
    used: bool = False
    last: int = 0  # the get (clock) that last used or admitted it
    handle: WeightHandle | None = field(default=None, repr=False)

    def wait(self) -> WeightHandle:
        if self.handle is None:
            self.handle = self.future.result()
        return self.handle


class ExpertCache:
    """Expert weights of one worker in the device tier: LRU or LFU, with next-layer prefetch."""

    def __init__(
        self,
        store: TieredStore,
        num_layers: int,
        num_experts: int,
        *,
        policy: str | None = None,
        predictor: str | None = None,
        gate_weight: Callable[[int], torch.Tensor | None] | None = None,
        router_top_k: int = 2,
        predict_top_k: int | None = None,
        capacity_bytes: int | None = None,
        group_name: Callable[[int, int], str] = expert_group_name,
        affinity_counts: torch.Tensor | None = None,
        layers: Sequence[int] | None = None,
        min_prefetch_precision: float = 0.5,
        cyclic: bool = False,
    ) -> None:
        cfg = store.config
        self.store = store
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.policy = policy or cfg.cache_policy
        if self.policy not in ("lru", "lfu"):
            raise ValueError(f"cache policy {self.policy!r} is unknown; use 'lru' or 'lfu'")
        mode = predictor or cfg.predictor
        # MoE layers in forward order (dense layers in between are skipped): "next layer" means next here.
        self.order = list(layers) if layers is not None else list(range(num_layers))
        self._pos = {layer: i for i, layer in enumerate(self.order)}
        self.affinity = AffinityPredictor(len(self.order), num_experts, affinity_counts) if mode in ("affinity", "both") else None
        if mode in ("gate", "both") and gate_weight is None:
            raise ValueError(f"predictor {mode!r} needs gate_weight (layer -> router weight)")
        self.gate = GatePredictor(gate_weight, router_top_k) if mode in ("gate", "both") and gate_weight else None
        self.predict_top_k = cfg.predict_top_k if predict_top_k is None else predict_top_k
        self.capacity_bytes = capacity_bytes
        self.group_name = group_name
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()  # order = recency (LRU at the front)
        self._freq: dict[Key, int] = {}
        self._pinned: set[Key] = set()
        self._bytes = 0
        self._clock = 0  # gets so far
        self._layer_now = self.order[0] if self.order else 0  # the layer of the current get
        self._last: tuple[int, list[int]] | None = None
        self._predicted: dict[int, set[int]] = {}
        self.min_prefetch_precision = min_prefetch_precision
        self.cyclic = cyclic
        self._prefetch_score = 1.0  # running precision of issued prefetches (optimistic start)
        self._throttled_seen = 0
        self._lock = threading.RLock()
        self.counters = {
            "hits": 0,
            "misses": 0,
            "bytes_moved": 0,
            "evictions": 0,
            "prefetch_issued": 0,
            "prefetch_used": 0,
            "prefetch_wasted": 0,
            "prefetch_throttled": 0,
            "stall_s": 0.0,
            "predicted": 0,
            "actual": 0,
            "predicted_correct": 0,
        }

    # -- the seam ---------------------------------------------------------------------

    def get(
        self, layer: int, expert_ids: Iterable[int], hidden: torch.Tensor | None = None
    ) -> dict[int, dict[str, torch.Tensor]]:
        """The weights of ``expert_ids`` of ``layer`` in the device tier (pinned until the next get).

        ``hidden`` (optional): the hidden state entering this layer, for the gate predictor.
        """
        ids = sorted({int(e) for e in expert_ids})
        with self._lock:
            self._clock += 1
            self._layer_now = layer
            self._pinned.clear()
            self._score_prediction(layer, ids)
            pos = self._pos[layer]
            if self.affinity is not None and self._last is not None and self._pos[self._last[0]] == pos - 1:
                self.affinity.observe(pos, self._last[1], ids)
            self._last = (layer, ids)
            keys = [(layer, e) for e in ids]
            self._demote_unused_prefetches(layer, set(ids))
            self._pinned.update(keys)
            for k in keys:
                self._freq[k] = self._freq.get(k, 0) + 1
                entry = self._entries.get(k)
                if entry is not None:
                    self.counters["hits"] += 1
                    if entry.prefetched and not entry.used:
                        self.counters["prefetch_used"] += 1
                        self._prefetch_outcome(True)
                    entry.used = True
                    entry.last = self._clock
                    self._entries.move_to_end(k)
                else:
                    self.counters["misses"] += 1
                    self._admit(k, prefetched=False, required=True)
            out = {}
            started = time.perf_counter()
            for k in keys:  # on CUDA the compute stream waits for each copy (GPU-side) before using it
                out[k[1]] = self._entries[k].wait().ready().tensors
            self.counters["stall_s"] += time.perf_counter() - started  # the model waited for reads this long
            self._prefetch_next(layer, ids, hidden)
            return out

    def release(self) -> None:
        """Unpin the experts of the last get (e.g. at the end of a forward pass)."""
        with self._lock:
            self._pinned.clear()

    # -- admission, eviction, prefetch ---------------------------------------------------

    def _admit(self, key: Key, prefetched: bool, required: bool) -> bool:
        name = self.group_name(*key)
        if name not in self.store.specs:
            if required:
                raise KeyError(f"expert {key[1]} of layer {key[0]} is not held by this worker's store ({name!r})")
            return False  # predicted, but another rank owns it
        nbytes = self.store.nbytes(name)
        while True:
            fut = None
            if self.capacity_bytes is None or self._bytes + nbytes <= self.capacity_bytes:
                fut = self.store.fetch_async(name, try_only=True, urgent=not prefetched)
            if fut is not None:
                break
            if not self._evict_one(protect_prefetched=not required):
                if not required:
                    return False
                raise BudgetExceeded(
                    f"expert cache: layer {key[0]} needs {len(self._pinned)} experts at once "
                    f"({len(self._pinned)} x ~{nbytes} bytes) but the device tier has no room left after evicting "
                    f"every unpinned expert (device budget {self.store.config.device_budget_bytes}, "
                    f"cache cap {self.capacity_bytes}); raise device_budget_bytes or reduce the batch"
                )
        entry = _Entry(fut, nbytes, prefetched=prefetched, used=not prefetched, last=self._clock)
        self._entries[key] = entry
        self._bytes += nbytes
        self.counters["bytes_moved"] += nbytes
        if prefetched:
            self.counters["prefetch_issued"] += 1
        return True

    def _demote_unused_prefetches(self, layer: int, used: set[int]) -> None:
        """Prefetches for ``layer`` that this get does not use were mispredicted: make them the first
        to go (otherwise, protected as "fresh", they would pile up and crowd out useful experts)."""
        for key in [k for k, e in self._entries.items() if k[0] == layer and k[1] not in used and e.prefetched and not e.used]:
            entry = self._entries[key]
            entry.prefetched = False
            entry.used = True
            entry.last = -len(self.order)  # stale: out of the working set
            self.counters["prefetch_wasted"] += 1
            self._prefetch_outcome(False)
            self._entries.move_to_end(key, last=False)

    def _victim(self, protect_prefetched: bool) -> Key | None:
        candidates = [k for k in self._entries if k not in self._pinned]
        if not candidates:
            return None
        fresh = [k for k in candidates if self._entries[k].prefetched and not self._entries[k].used]
        if protect_prefetched:
            candidates = [k for k in candidates if k not in fresh]
        else:
            # Demand misses evict used entries first, unused prefetches last.
            stale = [k for k in candidates if k not in fresh]
            candidates = stale or candidates
        if not candidates:
            return None
        if self.cyclic:
            # Entries not used during the last pass over the layers go first, by the policy. When every
            # candidate was (one pass uses more experts than the cache holds, as with a large batch),
            # recency is the wrong signal: decode visits the layers in a cycle, so the least recently
            # used entry is the next one needed and LRU would miss on every access. Then the entry whose
            # layer comes round last goes (Belady's choice if each is used again on the next pass).
            cycle = len(self.order)
            stale = [k for k in candidates if self._clock - self._entries[k].last >= cycle]
            if not stale and cycle > 1:
                now = self._pos.get(self._layer_now, 0)
                order = {k: i for i, k in enumerate(self._entries)}
                return max(candidates, key=lambda k: ((self._pos.get(k[0], 0) - now - 1) % cycle, -order[k]))
            candidates = stale or candidates
        if self.policy == "lru":
            return candidates[0]  # the OrderedDict is in recency order
        order = {k: i for i, k in enumerate(self._entries)}
        return min(candidates, key=lambda k: (self._freq.get(k, 0), order[k]))

    def _evict_one(self, protect_prefetched: bool) -> bool:
        key = self._victim(protect_prefetched)
        if key is None:
            return False
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
        self.counters["evictions"] += 1
        if entry.prefetched and not entry.used:
            self.counters["prefetch_wasted"] += 1
            self._prefetch_outcome(False)
        try:
            entry.wait().release()
        except Exception:  # noqa: BLE001 - a failed read holds no bytes
            pass
        return True

    def _prefetch_next(self, layer: int, ids: Sequence[int], hidden: torch.Tensor | None) -> None:
        pos = self._pos[layer] + 1
        if pos >= len(self.order) or (self.affinity is None and self.gate is None):
            return
        nxt = self.order[pos]
        scores = None
        k = self.predict_top_k or len(ids)  # default: as many as this layer used
        if self.gate is not None:
            scores = self.gate.scores(nxt, hidden)
            if scores is not None:
                scores = scores.cpu()  # the router ran where the hidden state is; ranking happens here
            if scores is not None and not self.predict_top_k:
                k = max(k, int((scores > 0).sum()))  # every expert the next router would pick
        if self.affinity is not None:
            aff = self.affinity.scores(pos, ids)
            if aff is not None:
                # Gate votes dominate; affinity breaks ties and fills in when no gate score exists.
                aff = aff / aff.max()
                scores = aff if scores is None else scores + aff
        predicted = rank_experts(scores, k)
        if not predicted:
            return
        self._predicted[nxt] = set(predicted)
        for e in predicted:
            key = (nxt, e)
            if key not in self._entries and self.group_name(*key) in self.store.specs and self._may_prefetch():
                self._admit(key, prefetched=True, required=False)

    def _prefetch_outcome(self, used: bool) -> None:
        self._prefetch_score += PREFETCH_EWMA * ((1.0 if used else 0.0) - self._prefetch_score)

    def _may_prefetch(self) -> bool:
        """Whether to issue one more prefetch read: yes while issued prefetches have paid off, else
        one in PREFETCH_EXPLORE (to notice when they would again)."""
        if self._prefetch_score >= self.min_prefetch_precision:
            return True
        self._throttled_seen += 1
        if self._throttled_seen % PREFETCH_EXPLORE == 0:
            return True
        self.counters["prefetch_throttled"] += 1
        return False

    def _score_prediction(self, layer: int, ids: Sequence[int]) -> None:
        predicted = self._predicted.pop(layer, None)
        if predicted is None:
            return
        actual = set(ids)
        self.counters["predicted"] += len(predicted)
        self.counters["actual"] += len(actual)
        self.counters["predicted_correct"] += len(predicted & actual)

    # -- stats and lifecycle ---------------------------------------------------------------

    def stats(self) -> dict:
        with self._lock:
            c = dict(self.counters)
        total = c["hits"] + c["misses"]
        c["hit_rate"] = c["hits"] / total if total else 0.0
        c["prefetch_precision"] = c["predicted_correct"] / c["predicted"] if c["predicted"] else 0.0
        c["prefetch_recall"] = c["predicted_correct"] / c["actual"] if c["actual"] else 0.0
        c["prefetch_score"] = self._prefetch_score
        c["cached_experts"] = len(self._entries)
        c["cached_bytes"] = self._bytes
        c["policy"] = self.policy
        return c

    def clear(self) -> None:
        """Drop every cached expert (gives the device bytes back)."""
        with self._lock:
            self._pinned.clear()
            while self._entries:
                _, entry = self._entries.popitem(last=False)
                try:
                    entry.wait().release()
                except Exception:  # noqa: BLE001
                    pass
            self._bytes = 0

    def close(self) -> None:
        self.clear()
