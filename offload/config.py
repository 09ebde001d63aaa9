"""Typed, frozen configuration of the offload tiers of one worker.

Validated once at construction (the edge); immutable afterwards, so a store
built from it cannot drift from what the user asked for.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from tessera.offload.errors import OffloadConfigError

ALIGNMENT = 4096  # O_DIRECT and NVMe page: every extent starts and ends on it


class Tier(str, enum.Enum):
    """Where a weight group lives between uses."""

    DEVICE = "device"  # resident in device memory (GPU; a budgeted host region on CPU)
    HOST = "host"  # host memory, copied to the device tier when used
    NVME = "nvme"  # the aligned tier file, read with O_DIRECT when used


READERS = ("auto", "aio", "preadv")
POLICIES = ("lru", "lfu")
PREDICTORS = ("none", "affinity", "gate", "both")
ON_CORRUPT = ("rebuild", "refuse")


@dataclass(frozen=True)
class OffloadConfig:
    """Budgets and knobs of one worker's tiers.

    ``device_budget_bytes`` / ``host_budget_bytes``: the most bytes of weights
    this worker may hold in each tier at any instant (resident groups, groups
    being used, prefetch and staging buffers together). ``None`` for the host
    budget means "unbounded". ``nvme_dir``: where tier files are written;
    required as soon as any group is placed on NVMe.

    ``reader``: ``"aio"`` (DeepSpeed async I/O, must be built), ``"preadv"``
    (O_DIRECT ``os.preadv`` thread pool) or ``"auto"`` (aio when its op is
    already built, else preadv; never compiles). ``io_threads``,
    ``queue_depth``, ``block_size`` tune the reader. ``chunk_bytes``: the unit
    one preadv thread reads.

    ``cache_policy``: expert-cache eviction (``"lru"`` or ``"lfu"``).
    ``predictor``: how next-layer experts are predicted for prefetch.
    ``prefetch_depth``: how many layers ahead dense prefetch runs (1 = double
    buffering). ``verify_reads``: check each group's checksum on every read
    (done on the I/O threads, so it overlaps compute). ``on_corrupt``: a
    corrupt tier file is rebuilt from the checkpoint, or refused.
    """

    device_budget_bytes: int
    host_budget_bytes: int | None = None
    nvme_dir: str | None = None
    reader: str = "auto"
    io_threads: int = 4
    queue_depth: int = 32
    block_size: int = 1 << 20
    chunk_bytes: int = 1 << 20
    cache_policy: str = "lru"
    predictor: str = "affinity"
    predict_top_k: int = 0  # 0: as many experts as the current layer used
    prefetch_depth: int = 1
    verify_reads: bool = True
    on_corrupt: str = "rebuild"
    min_free_bytes: int = 256 << 20  # disk headroom kept free after writing a tier file

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise OffloadConfigError(msg)

        need(
            isinstance(self.device_budget_bytes, int) and self.device_budget_bytes > 0,
            f"device_budget_bytes is {self.device_budget_bytes!r}; give a positive byte count",
        )
        need(
            self.host_budget_bytes is None
            or (isinstance(self.host_budget_bytes, int) and self.host_budget_bytes > 0),
            f"host_budget_bytes is {self.host_budget_bytes!r}; give a positive byte count or None",
        )
        if self.nvme_dir is not None:
            object.__setattr__(self, "nvme_dir", str(Path(self.nvme_dir).expanduser()))
        need(self.reader in READERS, f"reader {self.reader!r} is unknown; use one of {READERS}")
        need(self.cache_policy in POLICIES, f"cache_policy {self.cache_policy!r} is unknown; use one of {POLICIES}")
        need(self.predictor in PREDICTORS, f"predictor {self.predictor!r} is unknown; use one of {PREDICTORS}")
        need(self.on_corrupt in ON_CORRUPT, f"on_corrupt {self.on_corrupt!r} is unknown; use one of {ON_CORRUPT}")
        for name in ("io_threads", "queue_depth", "prefetch_depth"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} is {value!r}; it must be an int >= 1")
        for name in ("block_size", "chunk_bytes"):
            value = getattr(self, name)
            need(
                isinstance(value, int) and value >= ALIGNMENT and value % ALIGNMENT == 0,
                f"{name} is {value!r}; it must be a positive multiple of {ALIGNMENT}",
            )
        need(self.predict_top_k >= 0, f"predict_top_k is {self.predict_top_k}; it must be >= 0")
        need(self.min_free_bytes >= 0, f"min_free_bytes is {self.min_free_bytes}; it must be >= 0")
