"""Every error tessera raises to its user, in one leaf module (it imports nothing of tessera).

Each message names what failed, where (rank, node, file, key) and the fix,
because the user meets it far from the code that raised it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the problem and the fix."""


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


class InfrastructureError(TesseraError):
    """The Ray head or a node under tessera's workers is gone; the message names it and what tessera did."""


class OffloadError(RuntimeError):
    """Base class of every offload error (the rest live in ``tessera.offload.errors``)."""


class OffloadConfigError(OffloadError, ConfigError):
    """An OffloadConfig field is invalid."""
