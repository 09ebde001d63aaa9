"""Typed options of a job: sampling, the engines, offload tiers (a leaf: imports nothing of tessera but errors).

Why one leaf module: ``launch/`` builds these from keyword arguments, dicts
or YAML and validates them once, on the driver, before Ray starts; the
engines, the planner and offload receive the same frozen objects and never
re-parse. Every error names the key (``offload.device_budget_bytes``) and the fix.
"""

from __future__ import annotations

import difflib
import enum
import math
import re
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

from tessera.errors import ConfigError, OffloadConfigError

T = TypeVar("T")

DTYPES = ("float32", "bfloat16", "float16")
MOE_DISPATCH_MODES = ("auto", "all_to_all", "all_reduce")
EXPERT_PARALLEL_MODES = ("standard", "coherent", "exflow")


def from_mapping(cls: type[T], data: Mapping[str, Any] | T | None, where: str) -> T:
    """``cls(**data)`` with errors that name ``where.key``; an instance of ``cls`` passes through."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of options (or a {cls.__name__}), got {type(data).__name__}")
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown {where} option {key!r}{hint}; known: {', '.join(known)}")
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in data and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{where}: {f.name} is required; add it (see {cls.__name__}'s documentation)")
    try:
        return cls(**dict(data))
    except ConfigError as err:
        raise type(err)(f"{where}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _need_int(owner: Any, name: str, minimum: int, error: type[ConfigError] = ConfigError) -> None:
    value = getattr(owner, name)
    if not _is_int(value) or value < minimum:
        raise error(f"{name} is {value!r}; it must be an integer >= {minimum}")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Any, name: str) -> int:
    """An integer byte count, or a string such as ``"512MiB"`` / ``"2GB"``."""
    if _is_int(value):
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])
    raise OffloadConfigError(f"{name} is {value!r}; give a byte count such as 805306368 or '768MiB'")


# -- sampling ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """How to generate for one request; validated at construction (clear errors)."""

    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {self.seed!r}")
        stops = (self.stop_token_ids,) if isinstance(self.stop_token_ids, int) else tuple(self.stop_token_ids)
        if any(not _is_int(t) or t < 0 for t in stops):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", stops)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))


# -- engines -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecoveryPolicy:
    """What an engine does when a worker dies, stalls or fails mid-step.

    Every fault restarts all ranks and replays what was in flight from the
    driver's state. ``max_restarts`` faults within ``window_s`` are recovered;
    one more fails the requests in flight (clearly) instead. Retries wait
    ``backoff_s``, doubled per consecutive attempt up to ``max_backoff_s``.
    After a fault the requests of the failed step run one at a time once; a
    request that faults alone ``poison_faults`` times is failed alone.
    A step that does not answer within ``max(stall_floor_s, stall_factor x`` the
    slowest recent step of its size ``)`` is a stall: its ranks are killed and
    recovered like a death.
    """

    max_restarts: int = 5
    window_s: float = 300.0
    backoff_s: float = 0.25
    max_backoff_s: float = 8.0
    poison_faults: int = 2
    stall_floor_s: float = 10.0
    stall_factor: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_restarts", "poison_faults"):
            _need_int(self, name, 1)
        for name in ("window_s", "backoff_s", "max_backoff_s", "stall_floor_s", "stall_factor"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} is {value!r}; it must be a finite number >= 0")
        if self.stall_floor_s <= 0:
            raise ConfigError(f"stall_floor_s is {self.stall_floor_s!r}; it must be > 0 seconds")
        if self.stall_factor < 1:
            raise ConfigError(f"stall_factor is {self.stall_factor!r}; it must be >= 1 (a step may always take its "
                              "usual time)")


def _recovery(value: Any) -> RecoveryPolicy:
    return from_mapping(RecoveryPolicy, value, "recovery")


@dataclass(frozen=True)
class LLMOptions:
    """Options of the MoE language-model engine (``LLMEngine.load``).

    ``dtype`` / ``max_model_len``: ``None`` takes the checkpoint's dtype and
    ``min(max_position_embeddings, 1024)``. ``num_kv_blocks`` 0: enough for
    ``max_num_seqs`` full-length sequences. ``decode_steps``: decode steps the
    workers run per call while no request waits (pp=1); 1 = one call per token.
    ``moe_dispatch``: how routed tokens reach experts (``auto``: all_reduce for
    a few tokens or when it moves fewer bytes, else all_to_all).
    ``expert_parallel_mode``: ``standard``; ``coherent`` (each token handled on
    its top-1 expert's rank); ``exflow`` (hidden states token-sharded over ep,
    following their top-1 expert). ``expert_map`` (``[layer][expert] = ep
    rank``, or one list for every MoE layer), ``expert_replicas``
    (``[layer][expert]`` = extra ep ranks) or ``placement_file`` (a ``tessera
    place`` output) place the experts; the planner turns them into the job's
    :class:`~tessera.memory.placement.Placement`.
    """

    dtype: str | None = None
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int = 0
    max_num_seqs: int = 8
    max_prefill_tokens: int = 2048
    record_routing: bool = False
    stop_at_eos: bool = True
    step_timeout_s: float = 600.0
    moe_dispatch: str = "auto"
    decode_steps: int = 8
    expert_parallel_mode: str = "standard"
    expert_map: Any = None
    expert_replicas: Any = None
    placement_file: str | None = None
    recovery: RecoveryPolicy = RecoveryPolicy()

    def __post_init__(self) -> None:
        object.__setattr__(self, "recovery", _recovery(self.recovery))
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if self.max_model_len is not None:
            _need_int(self, "max_model_len", 1)
        for name in ("block_size", "max_num_seqs", "max_prefill_tokens", "decode_steps"):
            _need_int(self, name, 1)
        _need_int(self, "num_kv_blocks", 0)
        if not _is_number(self.step_timeout_s) or not math.isfinite(self.step_timeout_s) or not self.step_timeout_s > 0:
            raise ConfigError(f"step_timeout_s is {self.step_timeout_s!r}; it must be a finite number of seconds > 0")
        if self.moe_dispatch not in MOE_DISPATCH_MODES:
            raise ConfigError(f"moe_dispatch {self.moe_dispatch!r} is unknown; use one of {', '.join(MOE_DISPATCH_MODES)}")
        if self.expert_parallel_mode not in EXPERT_PARALLEL_MODES:
            raise ConfigError(f"expert_parallel_mode {self.expert_parallel_mode!r} is unknown; use one of "
                              f"{', '.join(EXPERT_PARALLEL_MODES)}")
        for name in ("record_routing", "stop_at_eos"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} is {getattr(self, name)!r}; it must be true or false")
        if self.placement_file is not None and not isinstance(self.placement_file, (str, Path)):
            raise ConfigError(f"placement_file is {self.placement_file!r}; give the path of a `tessera place` output")
        for name in ("expert_map", "expert_replicas"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__")):
                raise ConfigError(f"{name} is {value!r}; give a list (one ep rank per expert, or one list per MoE "
                                  "layer), or leave it out")
        if self.placement_file is not None and (self.expert_map is not None or self.expert_replicas is not None):
            raise ConfigError("give either placement_file or expert_map/expert_replicas, not both")


@dataclass(frozen=True)
class DiffusionOptions:
    """Options of the diffusion engine (``DiffusionEngine.load``): weight dtype, the driver's progress bar, faults.

    ``checkpoint_s``: seconds of denoising between step checkpoints. The driver keeps every rank's latents and
    scheduler state after each such chunk of steps, so a fault resumes the image there instead of rerunning it
    from its seed (the same bits either way); an image shorter than that stays one rpc. ``None``: no
    checkpoints. The stale-K/V modes (``displaced``, ``partial``) always rerun from the seed.
    """

    dtype: str = "float32"
    progress: bool = True
    recovery: RecoveryPolicy = RecoveryPolicy()
    checkpoint_s: float | None = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "recovery", _recovery(self.recovery))
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if not isinstance(self.progress, bool):
            raise ConfigError(f"progress is {self.progress!r}; it must be true or false")
        if self.checkpoint_s is not None and (not _is_number(self.checkpoint_s) or not math.isfinite(self.checkpoint_s)
                                              or self.checkpoint_s < 0):
            raise ConfigError(f"checkpoint_s is {self.checkpoint_s!r}; give seconds >= 0 between step checkpoints, "
                              "or null for none")


# -- offload ------------------------------------------------------------------------------------------------

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
    budget means "unbounded". Both also accept strings such as ``"768MiB"``.
    ``nvme_dir``: where tier files are written; required as soon as any group
    is placed on NVMe.

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

        object.__setattr__(self, "device_budget_bytes", parse_bytes(self.device_budget_bytes, "device_budget_bytes"))
        need(self.device_budget_bytes > 0,
             f"device_budget_bytes is {self.device_budget_bytes!r}; give a positive byte count")
        if self.host_budget_bytes is not None:
            object.__setattr__(self, "host_budget_bytes", parse_bytes(self.host_budget_bytes, "host_budget_bytes"))
            need(self.host_budget_bytes > 0,
                 f"host_budget_bytes is {self.host_budget_bytes!r}; give a positive byte count or None")
        if self.nvme_dir is not None:
            need(isinstance(self.nvme_dir, (str, Path)), f"nvme_dir is {self.nvme_dir!r}; give a directory path")
            object.__setattr__(self, "nvme_dir", str(Path(self.nvme_dir).expanduser()))
        need(self.reader in READERS, f"reader {self.reader!r} is unknown; use one of {READERS}")
        need(self.cache_policy in POLICIES, f"cache_policy {self.cache_policy!r} is unknown; use one of {POLICIES}")
        need(self.predictor in PREDICTORS, f"predictor {self.predictor!r} is unknown; use one of {PREDICTORS}")
        need(self.on_corrupt in ON_CORRUPT, f"on_corrupt {self.on_corrupt!r} is unknown; use one of {ON_CORRUPT}")
        for name in ("io_threads", "queue_depth", "prefetch_depth"):
            _need_int(self, name, 1, OffloadConfigError)
        for name in ("block_size", "chunk_bytes"):
            value = getattr(self, name)
            need(
                _is_int(value) and value >= ALIGNMENT and value % ALIGNMENT == 0,
                f"{name} is {value!r}; it must be a positive multiple of {ALIGNMENT}",
            )
        _need_int(self, "predict_top_k", 0, OffloadConfigError)
        object.__setattr__(self, "min_free_bytes", parse_bytes(self.min_free_bytes, "min_free_bytes"))
        need(self.min_free_bytes >= 0, f"min_free_bytes is {self.min_free_bytes}; it must be >= 0")
        need(isinstance(self.verify_reads, bool), f"verify_reads is {self.verify_reads!r}; it must be true or false")


# -- planning ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanningHints:
    """What the planner may assume instead of asking the cluster (to plan ahead of time).

    ``world_size`` / ``device_memory_gib``: devices and memory per device;
    ``kv_tokens``: the KV-cache reserve (tokens over all sequences).
    """

    world_size: int | None = None
    device_memory_gib: float | None = None
    kv_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.world_size is not None:
            _need_int(self, "world_size", 1)
        if self.device_memory_gib is not None and (not _is_number(self.device_memory_gib)
                                                   or not math.isfinite(self.device_memory_gib)
                                                   or not self.device_memory_gib > 0):
            raise ConfigError(f"device_memory_gib is {self.device_memory_gib!r}; it must be a finite number > 0")
        _need_int(self, "kv_tokens", 0)
