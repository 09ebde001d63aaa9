"""Typed, frozen configuration: the parallel plan, the timeouts and the job (a leaf module).

Validated once, at construction, with errors that name the fix; immutable
afterwards so that every rank and every layer sees the same plan. It imports
nothing of tessera but the other leaf modules (``errors``, ``options``), so
every folder may use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from tessera.errors import ConfigError
from tessera.options import DiffusionOptions, LLMOptions, OffloadConfig, PlanningHints

# Mesh dims, outermost first. tp is innermost so that the ranks of a
# tensor-parallel group are adjacent (and can be packed onto one node).
MESH_DIM_ORDER: tuple[str, ...] = ("dp", "pp", "cfg", "ep", "sp", "tp")

MESH_DIM_HELP: dict[str, str] = {
    "dp": "data parallel (independent replicas)",
    "pp": "pipeline parallel (layer stages)",
    "cfg": "classifier-free-guidance parallel (cond/uncond branches)",
    "ep": "expert parallel (experts spread over ranks)",
    "sp": "sequence / patch parallel (image tokens or sequence split)",
    "tp": "tensor parallel (heads and MLP columns split)",
}

DEVICE_KINDS = ("cpu", "cuda")


@dataclass(frozen=True)
class ParallelPlan:
    """Degrees per named mesh dim, e.g. ``ParallelPlan({"pp": 2, "tp": 2})``.

    Dims are kept in the canonical order of :data:`MESH_DIM_ORDER` whatever
    order they were given in, so two plans with equal degrees are equal and
    build the same mesh. ``world_size``, when given, must equal the product.
    """

    degrees: Mapping[str, int] = field(default_factory=dict)
    world_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.degrees, ParallelPlan):  # tolerate ParallelPlan(plan)
            object.__setattr__(self, "degrees", dict(self.degrees.degrees))
        if not isinstance(self.degrees, Mapping):
            raise ConfigError(
                f"ParallelPlan degrees must be a mapping of dim name to degree, got "
                f"{type(self.degrees).__name__}; write e.g. ParallelPlan({{'tp': 2, 'ep': 2}})"
            )
        unknown = [d for d in self.degrees if d not in MESH_DIM_ORDER]
        if unknown:
            known = ", ".join(f"{d} ({MESH_DIM_HELP[d]})" for d in MESH_DIM_ORDER)
            raise ConfigError(f"unknown mesh dim {unknown[0]!r}; use one of: {known}")
        for dim, deg in self.degrees.items():
            if isinstance(deg, bool) or not isinstance(deg, int):
                raise ConfigError(
                    f"degree of {dim!r} must be an integer, got {deg!r}; write e.g. {{{dim!r}: 2}}"
                )
            if deg < 1:
                raise ConfigError(
                    f"degree of {dim!r} is {deg}, but every degree must be >= 1; "
                    f"use 1 (or leave {dim!r} out) for no {MESH_DIM_HELP[dim]}"
                )
        ordered = {d: int(self.degrees[d]) for d in MESH_DIM_ORDER if d in self.degrees}
        object.__setattr__(self, "degrees", _FrozenDict(ordered))
        product = math.prod(ordered.values()) if ordered else 1
        if self.world_size is not None:
            if self.world_size < 1:
                raise ConfigError(f"world_size is {self.world_size}; it must be >= 1")
            if product != self.world_size:
                shown = " x ".join(f"{d}={k}" for d, k in ordered.items()) or "(no dims)"
                hint = (
                    f"; or add dp={self.world_size // product} if independent replicas are meant"
                    if self.world_size % product == 0
                    else ""
                )
                raise ConfigError(
                    f"degrees {shown} multiply to {product}, not to the world size "
                    f"{self.world_size}; change the degrees so that their product is "
                    f"{self.world_size}{hint}"
                )
        object.__setattr__(self, "world_size", product)

    @classmethod
    def parse(cls, text: str | Mapping[str, int] | "ParallelPlan") -> "ParallelPlan":
        """Accept ``"tp=2,ep=2"`` (or ``"tp=2xep=2"``), a dict of degrees, or a plan."""
        if isinstance(text, ParallelPlan):
            return text
        if isinstance(text, Mapping):
            return cls(dict(text))
        degrees: dict[str, int] = {}
        for part in str(text).replace("x", ",").replace(" ", "").split(","):
            if not part:
                continue
            if "=" not in part:
                raise ConfigError(f"cannot read plan part {part!r}; write dims as name=degree, e.g. 'tp=2,ep=2'")
            name, _, value = part.partition("=")
            try:
                degrees[name] = int(value)
            except ValueError:
                raise ConfigError(f"degree of {name!r} is {value!r}, not an integer; write e.g. '{name}=2'") from None
        return cls(degrees)

    @property
    def dim_names(self) -> tuple[str, ...]:
        return tuple(self.degrees)

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return tuple(self.degrees.values())

    def degree(self, dim: str) -> int:
        """Degree of ``dim``; 1 when the plan does not use it."""
        if dim not in MESH_DIM_ORDER:
            raise ConfigError(f"unknown mesh dim {dim!r}; use one of {', '.join(MESH_DIM_ORDER)}")
        return self.degrees.get(dim, 1)

    def coordinates(self, rank: int) -> dict[str, int]:
        """Mesh coordinates of ``rank`` (row-major over the canonical dim order)."""
        if not 0 <= rank < self.world_size:
            raise ConfigError(f"rank {rank} is outside the world of size {self.world_size}")
        coords: dict[str, int] = {}
        rest = rank
        for dim in reversed(self.dim_names):
            coords[dim] = rest % self.degrees[dim]
            rest //= self.degrees[dim]
        return {d: coords[d] for d in self.dim_names}

    def __str__(self) -> str:
        return ",".join(f"{d}={k}" for d, k in self.degrees.items()) or "single"


class _FrozenDict(dict):
    """A dict that refuses mutation, so a frozen plan really is immutable."""

    def _refuse(self, *_: Any, **__: Any) -> None:
        raise TypeError("ParallelPlan degrees are immutable; build a new ParallelPlan instead")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self.items()))


@dataclass(frozen=True)
class Timeouts:
    """Every wait in the controller ends; these are the limits, in seconds."""

    placement_group_s: float = 60.0
    worker_start_s: float = 120.0
    process_group_s: float = 120.0
    call_s: float = 600.0

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not value > 0):
                raise ConfigError(f"timeout {name} is {value!r}; every timeout must be a finite number of seconds > 0 "
                                  f"(e.g. {name}: 120)")


def check_plan_and_resources(config: Any) -> None:
    """Normalise ``config.plan`` to a ParallelPlan and check ``device`` and ``cpus_per_rank``.

    Shared by the frozen dataclasses that carry a plan (JobSpec, Placement).
    """
    if not isinstance(config.plan, ParallelPlan):
        object.__setattr__(config, "plan", ParallelPlan.parse(config.plan))
    if config.device not in DEVICE_KINDS:
        raise ConfigError(f"device {config.device!r} is not supported; use one of {', '.join(DEVICE_KINDS)}")
    cpus = config.cpus_per_rank
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not math.isfinite(cpus) or not cpus > 0:
        raise ConfigError(f"cpus_per_rank is {cpus!r}; it must be a finite number > 0 (e.g. 1)")


@dataclass(frozen=True)
class JobSpec:
    """One job, whatever surface it came from (Python, CLI, ``ray job``, SLURM).

    ``launch/`` builds it, with typed engine and offload options validated
    here, on the driver, before Ray starts; ``memory/`` turns it into a
    :class:`~tessera.memory.placement.Placement`; the engines receive the same
    option objects. ``plan_auto``: the planner chooses the degrees (``plan``
    is then a placeholder).
    """

    plan: ParallelPlan
    model: str | None = None
    device: str = "cpu"
    cluster: str | None = None  # None: embedded local Ray; "auto" or an address otherwise
    cpus_per_rank: float = 1.0
    timeouts: Timeouts = field(default_factory=Timeouts)
    log_level: str | None = None  # None: the driver's level ($TESSERA_LOG_LEVEL or INFO)
    plan_auto: bool = False
    engine: LLMOptions | DiffusionOptions | None = None
    offload: OffloadConfig | None = None
    planning: PlanningHints = field(default_factory=PlanningHints)

    def __post_init__(self) -> None:
        check_plan_and_resources(self)
        for name in ("model", "cluster"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"JobSpec.{name} is {value!r}; it must be a string or None")
        if not isinstance(self.plan_auto, bool):
            raise ConfigError(f"JobSpec.plan_auto is {self.plan_auto!r}; it must be true or false")
        if self.log_level is not None:
            level = str(self.log_level).upper()
            if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
                raise ConfigError(f"log level {self.log_level!r} is not one of DEBUG, INFO, WARNING, ERROR")
            object.__setattr__(self, "log_level", level)
        for name, kinds in (("engine", (LLMOptions, DiffusionOptions)), ("offload", (OffloadConfig,)),
                            ("planning", (PlanningHints,)), ("timeouts", (Timeouts,))):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kinds):
                raise ConfigError(f"JobSpec.{name} must be a {' or '.join(k.__name__ for k in kinds)}, got "
                                  f"{type(value).__name__}; build it with tessera.launch (which accepts dicts)")
