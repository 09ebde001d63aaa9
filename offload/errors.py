"""Errors of the offload tiers.

Each names the problem and the fix, because they surface at load time on a
worker far from the user's command line. The base class and the config
error live in the leaf ``tessera.errors`` (options are validated on the driver).
"""

from __future__ import annotations

from tessera.errors import OffloadConfigError, OffloadError

__all__ = ["OffloadError", "OffloadConfigError", "TierDirError", "DiskSpaceError", "BudgetError", "BudgetExceeded",
           "TierFileError", "CorruptTierFileError"]


class TierDirError(OffloadError):
    """The NVMe tier directory is missing, not a directory, or not writable."""


class DiskSpaceError(OffloadError):
    """Not enough free space under the tier directory for the tier file."""


class BudgetError(OffloadError):
    """A budget cannot hold what the plan puts in it (e.g. the largest weight group)."""


class BudgetExceeded(OffloadError):
    """A reservation would take a tier over its byte budget."""


class TierFileError(OffloadError):
    """A tier file or its manifest is unreadable or inconsistent."""


class CorruptTierFileError(TierFileError):
    """A weight group's bytes do not match the checksum in the manifest."""
