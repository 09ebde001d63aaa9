"""Host-to-device copies of weight groups on a side stream, ordered by events, so prefetch overlaps compute.

On CUDA, :class:`DeviceCopier` owns one copy stream per store. A group's
tensors are copied from page-locked host memory with non-blocking copies on
that stream and an event is recorded after them; the consumer makes its own
(compute) stream wait on that event (:meth:`DeviceCopier.wait`): a wait on the
GPU, the host does not block, so the copy of the next layer's weights runs
while this layer computes.

Freeing is ordered the same way. When the consumer releases a group, an event
is recorded on the stream that used it (:meth:`DeviceCopier.retire`); the
device tensors stay referenced, and the caller's refund (the device budget's
``release``) runs, only once that event has completed. So the caching
allocator can never hand the memory to the next copy while a kernel still
reads it (no ``record_stream`` needed), and the device budget refunds bytes
when they are really free: the budget's peak is what CUDA had allocated for
weights. :meth:`DeviceCopier.reap` runs completed retirements (never blocks)
and, asked for room, waits for the oldest ones.

On the CPU the device tier is host memory: ``copy`` returns the tensors as
they are, there are no events, and ``retire`` refunds at once. The same calls
run on both, so the CPU tests exercise the store's CUDA control flow.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Mapping

import torch

Tensors = dict[str, torch.Tensor]


class DeviceCopier:
    """Copies groups to ``device`` (a side stream and events on CUDA) and frees them in stream order."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._retiring: deque[tuple[Any, Tensors, Callable[[], None], int]] = deque()
        self._lock = threading.Lock()
        self.counters = {"copies": 0, "copy_bytes": 0, "retired": 0, "waited_retirements": 0}

    # -- copies ---------------------------------------------------------------------------

    def copy(self, host: Mapping[str, torch.Tensor]) -> tuple[Tensors, Any]:
        """``(device tensors, ready event)``; on the CPU ``(host tensors as they are, None)``.

        The copies are issued on the copy stream and return at once; the tensors
        are valid for a stream that has waited on the event (:meth:`wait`).
        Non-blocking copies are asynchronous only from page-locked memory: the
        store keeps its host tier and staging buffers pinned on CUDA.
        """
        nbytes = sum(t.numel() * t.element_size() for t in host.values())
        with self._lock:
            self.counters["copies"] += 1
            self.counters["copy_bytes"] += nbytes
        if not self.cuda:
            return dict(host), None
        with torch.cuda.stream(self.stream):
            out = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event

    def wait(self, event: Any) -> Any:
        """Make the current stream wait for ``event`` (GPU-side); returns that stream (the consumer)."""
        if event is None or not self.cuda:
            return None
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(event)
        return stream

    # -- freeing in stream order -------------------------------------------------------------

    def retire(self, tensors: Tensors, refund: Callable[[], None], nbytes: int, consumer: Any = None) -> None:
        """Free ``tensors`` and call ``refund`` once the consumer's work queued so far has run.

        ``consumer``: the stream that used the tensors (default: the current stream).
        """
        if not self.cuda:
            refund()
            return
        event = self._record_event(consumer)
        with self._lock:
            self._retiring.append((event, tensors, refund, nbytes))
        self.reap()

    def _record_event(self, stream: Any = None) -> Any:
        """An event recorded on ``stream`` (default: the current stream): done once the work queued there has run."""
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return event

    def reap(self, need_bytes: int = 0, fits: Callable[[int], bool] | None = None) -> int:
        """Run completed retirements; with ``fits``, also wait (oldest first) until ``fits(need_bytes)``.

        Returns the bytes refunded.
        """
        refunded = 0
        while True:
            with self._lock:
                if not self._retiring:
                    return refunded
                event, _, _, _ = self._retiring[0]
                done = event.query()
                if not done and (fits is None or fits(need_bytes)):
                    return refunded
            if not done:
                event.synchronize()  # only when asked for room: the compute stream must pass the old uses
                with self._lock:
                    self.counters["waited_retirements"] += 1
            with self._lock:
                if not self._retiring or self._retiring[0][0] is not event:
                    continue  # another thread reaped it meanwhile
                _, tensors, refund, nbytes = self._retiring.popleft()
                self.counters["retired"] += 1
            tensors.clear()  # the last references: the caching allocator may reuse the memory now
            refund()
            refunded += nbytes

    @property
    def retiring_bytes(self) -> int:
        with self._lock:
            return sum(n for _, _, _, n in self._retiring)

    def drain(self) -> None:
        """Wait for every retirement (shutdown)."""
        self.reap(need_bytes=1, fits=lambda n: False)
        if self.stream is not None:
            self.stream.synchronize()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out = dict(self.counters)
        out["retiring_bytes"] = self.retiring_bytes
        out["side_stream"] = self.cuda
        return out
