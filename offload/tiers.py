"""Byte budgets of the tiers of one worker, with an instrumented peak.

Every buffer that holds weight bytes in the device or host tier is charged
here before it is allocated and refunded after it is freed, so ``peak`` is
the true high-water mark of weight bytes in that tier. A reservation that
would go over the limit raises instead of silently over-allocating: a plan
that does not fit must fail loudly, never thrash or OOM later.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from tessera.offload.errors import BudgetExceeded


class TierBudget:
    """Thread-safe byte accounting of one tier (reserve before allocating, release after freeing)."""

    def __init__(self, name: str, limit_bytes: int | None) -> None:
        self.name = name
        self.limit = limit_bytes  # None: unbounded (still tracked)
        self._used = 0
        self._peak = 0
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)

    @property
    def used(self) -> int:
        return self._used

    @property
    def peak(self) -> int:
        return self._peak

    @property
    def free(self) -> int | None:
        return None if self.limit is None else self.limit - self._used

    def fits(self, nbytes: int) -> bool:
        return self.limit is None or self._used + nbytes <= self.limit

    def try_reserve(self, nbytes: int) -> bool:
        """Charge ``nbytes`` if they fit; return whether they were charged."""
        with self._lock:
            if self.limit is not None and self._used + nbytes > self.limit:
                return False
            self._charge(nbytes)
            return True

    def reserve(self, nbytes: int, what: str = "weights", timeout_s: float = 0.0) -> None:
        """Charge ``nbytes``; wait up to ``timeout_s`` for releases, then raise BudgetExceeded."""
        with self._lock:
            ok = self._freed.wait_for(
                lambda: self.limit is None or self._used + nbytes <= self.limit, timeout=timeout_s
            )
            if not ok:
                raise BudgetExceeded(
                    f"{self.name} tier: reserving {nbytes} bytes for {what} would use "
                    f"{self._used + nbytes} of its {self.limit}-byte budget (waited {timeout_s:.1f}s "
                    "for releases); release weights first or raise the budget"
                )
            self._charge(nbytes)

    def release(self, nbytes: int) -> None:
        with self._lock:
            if nbytes > self._used:
                raise AssertionError(f"{self.name} tier: releasing {nbytes} bytes but only {self._used} are charged")
            self._used -= nbytes
            self._freed.notify_all()

    def _charge(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"cannot reserve a negative byte count ({nbytes})")
        self._used += nbytes
        self._peak = max(self._peak, self._used)

    def reset_peak(self) -> None:
        with self._lock:
            self._peak = self._used

    def snapshot(self) -> "BudgetSnapshot":
        with self._lock:
            return BudgetSnapshot(self.name, self.limit, self._used, self._peak)


@dataclass(frozen=True)
class BudgetSnapshot:
    """One tier's accounting at an instant (for stats and tests)."""

    tier: str
    limit: int | None
    used: int
    peak: int
