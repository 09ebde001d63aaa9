"""Double-buffered streaming of weight groups in a fixed order (ZeRO-Inference style).

When layer i's group is taken for compute, the reads of groups i+1 .. i+depth
are already issued, so the disk works while layer i computes; with enough
bandwidth the step time approaches max(io, compute) instead of their sum.
Prefetches are charged to the device budget like any fetch; one that does not
fit is simply not issued now (it is retried at the next layer), so a budget
with room for only one streamed group degrades to synchronous reads instead
of failing.

The order wraps around (``cyclic=True``): after the last layer, layer 0 is
prefetched for the next decode step.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Iterator, Sequence

from tessera.offload.store import TieredStore, WeightHandle


class LayerStreamer:
    """Streams ``order`` (group names) through the device tier, ``depth`` groups ahead."""

    def __init__(self, store: TieredStore, order: Sequence[str], depth: int | None = None, cyclic: bool = True) -> None:
        if not order:
            raise ValueError("LayerStreamer needs at least one group in its order")
        self.store = store
        self.order = list(order)
        self.index = {n: i for i, n in enumerate(self.order)}
        self.depth = store.config.prefetch_depth if depth is None else depth
        self.cyclic = cyclic
        self._inflight: dict[str, Future] = {}
        self.counters = {"uses": 0, "prefetched": 0, "prefetch_hits": 0, "sync_fetches": 0, "wait_s": 0.0}

    def _ahead(self, i: int) -> list[str]:
        out = []
        for k in range(1, self.depth + 1):
            j = i + k
            if j >= len(self.order):
                if not self.cyclic:
                    break
                j %= len(self.order)
            if j != i:
                out.append(self.order[j])
        return out

    def prefetch(self, name: str) -> bool:
        """Issue the read of ``name`` if it is not in flight and the device tier has room."""
        if name in self._inflight:
            return True
        fut = self.store.fetch_async(name, try_only=True, urgent=False)
        if fut is None:
            return False
        self._inflight[name] = fut
        self.counters["prefetched"] += 1
        return True

    @contextmanager
    def use(self, name: str) -> Iterator[WeightHandle]:
        """The group's weights for the duration of the block; the next groups stream in meanwhile."""
        i = self.index[name]
        fut = self._inflight.pop(name, None)
        if fut is None:
            self.counters["sync_fetches"] += 1
            fut = self.store.fetch_async(name, try_only=True)
            if fut is None:  # prefetches of other groups hold the room: give it back, then fetch
                self.drain()
                fut = self.store.fetch_async(name)
        else:
            self.counters["prefetch_hits"] += 1
        for nxt in self._ahead(i):  # issue before waiting: reads queue behind this one
            self.prefetch(nxt)
        started = time.perf_counter()
        handle = fut.result().ready()  # on CUDA: the compute stream waits for the copy, the host does not
        self.counters["wait_s"] += time.perf_counter() - started
        self.counters["uses"] += 1
        try:
            yield handle
        finally:
            handle.release()
            for nxt in self._ahead(i):  # room freed: issue what did not fit before
                self.prefetch(nxt)

    def drain(self) -> None:
        """Wait for and release every prefetch in flight (end of generation, shutdown)."""
        for fut in self._inflight.values():
            try:
                fut.result().release()
            except Exception:  # noqa: BLE001 - a failed prefetch holds nothing
                pass
        self._inflight.clear()

    def close(self) -> None:
        self.drain()
