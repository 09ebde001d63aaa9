"""What a cluster can do, as numbers the cost model uses: the :class:`ClusterSpec`.

Why a declared description and not only the live inventory: a plan is most
useful before the cluster exists (which GPUs to rent, how many nodes), and the
cost model needs rates the inventory cannot give (FLOP/s, bytes/s, the latency
and bandwidth of each link). A ``ClusterSpec`` comes from one of three places:

- a YAML file (``clusters/hardware/*.yaml``; the schema is documented in
  ``clusters/hardware/README.md`` and checked here, errors naming the file and key);
- the live inventory (``memory.inventory``: a Ray cluster or this machine) with
  the rates of a device preset (GPUs, by name) or of this machine's calibration
  file (CPU; written by ``tessera plan --calibrate``);
- code (tests build them directly).

Units inside the dataclasses are SI (bytes, seconds, FLOP/s, bytes/s); the YAML
uses the units people quote (GiB, TFLOP/s, GB/s, microseconds).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from tessera.errors import ConfigError

GiB = 2**30
GB = 10**9
DTYPE_KEYS = ("float32", "bfloat16", "float16", "float8")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8", "float8_e4m3": "float8"}


@dataclass(frozen=True)
class LinkSpec:
    """One kind of link between ranks: a collective among ``p`` ranks costs
    ``alpha(p) + factor(p) * bytes / bandwidth`` (see ``memory.cost_model.collective_s``).

    ``alpha_s``: latency of one collective between two ranks; ``alpha_per_rank_s``:
    added for each further rank (a ring's extra hops; CPU processes that share
    cores). ``bandwidth``: bytes/s one rank moves over this link while every rank
    of its node does the same (for a node's NICs: the node's bandwidth divided by
    its devices). ``max_bytes``: messages above it take ``fallback`` (tessera's
    shared-memory slots fall back to gloo).
    """

    kind: str
    alpha_s: float
    bandwidth: float
    alpha_per_rank_s: float = 0.0
    max_bytes: int | None = None
    fallback: "LinkSpec | None" = None

    def __post_init__(self) -> None:
        if not self.alpha_s >= 0 or not self.alpha_per_rank_s >= 0:
            raise ConfigError(f"link {self.kind!r}: alpha must be >= 0 seconds")
        if not self.bandwidth > 0:
            raise ConfigError(f"link {self.kind!r}: bandwidth must be > 0 bytes/s")
        if self.max_bytes is not None and self.fallback is None:
            raise ConfigError(f"link {self.kind!r}: max_bytes needs a fallback link for larger messages")

    def for_bytes(self, nbytes: float) -> "LinkSpec":
        """The link a message of ``nbytes`` actually takes."""
        if self.max_bytes is not None and nbytes > self.max_bytes and self.fallback is not None:
            return self.fallback.for_bytes(nbytes)
        return self

    def alpha(self, ranks: int) -> float:
        return self.alpha_s + self.alpha_per_rank_s * max(0, ranks - 2)


@dataclass(frozen=True)
class DeviceSpec:
    """One device (a GPU, or on CPU one rank's process) and its sustained rates.

    ``compute``: FLOP/s by dtype (dense matmul peak); ``memory_bandwidth``: bytes/s
    from device memory; ``efficiency_compute`` / ``efficiency_memory``: the
    fraction of peak a real matmul reaches (1.0 for measured rates).
    ``fp8_weights``: block-FP8 checkpoints stay FP8 in this device's memory and
    its matmuls (so they are planned at their stored size); False: they are
    planned at the dequantized size, which is what tessera's loader holds today.
    """

    kind: str  # "cuda" | "cpu"
    model: str
    memory_bytes: int
    compute: Mapping[str, float]
    memory_bandwidth: float
    usable_fraction: float = 0.9
    efficiency_compute: float = 1.0
    efficiency_memory: float = 1.0
    fp8_weights: bool = False
    memory_bandwidth_by_dtype: Mapping[str, float] = field(default_factory=dict)  # measured per dtype (CPU matmuls)

    def __post_init__(self) -> None:
        if self.kind not in ("cuda", "cpu"):
            raise ConfigError(f"device kind {self.kind!r} is not supported; use cuda or cpu")
        if self.memory_bytes <= 0 or self.memory_bandwidth <= 0:
            raise ConfigError(f"device {self.model}: memory and memory bandwidth must be > 0")
        if not self.compute or any(v <= 0 for v in self.compute.values()):
            raise ConfigError(f"device {self.model}: give compute rates > 0 per dtype, e.g. {{bfloat16: 989}}")
        if not 0 < self.usable_fraction <= 1:
            raise ConfigError(f"device {self.model}: usable_fraction must be in (0, 1]")
        object.__setattr__(self, "compute", dict(self.compute))
        object.__setattr__(self, "memory_bandwidth_by_dtype", dict(self.memory_bandwidth_by_dtype))

    @property
    def budget_bytes(self) -> int:
        """Bytes a plan may fill (the rest is the framework's, the allocator's and activations' slack)."""
        return int(self.memory_bytes * self.usable_fraction)

    def flops(self, dtype: str) -> float:
        """Sustained matmul FLOP/s for weights of ``dtype`` (falls back to the nearest declared dtype)."""
        for key in (dtype, "bfloat16" if dtype in ("float16", "float8") else dtype, "bfloat16", "float32"):
            if key in self.compute:
                return self.compute[key] * self.efficiency_compute
        return next(iter(self.compute.values())) * self.efficiency_compute

    def bandwidth(self, dtype: str | None = None) -> float:
        """Bytes/s a matmul streams weights of ``dtype`` at (a measured per-dtype rate where there is one)."""
        rate = self.memory_bandwidth_by_dtype.get(dtype or "", self.memory_bandwidth)
        return rate * self.efficiency_memory


@dataclass(frozen=True)
class Overheads:
    """Framework time not explained by bytes or FLOPs (kernel launches, Python, the driver's calls).

    ``step_s`` per engine step on every rank (sampling, scheduling, the head's
    small ops); ``layer_s`` per decoder layer or DiT block; ``expert_s`` per
    routed expert a rank runs in a layer; ``call_s`` (+ ``call_per_rank_s``) per
    driver call that fans a step out to the ranks (Ray on CPU; amortised over
    the decode steps one call runs). ``overlaps_compute``: GPU kernels run
    asynchronously, so launch time hides under device time (a layer costs the
    larger of the two); on CPU the same core does both (they add).
    """

    step_s: float = 0.0
    layer_s: float = 0.0
    expert_s: float = 0.0
    call_s: float = 0.0
    call_per_rank_s: float = 0.0
    overlaps_compute: bool = True

    def __post_init__(self) -> None:
        for name in ("step_s", "layer_s", "expert_s", "call_s", "call_per_rank_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"overheads.{name} must be >= 0")


@dataclass(frozen=True)
class NodeSpec:
    """What each node has besides its devices (every node of a cluster is alike).

    ``cores``: CPU cores; on a CPU cluster more ranks than cores share them
    (compute and overheads slow by ``ranks / cores``). ``memory_bandwidth``: the
    node's total (CPU: all cores reading at once), or None (GPUs: per device).
    ``host_to_device``: bytes/s per device for the host tier; ``nvme_read``: the
    node's NVMe read bytes/s (shared by its devices).
    """

    cores: int = 1
    host_memory_bytes: int = 0
    memory_bandwidth: float | None = None
    host_to_device: float = 0.0
    nvme_read: float = 0.0
    nvme_bytes: int = 0

    def __post_init__(self) -> None:
        if self.cores < 1:
            raise ConfigError("node.cores must be >= 1")
        for name in ("host_memory_bytes", "host_to_device", "nvme_read", "nvme_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"node.{name} must be >= 0")


@dataclass(frozen=True)
class ClusterSpec:
    """``nodes`` alike nodes of ``devices_per_node`` devices, their links and overheads."""

    name: str
    nodes: int
    devices_per_node: int
    device: DeviceSpec
    node: NodeSpec
    intra_node: LinkSpec
    inter_node: LinkSpec | None
    overheads: Overheads = field(default_factory=Overheads)
    source: str = "code"  # where the figures came from (a file, a calibration, a preset)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.devices_per_node < 1:
            raise ConfigError(f"cluster {self.name!r}: nodes and devices_per_node must be >= 1")
        if self.nodes > 1 and self.inter_node is None:
            raise ConfigError(f"cluster {self.name!r}: {self.nodes} nodes need links.inter_node "
                              "(alpha_us, bandwidth_gbs), e.g. {kind: infiniband, alpha_us: 15, bandwidth_gbs: 50}")

    @property
    def total_devices(self) -> int:
        return self.nodes * self.devices_per_node

    def describe(self) -> str:
        d = self.device
        rates = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in d.compute.items())
        text = (f"{self.name}: {self.nodes} node(s) x {self.devices_per_node} {d.model} "
                f"({d.memory_bytes / GiB:.0f} GiB, {rates}, {d.memory_bandwidth / GB:.0f} GB/s)")
        return text + f" [{self.source}]"


# -- YAML ---------------------------------------------------------------------------------------------------------


def _section(data: Mapping[str, Any], key: str, where: str, required: bool = True) -> Mapping[str, Any]:
    value = data.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{where}: missing key {key!r} (see clusters/hardware/README.md)")
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: {key!r} must be a mapping, got {type(value).__name__}")
    return value


def _number(data: Mapping[str, Any], key: str, where: str, default: float | None = None, minimum: float = 0.0) -> float:
    value = data.get(key, default)
    if value is None:
        raise ConfigError(f"{where}: missing key {key!r} (see clusters/hardware/README.md)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{where}.{key} is {value!r}; give a number >= {minimum}")
    return float(value)


def _check_keys(data: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    import difflib

    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; known: {', '.join(known)}")


def _rates(value: Any, where: str, scale: float) -> dict[str, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"bfloat16": float(value) * scale}
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{where} must be a number or a mapping of dtype to rate, e.g. {{bfloat16: 989, float8: 1979}}")
    out = {}
    for key, rate in value.items():
        dtype = _DTYPE_ALIASES.get(str(key), str(key))
        if dtype not in DTYPE_KEYS:
            raise ConfigError(f"{where}: unknown dtype {key!r}; use {', '.join(DTYPE_KEYS)}")
        out[dtype] = _number(value, key, where) * scale
    return out


def _link(data: Mapping[str, Any] | None, where: str) -> LinkSpec | None:
    if not data or data.get("kind") == "none":
        return None
    _check_keys(data, ("kind", "alpha_us", "alpha_per_rank_us", "bandwidth_gbs", "max_bytes", "fallback"), where)
    fallback = _link(data.get("fallback"), f"{where}.fallback") if data.get("fallback") else None
    max_bytes = data.get("max_bytes")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise ConfigError(f"{where}.max_bytes is {max_bytes!r}; give a byte count")
    return LinkSpec(kind=str(data.get("kind", "link")), alpha_s=_number(data, "alpha_us", where) * 1e-6,
                    bandwidth=_number(data, "bandwidth_gbs", where, minimum=1e-9) * GB,
                    alpha_per_rank_s=_number(data, "alpha_per_rank_us", where, 0.0) * 1e-6,
                    max_bytes=max_bytes, fallback=fallback)


def cluster_from_mapping(data: Mapping[str, Any], where: str = "cluster") -> ClusterSpec:
    """A :class:`ClusterSpec` from the YAML schema (``clusters/hardware/README.md``); errors name ``where.key``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: a cluster description is a mapping (name, nodes, devices_per_node, device, ...)")
    _check_keys(data, ("name", "nodes", "devices_per_node", "device", "node", "links", "overheads", "calibration"),
                where)
    dev = _section(data, "device", where)
    dw = f"{where}.device"
    _check_keys(dev, ("kind", "model", "memory_gib", "usable_fraction", "compute_tflops", "memory_bandwidth_gbs",
                      "efficiency", "fp8_weights"), dw)
    if "compute_tflops" not in dev:
        raise ConfigError(f"{dw}: missing key 'compute_tflops' (dense matmul peak per dtype, e.g. {{bfloat16: 989}})")
    eff = _section(dev, "efficiency", dw, required=False)
    _check_keys(eff, ("compute", "memory"), f"{dw}.efficiency")
    if "memory_bandwidth_gbs" not in dev:
        raise ConfigError(f"{dw}: missing key 'memory_bandwidth_gbs' (bytes/s from device memory, in GB/s)")
    bandwidth = _rates(dev["memory_bandwidth_gbs"], f"{dw}.memory_bandwidth_gbs", GB)
    device = DeviceSpec(
        kind=str(dev.get("kind", "cuda")), model=str(dev.get("model", "device")),
        memory_bytes=int(_number(dev, "memory_gib", dw, minimum=1e-6) * GiB),
        compute=_rates(dev["compute_tflops"], f"{dw}.compute_tflops", 1e12),
        memory_bandwidth=max(bandwidth.values()),
        memory_bandwidth_by_dtype=bandwidth if not isinstance(dev["memory_bandwidth_gbs"], (int, float)) else {},
        usable_fraction=_number(dev, "usable_fraction", dw, 0.9),
        efficiency_compute=_number(eff, "compute", f"{dw}.efficiency", 1.0),
        efficiency_memory=_number(eff, "memory", f"{dw}.efficiency", 1.0),
        fp8_weights=bool(dev.get("fp8_weights", False)))
    nd = _section(data, "node", where, required=False)
    nw = f"{where}.node"
    _check_keys(nd, ("cores", "host_memory_gib", "memory_bandwidth_gbs", "host_to_device_gbs", "nvme_read_gbs",
                     "nvme_gib"), nw)
    node = NodeSpec(cores=int(_number(nd, "cores", nw, 1, minimum=1)),
                    host_memory_bytes=int(_number(nd, "host_memory_gib", nw, 0) * GiB),
                    memory_bandwidth=(_number(nd, "memory_bandwidth_gbs", nw) * GB
                                      if nd.get("memory_bandwidth_gbs") is not None else None),
                    host_to_device=_number(nd, "host_to_device_gbs", nw, 0) * GB,
                    nvme_read=_number(nd, "nvme_read_gbs", nw, 0) * GB,
                    nvme_bytes=int(_number(nd, "nvme_gib", nw, 0) * GiB))
    links = _section(data, "links", where)
    _check_keys(links, ("intra_node", "inter_node"), f"{where}.links")
    intra = _link(_section(links, "intra_node", f"{where}.links"), f"{where}.links.intra_node")
    if intra is None:
        raise ConfigError(f"{where}.links.intra_node: give alpha_us and bandwidth_gbs of the link between a node's devices")
    inter = _link(links.get("inter_node"), f"{where}.links.inter_node")
    ov = _section(data, "overheads", where, required=False)
    ow = f"{where}.overheads"
    _check_keys(ov, ("step_us", "layer_us", "expert_us", "call_us", "call_per_rank_us", "overlaps_compute"), ow)
    overheads = Overheads(step_s=_number(ov, "step_us", ow, 0) * 1e-6, layer_s=_number(ov, "layer_us", ow, 0) * 1e-6,
                          expert_s=_number(ov, "expert_us", ow, 0) * 1e-6, call_s=_number(ov, "call_us", ow, 0) * 1e-6,
                          call_per_rank_s=_number(ov, "call_per_rank_us", ow, 0) * 1e-6,
                          overlaps_compute=bool(ov.get("overlaps_compute", device.kind == "cuda")))
    nodes = data.get("nodes", 1)
    per = data.get("devices_per_node")
    for key, value in (("nodes", nodes), ("devices_per_node", per)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}.{key} is {value!r}; give an integer >= 1")
    return ClusterSpec(name=str(data.get("name", where)), nodes=nodes, devices_per_node=per, device=device, node=node,
                       intra_node=intra, inter_node=inter, overheads=overheads, source=where)


def load_cluster(path: str | os.PathLike[str]) -> ClusterSpec:
    """Read a cluster YAML (``clusters/hardware/*.yaml`` or a calibration file)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster file {path} does not exist; see clusters/hardware/ for examples "
                          "(e.g. clusters/hardware/h100-1x8.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return cluster_from_mapping(data or {}, str(path))


def cluster_to_mapping(spec: ClusterSpec) -> dict[str, Any]:
    """The YAML schema of ``spec`` (what ``load_cluster`` reads back), in the units people quote."""

    def link(l: LinkSpec | None) -> dict[str, Any] | None:
        if l is None:
            return None
        out: dict[str, Any] = {"kind": l.kind, "alpha_us": round(l.alpha_s * 1e6, 3),
                               "alpha_per_rank_us": round(l.alpha_per_rank_s * 1e6, 3),
                               "bandwidth_gbs": round(l.bandwidth / GB, 4)}
        if l.max_bytes is not None:
            out["max_bytes"] = l.max_bytes
            out["fallback"] = link(l.fallback)
        return out

    d, n, o = spec.device, spec.node, spec.overheads
    data: dict[str, Any] = {
        "name": spec.name, "nodes": spec.nodes, "devices_per_node": spec.devices_per_node,
        "device": {"kind": d.kind, "model": d.model, "memory_gib": round(d.memory_bytes / GiB, 3),
                   "usable_fraction": d.usable_fraction,
                   "compute_tflops": {k: round(v / 1e12, 6) for k, v in d.compute.items()},
                   "memory_bandwidth_gbs": ({k: round(v / GB, 3) for k, v in d.memory_bandwidth_by_dtype.items()}
                                            or round(d.memory_bandwidth / GB, 3)),
                   "efficiency": {"compute": d.efficiency_compute, "memory": d.efficiency_memory},
                   "fp8_weights": d.fp8_weights},
        "node": {"cores": n.cores, "host_memory_gib": round(n.host_memory_bytes / GiB, 3),
                 "host_to_device_gbs": round(n.host_to_device / GB, 3), "nvme_read_gbs": round(n.nvme_read / GB, 3),
                 "nvme_gib": round(n.nvme_bytes / GiB, 3)},
        "links": {"intra_node": link(spec.intra_node)},
        "overheads": {"step_us": round(o.step_s * 1e6, 2), "layer_us": round(o.layer_s * 1e6, 2),
                      "expert_us": round(o.expert_s * 1e6, 2), "call_us": round(o.call_s * 1e6, 2),
                      "call_per_rank_us": round(o.call_per_rank_s * 1e6, 2), "overlaps_compute": o.overlaps_compute},
    }
    if n.memory_bandwidth is not None:
        data["node"]["memory_bandwidth_gbs"] = round(n.memory_bandwidth / GB, 3)
    if spec.inter_node is not None:
        data["links"]["inter_node"] = link(spec.inter_node)
    return data


# -- presets and the live inventory ----------------------------------------------------------------------------------

# Published dense peaks (no sparsity) and HBM bandwidth of common GPUs; the efficiencies are what large
# matmuls and streaming reads sustain in practice. Used for a Ray cluster's GPUs (by accelerator type).
GPU_PRESETS: dict[str, dict[str, Any]] = {
    "H100": {"model": "H100-80GB-SXM", "memory_gib": 80, "compute_tflops": {"bfloat16": 989, "float8": 1979, "float32": 67},
             "memory_bandwidth_gbs": 3350, "efficiency": {"compute": 0.6, "memory": 0.8}, "fp8_weights": True},
    "H200": {"model": "H200-141GB-SXM", "memory_gib": 141, "compute_tflops": {"bfloat16": 989, "float8": 1979, "float32": 67},
             "memory_bandwidth_gbs": 4800, "efficiency": {"compute": 0.6, "memory": 0.8}, "fp8_weights": True},
    "A100": {"model": "A100-80GB-SXM", "memory_gib": 80, "compute_tflops": {"bfloat16": 312, "float32": 19.5},
             "memory_bandwidth_gbs": 2039, "efficiency": {"compute": 0.6, "memory": 0.8}, "fp8_weights": False},
}
GPU_OVERHEADS = {"step_us": 1500, "layer_us": 120, "expert_us": 15, "call_us": 700, "call_per_rank_us": 20}


def calibration_path() -> Path:
    """Where ``tessera plan --calibrate`` stores this machine's measured cluster file.

    ``$TESSERA_CALIBRATION`` names the file; otherwise ``$TESSERA_CACHE/calibration/<host>.yaml``
    (default cache ``~/.cache/tessera``): the figures belong to one machine, not to the repository.
    """
    explicit = os.environ.get("TESSERA_CALIBRATION")
    if explicit:
        return Path(explicit).expanduser()
    cache = Path(os.environ.get("TESSERA_CACHE", Path.home() / ".cache" / "tessera"))
    import socket

    return cache / "calibration" / f"{socket.gethostname()}.yaml"


def local_cpu_cluster(ranks: int | None = None) -> ClusterSpec:
    """This machine as a one-node CPU cluster: the calibration file's rates, ``ranks`` rank slots.

    Without a calibration file the rates are the defaults below (conservative
    guesses for one x86 core) and ``source`` says so: run ``tessera plan --calibrate``.
    """
    path = calibration_path()
    if path.is_file():
        spec = load_cluster(path)
        spec = replace(spec, source=f"calibrated {path}")
    else:
        cores = os.cpu_count() or 1
        spec = cluster_from_mapping({
            "name": "this machine (uncalibrated)", "nodes": 1, "devices_per_node": cores,
            "device": {"kind": "cpu", "model": "cpu-rank", "memory_gib": max(1.0, _host_bytes() / GiB / cores),
                       "compute_tflops": {"float32": 0.05, "bfloat16": 0.02}, "memory_bandwidth_gbs": 8},
            "node": {"cores": cores, "host_memory_gib": _host_bytes() / GiB, "memory_bandwidth_gbs": 8 * cores,
                     "nvme_read_gbs": 1.0},
            "links": {"intra_node": {"kind": "gloo", "alpha_us": 500, "bandwidth_gbs": 1.0}},
            "overheads": {"step_us": 2000, "layer_us": 400, "expert_us": 60, "call_us": 700, "call_per_rank_us": 500,
                          "overlaps_compute": False},
        }, "this machine (uncalibrated: run `tessera plan --calibrate`)")
    if ranks is not None and ranks != spec.devices_per_node:
        # Rank slots, not hardware: memory is the node's host memory shared by the ranks.
        memory = spec.device.memory_bytes * spec.devices_per_node // ranks
        spec = replace(spec, devices_per_node=ranks, device=replace(spec.device, memory_bytes=memory))
    return spec


def cluster_from_inventory(inventory: Any) -> ClusterSpec:
    """A :class:`ClusterSpec` for a live ``memory.inventory.ClusterInventory``.

    GPUs take the rates of the preset whose name their accelerator type (or
    CUDA device name) contains; CPUs take this machine's calibration.
    """
    if inventory.device == "cpu":
        spec = local_cpu_cluster(inventory.devices_per_node)
        return replace(spec, nodes=len(inventory.nodes), source=f"{inventory.source}; rates: {spec.source}",
                       device=replace(spec.device, memory_bytes=inventory.device_bytes),
                       inter_node=spec.inter_node or (LinkSpec("tcp", 100e-6, 1.0 * GB) if len(inventory.nodes) > 1
                                                      else None))
    name = getattr(inventory, "device_name", "") or ""
    preset = next((v for k, v in GPU_PRESETS.items() if k.lower() in name.lower()), GPU_PRESETS["H100"])
    data = {"name": f"{len(inventory.nodes)} x {inventory.devices_per_node} {preset['model']} ({inventory.source})",
            "nodes": len(inventory.nodes), "devices_per_node": inventory.devices_per_node,
            "device": {"kind": "cuda", **preset, "memory_gib": inventory.device_bytes / GiB},
            "links": {"intra_node": {"kind": "nvlink", "alpha_us": 10, "alpha_per_rank_us": 2, "bandwidth_gbs": 150},
                      "inter_node": {"kind": "network", "alpha_us": 20, "alpha_per_rank_us": 2, "bandwidth_gbs": 6.25}},
            "overheads": GPU_OVERHEADS}
    return cluster_from_mapping(data, f"{inventory.source} (rates of the {preset['model']} preset)")


def _host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
