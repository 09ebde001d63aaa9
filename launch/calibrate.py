"""``tessera plan --calibrate``: measure this machine's constants for the cost model and store them.

What is measured (each a few seconds; under two minutes in all on 2 cores):

- matmul FLOP/s of one rank (one thread, as Ray workers run) per dtype, large enough to be compute-bound;
- the rate at which a matmul streams weights (a batch-1 ``linear`` over a weight larger than the caches)
  on one thread, and the node's memory bus (a streaming read with every core) that busy ranks share;
- collectives between processes of this node: ``all_reduce`` through tessera's shared-memory path
  (``parallel.shm_comm``, what CPU ranks of one node use) and through gloo (larger messages), with 2 ranks
  and with 2 x the cores (oversubscribed, as 4 workers on 2 cores run), fitted to ``alpha + bytes / beta``;
- the NVMe (tier file) read rate with O_DIRECT and several requests in flight;
- the framework's own time: tessera's LLM engine on one in-process rank, decoding three tiny models that
  differ in layers and experts per token, fitted to ``step + layers x (layer + top_k x expert)``; and the
  driver's call per step (a no-op ``collective_rpc`` to 1 and to 2 x cores Ray workers).

The result is a cluster file in the ``clusters/hardware`` schema, written to
``memory.hardware.calibration_path()`` (``$TESSERA_CALIBRATION``, else
``$TESSERA_CACHE/calibration/<host>.yaml``): the figures belong to this machine, and the planner's
local cluster (``tessera plan MODEL`` without ``--cluster``, or ``--cluster local``) reads them.
Collectives are timed between *busy* ranks (a small matmul between two collectives, less the same matmul
alone), so ranks that share cores or wait for an unscheduled peer pay here what they pay in the engine.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

GB = 1e9
SHM_SIZES = (4 << 10, 64 << 10, 512 << 10)
GLOO_SIZES = (4 << 10, 1 << 20, 8 << 20)
CALL_US, CALL_PER_RANK_US = 700.0, 600.0  # Ray fan-out on these machines (PLATFORM.md), when Ray cannot be measured
TINY = {"hidden": 64, "heads": 4, "kv_heads": 2, "experts": 8, "vocab": 512, "intermediate": 128,
        "moe_intermediate": 64, "init_std": 0.02}
TINY_MODELS = {"l2k2": {"layers": 2, "top_k": 2}, "l8k2": {"layers": 8, "top_k": 2}, "l8k6": {"layers": 8, "top_k": 6}}


@dataclass
class Measurements:
    """Raw figures, kept in the calibration file's ``calibration`` section for the record."""

    cores: int
    host_memory_bytes: int
    gemm_flops: dict[str, float] = field(default_factory=dict)
    stream_bps: dict[str, float] = field(default_factory=dict)  # one rank alone
    node_stream_bps: dict[str, float] = field(default_factory=dict)  # "bus": streaming read with every core
    links: dict[str, dict[str, float]] = field(default_factory=dict)
    nvme_read_bps: float = 0.0
    overheads: dict[str, float] = field(default_factory=dict)
    decode_steps_s: dict[str, float] = field(default_factory=dict)
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)
    seconds: float = 0.0


# -- one process ---------------------------------------------------------------------------------------------


def _best(fn: Callable[[], Any], repeats: int, budget_s: float = 1.5) -> float:
    """Fastest of ``repeats`` runs (other jobs on the machine only ever slow a run), within ``budget_s``."""
    fn()
    best = float("inf")
    start = time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return best


def gemm_flops(dtype: str, n: int = 512) -> float:
    import torch

    a = torch.randn(n, 1024, dtype=getattr(torch, dtype))
    b = torch.randn(1024, 1024, dtype=getattr(torch, dtype))
    seconds = _best(lambda: a @ b, 6)
    return 2 * n * 1024 * 1024 / seconds


def stream_bps(dtype: str, mib: int = 64) -> float:
    """Weight bytes per second a batch-1 ``linear`` reads (the decode case): the fastest of 12 calls."""
    import torch

    t = getattr(torch, dtype)
    cols = 4096
    rows = mib * (1 << 20) // (cols * torch.tensor([], dtype=t).element_size())
    w = torch.randn(rows, cols, dtype=t)
    x = torch.randn(1, cols, dtype=t)
    return w.numel() * w.element_size() / _best(lambda: torch.nn.functional.linear(x, w), 12)


def bus_bps(threads: int, mib: int = 256) -> float:
    """The node's memory bus: bytes/s of a streaming read (``sum``) with ``threads`` threads, best of 8."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = torch.ones(mib * (1 << 20) // 4)
        return t.numel() * 4 / _best(t.sum, 8)
    finally:
        torch.set_num_threads(old)


def _timed_collective(op: Callable[[], Any], work: Callable[[], Any], group: Any = None,
                      round_s: float = 0.15, rounds: int = 3) -> float:
    """What one collective adds to a step of busy ranks: per iteration, ``work`` (a matmul the size of a
    layer's, between two collectives) then ``op``, less ``work`` alone on every rank at once, and never less
    than ``op`` alone. Each is timed over rounds of ``round_s`` (as long as an engine's timed generation, so
    that a rank the OS deschedules makes its peers wait as often here as there); the median of ``rounds``."""
    import statistics

    import torch.distributed as dist

    src = dist.get_global_rank(group, 0) if group is not None else 0

    def barrier() -> None:
        dist.barrier(group=group)

    def loop(fn: Callable[[], Any]) -> float:
        barrier()
        # every rank runs the same number of iterations (collectives must match): rank 0's estimate, broadcast
        start = time.perf_counter()
        for _ in range(4):
            fn()
        count = [max(4, min(2000, int(round_s / max((time.perf_counter() - start) / 4, 1e-6))))]
        dist.broadcast_object_list(count, src=src, group=group)
        barrier()
        start = time.perf_counter()
        for _ in range(count[0]):
            fn()
        return (time.perf_counter() - start) / count[0]

    op()
    only, alone, both = [], [], []
    for _ in range(rounds):
        only.append(loop(op))
        alone.append(loop(work))
        both.append(loop(lambda: (work(), op())))
    return max(statistics.median(both) - statistics.median(alone), statistics.median(only))


def collective_timings(comm: Any, group: Any = None) -> dict[str, dict[int, float]]:
    """``all_reduce`` seconds by size between busy ranks of ``group``: through tessera's ``GroupComm``
    (shared memory on one CPU node, when it attached) and through the backend (gloo)."""
    import torch
    import torch.distributed as dist

    w, x = torch.randn(1024, 1024), torch.randn(1, 1024)  # a layer's matmul (~0.3 ms) between collectives
    work = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    shm, gloo = {}, {}
    if comm.shm is not None:
        for size in SHM_SIZES:
            t = torch.ones(size // 4)
            shm[size] = _timed_collective(lambda: comm.all_reduce(t), work, group)
    for size in GLOO_SIZES:
        t = torch.ones(size // 4)
        gloo[size] = _timed_collective(lambda: dist.all_reduce(t, group=group), work, group)
    return {"shm": shm, "gloo": gloo}


def _worker_collectives(worker: Any) -> dict[str, dict[int, float]]:
    """On a tessera worker (a Ray actor, as engines run): its tp group's collectives."""
    import torch

    torch.set_num_threads(1)
    return collective_timings(worker.comm("tp"), worker.group("tp"))


def _rank_main(rank: int, world: int, port: int, out: Any) -> None:
    """One calibration process without Ray: shm and gloo all_reduce timings between busy ranks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        from tessera.parallel.comm import GroupComm

        out.put({"rank": rank, **collective_timings(GroupComm.attach(dist.group.WORLD))})
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, timeout_s: float = 150.0) -> list[dict[str, Any]]:
    """Start ``world`` calibration processes, wait (bounded) for their figures, stop them by pid."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"calibration ranks ({world} processes) gave {len(results)} of {world} results "
                                   f"in {timeout_s:.0f} s; the machine may be overloaded, try again")
            try:
                results.append(queue.get(timeout=min(left, 5.0)))
            except Exception:  # noqa: BLE001 - queue.Empty: check the processes are alive and wait on
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a calibration rank exited with code {dead[0].exitcode}") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()  # only processes started here, by their handle
    return sorted(results, key=lambda r: r["rank"])


def fit_link(times: dict[int, float], ranks: int) -> tuple[float, float]:
    """(alpha s, bandwidth bytes/s) of ``t = alpha + 2 (p-1)/p * n / bandwidth``: the bandwidth from the two
    largest messages (where bytes dominate), alpha from the smallest (where latency does); a noisy point
    (a larger message faster than a smaller one) cannot make either negative or alpha above any time seen."""
    sizes = sorted(times)
    factor = 2 * (ranks - 1) / ranks
    lo, hi = (sizes[-2], sizes[-1]) if len(sizes) > 1 else (0, sizes[0])
    dt = times[hi] - (times[lo] if lo else 0.0)
    bandwidth = factor * (hi - lo) / dt if dt > 0 else factor * hi / times[hi]
    alpha = max(0.0, min(times[sizes[0]] - factor * sizes[0] / bandwidth, min(times.values())))
    return alpha, bandwidth


def nvme_read_bps(folder: Path, mib: int = 256, threads: int = 4, chunk: int = 1 << 20) -> float:
    """O_DIRECT reads of a fresh file with ``threads`` requests in flight (the tier-file reader's pattern)."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    fd_w, path = tempfile.mkstemp(prefix="tessera-calibrate-", dir=folder)
    try:
        block = os.urandom(chunk)
        with os.fdopen(fd_w, "wb") as f:
            for _ in range(mib):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
        try:
            fd = os.open(path, flags)
        except OSError:  # a file system without O_DIRECT (tmpfs): plain reads after dropping the file's pages
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            buffers = [mmap.mmap(-1, chunk) for _ in range(threads)]  # page-aligned, as O_DIRECT needs

            def read(i: int) -> int:
                buf = buffers[i % threads]
                total = 0
                for off in range(i * chunk, mib * chunk, threads * chunk):
                    total += os.preadv(fd, [buf], off)
                return total

            start = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                done = sum(pool.map(read, range(threads)))
            return done / (time.perf_counter() - start)
        finally:
            os.close(fd)
    finally:
        os.unlink(path)


# -- the framework's own time ----------------------------------------------------------------------------------


def _noop(worker: Any) -> int:
    return worker.rank


def ray_measurements(worlds: tuple[int, ...], calls: int = 60) -> tuple[dict[int, float], dict[int, dict]]:
    """On Ray workers, as engines run: the median seconds of one driver call fanned out to ``world`` workers
    (a no-op ``collective_rpc``: what every engine step pays the controller), and the collectives of a
    ``tp=world`` group. One embedded Ray for all, stopped at the end."""
    from tessera.config import ParallelPlan
    from tessera.memory.placement import Placement
    from tessera.runtime.controller import Controller
    from tessera.runtime.ray_env import RayConnection

    call_s, links = {}, {}
    RayConnection.acquire()
    try:
        for world in worlds:
            with Controller(Placement(ParallelPlan({"tp": world} if world > 1 else {}))) as ctl:
                for _ in range(10):
                    ctl.collective_rpc(_noop)
                times = []
                for _ in range(calls):
                    t = time.perf_counter()
                    ctl.collective_rpc(_noop)
                    times.append(time.perf_counter() - t)
                call_s[world] = sorted(times)[len(times) // 2]
                if world > 1:
                    links[world] = ctl.collective_rpc(_worker_collectives, timeout_s=300)[0]
    finally:
        RayConnection.release()
    return call_s, links


class _InProcess:
    """A one-rank controller in this process (no Ray): what the engine's single-rank plan runs on."""

    def __init__(self) -> None:
        import torch

        from tessera.config import ParallelPlan
        from tessera.memory.placement import Placement
        from tessera.runtime.worker import Worker

        threads = torch.get_num_threads()
        self.worker = Worker(0, 1, "cpu", log_level="WARNING", num_threads=1)
        torch.set_num_threads(threads)
        self.placement = Placement(ParallelPlan({}))

    def collective_rpc(self, fn, args=(), kwargs=None, timeout_s=None, ranks=None, stall_s=None):  # noqa: ANN001
        return [self.worker.execute(fn, tuple(args), kwargs)]  # timeouts and stall deadlines: the caller's own

    def describe(self) -> list:
        return []


def decode_steps_s(model_dirs: dict[str, Path], new_tokens: int = 25, rounds: int = 5) -> dict[str, float]:
    """Seconds per decode step of each model at batch 1 on one in-process rank: the models take turns for
    ``rounds`` rounds (so a burst of load from other jobs hits them alike) and each keeps its fastest."""
    import torch

    from tessera.runtime.llm.engine import LLMEngine, SamplingParams

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engines = {}
    try:
        for name, path in model_dirs.items():
            engines[name] = LLMEngine.load(_InProcess(), path, dtype="bfloat16", stop_at_eos=False, max_model_len=96,
                                           max_num_seqs=1)
        ids = list(range(3, 19))
        for engine in engines.values():
            engine.generate(ids, SamplingParams(max_new_tokens=9))
        best = {name: float("inf") for name in engines}
        for _ in range(rounds):
            for name, engine in engines.items():
                before = dict(engine.stats())
                engine.generate(ids, SamplingParams(max_new_tokens=new_tokens))
                after = engine.stats()
                step = (after["decode_s"] - before["decode_s"]) / (after["decode_tokens"] - before["decode_tokens"])
                best[name] = min(best[name], step)
        return best
    finally:
        for engine in engines.values():
            engine.close()
        torch.set_num_threads(threads)


def fit_overheads(steps: dict[str, float], device_s: dict[str, float]) -> dict[str, float]:
    """``step``, ``layer`` and ``expert`` seconds from the three tiny models (what bytes and FLOPs do not explain)."""
    t = {k: max(0.0, steps[k] - device_s.get(k, 0.0)) for k in TINY_MODELS}
    la, lb = TINY_MODELS["l2k2"]["layers"], TINY_MODELS["l8k2"]["layers"]
    ka, kc = TINY_MODELS["l8k2"]["top_k"], TINY_MODELS["l8k6"]["top_k"]
    per_layer = (t["l8k2"] - t["l2k2"]) / (lb - la)  # layer + ka x expert
    expert = max(0.0, (t["l8k6"] - t["l8k2"]) / (lb * (kc - ka)))
    layer = max(0.0, per_layer - ka * expert)
    step = max(0.0, t["l2k2"] - la * (layer + ka * expert))
    return {"step_s": step, "layer_s": layer, "expert_s": expert}


# -- all of it ------------------------------------------------------------------------------------------------


def measure(cache: Path, echo: Callable[[str], None] = print) -> Measurements:
    import torch

    from tessera.memory.hardware import _host_bytes

    started = time.perf_counter()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    m = Measurements(cores=cores, host_memory_bytes=_host_bytes(), load_average=os.getloadavg())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for dtype in ("bfloat16", "float32"):
            m.gemm_flops[dtype] = gemm_flops(dtype)
            m.stream_bps[dtype] = stream_bps(dtype)
            echo(f"  {dtype}: matmul {m.gemm_flops[dtype] / 1e9:.1f} GFLOP/s, weight streaming "
                 f"{m.stream_bps[dtype] / GB:.2f} GB/s (one thread)")
    finally:
        torch.set_num_threads(threads)
    m.node_stream_bps["bus"] = bus_bps(cores)
    echo(f"  memory bus (streaming read, {cores} threads): {m.node_stream_bps['bus'] / GB:.1f} GB/s")
    worlds = tuple(sorted({2, 2 * cores}))
    try:
        echo(f"  on Ray workers: driver calls and collectives between {' and '.join(map(str, worlds))} ranks ...")
        calls, links = ray_measurements((1, *worlds))
        hi = max(worlds)
        m.overheads["call_s"] = calls[1]
        m.overheads["call_per_rank_s"] = max(0.0, (calls[hi] - calls[1]) / (hi - 1))
        echo(f"    driver calls (Ray fan-out): {calls[1] * 1e3:.2f} ms to 1 worker, {calls[hi] * 1e3:.2f} ms to {hi}")
    except ImportError:  # Ray is a dependency; without it, plain processes (and PLATFORM.md's call figures)
        echo("  Ray is not importable here: collectives between plain processes")
        links = {world: run_ranks(world)[0] for world in worlds}
    for world, r0 in sorted(links.items()):
        for path in ("shm", "gloo"):
            times = {int(k): v for k, v in r0[path].items()}
            if times:
                alpha, bw = fit_link(times, world)
                m.links.setdefault(path, {})[f"alpha_{world}_s"] = alpha
                m.links[path][f"bandwidth_{world}"] = bw
                echo(f"    {path}, {world} ranks: alpha {alpha * 1e6:.0f} us, {bw / GB:.2f} GB/s")
    m.nvme_read_bps = nvme_read_bps(cache / "calibration")
    echo(f"  NVMe (tier file) reads: {m.nvme_read_bps / GB:.2f} GB/s")
    fitted, m.decode_steps_s = framework_overheads(cache, m, echo)
    m.overheads.update(fitted)
    m.seconds = time.perf_counter() - started
    return m


def framework_overheads(cache: Path, m: Measurements, echo: Callable[[str], None]) -> tuple[dict, dict]:
    from tessera.models.tiny_moe import build_tiny_moe

    paths = {name: build_tiny_moe("qwen3_moe", cache / "calibration" / f"tiny-{name}", dtype="bfloat16", **TINY, **size)
             for name, size in TINY_MODELS.items()}
    steps = decode_steps_s(paths)
    for _ in range(2):  # more layers and more experts per token can only cost more; if not, load got in the way
        if steps["l2k2"] < steps["l8k2"] < steps["l8k6"]:
            break
        echo("    tiny models timed out of order (the machine is busy): timing them again")
        again = decode_steps_s(paths)
        steps = {k: min(v, again[k]) for k, v in steps.items()}
    else:
        if not steps["l2k2"] < steps["l8k2"] < steps["l8k6"]:
            echo("    WARNING: the framework figures are unreliable (load average "
                 f"{os.getloadavg()[0]:.1f}); calibrate again on a quieter machine")
    device = {name: _tiny_device_s(path, m) for name, path in paths.items()}
    for name in paths:
        echo(f"    tiny model {name}: {steps[name] * 1e3:.2f} ms per decode step")
    fitted = fit_overheads(steps, device)
    echo(f"  framework: {fitted['step_s'] * 1e6:.0f} us per step, {fitted['layer_s'] * 1e6:.0f} us per layer, "
         f"{fitted['expert_s'] * 1e6:.0f} us per expert run")
    return fitted, steps


def _tiny_device_s(path: Path, m: Measurements) -> float:
    """What bytes and FLOPs alone predict for a tiny model's decode step (subtracted before fitting overheads)."""
    from tessera.memory.profile import model_profile

    p = model_profile(path)
    flops = bw = 0.0
    for l in p.layers:
        bw += l.split_bytes + l.kv_bytes_w + l.replicated_bytes + p.top_k * l.expert_bytes
        flops += 2 * (l.split_params + l.kv_params + l.replicated_params + p.top_k * l.expert_params)
    bw += p.last_bytes
    flops += 2 * p.last_params
    return max(flops / m.gemm_flops["bfloat16"], bw / m.stream_bps["bfloat16"])


def to_cluster_mapping(m: Measurements) -> dict[str, Any]:
    """The cluster file (``clusters/hardware`` schema) of this machine: ``cores`` rank slots of one thread."""
    shm, gloo = m.links.get("shm", {}), m.links.get("gloo", {})
    hi = max(2, 2 * m.cores)

    def link(figures: dict[str, float], kind: str) -> dict[str, Any]:
        a2, a_hi = figures.get("alpha_2_s", 0.0), figures.get(f"alpha_{hi}_s", figures.get("alpha_2_s", 0.0))
        per_rank = max(0.0, (a_hi - a2) / max(1, hi - 2))
        return {"kind": kind, "alpha_us": round(a2 * 1e6, 2), "alpha_per_rank_us": round(per_rank * 1e6, 2),
                "bandwidth_gbs": round(min(figures.get("bandwidth_2", GB), figures.get(f"bandwidth_{hi}", GB * 1e3)) / GB, 4)}

    from tessera.parallel.shm_comm import SLOT_BYTES

    fallback = link(gloo, "gloo")
    intra = {**link(shm, "shm"), "max_bytes": SLOT_BYTES, "fallback": fallback} if shm else fallback
    mem_gib = m.host_memory_bytes / 2**30
    return {
        "name": f"this machine ({socket.gethostname()}, {m.cores} cores, calibrated)",
        "nodes": 1,
        "devices_per_node": m.cores,
        "device": {"kind": "cpu", "model": "cpu-rank (1 thread)", "memory_gib": round(mem_gib / m.cores, 3),
                   "usable_fraction": 0.8,
                   "compute_tflops": {k: round(v / 1e12, 6) for k, v in m.gemm_flops.items()},
                   "memory_bandwidth_gbs": {k: round(v / GB, 4) for k, v in m.stream_bps.items()}},
        "node": {"cores": m.cores, "host_memory_gib": round(mem_gib, 3),
                 "memory_bandwidth_gbs": round(m.node_stream_bps.get("bus", 0) / GB, 4) or None,
                 "nvme_read_gbs": round(m.nvme_read_bps / GB, 4), "nvme_gib": round(_free_bytes() / 2**30, 1)},
        "links": {"intra_node": intra},
        "overheads": {"step_us": round(m.overheads["step_s"] * 1e6, 1), "layer_us": round(m.overheads["layer_s"] * 1e6, 1),
                      "expert_us": round(m.overheads["expert_s"] * 1e6, 1),
                      "call_us": round(m.overheads.get("call_s", CALL_US * 1e-6) * 1e6, 1),
                      "call_per_rank_us": round(m.overheads.get("call_per_rank_s", CALL_PER_RANK_US * 1e-6) * 1e6, 1),
                      "overlaps_compute": False},
    }


def _free_bytes() -> int:
    from tessera.memory.hardware import calibration_path

    folder = calibration_path().parent
    folder.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def calibrate(out: str | os.PathLike[str] | None = None, echo: Callable[[str], None] = print) -> Path:
    """Measure, write the cluster file (default ``memory.hardware.calibration_path()``), return its path."""
    import yaml

    from tessera.memory.hardware import calibration_path, cluster_from_mapping

    path = Path(out) if out else calibration_path()
    cache = Path(os.environ.get("TESSERA_CACHE", Path.home() / ".cache" / "tessera"))
    echo(f"tessera plan --calibrate: measuring this machine (load average {os.getloadavg()[0]:.2f}) ...")
    m = measure(cache, echo)
    data = to_cluster_mapping(m)
    cluster_from_mapping(data, "calibration")  # the file must read back
    data["node"] = {k: v for k, v in data["node"].items() if v is not None}
    record = {"measured_unix": time.time(), "seconds": round(m.seconds, 1),
              "load_average": [round(x, 2) for x in m.load_average],
              "decode_step_ms": {k: round(v * 1e3, 3) for k, v in m.decode_steps_s.items()},
              "links": {k: {n: float(f"{x:.4g}") for n, x in v.items()} for k, v in m.links.items()},
              "node_stream_gbs": {k: round(v / GB, 3) for k, v in m.node_stream_bps.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Written by `tessera plan --calibrate` (tessera.launch.calibrate); the schema is\n"
              "# clusters/hardware/README.md. `calibration` is the raw record and is not read back.\n")
    path.write_text(header + yaml.safe_dump({**data, "calibration": json.loads(json.dumps(record))}, sort_keys=False))
    echo(f"wrote {path} in {m.seconds:.0f} s")
    return path

