"""Choosing a plan with the cost model: the candidates the rules allow, ranked by the objective, explained.

:func:`search_plans` costs every plan :func:`candidate_plans` yields (``memory.cost_model``), keeps those
that fit, ranks them by the objective (plans within 2% by simplicity: fewer devices, fewer stages, smaller
``tp``), and says why each runner-up lost (:func:`lost_because`); when nothing fits it refuses with one
line naming what to change (:func:`refusal`). :func:`describe_search` and :func:`search_to_dict` are what
``tessera plan MODEL --cluster ...`` prints (text, ``--json``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields, replace
from typing import Any

from tessera.config import ParallelPlan
from tessera.errors import ConfigError
from tessera.memory.cost_model import (DIT_SEARCH_DIMS, LM_SEARCH_DIMS, OBJECTIVES, TIE, PlanEstimate, Workload,
                                       _divisors, _gib, check_shape, estimate_dit, estimate_lm)
from tessera.memory.hardware import GiB, ClusterSpec
from tessera.memory.profile import ModelProfile


@dataclass(frozen=True)
class Alternative:
    estimate: PlanEstimate
    lost_because: str


@dataclass(frozen=True)
class PlanSearch:
    """The planner's answer: the chosen plan, the runners-up and why they lost."""

    profile: ModelProfile
    cluster: ClusterSpec
    workload: Workload
    objective: str
    offload: bool
    best: PlanEstimate
    alternatives: tuple[Alternative, ...]
    considered: int
    feasible: int
    search_s: float


def candidate_plans(profile: ModelProfile, cluster: ClusterSpec, workload: Workload) -> list[ParallelPlan]:
    """Every plan that passes :func:`check_shape` over all the cluster's devices, or over fewer when the
    whole cluster cannot be used well (a power-of-two share of a node: a model that fits one device may
    run on one, the others left free)."""
    total = cluster.total_devices
    worlds = {total} | {w for w in _divisors(cluster.devices_per_node) if w < total}
    dims = LM_SEARCH_DIMS if profile.kind == "moe_lm" else DIT_SEARCH_DIMS
    out = []

    def rec(i: int, left: int, chosen: dict[str, int]) -> None:
        if i == len(dims) - 1:
            degrees = {**chosen, dims[i]: left}
            plan = ParallelPlan({d: k for d, k in degrees.items() if k > 1})
            if degrees["dp"] > workload.batch:
                return  # replicas with nothing to serve
            try:
                check_shape(profile, cluster, plan, workload)
            except ConfigError:
                return
            out.append(plan)
            return
        for k in _divisors(left):
            rec(i + 1, left // k, {**chosen, dims[i]: k})

    for world in sorted(worlds):
        rec(0, world, {})
    return out


def _simplicity(plan: ParallelPlan) -> tuple[int, ...]:
    return (plan.world_size, plan.degree("pp"), plan.degree("tp"), plan.degree("sp"), plan.degree("ep"), plan.degree("cfg"),
            plan.degree("dp"))


def _rank_key(best_score: float):
    def key(e: PlanEstimate) -> tuple:
        # plans within TIE of each other form one bucket, ranked by simplicity (fewest devices, then
        # fewest stages, then smallest tp)
        rel = (e.score - best_score) / abs(best_score) if best_score else 0.0
        return (math.floor(rel / TIE), _simplicity(e.plan), e.score)

    return key


def _headline(profile: ModelProfile, objective: str, e: PlanEstimate) -> str:
    m = e.metrics
    if profile.kind == "diffusion":
        return (f"{m['s_per_image']:.3g} s/image" if objective == "latency" else f"{m['images_per_s']:.3g} images/s")
    return (f"{m['request_s']:.3g} s per request ({m['decode_step_s'] * 1e3:.3g} ms/token)" if objective == "latency"
            else f"{m['tokens_per_s']:.4g} tokens/s")


def _life_parts(profile: ModelProfile, e: PlanEstimate) -> dict[str, float]:
    """Seconds of the whole batch by cause: a language model's prefill plus ``new_tokens`` decode steps (times
    the waves the KV cache forces), or a diffusion batch's denoising steps. Both objectives compare these:
    the same workload generates the same tokens (images), so throughput is inversely proportional to them."""
    if profile.kind == "diffusion":
        steps = e.metrics["batch_s"] / e.step.total_s
        return {k: v * steps for k, v in e.step.parts().items()}
    assert e.prefill is not None
    wave = e.metrics["prefill_s"] + e.metrics["new_tokens"] * e.step.total_s
    waves = e.metrics["request_s"] / wave
    out = {k: v * waves for k, v in e.prefill.parts().items()}
    for k, v in e.step.parts().items():
        out[k] = out.get(k, 0.0) + waves * e.metrics["new_tokens"] * v
    return out


def lost_because(profile: ModelProfile, objective: str, best: PlanEstimate, alt: PlanEstimate) -> str:
    """Why ``alt`` lost to ``best``: it does not fit, or it is slower by this much, mostly because of that."""
    if not alt.feasible:
        return f"does not fit: {alt.reason}"
    ratio = (alt.score / best.score) if objective == "latency" else (best.score / alt.score)
    if abs(ratio - 1) < TIE:
        return (f"within {TIE:.0%} of the chosen plan ({_headline(profile, objective, alt)}), "
                "which is simpler (fewer devices, then fewer stages, then smaller tp)")
    worse = "slower" if objective == "latency" else "less throughput"
    a, b = _life_parts(profile, alt), _life_parts(profile, best)
    delta, name = max((a.get(n, 0.0) - b.get(n, 0.0), n) for n in set(a) | set(b))
    what = "the batch" if objective == "throughput" else ("a request" if profile.kind == "moe_lm" else "the images")
    cause = f"+{delta:.3g} s for {what} in {name}"
    if profile.kind == "moe_lm" and alt.prefill is not None and best.prefill is not None:
        cause += (f" (prefill {alt.metrics['prefill_s']:.3g} s vs {best.metrics['prefill_s']:.3g} s, decode step "
                  f"{alt.metrics['decode_step_s'] * 1e3:.3g} ms vs {best.metrics['decode_step_s'] * 1e3:.3g} ms"
                  + (f", {alt.batch_per_replica} vs {best.batch_per_replica} sequences per replica"
                     if alt.batch_per_replica != best.batch_per_replica else "") + ")")
    return f"{ratio:.2f}x {worse} ({_headline(profile, objective, alt)}): {cause}"


def search_plans(profile: ModelProfile, cluster: ClusterSpec, workload: Workload | None = None,
                 objective: str = "latency", offload: bool = False, keep: int = 3) -> PlanSearch:
    """Cost every candidate plan and choose; refuse (ConfigError naming the fix) when none can work."""
    started = time.perf_counter()
    workload = workload or Workload()
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective {objective!r} is unknown; use latency or throughput")
    plans = candidate_plans(profile, cluster, workload)
    if not plans:
        raise ConfigError(
            f"no plan splits {profile.architecture} ({profile.num_heads} heads, {len(profile.layers)} layers"
            f"{f', {profile.num_experts} experts' if profile.num_experts else ''}) over {cluster.total_devices} device(s) "
            f"in nodes of {cluster.devices_per_node}: use a device count per node that divides the heads "
            f"(e.g. {max(d for d in _divisors(profile.num_heads) if d <= 8)}), or more devices; replicas (dp) "
            f"need requests: --workload batch=N")
    fn = estimate_lm if profile.kind == "moe_lm" else estimate_dit
    estimates = [fn(profile, cluster, p, workload, objective, offload) for p in plans]
    feasible = [e for e in estimates if e.feasible]
    if not feasible:
        raise ConfigError(refusal(profile, cluster, workload, estimates, offload))
    best_score = min(e.score for e in feasible)
    feasible.sort(key=_rank_key(best_score))
    best = feasible[0]
    rest = feasible[1:] + sorted((e for e in estimates if not e.feasible), key=lambda e: e.memory.total)
    alternatives = tuple(Alternative(e, lost_because(profile, objective, best, e)) for e in rest[:keep])
    best = replace(best, reason=why_chosen(profile, objective, best, feasible, len(estimates)))
    return PlanSearch(profile, cluster, workload, objective, offload, best, alternatives, len(estimates),
                      len(feasible), time.perf_counter() - started)


def why_chosen(profile: ModelProfile, objective: str, best: PlanEstimate, feasible: list[PlanEstimate],
               considered: int) -> str:
    parts = best.step.parts()
    name, seconds = max(parts.items(), key=lambda kv: kv[1])
    share = seconds / best.step.total_s if best.step.total_s else 0
    goal = "lowest latency" if objective == "latency" else "highest throughput"
    return (f"{goal} of {len(feasible)} plan(s) that fit (of {considered} the rules allow): "
            f"{_headline(profile, objective, best)}; its step is {share:.0%} {name}")


def refusal(profile: ModelProfile, cluster: ClusterSpec, workload: Workload, estimates: list[PlanEstimate],
            offload: bool) -> str:
    """One line: what does not fit and what to change."""
    least = min(estimates, key=lambda e: e.memory.total)
    need, budget, dpn = least.memory.total, cluster.device.budget_bytes, cluster.devices_per_node
    kv_total = least.memory.kv_cache * least.plan.world_size / max(least.plan.degree("ep"), 1)
    devices = math.ceil((profile.weight_bytes + kv_total) / budget)
    nodes = math.ceil(devices / dpn)
    fixes = []
    if nodes > cluster.nodes:
        fixes.append(f"use at least {nodes} node(s) of {dpn} x {cluster.device.model} ({nodes * dpn} devices)")
    fixes.append(f"devices with more than {need / GiB / cluster.device.usable_fraction:.0f} GiB")
    if least.memory.kv_cache > least.memory.weights * 0.25:
        fixes.append(f"a smaller --workload batch/context (KV cache {_gib(least.memory.kv_cache)} per device)")
    if not offload and profile.num_experts:
        fixes.append("--offload (experts in host memory / NVMe)")
    return (f"{profile.architecture} ({_gib(profile.weight_bytes)} of weights, {profile.weights}) does not fit "
            f"{cluster.total_devices} x {cluster.device.model}: the smallest need is {_gib(need)} per device "
            f"({least.plan}) against {_gib(budget)} usable; to fix: " + ", or ".join(fixes))


def search_to_dict(result: PlanSearch) -> dict[str, Any]:
    """The figures of a search for ``--json`` (seconds, bytes; the same numbers the text shows)."""

    def est(e: PlanEstimate) -> dict[str, Any]:
        mem = e.memory
        return {
            "plan": e.degrees, "world_size": e.plan.world_size, "fits": e.feasible,
            "batch_per_replica": e.batch_per_replica,
            "memory_per_device": {"weights": mem.weights, "kv_cache": mem.kv_cache, "activations": mem.activations,
                                  "others": mem.others, "total": mem.total,
                                  "tiers": {"device": mem.device, "host": mem.host, "nvme": mem.nvme},
                                  "budget": mem.budget},
            "step_s": e.step.total_s,
            "step_breakdown_s": {k: v for k, v in e.step.parts().items() if v},
            "prefill_s": e.prefill.total_s if e.prefill is not None else None,
            "metrics": dict(e.metrics), "reason": e.reason, "notes": list(e.notes),
        }

    p = result.profile
    return {
        "model": {"architecture": p.architecture, "kind": p.kind, "weights": p.weights,
                  "weight_bytes": p.weight_bytes, "layers": len(p.layers), "heads": p.num_heads,
                  "experts": p.num_experts, "path": p.spec.path},
        "cluster": {"name": result.cluster.name, "nodes": result.cluster.nodes,
                    "devices_per_node": result.cluster.devices_per_node, "device": result.cluster.device.model,
                    "source": result.cluster.source},
        "workload": {f.name: getattr(result.workload, f.name) for f in fields(result.workload)},
        "objective": result.objective, "offload": result.offload,
        "chosen": est(result.best),
        "alternatives": [{**est(a.estimate), "lost_because": a.lost_because} for a in result.alternatives],
        "considered": result.considered, "feasible": result.feasible, "search_s": result.search_s,
    }


def describe_search(result: PlanSearch) -> str:
    """What ``tessera plan MODEL --cluster ...`` prints."""
    p, c, b = result.profile, result.cluster, result.best
    lines = [
        f"model {p.architecture} ({p.kind}): {_gib(p.weight_bytes)} of weights, {p.weights}; "
        f"{len(p.layers)} layers, {p.num_heads} heads" + (f", {p.num_experts} experts top-{p.top_k}" if p.num_experts else ""),
        f"cluster {c.describe()}",
        f"workload {result.workload.describe(p.kind)}; objective {result.objective}"
        + ("; offload to host/NVMe allowed" if result.offload else ""),
        f"plan {b.plan} on {b.plan.world_size} device(s)",
        f"  why: {b.reason}",
    ]
    lines += _estimate_lines(p, b, "  ")
    lines.append(f"alternatives ({result.considered} considered, {result.feasible} fit, searched in {result.search_s:.2f} s):")
    for i, alt in enumerate(result.alternatives, 1):
        lines.append(f"  {i}. {alt.estimate.plan}: {alt.lost_because}")
    return "\n".join(lines)


def _estimate_lines(p: ModelProfile, e: PlanEstimate, pad: str) -> list[str]:
    mem = e.memory
    lines = [
        f"{pad}per device (most loaded): {_gib(mem.total)} of {_gib(mem.budget)} usable = weights {_gib(mem.weights)}"
        f" + KV cache {_gib(mem.kv_cache)} + activations {_gib(mem.activations)}"
        + (f" + text encoders/VAE {_gib(mem.others)}" if mem.others else ""),
        f"{pad}tiers per device: device {_gib(mem.device)}, host {_gib(mem.host)}, NVMe {_gib(mem.nvme)}",
    ]
    parts = ", ".join(f"{k} {v * 1e3:.3g}" for k, v in e.step.parts().items() if v > 0)
    m = e.metrics
    if p.kind == "diffusion":
        lines.append(f"{pad}denoising step {m['step_s'] * 1e3:.4g} ms ({parts} ms); {m['s_per_image']:.4g} s/image, "
                     f"{m['images_per_s']:.4g} images/s")
    else:
        lines.append(f"{pad}decode step {m['decode_step_s'] * 1e3:.4g} ms ({parts} ms)")
        lines.append(f"{pad}prefill {m['prefill_s']:.4g} s; request {m['request_s']:.4g} s; "
                     f"{m['tokens_per_s']:.4g} tokens/s overall ({m['decode_tokens_per_s']:.4g} while decoding, "
                     f"{m['tokens_per_s_per_sequence']:.4g} per sequence)")
    lines += [f"{pad}note: {n}" for n in e.notes]
    return lines


def describe_estimate(profile: ModelProfile, e: PlanEstimate) -> str:
    return "\n".join([f"plan {e.plan}" + ("" if e.feasible else f": does not fit: {e.reason}")] + _estimate_lines(profile, e, "  "))
