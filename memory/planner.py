"""The planner: JobSpec + ModelSpec + cluster inventory -> Placement, or a refusal with the reason.

``plan: auto`` picks degrees; an explicit plan is checked against the model
(heads divisible by ``tp``, stages no more than layers, no dims the engine
does not use) and against memory. Both happen before any worker starts.

Per-rank bytes follow how the engines shard:

- MoE LM: dense weights split over ``tp`` within a stage, layers split over
  ``pp``, routed experts spread over the ``ep x tp`` ranks of a stage, plus a
  KV-cache reserve split over ``tp``;
- diffusion: the transformer is split over ``tp`` (and ``pp``); ``sp`` and
  ``cfg`` ranks hold full copies of their shard.

Auto prefers, among plans that fit: fewest pipeline stages (bubbles), then
the smallest ``tp`` (an all-reduce per layer), then expert parallel for the
rest (MoE), or CFG x patch parallel (diffusion) as xDiT does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from tessera.memory.footprint import ModelSpec, read_model_spec
from tessera.memory.inventory import ClusterInventory, detect_inventory
from tessera.memory.expert_placement import ExpertPlacement
from tessera.memory.placement import Placement
from tessera.memory.stages import stage_ranges
from tessera.options import LLMOptions
from tessera.config import JobSpec, ParallelPlan
from tessera.errors import ConfigError

USABLE_FRACTION = 0.9  # of device memory; the rest is the framework's and the allocator's
DEFAULT_KV_TOKENS = 8192  # KV-cache reserve when the job does not say (tokens across all sequences)
LM_DIMS = ("pp", "ep", "tp")
DIFFUSION_DIMS = ("pp", "cfg", "sp", "tp")


@dataclass(frozen=True)
class PlanReport:
    """Why a plan was chosen (or accepted), with the per-rank memory it needs."""

    plan: ParallelPlan
    model: ModelSpec | None
    inventory: ClusterInventory | None
    per_rank_bytes: int
    budget_bytes: int | None
    fits: bool
    offloaded: bool
    reason: str


def _plan(**degrees: int) -> ParallelPlan:
    """A plan without its degree-1 dims (they change nothing and clutter the mesh)."""
    return ParallelPlan({d: k for d, k in degrees.items() if k > 1})


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def per_rank_bytes(spec: ModelSpec, plan: ParallelPlan, kv_tokens: int = DEFAULT_KV_TOKENS) -> int:
    """Bytes of weights (and KV reserve) one rank holds under ``plan``."""
    pp, tp = plan.degree("pp"), plan.degree("tp")
    if spec.kind == "moe_lm":
        ep = plan.degree("ep")
        dense = spec.dense_bytes / (tp * pp)
        experts = spec.expert_bytes / (ep * tp * pp)
        kv = spec.kv_bytes_per_token * kv_tokens / ((tp if spec.kv_split_over_tp else 1) * pp)
        return int(dense + experts + kv)
    return int(spec.dense_bytes / (tp * pp))


def check_plan_shape(spec: ModelSpec, plan: ParallelPlan) -> None:
    """Refuse degrees the model cannot be split into, naming the fix."""
    allowed = LM_DIMS if spec.kind == "moe_lm" else DIFFUSION_DIMS
    extra = [d for d, k in plan.degrees.items() if k > 1 and d not in allowed]
    if extra:
        raise ConfigError(
            f"{spec.architecture} ({spec.kind}) does not use mesh dim(s) {extra}; use {', '.join(allowed)}"
        )
    tp, pp = plan.degree("tp"), plan.degree("pp")
    if spec.num_heads % tp:
        good = [d for d in _divisors(spec.num_heads) if d <= max(tp * 2, 8)]
        raise ConfigError(
            f"tp={tp} does not divide the {spec.num_heads} attention heads of {spec.architecture}; use tp in {good}"
        )
    if spec.num_layers and pp > spec.num_layers:
        raise ConfigError(f"pp={pp} stages for {spec.num_layers} layers; use pp <= {spec.num_layers}")


def _lm_candidates(spec: ModelSpec, inv: ClusterInventory) -> list[ParallelPlan]:
    world = inv.total_devices
    plans = []
    for pp in _divisors(world):
        if spec.num_layers and pp > spec.num_layers:
            continue
        for tp in _divisors(world // pp):
            if tp > inv.devices_per_node or spec.num_heads % tp:
                continue
            ep = world // (pp * tp)
            plans.append(_plan(pp=pp, ep=ep, tp=tp))
    return sorted(plans, key=lambda p: (p.degree("pp"), p.degree("tp")))


def _diffusion_candidates(spec: ModelSpec, inv: ClusterInventory) -> list[ParallelPlan]:
    world = inv.total_devices
    plans = []
    for tp in _divisors(world):
        if tp > inv.devices_per_node or spec.num_heads % tp:
            continue
        rest = world // tp
        cfg = 2 if rest % 2 == 0 else 1
        plans.append(_plan(cfg=cfg, sp=rest // cfg, tp=tp))
    return sorted(plans, key=lambda p: p.degree("tp"))


def choose_plan(spec: ModelSpec, inv: ClusterInventory, offload: bool = False, kv_tokens: int = DEFAULT_KV_TOKENS) -> PlanReport:
    """The first plan (in preference order) whose per-rank bytes fit the device budget."""
    budget = int(inv.device_bytes * USABLE_FRACTION)
    candidates = _lm_candidates(spec, inv) if spec.kind == "moe_lm" else _diffusion_candidates(spec, inv)
    if not candidates:
        raise ConfigError(
            f"no plan splits {spec.architecture} ({spec.num_heads} heads, {spec.num_layers} layers) over "
            f"{inv.total_devices} {inv.device} device(s); change the number of devices"
        )
    for plan in candidates:
        need = per_rank_bytes(spec, plan, kv_tokens)
        if need <= budget:
            return PlanReport(plan, spec, inv, need, budget, True, False,
                              f"smallest pp/tp that fits {_gib(need)} per rank into {_gib(budget)}")
    smallest = min(candidates, key=lambda p: per_rank_bytes(spec, p, kv_tokens))
    need = per_rank_bytes(spec, smallest, kv_tokens)
    if offload:
        return PlanReport(smallest, spec, inv, need, budget, False, True,
                          f"needs {_gib(need)} per rank, over the {_gib(budget)} budget: the offload tiers hold the rest")
    raise ConfigError(
        f"{spec.architecture} ({_gib(spec.total_bytes)}) does not fit {inv.total_devices} {inv.device} device(s) "
        f"of {_gib(inv.device_bytes)}: the best plan {smallest} needs {_gib(need)} per rank, over the "
        f"{_gib(budget)} usable; add devices, or enable offload (offload: {{...}}) to stream weights from host/NVMe"
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def plan_job(job: JobSpec, inventory: ClusterInventory | None = None) -> Placement:
    """Turn a job into a Placement, or refuse it with the reason, before workers start.

    ``job.plan_auto`` asks for degrees to be chosen; otherwise ``job.plan`` is
    checked. With ``job.offload`` weights beyond the device budget go to the
    offload tiers; ``job.planning`` may stand in for the cluster
    (``world_size``, ``device_memory_gib``) and sizes the KV reserve.
    """
    auto = job.plan_auto
    spec = read_model_spec(job.model) if job.model else None
    offload = job.offload is not None
    kv_tokens = job.planning.kv_tokens
    if auto:
        if spec is None:
            raise ConfigError("plan auto needs a model to size; give model: <checkpoint dir>, or explicit degrees")
        inv = inventory or detect_inventory(job.device, job.planning)
        report = choose_plan(spec, inv, offload=offload, kv_tokens=kv_tokens)
        check_plan_shape(spec, report.plan)
    elif spec is not None:
        check_plan_shape(spec, job.plan)
        need = per_rank_bytes(spec, job.plan, kv_tokens)
        inv = inventory
        budget = int(inv.device_bytes * USABLE_FRACTION) if inv else None
        fits = budget is None or need <= budget
        if not fits and not offload and job.device == "cuda":
            raise ConfigError(
                f"plan {job.plan} needs {_gib(need)} per GPU for {spec.architecture}, over the {_gib(budget or 0)} "
                f"usable; raise tp/ep/pp, add GPUs, or enable offload"
            )
        report = PlanReport(job.plan, spec, inv, need, budget, fits, not fits and offload, "explicit plan")
    else:
        report = PlanReport(job.plan, None, inventory, 0, None, True, False, "explicit plan, no model")
    placement = Placement(report.plan, device=job.device, cpus_per_rank=job.cpus_per_rank, offload=job.offload,
                          report=report)
    if spec is not None and spec.kind == "moe_lm":
        from tessera.models.checkpoint import read_config
        from tessera.models.registry import family_for

        cfg = read_config(job.model)
        arch = family_for(cfg["architectures"][0]).parse_config(cfg)
        options = job.engine if isinstance(job.engine, LLMOptions) else LLMOptions()
        placement = place_llm(placement, job.model, arch, options)
    return placement


def llm_layer_bytes(arch) -> tuple[list[int], int, int]:
    """(bytes of each decoder layer, embedding bytes, LM-head and final-norm bytes) from the config alone."""
    from tessera.models.loader import expected_shape, layer_param_names

    def nbytes(name: str) -> int:
        return math.prod(expected_shape(arch, name))

    expert = sum(nbytes(n) for n in ("expert_gate", "expert_up", "expert_down"))
    layers = [sum(nbytes(n) for n in layer_param_names(arch, layer)) + (arch.num_experts * expert if moe else 0)
              for layer, moe in enumerate(arch.moe_layers)]
    return layers, nbytes("embed"), nbytes("lm_head") + nbytes("final_norm")


def place_llm(placement: Placement, model_dir: str, arch, options: LLMOptions) -> Placement:
    """The shards of a MoE language model on ``placement``'s mesh: layers per pipeline stage and the experts.

    Stages cut the decoder layers into contiguous ranges of balanced bytes (the
    first stage also holds the embedding, the last the head). Experts follow
    ``options.placement_file`` (a ``tessera place`` output), or
    ``options.expert_map`` / ``expert_replicas``, or the linear default.
    Refuses, naming the fix, what cannot work.
    """
    from tessera.memory.affinity.placement_file import placement_for_model

    plan = placement.plan
    pp, ep = plan.degree("pp"), plan.degree("ep")
    if pp > arch.num_layers:
        raise ConfigError(f"{arch.architecture} on plan {plan}: pp={pp} stages for {arch.num_layers} layers; "
                          f"use pp <= {arch.num_layers}")
    per_layer, embed, head = llm_layer_bytes(arch)
    stages = tuple(tuple(r) for r in stage_ranges(per_layer, pp, embed, head))
    experts = None
    if arch.moe_layer_ids:
        if options.placement_file is not None:
            experts = placement_for_model(options.placement_file, arch.num_experts, arch.moe_layer_ids, ep)
        else:
            experts = ExpertPlacement.for_model(arch.num_experts, arch.moe_layer_ids, ep, options.expert_map,
                                                options.expert_replicas)
    return replace(placement, model=str(Path(model_dir).resolve()), stages=stages, experts=experts)


def describe_placement(placement: Placement) -> str:
    """A few lines a person can read: the mesh, the model, memory per rank, and why."""
    plan = placement.plan
    report: PlanReport | None = placement.report
    lines = [f"mesh {plan} = {plan.world_size} rank(s) on {placement.device} (bundle {placement.bundle()} each)"]
    if report is not None and report.model is not None:
        spec = report.model
        lines.append(
            f"model {spec.architecture} ({spec.kind}): {_gib(spec.total_bytes)} "
            f"(dense {_gib(spec.dense_bytes)}, experts {_gib(spec.expert_bytes)}, largest group "
            f"{_gib(spec.largest_group_bytes)})"
        )
        budget = f" of {_gib(report.budget_bytes)} usable" if report.budget_bytes else ""
        lines.append(f"per rank: {_gib(report.per_rank_bytes)}{budget}{' (offloaded beyond it)' if report.offloaded else ''}")
        if report.inventory is not None:
            inv = report.inventory
            lines.append(f"cluster ({inv.source}): {len(inv.nodes)} node(s), {inv.total_devices} device(s) of "
                         f"{_gib(inv.device_bytes)}")
        lines.append(f"why: {report.reason}")
    for rank in range(plan.world_size):
        coords = ", ".join(f"{d}={c}" for d, c in plan.coordinates(rank).items())
        lines.append(f"  rank {rank}: {coords}")
    return "\n".join(lines)
