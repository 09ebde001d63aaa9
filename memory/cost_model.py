"""The cost model: per-rank memory per tier and step time of a plan, and the search for the best plan.

Inputs are typed and frozen: a :class:`~tessera.memory.profile.ModelProfile`
(from the config alone), a :class:`~tessera.memory.hardware.ClusterSpec`, a
:class:`Workload` and an objective (``latency`` or ``throughput``). The output
of :func:`search_plans` is a :class:`PlanSearch`: the chosen
:class:`PlanEstimate`, the others ranked, and why each lost.

How a step is costed (what tessera's engines do, so the prediction can be
checked against them, ``benchmarks/bench_planner.py``):

- **Language models** (pp, ep, tp; dp = independent replicas). Per decoder
  layer a rank reads its weights (``tp``-split projections, replicated norms and
  routers, the routed experts it holds that the step's tokens hit) and its KV
  cache, and does the matching FLOPs; the layer takes the larger of bytes /
  bandwidth and FLOPs / FLOP rate (roofline). Activations are replicated inside
  a stage's ``ep x tp`` group (tessera's dispatch), so every ep rank runs the
  attention of every token and holds its KV cache; the attention output is
  all-reduced over ``tp`` and the MoE output over ``ep x tp`` (or exchanged
  with all-to-all when that moves fewer bytes, as ``moe_dispatch: auto``).
  Pipeline stages run ``m = min(pp, batch)`` micro-batches GPipe style: a step
  costs ``(m + pp - 1)`` times the slowest stage's micro-batch, the ``pp - 1``
  being bubbles.
- **Diffusion transformers** (pp, cfg, sp, tp; dp replicas). Per block: the
  linears over this rank's image tokens (``sp`` splits them), the text tokens
  and the per-sample modulation, attention over the whole sequence for
  ``heads / (sp x tp)`` heads (Ulysses: four all-to-alls), ``tp`` all-reduces
  after row-parallel linears; ``cfg`` puts the two guidance branches on
  different ranks.
- **Collectives**: ``alpha(p) + factor * bytes / bandwidth`` on the link the
  group uses (within a node, or across nodes when its ranks span nodes:
  hierarchical, the cross-node part at the node's NIC bandwidth per device).
- **Overheads** (kernel launches, Python, the driver's call per step): per
  layer, per routed expert run, per step and per call, from the cluster file
  (measured by ``tessera plan --calibrate`` on CPU). On GPU they hide under
  device time (the larger counts); on CPU they add. CPU ranks beyond the
  node's cores share them (compute slows by busy ranks / cores; collectives
  take the latency calibrated for that many ranks).
- **Tiers**: weights beyond the device budget go to host memory, then NVMe
  (only with ``offload``); each step then moves the off-device bytes its
  tokens need at the host-to-device or NVMe rate (no overlap assumed).

Search: every split of the devices (all of them, or a share of one node's)
into ``dp x pp x ep x tp`` (language models) or ``dp x pp x cfg x sp x tp``
(diffusion) that follows the rules
engineers use (``tp`` divides the heads and stays within a node, ``ep``
divides the experts, ``pp`` no more than the layers, ``cfg`` 1 or 2, Ulysses
``sp x tp`` divides the heads, no replicas without requests), costed, ranked
by the objective; plans within 2% of each other are ranked by simplicity
(fewer devices, then fewer stages, then smaller ``tp``), as the rules-based
planner does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from tessera.config import ParallelPlan
from tessera.errors import ConfigError
from tessera.memory.hardware import GiB, ClusterSpec, LinkSpec
from tessera.memory.profile import LayerProfile, ModelProfile
from tessera.memory.stages import stage_ranges

OBJECTIVES = ("latency", "throughput")
LM_SEARCH_DIMS = ("dp", "pp", "ep", "tp")
DIT_SEARCH_DIMS = ("dp", "pp", "cfg", "sp", "tp")
DECODE_STEPS_PER_CALL = 8  # LLMOptions.decode_steps default: decode steps the workers run per driver call (pp=1)
MAX_PREFILL_TOKENS = 2048  # LLMOptions.max_prefill_tokens default: prefill chunk
LOW_LATENCY_TOKENS = 16  # parallel.expert: moe_dispatch auto uses all_reduce up to this many tokens
HOST_FRACTION = 0.8  # of a node's host memory the host tier may use (the rest: OS, page cache, the runtime)
TIE = 0.02  # plans within 2% are ranked by simplicity


# -- inputs ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What the plan must serve.

    Language models: ``batch`` sequences in flight together (over the whole
    cluster; ``dp`` replicas split them), each with a ``context``-token prompt
    and ``new_tokens`` generated tokens. Diffusion: ``batch`` images of
    ``image_size`` x ``image_size`` pixels, ``steps`` denoising steps,
    ``text_tokens`` prompt tokens (default: the family's).
    """

    batch: int = 1
    context: int = 1024
    new_tokens: int = 128
    image_size: int = 1024
    steps: int = 28
    text_tokens: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "text_tokens" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if f.name == "text_tokens" else 1):
                raise ConfigError(f"workload {f.name} is {value!r}; give an integer >= 1, e.g. --workload {f.name}=8")

    @classmethod
    def parse(cls, text: str | Mapping[str, Any] | None) -> "Workload":
        """``"batch=8,context=4096"``, a mapping, a YAML file holding one, or None (defaults)."""
        if text is None or isinstance(text, Workload):
            return text or cls()
        data: Mapping[str, Any]
        if isinstance(text, Mapping):
            data = text
        elif Path(text).suffix in (".yaml", ".yml", ".json"):
            import yaml

            if not Path(text).is_file():
                raise ConfigError(f"workload file {text} does not exist")
            data = yaml.safe_load(Path(text).read_text()) or {}
        else:
            data = {}
            for part in str(text).replace(" ", "").split(","):
                if not part:
                    continue
                key, eq, value = part.partition("=")
                if not eq:
                    raise ConfigError(f"cannot read workload part {part!r}; write key=value, e.g. batch=8,context=4096")
                try:
                    data[key] = int(value)
                except ValueError:
                    raise ConfigError(f"workload {key} is {value!r}, not an integer") from None
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                raise ConfigError(f"unknown workload key {key!r}; known: {', '.join(known)}")
        return cls(**dict(data))

    def describe(self, kind: str) -> str:
        if kind == "diffusion":
            return f"batch {self.batch} image(s) {self.image_size}x{self.image_size}, {self.steps} steps"
        return f"batch {self.batch}, context {self.context}, new_tokens {self.new_tokens}"


# -- outputs -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the most loaded rank, and where they live."""

    weights: int
    kv_cache: int
    activations: int
    others: int  # diffusion: text encoders and VAE (rank 0)
    device: int
    host: int
    nvme: int
    budget: int
    fits: bool
    reason: str = ""

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.others


@dataclass(frozen=True)
class StepTime:
    """Seconds of one step on the critical path, by cause (they add up to ``total_s``)."""

    compute_s: float = 0.0
    memory_s: float = 0.0
    overhead_s: float = 0.0
    offload_s: float = 0.0
    bubble_s: float = 0.0
    comm: tuple[tuple[str, float], ...] = ()

    @property
    def comm_s(self) -> float:
        return sum(s for _, s in self.comm)

    @property
    def total_s(self) -> float:
        return self.compute_s + self.memory_s + self.overhead_s + self.offload_s + self.bubble_s + self.comm_s

    def scaled(self, k: float) -> "StepTime":
        return StepTime(self.compute_s * k, self.memory_s * k, self.overhead_s * k, self.offload_s * k,
                        self.bubble_s * k, tuple((n, s * k) for n, s in self.comm))

    def plus(self, other: "StepTime") -> "StepTime":
        comm: dict[str, float] = dict(self.comm)
        for name, s in other.comm:
            comm[name] = comm.get(name, 0.0) + s
        return StepTime(self.compute_s + other.compute_s, self.memory_s + other.memory_s,
                        self.overhead_s + other.overhead_s, self.offload_s + other.offload_s,
                        self.bubble_s + other.bubble_s, tuple(comm.items()))

    def parts(self) -> dict[str, float]:
        """Named causes, communication by kind."""
        out = {"compute": self.compute_s, "memory reads": self.memory_s, "overheads": self.overhead_s,
               "offload transfers": self.offload_s, "pipeline bubbles": self.bubble_s}
        out.update({name: s for name, s in self.comm})
        return out


@dataclass(frozen=True)
class PlanEstimate:
    """One plan's predicted memory and time; ``score``: the objective's value (lower is better)."""

    plan: ParallelPlan
    memory: MemoryEstimate
    step: StepTime  # LM: one decode step; diffusion: one denoising step
    prefill: StepTime | None
    batch_per_replica: int
    score: float
    metrics: Mapping[str, float]
    feasible: bool
    reason: str = ""  # why infeasible (or, for the chosen plan, why it won)
    notes: tuple[str, ...] = ()

    @property
    def degrees(self) -> dict[str, int]:
        return dict(self.plan.degrees)


# -- collectives -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupLayout:
    """Where the ranks of one mesh-dim group sit: ``size`` ranks over ``nodes`` nodes. ``crowd``: the ranks
    that share one node's cores (CPU); a collective waits for every member to be scheduled, so with more
    ranks than cores its latency is that of the crowd, not of the group alone (0: not crowded)."""

    size: int
    nodes: int
    crowd: int = 0

    @property
    def per_node(self) -> int:
        return self.size // self.nodes


def group_layout(plan: ParallelPlan, dims: tuple[str, ...], devices_per_node: int) -> GroupLayout:
    """The group over ``dims`` that holds rank 0: how many nodes its ranks span. Ranks are numbered node by
    node and row-major over the mesh (the innermost dim, ``tp``, fastest), as the controller places them."""
    return _layout(tuple(plan.degrees.items()), tuple(d for d in dims if plan.degree(d) > 1), devices_per_node)


@lru_cache(maxsize=4096)
def _layout(degrees: tuple[tuple[str, int], ...], dims: tuple[str, ...], devices_per_node: int) -> GroupLayout:
    size = math.prod(k for d, k in degrees if d in dims)
    if size == 1:
        return GroupLayout(1, 1)
    ranks = [0]
    stride = 1
    for d, k in reversed(degrees):  # innermost first
        if d in dims:
            ranks = [r + i * stride for r in ranks for i in range(k)]
        stride *= k
    return GroupLayout(size, len({r // devices_per_node for r in ranks}))


def collective_s(kind: str, layout: GroupLayout, nbytes: float, cluster: ClusterSpec) -> float:
    """Seconds of one collective over ``layout``: ``all_reduce`` (ring), ``all_to_all`` / ``all_gather``
    (``nbytes``: what one rank sends / receives in all), ``p2p``. Across nodes it is hierarchical. On CPU
    nodes with more ranks than cores the latency is the calibrated one for that many ranks (``crowd``)."""
    p = layout.size
    if p <= 1 or nbytes <= 0:
        return 0.0
    crowd = layout.crowd if cluster.device.kind == "cpu" and layout.crowd > cluster.node.cores else 0

    def on(link: LinkSpec, ranks: int, n: float, factor: float) -> float:
        link = link.for_bytes(n)
        return link.alpha(max(ranks, crowd)) + factor * n / link.bandwidth

    intra, inter = cluster.intra_node, cluster.inter_node or cluster.intra_node
    if kind == "p2p":
        return on(inter if layout.nodes > 1 else intra, 2, nbytes, 1.0)
    if layout.nodes == 1:
        factor = 2 * (p - 1) / p if kind == "all_reduce" else (p - 1) / p
        return on(intra, p, nbytes, factor)
    g, m = layout.per_node, layout.nodes
    if kind == "all_reduce":  # reduce-scatter in the node, all-reduce across nodes on 1/g, all-gather in the node
        t = on(inter, m, nbytes / g, 2 * (m - 1) / m)
        if g > 1:
            t += 2 * on(intra, g, nbytes, (g - 1) / g)
        return t
    # all_to_all / all_gather: (g-1)/p of the bytes stay in the node, (p-g)/p cross it
    return on(intra, g, nbytes * (g - 1) / p, 1.0) + on(inter, m, nbytes * (p - g) / p, 1.0)


# -- the rates one rank sees -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankRates:
    """FLOP/s, bytes/s and the slowdown of one rank given how many ranks share its node."""

    flops: float
    bandwidth: float
    slow: float  # CPU: ranks per core beyond 1 (everything on the rank takes this much longer)


def rank_rates(cluster: ClusterSpec, profile: ModelProfile, ranks_on_node: int) -> RankRates:
    """Rates of one rank while ``ranks_on_node`` ranks of its node are busy at once (CPU: they share the cores
    and the memory bus; GPUs are independent)."""
    d, node = cluster.device, cluster.node
    flops = d.flops(profile.weight_dtype)
    bandwidth = d.bandwidth(profile.weight_dtype)
    slow = 1.0
    if d.kind == "cpu":
        slow = max(1.0, ranks_on_node / node.cores)
        if node.memory_bandwidth is not None:  # the node's memory bus is shared by its busy ranks
            bandwidth = min(bandwidth, node.memory_bandwidth / min(ranks_on_node, node.cores))
        flops, bandwidth = flops / slow, bandwidth / slow
    return RankRates(flops, bandwidth, slow)


def roofline(flops: float, nbytes: float, rates: RankRates) -> StepTime:
    """The larger of compute and memory time, attributed to whichever bounds it."""
    c, m = flops / rates.flops, nbytes / rates.bandwidth
    return StepTime(compute_s=c) if c >= m else StepTime(memory_s=m)


def with_overhead(device: StepTime, overhead_s: float, cluster: ClusterSpec) -> StepTime:
    """GPU launches hide under device time (the larger counts); on CPU they add."""
    if cluster.overheads.overlaps_compute:
        busy = device.compute_s + device.memory_s
        return device if busy >= overhead_s else StepTime(overhead_s=overhead_s)
    return device.plus(StepTime(overhead_s=overhead_s))


def expected_busiest(n: int, q: float, ranks: int) -> float:
    """E[max] over ``ranks`` independent Binomial(n, q) counts: the busiest rank's distinct experts hit."""
    if n <= 0 or q <= 0:
        return 0.0
    if q >= 1 or ranks <= 1:
        return n * q if ranks <= 1 else float(n)
    cdf, out = 0.0, 0.0
    for j in range(n):  # E[max] = sum over j of P(max > j)
        cdf += math.comb(n, j) * q**j * (1 - q) ** (n - j)
        out += 1 - min(1.0, cdf) ** ranks
    return out


# -- language models ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _stage_cuts(layer_bytes: tuple[int, ...], pp: int, first: int, last: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(r) for r in stage_ranges(list(layer_bytes), pp, first, last))


def stage_layers(profile: ModelProfile, pp: int) -> tuple[tuple[int, ...], ...]:
    """Layers (blocks) of each pipeline stage: the cuts ``place_llm`` and the DiT pipeline make (balanced bytes)."""
    if pp == 1:
        return (tuple(range(len(profile.layers))),)
    sizes = tuple(l.dense_bytes + profile.num_experts * l.expert_bytes for l in profile.layers)
    return _stage_cuts(sizes, pp, profile.first_bytes, profile.last_bytes)


def _kv_share(profile: ModelProfile, tp: int) -> float:
    """Fraction of a layer's KV cache (and kv projections) one tp rank holds."""
    if not profile.kv_split_over_tp:
        return 1.0
    return max(1.0 / tp, 1.0 / max(profile.num_kv_heads, 1))


def _expert_share(profile: ModelProfile, ep: int, tp: int) -> tuple[float, float]:
    """(experts one rank holds a slice of, fraction of each expert it holds)."""
    e = profile.num_experts
    if ep <= e:
        return math.ceil(e / ep), 1.0 / tp
    return 1.0, 1.0 / (tp * (ep // e))


def lm_weight_bytes(profile: ModelProfile, layers: tuple[int, ...], tp: int, ep: int, first: bool, last: bool) -> int:
    """Weights one rank of a stage holds: tp-split projections, replicated norms and routers, its experts'
    slices, the embedding split over tp (first stage) and the LM head over ep x tp (last stage)."""
    held, frac = _expert_share(profile, ep, tp) if profile.num_experts else (0, 0.0)
    kv = _kv_share(profile, tp)
    total = 0.0
    for i in layers:
        l = profile.layers[i]
        total += l.split_bytes / tp + l.kv_bytes_w * kv + l.replicated_bytes + held * l.expert_bytes * frac
    total += (profile.first_bytes / tp if first else 0) + (profile.last_bytes / (tp * ep) if last else 0)
    return int(total)


def _lm_layer_time(profile: ModelProfile, l: LayerProfile, tokens: int, ctx: float, tp: int, ep: int,
                   rates: RankRates, cluster: ClusterSpec, tp_group: GroupLayout, moe_group: GroupLayout,
                   offload_frac: float, offload_rate: float) -> StepTime:
    """One decoder layer on the busiest rank for ``tokens`` tokens attending ``ctx`` cached tokens each."""
    kv = _kv_share(profile, tp)
    flops = 2 * tokens * (l.split_params / tp + l.kv_params * kv + l.replicated_params)
    nbytes = l.split_bytes / tp + l.kv_bytes_w * kv + l.replicated_bytes
    flops += tokens * ctx * l.attn_flops / tp  # heads are split over tp (MLA too)
    nbytes += tokens * ctx * l.kv_bytes * kv
    experts_run = 0.0
    offload = 0.0
    act = profile.act_bytes * profile.hidden
    comm: list[tuple[str, float]] = []
    if tp > 1:
        comm.append((f"tp all-reduce (tp={tp})", collective_s("all_reduce", tp_group, tokens * act, cluster)))
    if l.expert_bytes:
        e, k = profile.num_experts, profile.top_k
        held, frac = _expert_share(profile, ep, tp)
        q = 1 - (1 - k / e) ** tokens  # probability that a given expert is hit by the step's tokens
        experts_run = expected_busiest(int(held), q, min(ep, e)) if ep <= e else q
        rows = tokens * k / min(ep, e)
        rows = min(tokens * k, rows + math.sqrt(rows)) if ep > 1 else tokens * k
        flops += 2 * rows * l.expert_params * frac
        nbytes += experts_run * l.expert_bytes * frac * (1 - offload_frac)
        if offload_frac:
            offload = experts_run * l.expert_bytes * frac * offload_frac / offload_rate
        p = moe_group.size
        if p > 1:
            reduce = collective_s("all_reduce", moe_group, tokens * act, cluster)
            name = f"MoE all-reduce (ep x tp={p}{', across nodes' if moe_group.nodes > 1 else ''})"
            if tokens > LOW_LATENCY_TOKENS:
                slices = tp * (ep // e if ep > e else 1)
                sent = tokens / p * k * slices * act
                a2a = 2 * collective_s("all_to_all", moe_group, sent, cluster) + \
                    collective_s("all_gather", moe_group, tokens * act, cluster)
                if a2a < reduce:
                    reduce, name = a2a, f"expert all-to-all (ep x tp={p}{', across nodes' if moe_group.nodes > 1 else ''})"
            comm.append((name, reduce))
    elif tp > 1:
        comm.append((f"tp all-reduce (tp={tp})", collective_s("all_reduce", tp_group, tokens * act, cluster)))
    overhead = (cluster.overheads.layer_s + cluster.overheads.expert_s * experts_run) * rates.slow
    out = with_overhead(roofline(flops, nbytes, rates), overhead, cluster)
    return out.plus(StepTime(offload_s=offload, comm=tuple(comm)))


def busy_ranks(plan: ParallelPlan, cluster: ClusterSpec, micro_batches: int) -> int:
    """Ranks of the first node computing at the same time: with fewer micro-batches than stages, only
    ``m / pp`` of the stages work at once (the others wait for their activations)."""
    on_node = min(plan.world_size, cluster.devices_per_node)
    pp = plan.degree("pp")
    return max(1, math.ceil(on_node * min(micro_batches, pp) / pp))


def _lm_pass(profile: ModelProfile, cluster: ClusterSpec, plan: ParallelPlan, tokens_per_seq: int, seqs: int,
             ctx: float, offload_frac: float, offload_rate: float, decode: bool) -> StepTime:
    """One engine step over ``seqs`` sequences of ``tokens_per_seq`` new tokens each (decode: 1)."""
    pp, tp, ep = plan.degree("pp"), plan.degree("tp"), plan.degree("ep")
    dpn = cluster.devices_per_node
    m = min(pp, seqs)
    # compute: only stages with work share the cores; collectives: every rank process on the node takes
    # part in the scheduling (waiting stages and Ray's threads still wake up), so all of them are the crowd
    crowd = min(plan.world_size, dpn)
    tp_group = replace(group_layout(plan, ("tp",), dpn), crowd=crowd)
    moe_group = replace(group_layout(plan, ("ep", "tp"), dpn), crowd=crowd)
    rates = rank_rates(cluster, profile, busy_ranks(plan, cluster, m))
    tokens = math.ceil(seqs / m) * tokens_per_seq
    stages = stage_layers(profile, pp)
    worst = None
    for s, layers in enumerate(stages):
        t = StepTime()
        for i in layers:
            t = t.plus(_lm_layer_time(profile, profile.layers[i], tokens, ctx, tp, ep, rates, cluster, tp_group,
                                      moe_group, offload_frac, offload_rate))
        if s == 0 and tp > 1:  # the embedding's vocabulary is split over tp: its rows are summed
            t = t.plus(StepTime(comm=((f"tp all-reduce (tp={tp})", collective_s(
                "all_reduce", tp_group, tokens * profile.hidden * profile.act_bytes, cluster)),)))
        if s == pp - 1:  # LM head on each sequence's last token, vocab split over the ep x tp group, gathered
            heads, group = math.ceil(seqs / m), moe_group.size
            t = t.plus(roofline(2 * heads * profile.last_params / group, profile.last_bytes / group, rates))
            if group > 1:
                t = t.plus(StepTime(comm=((f"logits all-gather (ep x tp={group})", collective_s(
                    "all_gather", moe_group, heads * profile.vocab * 4, cluster)),)))
        if worst is None or t.total_s > worst.total_s:
            worst = t
    assert worst is not None
    step = worst.scaled(m)
    if pp > 1:
        pipe = group_layout(plan, ("pp",), dpn)
        p2p = collective_s("p2p", GroupLayout(2, 2 if pipe.nodes > 1 else 1, crowd),
                           tokens * profile.hidden * profile.act_bytes, cluster)
        step = step.plus(StepTime(bubble_s=(pp - 1) * worst.total_s, comm=(("pipeline send/recv", (m + pp - 1) * p2p),)))
    ov = cluster.overheads
    per_call = 1 if (pp > 1 or not decode) else DECODE_STEPS_PER_CALL
    replica = pp * tp * ep
    step = step.plus(StepTime(overhead_s=ov.step_s * rates.slow + (ov.call_s + ov.call_per_rank_s * (replica - 1)) / per_call))
    return step


def _lm_activations(profile: ModelProfile, seqs: int, workload: Workload, ep: int) -> int:
    """Workspace of a step: one prefill chunk's hidden states and expert rows, and the logits of every sequence."""
    chunk = min(MAX_PREFILL_TOKENS, seqs * workload.context)
    return int(chunk * profile.hidden * profile.act_bytes * (12 + 2 * max(profile.top_k, 1) / max(ep, 1))
               + seqs * profile.vocab * 4)


def _lm_stage_need(profile: ModelProfile, plan: ParallelPlan, seqs: int,
                   workload: Workload) -> list[tuple[int, int, int, int]]:
    """Per stage: (weights, KV cache, activations, routed-expert bytes) on one of its ranks."""
    pp, tp, ep = plan.degree("pp"), plan.degree("tp"), plan.degree("ep")
    tokens = seqs * (workload.context + workload.new_tokens)
    kv_share = _kv_share(profile, tp)
    act = _lm_activations(profile, seqs, workload, ep)
    held, frac = _expert_share(profile, ep, tp) if profile.num_experts else (0, 0.0)
    out = []
    for s, layers in enumerate(stage_layers(profile, pp)):
        weights = lm_weight_bytes(profile, layers, tp, ep, s == 0, s == pp - 1)
        kv = int(tokens * sum(profile.layers[i].kv_bytes for i in layers) * kv_share)
        experts = int(sum(held * profile.layers[i].expert_bytes * frac for i in layers))
        out.append((weights, kv, act, experts))
    return out


def lm_capacity(profile: ModelProfile, cluster: ClusterSpec, plan: ParallelPlan, workload: Workload) -> int:
    """How many sequences of the workload's length one replica holds at once (device memory only)."""
    budget = cluster.device.budget_bytes
    ep = plan.degree("ep")
    chunk = _lm_activations(profile, MAX_PREFILL_TOKENS, replace(workload, context=1), ep) - MAX_PREFILL_TOKENS * profile.vocab * 4
    cap = None
    for weights, kv, _, _ in _lm_stage_need(profile, plan, 1, workload):
        free = budget - weights - chunk
        per_seq = kv + profile.vocab * 4  # its KV cache and its logits
        stage_cap = free // per_seq if free > 0 else 0
        cap = stage_cap if cap is None else min(cap, stage_cap)
    return max(0, int(cap or 0))


def _lm_memory(profile: ModelProfile, cluster: ClusterSpec, plan: ParallelPlan, seqs: int, workload: Workload,
               offload: bool) -> tuple[MemoryEstimate, float, float]:
    """Memory on the most loaded rank, and (fraction of its experts off the device, their transfer rate)."""
    budget = cluster.device.budget_bytes
    dpn = cluster.devices_per_node
    worst: MemoryEstimate | None = None
    worst_frac, rate = 0.0, 1.0
    for weights, kv, act, experts in _lm_stage_need(profile, plan, seqs, workload):
        need = weights + kv + act
        host = nvme = 0
        reason = ""
        fits = need <= budget
        off_frac = 0.0
        if not fits and offload and experts:
            spill = need - budget
            if spill <= experts:
                host_cap = int(cluster.node.host_memory_bytes * HOST_FRACTION / dpn) if cluster.device.kind == "cuda" else 0
                host = min(spill, host_cap)
                nvme = spill - host
                nvme_cap = cluster.node.nvme_bytes // dpn
                fits = nvme <= nvme_cap and (nvme == 0 or cluster.node.nvme_read > 0)
                off_frac = spill / experts
                rate = (cluster.node.nvme_read / dpn) if nvme else (cluster.node.host_to_device or cluster.device.memory_bandwidth)
                if not fits:
                    reason = (f"needs {_gib(need)} per device; offload would put {_gib(nvme)} on NVMe, over the "
                              f"{_gib(nvme_cap)} per device the node has")
            else:
                reason = (f"needs {_gib(need - experts)} per device without the experts (KV cache {_gib(kv)}), over "
                          f"the {_gib(budget)} usable: offload moves only experts")
        if not fits and not reason:
            reason = f"needs {_gib(need)} per device (weights {_gib(weights)}, KV cache {_gib(kv)}), over the {_gib(budget)} usable"
        est = MemoryEstimate(weights, kv, act, 0, need - host - nvme, host, nvme, budget, fits, reason)
        if worst is None or (not est.fits, est.total) > (not worst.fits, worst.total):
            worst, worst_frac = est, off_frac
    assert worst is not None
    return worst, worst_frac, rate


def _device_notes(plan: ParallelPlan, cluster: ClusterSpec) -> list[str]:
    if plan.world_size < cluster.total_devices:
        return [f"uses {plan.world_size} of the {cluster.total_devices} devices: more would not make it faster "
                "(the rest can serve other jobs)"]
    return []


def estimate_lm(profile: ModelProfile, cluster: ClusterSpec, plan: ParallelPlan, workload: Workload,
                objective: str = "latency", offload: bool = False) -> PlanEstimate:
    """Predicted memory and step times of ``plan`` (its ranks placed from the first node on).

    Each replica takes ``ceil(batch / dp)`` sequences; when their KV cache does not fit beside the weights,
    it runs as many as fit at once (continuous batching admits the rest as others finish: waves); weights
    go to the offload tiers only when not even one sequence fits and ``offload`` allows it.
    """
    dp = plan.degree("dp")
    wanted = math.ceil(workload.batch / dp)
    seqs = wanted
    memory, off_frac, off_rate = _lm_memory(profile, cluster, plan, seqs, workload, offload=False)
    if not memory.fits:
        cap = lm_capacity(profile, cluster, plan, workload)
        if cap >= 1:
            seqs = min(wanted, cap)
            memory, off_frac, off_rate = _lm_memory(profile, cluster, plan, seqs, workload, offload=False)
        elif offload:
            memory, off_frac, off_rate = _lm_memory(profile, cluster, plan, seqs, workload, offload=True)
    waves = math.ceil(wanted / seqs)
    ctx = workload.context + workload.new_tokens / 2  # mean cached length over the decode
    decode = _lm_pass(profile, cluster, plan, 1, seqs, ctx, off_frac, off_rate, decode=True)
    chunk_seqs = max(1, min(seqs, MAX_PREFILL_TOKENS // max(workload.context, 1)))
    chunks = math.ceil(seqs / chunk_seqs)
    prefill = _lm_pass(profile, cluster, plan, min(workload.context, MAX_PREFILL_TOKENS), chunk_seqs,
                       workload.context / 2, off_frac, off_rate, decode=False)
    prefill = prefill.scaled(chunks * max(1, math.ceil(workload.context / MAX_PREFILL_TOKENS)))
    wave_s = prefill.total_s + workload.new_tokens * decode.total_s
    request_s = waves * wave_s  # the last request of the batch
    metrics = {
        "decode_step_s": decode.total_s,
        "prefill_s": prefill.total_s,
        "request_s": request_s,
        "tokens_per_s": dp * wanted * workload.new_tokens / request_s,  # generated tokens, all replicas
        "decode_tokens_per_s": dp * seqs / decode.total_s,
        "tokens_per_s_per_sequence": 1.0 / decode.total_s,
        "sequences_in_flight": dp * seqs,
        "new_tokens": workload.new_tokens,
    }
    score = request_s if objective == "latency" else -metrics["tokens_per_s"]
    notes = _device_notes(plan, cluster)
    if dp > 1:
        notes.append(f"dp={dp}: {dp} independent replicas of {plan.world_size // dp} ranks (one job each), "
                     f"{wanted} sequence(s) each")
    if waves > 1:
        notes.append(f"the KV cache holds {seqs} of the {wanted} sequences per replica at once: {waves} waves")
    if memory.host or memory.nvme:
        notes.append(f"offload: {_gib(memory.host)} host, {_gib(memory.nvme)} NVMe per device")
    return PlanEstimate(plan, memory, decode, prefill, seqs, score, metrics, memory.fits, memory.reason, tuple(notes))


# -- diffusion transformers --------------------------------------------------------------------------------------


def _dit_tokens(profile: ModelProfile, workload: Workload) -> tuple[int, int, int]:
    """(image tokens, patch-grid rows, text tokens) of one image."""
    side = workload.image_size // (profile.vae_scale * profile.patch)
    return side * side, side, workload.text_tokens if workload.text_tokens is not None else profile.text_tokens


def estimate_dit(profile: ModelProfile, cluster: ClusterSpec, plan: ParallelPlan, workload: Workload,
                 objective: str = "latency", offload: bool = False) -> PlanEstimate:
    dp, pp, cfg, sp, tp = (plan.degree(d) for d in ("dp", "pp", "cfg", "sp", "tp"))
    images = math.ceil(workload.batch / dp)
    branches = 2 if profile.uses_cfg else 1
    samples = images * branches // cfg  # per rank (cfg ranks take one branch each)
    n, _, L = _dit_tokens(profile, workload)
    n_local = math.ceil(n / sp)
    d, act = profile.hidden, profile.act_bytes
    dpn = cluster.devices_per_node
    stages = stage_layers(profile, pp)
    m = min(pp, samples)
    crowd = min(plan.world_size, dpn)  # as for language models: every rank process is in the crowd
    tp_group = replace(group_layout(plan, ("tp",), dpn), crowd=crowd)
    sp_group = replace(group_layout(plan, ("sp",), dpn), crowd=crowd)
    rates = rank_rates(cluster, profile, busy_ranks(plan, cluster, m))
    per = math.ceil(samples / m)
    budget = cluster.device.budget_bytes
    worst_t: StepTime | None = None
    worst_mem: MemoryEstimate | None = None
    for s, layers in enumerate(stages):
        weights = int(sum(profile.layers[i].split_bytes / tp + profile.layers[i].replicated_bytes for i in layers)
                      + (profile.first_bytes if s == 0 else 0) + (profile.last_bytes if s == pp - 1 else 0))
        activ = int(per * (n_local + L) * d * act * 16)
        others = profile.others_bytes if s == 0 else 0
        need = weights + activ + others
        fits = need <= budget
        host = nvme = 0
        reason = ""
        if not fits and offload:
            spill = need - budget
            host_cap = int(cluster.node.host_memory_bytes * HOST_FRACTION / dpn) if cluster.device.kind == "cuda" else 0
            host = min(spill, host_cap)
            nvme = spill - host
            fits = nvme <= cluster.node.nvme_bytes // dpn
        if not fits:
            reason = f"needs {_gib(need)} per device (weights {_gib(weights)}), over the {_gib(budget)} usable"
        mem = MemoryEstimate(weights, 0, activ, others, need - host - nvme, host, nvme, budget, fits, reason)
        t = StepTime()
        for i in layers:
            l = profile.layers[i]
            tokens_joint = n_local + L
            flops = 2 * per * (n_local * l.split_params + L * l.text_params + tokens_joint * l.joint_params
                               + l.sample_params) / tp
            seq = n + L if l.joint_attention else n
            flops += per * seq * (n + L if l.joint_attention else n) * l.attn_flops / (sp * tp)
            if not l.joint_attention and l.text_params:  # cross-attention to the text
                flops += per * n_local * L * l.attn_flops / tp
            nbytes = l.split_bytes / tp + l.replicated_bytes
            lt = with_overhead(roofline(flops, nbytes, rates), cluster.overheads.layer_s * rates.slow, cluster)
            comm = []
            if tp > 1:
                img_tokens = n_local + (L if l.joint_params else 0)
                ar = (l.row_parallel * collective_s("all_reduce", tp_group, per * img_tokens * d * act, cluster)
                      + l.row_text * collective_s("all_reduce", tp_group, per * L * d * act, cluster))
                comm.append((f"tp all-reduce (tp={tp})", ar))
            if sp > 1:
                comm.append((f"sp all-to-all (sp={sp})", 4 * collective_s(
                    "all_to_all", sp_group, per * n_local * d * act / tp, cluster)))
            if host or nvme:
                frac = (host + nvme) / max(weights, 1)
                rate = (cluster.node.nvme_read / dpn) if nvme else (cluster.node.host_to_device or 1e9)
                lt = lt.plus(StepTime(offload_s=nbytes * frac / rate))
            t = t.plus(lt.plus(StepTime(comm=tuple(comm))))
        if worst_t is None or t.total_s > worst_t.total_s:
            worst_t = t
        if worst_mem is None or (not mem.fits, mem.total) > (not worst_mem.fits, worst_mem.total):
            worst_mem = mem
    assert worst_t is not None and worst_mem is not None
    step = worst_t.scaled(m)
    if pp > 1:
        p2p = collective_s("p2p", GroupLayout(2, 2 if group_layout(plan, ("pp",), dpn).nodes > 1 else 1),
                           per * (n_local + L) * d * act, cluster)
        step = step.plus(StepTime(bubble_s=(pp - 1) * worst_t.total_s, comm=(("pipeline send/recv", (m + pp - 1) * p2p),)))
    if cfg > 1:
        step = step.plus(StepTime(comm=((f"cfg all-gather (cfg={cfg})", collective_s(
            "all_gather", group_layout(plan, ("cfg",), dpn), images * n_local * d * act, cluster)),)))
    ov = cluster.overheads
    step = step.plus(StepTime(overhead_s=ov.step_s * rates.slow + (ov.call_s + ov.call_per_rank_s * (plan.world_size // dp - 1))
                              / workload.steps))
    batch_s = workload.steps * step.total_s
    metrics = {"step_s": step.total_s, "batch_s": batch_s, "s_per_image": batch_s / images,
               "images_per_s": dp * images / batch_s}
    score = batch_s if objective == "latency" else -metrics["images_per_s"]
    notes = _device_notes(plan, cluster)
    if dp > 1:
        notes.append(f"dp={dp}: {dp} independent replicas of {plan.world_size // dp} ranks, {images} image(s) each")
    if profile.others_bytes == 0:
        notes.append("text encoders and VAE not counted (transformer config only)")
    return PlanEstimate(plan, worst_mem, step, None, images, score, metrics, worst_mem.fits, worst_mem.reason,
                        tuple(notes))


def estimate(profile: ModelProfile, cluster: ClusterSpec, plan: ParallelPlan, workload: Workload,
             objective: str = "latency", offload: bool = False) -> PlanEstimate:
    """Memory and time of one plan (checked against the model's shape first)."""
    check_shape(profile, cluster, plan, workload)
    if plan.world_size > cluster.total_devices:
        raise ConfigError(f"plan {plan} needs {plan.world_size} devices; {cluster.name} has {cluster.total_devices}")
    fn = estimate_lm if profile.kind == "moe_lm" else estimate_dit
    return fn(profile, cluster, plan, workload, objective, offload)


# -- the rules engineers use -------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_shape(profile: ModelProfile, cluster: ClusterSpec, plan: ParallelPlan, workload: Workload) -> None:
    """Refuse degrees the model or the cluster cannot take, naming the fix (the rules engineers use)."""
    allowed = LM_SEARCH_DIMS if profile.kind == "moe_lm" else DIT_SEARCH_DIMS
    extra = [d for d, k in plan.degrees.items() if k > 1 and d not in allowed]
    if extra:
        raise ConfigError(f"{profile.architecture} does not use mesh dim(s) {extra}; use {', '.join(allowed)}")
    tp, pp, ep = plan.degree("tp"), plan.degree("pp"), plan.degree("ep")
    heads, kv = profile.num_heads, profile.num_kv_heads
    if heads % tp:
        raise ConfigError(f"tp={tp} does not divide the {heads} attention heads of {profile.architecture}; "
                          f"use tp in {[t for t in _divisors(heads) if t <= cluster.devices_per_node]}")
    if profile.kind == "moe_lm" and kv % tp and tp % kv:
        raise ConfigError(f"tp={tp} and {kv} key/value heads: one must divide the other")
    if tp > cluster.devices_per_node or cluster.devices_per_node % tp:
        raise ConfigError(f"tp={tp} would cross nodes of {cluster.devices_per_node} devices (an all-reduce per layer "
                          f"over the network); keep tp within a node: tp in {_divisors(cluster.devices_per_node)}")
    if pp > len(profile.layers):
        raise ConfigError(f"pp={pp} stages for {len(profile.layers)} layers; use pp <= {len(profile.layers)}")
    if ep > 1:
        e = profile.num_experts
        if not e:
            raise ConfigError(f"ep={ep} on {profile.architecture}, which has no routed experts; use tp, pp or dp")
        if e % ep and ep % e:
            raise ConfigError(f"ep={ep} and {e} experts: ep must divide the experts (or be a multiple of them)")
    if profile.kind == "diffusion":
        cfg, sp = plan.degree("cfg"), plan.degree("sp")
        if cfg > 2 or (cfg == 2 and not profile.uses_cfg):
            raise ConfigError(f"cfg={cfg}: {profile.family} has {'2 guidance branches' if profile.uses_cfg else 'no CFG'}; "
                              f"use cfg in {[1, 2] if profile.uses_cfg else [1]}")
        if heads % (sp * tp):
            raise ConfigError(f"sp={sp} x tp={tp} does not divide the {heads} heads (Ulysses splits heads over sp x tp)")
        _, rows, _ = _dit_tokens(profile, workload)
        if sp > rows:
            raise ConfigError(f"sp={sp} patch bands for {rows} patch rows of a {workload.image_size}px image; use sp <= {rows}")


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"
