"""The tiered weight store of one worker: every weight group in one tier, fetched on demand.

A weight group (a layer's dense weights, one expert, a stage) lives in the
device tier (resident), the host tier (host memory) or the NVMe tier (one
extent of the tier file). ``fetch`` / ``fetch_async`` bring a group into the
device tier and return a :class:`WeightHandle`; releasing the handle gives
the bytes back. Every byte that sits in the device or host tier is charged to
that tier's :class:`~tessera.offload.tiers.TierBudget` first, so the budgets
are enforced, and their peaks are what really existed.

On a CPU-only machine the device tier is a budgeted region of host memory:
NVMe reads land directly in device-tier buffers, and host-tier groups are
charged to the device budget while in use (no copy is needed on CPU).
On CUDA the host tier is page-locked memory, NVMe reads land in page-locked
(registered) staging buffers (charged to the host tier), and groups reach the
device through :class:`~tessera.offload.h2d.DeviceCopier`: copies on a side
stream, ordered by events, so a prefetch overlaps compute; a released group's
device memory is freed, and refunded to the device budget, only after the
compute stream has passed its uses. The device budget is checked against
what the GPU can still give (``torch.cuda.mem_get_info`` plus the caching
allocator's free blocks) when the store is built, and the stats report CUDA's
own allocation counters next to the budget's.

Which group goes to which tier is the planner's decision (``tiers=``); when
none is given, :func:`assign_tiers` applies a simple documented default.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from tessera.offload.aio import Reader, make_reader
from tessera.offload.buffers import BufferPool, PinnedAllocator
from tessera.offload.h2d import DeviceCopier
from tessera.options import OffloadConfig, Tier
from tessera.offload.errors import BudgetError, CorruptTierFileError, OffloadError
from tessera.offload.tier_file import (
    TierFile,
    checksum,
    group_nbytes,
    pack_group,
    rewrite_group,
    unpack_group,
    write_tier_file,
)
from tessera.offload.tiers import TierBudget

log = logging.getLogger("tessera.offload")

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class GroupSpec:
    """A weight group as the store sees it: a name, its padded size, and how to load it from the checkpoint."""

    name: str
    nbytes: int  # padded extent size (what a read buffer for it takes)
    load: Callable[[], Mapping[str, torch.Tensor]]


def group_spec(name: str, tensors: Mapping[str, torch.Tensor]) -> GroupSpec:
    """A GroupSpec for tensors already in memory (tests, small models)."""
    held = dict(tensors)
    return GroupSpec(name, group_nbytes(held), lambda: held)


def fingerprint_of(files: Iterable[str | os.PathLike], layout: Mapping[str, int]) -> str:
    """Identity of a checkpoint (file names, sizes, mtimes) and of the grouping written from it."""
    h = hashlib.sha256()
    for f in sorted(str(Path(p).resolve()) for p in files):
        st = os.stat(f)
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(sorted(layout.items())).encode())
    return h.hexdigest()


def content_fingerprint(specs: Sequence[GroupSpec]) -> str:
    """Identity of the groups' bytes themselves (used when the caller has no checkpoint files to name).

    Costs one pass over the weights (CRC32, ~1 GB/s), but a tier file is then
    reused only for exactly the same bytes: a different checkpoint with the
    same shapes can never be served from a stale file.
    """
    h = hashlib.sha256()
    for s in specs:
        packed, entries = pack_group(dict(s.load()))
        h.update(f"{s.name}|{packed.numel()}|{checksum(packed):08x}|".encode())
        h.update(json.dumps([(e.name, e.dtype, e.shape, e.offset) for e in entries]).encode())
    return h.hexdigest()


def assign_tiers(
    specs: Sequence[GroupSpec], config: OffloadConfig, resident: Iterable[str] = ()
) -> dict[str, Tier]:
    """Default placement: ``resident`` groups on the device; the rest in host memory up to the host
    budget (all of them when no NVMe dir is set), the remainder on NVMe.

    With an NVMe dir and no host budget, nothing is kept in host memory:
    offloaded groups are read from the tier file on every use.
    """
    resident = set(resident)
    tiers: dict[str, Tier] = {}
    host_left = 0 if config.nvme_dir is not None and config.host_budget_bytes is None else config.host_budget_bytes
    for s in specs:
        if s.name in resident:
            tiers[s.name] = Tier.DEVICE
        elif config.nvme_dir is None:
            tiers[s.name] = Tier.HOST
        elif host_left is None or host_left >= s.nbytes:
            tiers[s.name] = Tier.HOST
            host_left = None if host_left is None else host_left - s.nbytes
        else:
            tiers[s.name] = Tier.NVME
    return tiers


class WeightHandle:
    """A group's tensors in the device tier while in use. ``release()`` (or ``with``) gives the bytes back.

    On CUDA the tensors may still be in flight on the copy stream: call :meth:`ready` on the
    stream that computes with them first (the expert cache and the layer streamer do).
    """

    __slots__ = ("name", "tensors", "nbytes", "_release", "_lock", "_event", "_copier", "_consumer")

    def __init__(self, name: str, tensors: Tensors, nbytes: int, release: Callable[[], None] | None,
                 event: Any = None, copier: DeviceCopier | None = None) -> None:
        self.name = name
        self.tensors = tensors
        self.nbytes = nbytes
        self._release = release
        self._lock = threading.Lock()
        self._event = event  # the copy's completion (CUDA), None when the tensors are usable now
        self._copier = copier  # frees the device tensors in stream order (CUDA copies only)
        self._consumer = None

    def ready(self) -> "WeightHandle":
        """Order the current stream after this group's copy (a GPU-side wait; no-op on CPU); returns self."""
        if self._event is not None and self._copier is not None:
            self._consumer = self._copier.wait(self._event)
        return self

    def release(self) -> None:
        with self._lock:
            fn, self._release = self._release, None
        if fn is not None:
            tensors, self.tensors = self.tensors, {}
            if self._copier is not None and self._copier.cuda:
                # Device memory goes back (and is refunded) once the consumer's kernels are done with it.
                self._copier.retire(tensors, fn, self.nbytes, self._consumer)
            else:
                fn()

    @property
    def released(self) -> bool:
        return self._release is None

    def __enter__(self) -> "WeightHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class TieredStore:
    """Weight groups of one worker across the device, host and NVMe tiers, with budgets enforced."""

    def __init__(
        self,
        config: OffloadConfig,
        specs: Sequence[GroupSpec],
        tiers: Mapping[str, Tier] | None = None,
        *,
        fingerprint: str | None = None,
        name: str = "weights",
        device: str | torch.device = "cpu",
        reader: Reader | None = None,
        read_delay_s: float = 0.0,
        progress: Callable[[str], None] | None = None,
        external_resident_bytes: int = 0,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.specs = {s.name: s for s in specs}
        if len(self.specs) != len(specs):
            raise OffloadError("weight group names must be unique")
        self.tiers = dict(tiers) if tiers is not None else assign_tiers(specs, config)
        missing = [n for n in self.specs if n not in self.tiers]
        if missing:
            raise OffloadError(f"no tier given for weight groups {missing[:5]}")
        self.budgets = {
            Tier.DEVICE: TierBudget("device", config.device_budget_bytes),
            Tier.HOST: TierBudget("host", config.host_budget_bytes),
        }
        # Weights the caller keeps resident in the device tier itself (e.g. a model's dense layers):
        # charged to the device budget so offloaded groups only get what is really left.
        self.external_resident_bytes = external_resident_bytes
        self.counters = {"fetches": 0, "reads": 0, "bytes_read": 0, "read_s": 0.0, "repaired": 0, "h2d_bytes": 0}
        self._lock = threading.Lock()
        self._check_budgets()
        self.copier = DeviceCopier(self.device)
        if self.device.type == "cuda":
            self._check_cuda_room()
        if external_resident_bytes:
            self.budgets[Tier.DEVICE].reserve(external_resident_bytes, "weights kept resident by the caller")
        self.reader: Reader | None = None
        self.tier_file: TierFile | None = None
        self._resident: dict[str, Tensors] = {}
        self._host: dict[str, Tensors] = {}
        on_cuda = self.device.type == "cuda"
        nvme = [self.specs[n] for n, t in self.tiers.items() if t == Tier.NVME]
        if nvme:
            if config.nvme_dir is None:
                raise OffloadError(
                    f"{len(nvme)} weight group(s) are placed on NVMe but OffloadConfig.nvme_dir is not set; "
                    "give a directory on a fast local disk"
                )
            fp = fingerprint if fingerprint is not None else content_fingerprint(nvme)
            self.tier_file = self._open_or_write(name, nvme, fp, progress)
            self.reader = reader or make_reader(config, read_delay_s=read_delay_s)
        # Device-tier buffers for reads (CPU) or host staging buffers (CUDA), allocated by the reader
        # so that aio gets page-locked memory.
        alloc = self.reader.alloc if self.reader else None
        free = self.reader.free if self.reader else None
        if on_cuda:
            pinned = PinnedAllocator(alloc, free) if alloc else None  # NVMe -> pinned staging -> device
            self.staging = BufferPool(self.budgets[Tier.HOST], pinned.alloc, pinned.free) if pinned else None
            self.device_pool = None
        else:
            self.staging = None
            self.device_pool = BufferPool(self.budgets[Tier.DEVICE], alloc, free) if alloc else None
        for n, t in self.tiers.items():
            if t == Tier.DEVICE:
                tensors = {k: v.to(self.device) for k, v in self.specs[n].load().items()}
                self.budgets[Tier.DEVICE].reserve(self.specs[n].nbytes, f"resident group {n!r}")
                self._resident[n] = tensors
            elif t == Tier.HOST:
                self.budgets[Tier.HOST].reserve(self.specs[n].nbytes, f"host group {n!r}")
                host = {k: v.detach().to("cpu").contiguous() for k, v in self.specs[n].load().items()}
                # page-locked on CUDA: copies from it run asynchronously on the copy stream
                self._host[n] = {k: v.pin_memory() for k, v in host.items()} if on_cuda else host
        self._closed = False

    # -- build-time checks ---------------------------------------------------------

    def _check_budgets(self) -> None:
        dev = self.config.device_budget_bytes
        resident = self.external_resident_bytes + sum(
            self.specs[n].nbytes for n, t in self.tiers.items() if t == Tier.DEVICE
        )
        streamed = [s for s in self.specs.values() if self.tiers[s.name] != Tier.DEVICE]
        largest = max(streamed, key=lambda s: s.nbytes, default=None)
        if resident > dev:
            raise BudgetError(
                f"groups placed in the device tier take {resident} bytes but the device budget is {dev}; "
                "raise device_budget_bytes or place fewer groups on the device"
            )
        if largest is not None and resident + largest.nbytes > dev:
            raise BudgetError(
                f"device budget {dev} bytes is smaller than the resident weights ({resident} bytes) plus the largest "
                f"offloaded weight group {largest.name!r} ({largest.nbytes} bytes); raise device_budget_bytes to at "
                f"least {resident + largest.nbytes}"
            )
        host = self.config.host_budget_bytes
        if host is not None:
            in_host = sum(self.specs[n].nbytes for n, t in self.tiers.items() if t == Tier.HOST)
            staging = largest.nbytes if (largest is not None and self.device.type == "cuda") else 0
            if in_host + staging > host:
                raise BudgetError(
                    f"host budget {host} bytes cannot hold the host-tier groups ({in_host} bytes) plus one staging "
                    f"buffer ({staging} bytes); raise host_budget_bytes or move groups to NVMe (set nvme_dir)"
                )

    def _check_cuda_room(self) -> None:
        """Refuse a device budget larger than what this GPU can still give the store."""
        free, total = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        needed = self.config.device_budget_bytes - self.external_resident_bytes  # resident bytes are allocated already
        if needed > free + cached:
            raise BudgetError(
                f"device budget {self.config.device_budget_bytes} bytes ({self.external_resident_bytes} of them resident "
                f"already) needs {needed} more bytes on {self.device}, but the GPU has {free} free of {total} (plus "
                f"{cached} cached by PyTorch); lower device_budget_bytes or free GPU memory"
            )

    def _open_or_write(self, name: str, nvme: Sequence[GroupSpec], fp: str, progress) -> TierFile:
        cfg = self.config
        tf = TierFile.open(cfg.nvme_dir, name, fingerprint=fp, on_corrupt=cfg.on_corrupt)
        if tf is not None and set(tf.groups) == {s.name for s in nvme}:
            if not cfg.verify_reads:
                bad = tf.verify_all()
                if bad:
                    if cfg.on_corrupt == "refuse":
                        raise CorruptTierFileError(
                            f"tier file {tf.path}: groups {bad[:5]} fail their checksums; delete it to rebuild "
                            "(or set on_corrupt='rebuild')"
                        )
                    log.warning("tier file %s: %d corrupt group(s), rebuilding it", tf.path, len(bad))
                    tf = None
            if tf is not None:
                log.info("reusing tier file %s (%d groups)", tf.path, len(tf.groups))
                return tf
        total = sum(s.nbytes for s in nvme)
        started = time.perf_counter()

        def groups():
            for i, s in enumerate(nvme):
                if progress is not None:
                    progress(f"writing tier file: group {i + 1}/{len(nvme)} ({s.name})")
                tensors = dict(s.load())
                if group_nbytes(tensors) != s.nbytes:
                    raise OffloadError(f"group {s.name!r} loads as {group_nbytes(tensors)} bytes, spec says {s.nbytes}")
                yield s.name, tensors

        tf = write_tier_file(cfg.nvme_dir, name, groups(), fp, total, cfg.min_free_bytes)
        log.info("wrote tier file %s: %.1f MiB in %.1fs", tf.path, total / 2**20, time.perf_counter() - started)
        return tf

    # -- fetching ------------------------------------------------------------------------

    def tier_of(self, name: str) -> Tier:
        return self.tiers[name]

    def nbytes(self, name: str) -> int:
        return self.specs[name].nbytes

    def fetch(self, name: str, timeout_s: float = 0.0) -> WeightHandle:
        """Bring one group into the device tier now (waits for the read; the current stream waits for the copy)."""
        fut = self.fetch_async(name, timeout_s=timeout_s)
        assert fut is not None
        return fut.result().ready()

    def fetch_async(self, name: str, timeout_s: float = 0.0, try_only: bool = False,
                    urgent: bool = True) -> "Future[WeightHandle] | None":
        """Start bringing one group into the device tier; the device bytes are charged now.

        Raises BudgetExceeded when the device tier cannot take the group within
        ``timeout_s``; with ``try_only`` returns None instead. ``urgent=False``
        (a prefetch): its read queues behind every urgent read (one the model waits for).
        """
        if self._closed:
            raise OffloadError("the tiered store is closed")
        spec = self.specs[name]
        tier = self.tiers[name]
        with self._lock:
            self.counters["fetches"] += 1
        fut: Future = Future()
        if tier == Tier.DEVICE:
            fut.set_result(WeightHandle(name, self._resident[name], 0, None))
            return fut
        budget = self.budgets[Tier.DEVICE]
        if tier == Tier.HOST:
            if not self._charge(budget, spec.nbytes, name, timeout_s, try_only):
                return None
            host = self._host[name]
            if self.device.type == "cpu":
                fut.set_result(WeightHandle(name, host, spec.nbytes, lambda: budget.release(spec.nbytes)))
                return fut
            try:
                tensors, event = self._to_device(host)
            except BaseException:
                budget.release(spec.nbytes)
                raise
            fut.set_result(WeightHandle(name, tensors, spec.nbytes, lambda: budget.release(spec.nbytes), event,
                                        self.copier))
            return fut
        return self._read_nvme(name, timeout_s, try_only, urgent)

    def _charge(self, budget: TierBudget, nbytes: int, name: str, timeout_s: float, try_only: bool) -> bool:
        if self.copier.cuda:  # device bytes released earlier come back once the compute stream is past them
            self.copier.reap(nbytes, budget.fits)
        if try_only:
            return budget.try_reserve(nbytes)
        budget.reserve(nbytes, f"weight group {name!r}", timeout_s=timeout_s)
        return True

    def _to_device(self, tensors: Mapping[str, torch.Tensor]) -> tuple[Tensors, Any]:
        """Device copies issued on the copy stream, and the event that says they landed."""
        out, event = self.copier.copy(tensors)
        with self._lock:
            self.counters["h2d_bytes"] += sum(v.numel() * v.element_size() for v in out.values())
        return out, event

    def _read_nvme(self, name: str, timeout_s: float, try_only: bool, urgent: bool = True
                   ) -> "Future[WeightHandle] | None":
        assert self.tier_file is not None and self.reader is not None
        g = self.tier_file.groups[name]
        on_cuda = self.device.type == "cuda"
        pool = self.staging if on_cuda else self.device_pool
        assert pool is not None
        if try_only:
            buf = pool.try_acquire(g.nbytes)
            if buf is None:
                return None
        else:
            buf = pool.acquire(g.nbytes, f"weight group {name!r}", timeout_s=timeout_s)
        dev_budget = self.budgets[Tier.DEVICE]
        if on_cuda and not self._charge(dev_budget, g.nbytes, name, timeout_s, try_only):
            pool.give_back(buf)
            return None
        started = time.perf_counter()

        def land() -> WeightHandle:
            # Runs on an I/O thread once the bytes are in ``buf``.
            try:
                if self.config.verify_reads:
                    self._verify_or_repair(g, buf)
                with self._lock:
                    self.counters["reads"] += 1
                    self.counters["bytes_read"] += g.nbytes
                    self.counters["read_s"] += time.perf_counter() - started
                tensors = unpack_group(buf, g.tensors)
                if on_cuda:
                    tensors, event = self._to_device(tensors)
                    event.synchronize()  # this I/O thread waits for the copy, so the staging buffer can be reused
                    pool.give_back(buf)
                    return WeightHandle(name, tensors, g.nbytes, lambda: dev_budget.release(g.nbytes), event,
                                        self.copier)
                return WeightHandle(name, tensors, g.nbytes, lambda: pool.give_back(buf))
            except BaseException:
                pool.give_back(buf)
                if on_cuda:
                    dev_budget.release(g.nbytes)
                raise

        return self.reader.submit(str(self.tier_file.path), g.offset, buf, then=land, urgent=urgent)

    def _verify_or_repair(self, g, buf: torch.Tensor) -> None:
        try:
            self.tier_file.verify(g, buf)
            return
        except CorruptTierFileError:
            if self.config.on_corrupt == "refuse":
                raise
        # Rebuild the extent from the checkpoint, then use the checkpoint's bytes (verified).
        log.warning("tier file %s: group %r is corrupt; rewriting it from the checkpoint", self.tier_file.path, g.name)
        tensors = dict(self.specs[g.name].load())
        rewrite_group(self.tier_file, g.name, tensors)
        pack_group(tensors, out=buf)
        self.tier_file.verify(g, buf)
        with self._lock:
            self.counters["repaired"] += 1

    # -- stats and lifecycle -------------------------------------------------------------

    def stats(self) -> dict:
        with self._lock:
            out = dict(self.counters)
        out["reader"] = self.reader.name if self.reader else None
        out["direct_io"] = bool(self.reader and self.reader.direct)
        for tier, b in self.budgets.items():
            snap = b.snapshot()
            out[f"{tier.value}_limit"] = snap.limit
            out[f"{tier.value}_used"] = snap.used
            out[f"{tier.value}_peak"] = snap.peak
        out["groups"] = {t.value: sum(1 for v in self.tiers.values() if v == t) for t in Tier}
        out["copier"] = self.copier.stats()
        if self.device.type == "cuda":  # CUDA's own view, next to the budget's
            out["cuda_allocated"] = torch.cuda.memory_allocated(self.device)
            out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(self.device)
        # read_s sums submit-to-landed latency per read (reads overlap), so it is a latency, not a rate.
        out["mean_read_latency_ms"] = 1e3 * out["read_s"] / out["reads"] if out["reads"] else 0.0
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.copier.drain()
        if self.reader is not None:
            self.reader.close()
        for pool in (self.device_pool, self.staging):
            if pool is not None:
                pool.trim()
        self._resident.clear()
        self._host.clear()
