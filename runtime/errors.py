"""Errors the controller raises; each message names what failed and where."""

from __future__ import annotations


class TesseraError(RuntimeError):
    """Base class of runtime errors."""


class PlacementError(TesseraError):
    """The cluster cannot hold the requested placement (raised before any worker starts)."""


class WaitTimeout(TesseraError):
    """A bounded wait ran out; the message says what was waited for."""


class WorkerDiedError(TesseraError):
    """A worker process died; names its rank and node."""

    def __init__(self, message: str, ranks: list[int]) -> None:
        super().__init__(message)
        self.ranks = ranks


class RankError(TesseraError):
    """A function raised on one or more ranks; carries each rank's error."""

    def __init__(self, message: str, errors: dict[int, BaseException]) -> None:
        super().__init__(message)
        self.errors = errors
