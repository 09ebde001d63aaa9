"""Offload: decode tokens/s of a MoE whose weights are 4x the memory budget, tessera vs HF accelerate disk offload.

Run (root: it drops the page cache and uses cgroup-v1 memory cgroups)::

    python -m tessera.benchmarks.bench_offload [--quick] [--sections decode,equal,io,batch]
        [--lengths 16,64,256] [--repeats 3] [--workdir DIR] [--keep]

Writes ``benchmarks/results/offload.json`` (sections run earlier are kept) and prints tables.
Every run is a fresh subprocess; the checkpoint is a random Mixtral (8 layers x 16 experts, fp32,
2.9 GB) and the budget a quarter of its weights. Each figure carries the load average seen when it
was taken; every row is repeated (``--repeats``) and reported as median and spread (min, max).

1. ``decode``: batch 1 at each length of ``--lengths``. Each side runs in its own cgroup-v1 memory
   cgroup limited to budget + ``OVERHEAD`` (the same for both), the page cache dropped before the
   timed decode:
   - tessera: ``LLMEngine.load(..., offload=OffloadConfig(device_budget_bytes=budget, nvme_dir=...))``
     (dense weights resident, experts streamed from the tier file through the expert cache);
   - accelerate: ``from_pretrained(device_map="auto", max_memory={"cpu": budget}, offload_folder=...)``;
   - tessera without offload (all weights in memory, no cgroup): what offload costs.
   Per run: decode tok/s, GB read from the block device in the decode window, the cgroup's
   ``memory.failcnt`` increase and peak usage, the process's peak RSS (anonymous and file-backed,
   sampled every 50 ms) against budget + overhead.
2. ``equal``: tessera with a budget that fills the same cgroup (limit minus its ~0.38 GB runtime), since
   accelerate's memory-mapped weights use all of the cgroup's memory as a weight cache (see
   :func:`section_equal_memory`): the two sides with the same memory for weights.
3. ``io``: an I/O-bound setting (a 2-token prompt and an expert cache of 8 experts, half of what one
   token routes to, so every decode step waits on reads). tessera's read rate over its decode window
   (bytes read from the device between the first and the last decode step, over that time) against
   the *true disk bound*: O_DIRECT reads of the same tier file with as many requests in flight as
   tessera's reader keeps (``io_threads`` for preadv, ``queue_depth`` x ``io_threads`` for aio) and
   the same request size, page cache dropped, measured right before and right after each run.
4. ``batch``: batch 1 / 8 / 32 x ep 1 / 2 (ep=2: two Ray workers, each with its own cgroup and
   expert cache; together the same cache bytes as ep=1), 32 new tokens: tok/s offloaded vs in
   memory vs accelerate (ep does not apply to it), cache hit rates, GB read, and what reading
   every active expert of every step would have read (the no-cache floor a streaming engine pays).
   The routing of each run is replayed through LRU, LFU and Belady's optimum at the same capacity.

Threads: every process runs ``--threads`` torch threads (default 1, both sides; ep=2 ranks one each).
On this shared 2-core VM two OpenMP threads per process stall in every parallel region whenever the
peer thread is descheduled: with the load average at 16-20, in-memory decode ran at 0.7-2.0 tok/s
with 2 threads against 8.7-9.9 with 1 (12-16 CPU-seconds of spinning against 2.2 for 48 tokens).
One compute thread also leaves the second core to the I/O threads (checksums, aio) and, on the
accelerate side, to the page-cache reads.

All figures come from one machine (a shared 2-core VM here): compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tessera.benchmarks._common import RESULTS_DIR, machine, print_table

RESULTS = RESULTS_DIR / "offload.json"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
OVERHEAD = 768 << 20  # python + torch (+ transformers) runtime, KV cache, activations: the same for both sides
EQUAL_RUNTIME = 384 << 20  # what tessera's process holds besides its budget (section equal_memory)
PROMPT = [11, 42, 7, 99, 3, 250, 18, 64]
IO_PROMPT = PROMPT[:2]
IO_CACHE_EXPERTS = 8
BATCH_TOKENS = 32


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_bytes(pid: str = "self") -> int:
    """Bytes this process had the block layer fetch for it (O_DIRECT and aio reads included)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def proc_memory(pid: str = "self") -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile / VmLck of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "VmLck"):
            out[key] = int(line.split()[1]) * 1024
    return out


def page_cache_bytes(path: Path) -> int | None:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``); None where it is not installed."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, timeout=30)
        return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.split() else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


# -- memory cgroups --------------------------------------------------------------------------------


def join_cgroup(name: str, limit: int, pid: int | None = None) -> bool:
    """Move ``pid`` (default: this process, and its future children) into memory cgroup ``name``."""
    group = CGROUP_ROOT / name
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit))
        (group / "cgroup.procs").write_text(str(pid or os.getpid()))
        return True
    except OSError as exc:
        _log(f"  (no memory cgroup: {exc}; page cache may serve offloaded bytes)")
        return False


def cgroup_stats(name: str) -> dict[str, int] | None:
    group = CGROUP_ROOT / name
    try:
        stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
        return {
            "usage": int((group / "memory.usage_in_bytes").read_text()),
            "max_usage": int((group / "memory.max_usage_in_bytes").read_text()),
            "failcnt": int((group / "memory.failcnt").read_text()),
            "rss": int(stat.get("rss", 0)), "cache": int(stat.get("cache", 0)),
            "mapped_file": int(stat.get("mapped_file", 0)),
        }
    except OSError:
        return None


def reset_cgroup_peak(name: str) -> None:
    try:
        (CGROUP_ROOT / name / "memory.max_usage_in_bytes").write_text("0")
    except OSError:
        pass


def remove_cgroup(name: str) -> None:
    try:
        (CGROUP_ROOT / name).rmdir()
    except OSError:
        pass


class MemorySampler:
    """Peaks of this process's RSS (anonymous, file-backed) and its cgroup's usage over a window (50 ms samples)."""

    def __init__(self, cgroup: str | None, period_s: float = 0.05) -> None:
        self.cgroup = cgroup
        self.period_s = period_s
        self.peak = {"rss": 0, "anon": 0, "file": 0, "cgroup_cache": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        m = proc_memory()
        for key, src in (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile")):
            self.peak[key] = max(self.peak[key], m.get(src, 0))
        if self.cgroup:
            c = cgroup_stats(self.cgroup)
            if c:
                self.peak["cgroup_cache"] = max(self.peak["cgroup_cache"], c["cache"])

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self) -> "MemorySampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()


# -- the checkpoint ---------------------------------------------------------------------------------


def build_checkpoint(path: Path, quick: bool) -> Path:
    from tessera.models.tiny_moe import build_tiny_moe

    if (path / "config.json").is_file() and list(path.glob("*.safetensors")):
        return path  # kept from an earlier run (--keep)
    size = (
        dict(hidden=512, layers=4, experts=8, intermediate=1024, heads=8, kv_heads=2, vocab=512)
        if quick
        else dict(hidden=1024, layers=8, experts=16, intermediate=1792, heads=8, kv_heads=2, vocab=1024)
    )
    started = time.perf_counter()
    out = build_tiny_moe("mixtral", path, init_std=0.02, **size)
    _log(f"  checkpoint {out} ready in {time.perf_counter() - started:.0f}s")
    return out


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def geometry(ckpt: Path) -> dict[str, int]:
    """Expert group bytes (as the tier file pads them) and the dense (resident) bytes of the checkpoint."""
    from tessera.models.checkpoint import read_config
    from tessera.offload.buffers import align_up

    cfg = read_config(ckpt)
    H, I, L, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_local_experts"]
    raw = 3 * I * H * 4  # fp32 gate, up, down
    group = align_up(align_up(2 * I * H * 4, 64) + I * H * 4)
    dense = weight_bytes(ckpt) - raw * L * E  # (safetensors headers are noise)
    return {"expert_bytes": group, "dense_bytes": dense, "layers": L, "experts": E, "top_k": cfg["num_experts_per_tok"]}


def prompts_for(batch: int, base: list[int], vocab: int = 512) -> list[list[int]]:
    """``batch`` distinct prompts of ``len(base)`` tokens (deterministic)."""
    return [[(t + 37 * i) % vocab for t in base] for i in range(batch)]


# -- one side, in a subprocess ------------------------------------------------------------------------


def _rank_join_cgroup(worker, prefix: str, limit: int) -> bool:
    return join_cgroup(f"{prefix}-rank{worker.rank}", limit)


def _rank_io(worker) -> dict[str, Any]:
    return {"read_bytes": read_bytes(), **proc_memory()}


def _controller(ep: int, threads: int):
    if ep == 1:  # one rank in this process (torch threads already set), so the cgroup holds the whole runtime
        from tessera.runtime.inprocess import InProcessController

        return InProcessController(log_level="WARNING").start()
    from tessera.config import ParallelPlan
    from tessera.memory.placement import Placement
    from tessera.runtime.controller import Controller

    return Controller(Placement(ParallelPlan({"ep": ep}))).start()


def run_tessera(args) -> dict[str, Any]:
    """One tessera run (offloaded or in memory): load, drop the page cache, decode, measure."""
    import torch

    from tessera.options import OffloadConfig
    from tessera.runtime.llm.engine import LLMEngine, SamplingParams

    ep, batch, tokens = args.ep, args.batch, args.tokens
    torch.set_num_threads(args.threads)
    prompt = IO_PROMPT if args.io else PROMPT
    ctl = _controller(ep, args.threads)  # ep > 1: one Ray worker per rank, one thread each
    rank_cgroups = None
    if ep > 1 and args.cgroup and args.side == "tessera":
        ok = ctl.collective_rpc(_rank_join_cgroup, args=(args.cgroup, args.limit))
        rank_cgroups = [f"{args.cgroup}-rank{r}" for r in range(ep)] if all(ok) else None
    extra = {}
    if args.side == "tessera":
        extra["offload"] = OffloadConfig(device_budget_bytes=args.budget, nvme_dir=args.dir, reader=args.reader,
                                         predictor="both")
    started = time.perf_counter()
    engine = LLMEngine.load(ctl, args.ckpt, dtype="float32", stop_at_eos=False, max_model_len=len(prompt) + tokens + 8,
                            max_num_seqs=batch, record_routing=True, **extra)
    load_s = time.perf_counter() - started
    if args.prepare:  # the first load writes the tier file(s); timed runs reuse them
        engine.close()
        ctl.shutdown()
        return {"load_s": load_s}

    def io_now() -> int:
        return sum(r["read_bytes"] for r in ctl.collective_rpc(_rank_io)) if ep > 1 else read_bytes()

    groups = rank_cgroups or ([args.cgroup] if args.in_cgroup else [])
    dropped = drop_caches()
    for g in groups:
        reset_cgroup_peak(g)
    fail0 = [cgroup_stats(g)["failcnt"] for g in groups]
    sampling = SamplingParams(max_new_tokens=tokens)
    for p in prompts_for(batch, prompt):
        engine.add_request(p, sampling)
    marks = []  # (time, read bytes, prefill tokens so far, decode tokens so far) after each step
    offload0 = None
    load_avg = loadavg()
    t0, io0 = time.perf_counter(), io_now()
    with MemorySampler(args.cgroup if args.in_cgroup else None) as mem:
        while engine.has_unfinished():
            engine.step()
            c = engine.stats()
            marks.append((time.perf_counter(), io_now(), c["prefill_tokens"], c["decode_tokens"]))
            if offload0 is None and args.side == "tessera" and c["decode_tokens"] == 0 and not c["waiting"]:
                offload0 = engine.offload_stats()  # counters at the start of the decode window
    prefill_steps = [i for i, m in enumerate(marks) if m[2] > (marks[i - 1][2] if i else 0)]
    w0 = marks[prefill_steps[-1]]  # the decode window: from the end of the last prefill step to the end
    w1 = marks[-1]
    decode_tokens, decode_s = w1[3] - w0[3], w1[0] - w0[0]
    out: dict[str, Any] = {
        "ep": ep, "batch": batch, "tokens": tokens, "prompt_tokens": len(prompt), "load_s": load_s,
        "loadavg_during": load_avg, "cache_dropped": dropped,
        "decode_tokens": decode_tokens, "decode_s": decode_s, "tokens_per_s": decode_tokens / decode_s,
        "prefill_s": w0[0] - t0,
        "gb_read_decode_window": (w1[1] - w0[1]) / 1e9, "gb_read_total": (w1[1] - io0) / 1e9,
        "read_gb_s_decode_window": (w1[1] - w0[1]) / decode_s / 1e9,
        "peak_rss_bytes": mem.peak["rss"], "peak_anon_bytes": mem.peak["anon"], "peak_file_bytes": mem.peak["file"],
        "peak_cgroup_cache_bytes": mem.peak["cgroup_cache"],
    }
    if groups:
        stats = [cgroup_stats(g) for g in groups]
        out["cgroup_limit_bytes"] = args.limit
        out["cgroup_failcnt_delta"] = sum(s["failcnt"] for s in stats) - sum(fail0)
        out["cgroup_peak_usage_bytes"] = [s["max_usage"] for s in stats]
    if ep > 1:
        out["rank_memory"] = [{k: v for k, v in r.items() if k != "read_bytes"} for r in ctl.collective_rpc(_rank_io)]
    if args.side == "tessera":
        final = engine.offload_stats()
        out["reader"] = final[0]["store_reader"]
        out["direct_io"] = final[0]["store_direct_io"]
        out["ranks"] = []
        for r, (a, b) in enumerate(zip(offload0 or [{}] * ep, final)):
            window = {k: b.get(k, 0) - a.get(k, 0) for k in ("cache_hits", "cache_misses", "store_bytes_read",
                                                             "cache_stall_s")}
            out["ranks"].append({
                "device_budget_bytes": args.budget, "device_peak_bytes": b["store_device_peak"],
                "hit_rate_decode": window["cache_hits"] / max(1, window["cache_hits"] + window["cache_misses"]),
                "gb_read_store_decode": window["store_bytes_read"] / 1e9,
                "read_stall_s_decode": window["cache_stall_s"],  # decode time spent waiting for reads
                "cache": {k[6:]: v for k, v in b.items() if k.startswith("cache_")},
                "repaired": b["store_repaired"],
            })
    if args.side == "tessera":  # O_DIRECT: the tier files must not be in the page cache
        out["tier_file_page_cache_bytes"] = sum(page_cache_bytes(f) for f in Path(args.dir).glob("*.tier"))
    trace = engine.routing_trace()
    out["trace"] = {str(l): a.tolist() for l, a in trace["layers"].items()}
    out["prefill_rows"] = [m[2] - (marks[i - 1][2] if i else 0) for i, m in enumerate(marks) if i in prefill_steps]
    out["local_experts"] = [{str(l): v for l, v in s.experts.items()} for s in engine.shards]
    engine.close()
    ctl.shutdown()
    return out


def run_accelerate(args) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.ckpt, dtype=torch.float32, device_map="auto", max_memory={"cpu": args.budget}, offload_folder=args.dir,
    ).eval()
    load_s = time.perf_counter() - started
    placement: dict[str, int] = {}
    for v in getattr(model, "hf_device_map", {}).values():
        placement[str(v)] = placement.get(str(v), 0) + 1
    marks: list[tuple[float, int]] = []

    class Stamp(StoppingCriteria):  # called once per generated token (the first right after prefill)
        def __call__(self, input_ids, scores, **kw):
            marks.append((time.perf_counter(), read_bytes()))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    dropped = drop_caches()
    if args.in_cgroup:
        reset_cgroup_peak(args.cgroup)
    fail0 = cgroup_stats(args.cgroup)["failcnt"] if args.in_cgroup else 0
    load_avg = loadavg()
    ids = torch.tensor(prompts_for(args.batch, PROMPT))
    with MemorySampler(args.cgroup if args.in_cgroup else None) as mem, torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens, do_sample=False,
                       eos_token_id=None, pad_token_id=0, stopping_criteria=StoppingCriteriaList([Stamp()]))
    (t0, r0), (t1, r1) = marks[0], marks[-1]
    out = {
        "batch": args.batch, "tokens": args.tokens, "load_s": load_s, "loadavg_during": load_avg,
        "cache_dropped": dropped, "device_map_counts": placement,
        "decode_tokens": args.batch * (len(marks) - 1), "decode_s": t1 - t0,
        "tokens_per_s": args.batch * (len(marks) - 1) / (t1 - t0),
        "gb_read_decode_window": (r1 - r0) / 1e9, "read_gb_s_decode_window": (r1 - r0) / (t1 - t0) / 1e9,
        "peak_rss_bytes": mem.peak["rss"], "peak_anon_bytes": mem.peak["anon"], "peak_file_bytes": mem.peak["file"],
        "peak_cgroup_cache_bytes": mem.peak["cgroup_cache"],
    }
    if args.in_cgroup:
        s = cgroup_stats(args.cgroup)
        out.update(cgroup_limit_bytes=args.limit, cgroup_failcnt_delta=s["failcnt"] - fail0,
                   cgroup_peak_usage_bytes=[s["max_usage"]])
    return out


def _side_main(args) -> None:
    # ep=2: the driver stays outside; each Ray worker joins its own cgroup (run_tessera)
    want = args.cgroup and args.side != "tessera-memory" and args.ep == 1
    args.limit = args.limit or args.budget + OVERHEAD
    args.in_cgroup = join_cgroup(args.cgroup, args.limit) if want else False
    out = run_tessera(args) if args.side in ("tessera", "tessera-memory") else run_accelerate(args)
    Path(args.out).write_text(json.dumps(out))


THREADS = 1  # torch threads per process, both sides (set from --threads)


def run_side(side: str, ckpt: Path, budget: int, work: Path, tokens: int, *, batch: int = 1, ep: int = 1,
             prepare: bool = False, io: bool = False, reader: str = "auto", tag: str = "",
             limit: int | None = None) -> dict[str, Any]:
    out = work / f"{side}-{tag or 'run'}{'-prep' if prepare else ''}.json"
    out.unlink(missing_ok=True)
    d = work / ("accelerate-offload" if side == "accelerate" else f"tiers-ep{ep}")
    d.mkdir(exist_ok=True)
    cgroup = f"tessera-bench-{side}-{os.getpid()}"
    cmd = [sys.executable, "-m", "tessera.benchmarks.bench_offload", "--side", side, "--ckpt", str(ckpt),
           "--budget", str(budget), "--dir", str(d), "--tokens", str(tokens), "--out", str(out), "--cgroup", cgroup,
           "--batch", str(batch), "--ep", str(ep), "--reader", reader, "--threads", str(THREADS)]
    cmd += ["--prepare"] if prepare else []
    cmd += ["--limit", str(limit)] if limit else []
    cmd += ["--io"] if io else []
    started = time.perf_counter()
    proc = subprocess.run(cmd, timeout=3600)
    for name in [cgroup] + [f"{cgroup}-rank{r}" for r in range(ep)]:
        remove_cgroup(name)
    if proc.returncode != 0 or not out.is_file():
        return {"error": f"{side} run exited with code {proc.returncode} (an OOM kill in the cgroup shows as -9)",
                "wall_s": time.perf_counter() - started, "loadavg_after": loadavg()}
    res = json.loads(out.read_text())
    res["loadavg_after"] = loadavg()
    return res


# -- the true disk bound -----------------------------------------------------------------------------


def reader_in_flight(reader: str) -> dict[str, Any]:
    """How many requests tessera's reader keeps in flight, and of what size (OffloadConfig defaults)."""
    from tessera.offload.aio import aio_built
    from tessera.options import OffloadConfig

    cfg = OffloadConfig(device_budget_bytes=1)
    name = "aio" if reader == "aio" or (reader == "auto" and aio_built()) else "preadv"
    if name == "aio":
        return {"reader": "aio", "in_flight": cfg.queue_depth * cfg.io_threads, "request_bytes": cfg.block_size,
                "how": f"queue_depth {cfg.queue_depth} x io_threads {cfg.io_threads}"}
    return {"reader": "preadv", "in_flight": cfg.io_threads, "request_bytes": cfg.chunk_bytes,
            "how": f"io_threads {cfg.io_threads} (one synchronous request each)"}


def disk_bound(path: Path, in_flight: int, request_bytes: int, max_bytes: int = 3 << 30) -> dict[str, Any]:
    """O_DIRECT reads of ``path`` with ``in_flight`` requests of ``request_bytes`` always outstanding, cold cache.

    ``in_flight`` threads each loop: take the next offset, ``os.preadv`` it (the GIL is released for the
    read), until the file (or ``max_bytes``) is read. Bytes and time are counted over the same window.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tessera.offload.buffers import aligned_empty

    drop_caches()
    size = min(max_bytes, path.stat().st_size) // request_bytes * request_bytes
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    lock = threading.Lock()
    next_off = [0]

    def worker() -> int:
        buf = aligned_empty(request_bytes)
        mv = memoryview(buf.numpy())
        done = 0
        while True:
            with lock:
                off = next_off[0]
                next_off[0] += request_bytes
            if off >= size:
                return done
            done += os.preadv(fd, [mv], off)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        total = sum(pool.map(lambda _: worker(), range(in_flight)))
    elapsed = time.perf_counter() - started
    os.close(fd)
    return {"gb_s": total / elapsed / 1e9, "bytes": total, "s": elapsed, "in_flight": in_flight,
            "request_bytes": request_bytes, "loadavg": loadavg()}


# -- expert-cache policies on a recorded trace -------------------------------------------------------


def simulate(steps: list[tuple[int, list[int]]], capacity: int, policy: str) -> float:
    """Hit rate of one policy over (layer, expert set) requests, the set of one request pinned."""
    cached: dict[tuple[int, int], float] = {}
    freq: dict[tuple[int, int], int] = {}
    nxt_use: list[dict] = []
    if policy == "belady":
        last: dict = {}
        for i in range(len(steps) - 1, -1, -1):
            layer, ids = steps[i]
            nxt_use.append(dict(last))
            for e in ids:
                last[(layer, e)] = i
        nxt_use.reverse()
    hits = total = 0
    clock = 0
    for i, (layer, ids) in enumerate(steps):
        keys = [(layer, e) for e in ids]
        for k in keys:
            clock += 1
            total += 1
            freq[k] = freq.get(k, 0) + 1
            if k in cached:
                hits += 1
                cached[k] = clock
                continue
            if len(cached) >= capacity:
                victims = [c for c in cached if c not in keys]
                if not victims:
                    continue  # the request alone exceeds the capacity: read without caching
                if policy == "lru":
                    v = min(victims, key=lambda c: cached[c])
                elif policy == "lfu":
                    v = min(victims, key=lambda c: (freq[c], cached[c]))
                else:
                    v = max(victims, key=lambda c: nxt_use[i].get(c, float("inf")))
                del cached[v]
            cached[k] = clock
    return hits / total if total else 0.0


def trace_steps(res: dict[str, Any], local: set[int] | None = None) -> tuple[list, list]:
    """(all requests, decode-window requests): one (layer, expert set) per MoE layer per engine step."""
    trace = {int(l): rows for l, rows in res["trace"].items()}
    layers = sorted(trace)
    n = len(trace[layers[0]])
    bounds, pos = [], 0
    for rows in res["prefill_rows"]:
        bounds.append((pos, pos + rows))
        pos += rows
    prefill_end = pos
    while pos < n:  # decode: one row per running sequence per step (no stops: all run to the end)
        bounds.append((pos, min(n, pos + res["batch"])))
        pos += res["batch"]
    steps, decode = [], []
    for a, b in bounds:
        for layer in layers:
            ids = sorted({e for row in trace[layer][a:b] for e in row if local is None or e in local})
            if ids:
                steps.append((layer, ids))
                if a >= prefill_end:
                    decode.append((layer, ids))
    return steps, decode


def cache_table(res: dict[str, Any], capacity: int, expert_bytes: int, rank: int = 0) -> dict[str, Any]:
    local = None
    if len(res.get("local_experts", [])) > 1:
        local = {e for v in res["local_experts"][rank].values() for e in v}
    steps, decode = trace_steps(res, local)
    out: dict[str, Any] = {p: simulate(steps, capacity, p) for p in ("lru", "lfu", "belady")}
    r = res["ranks"][rank]
    out["engine_measured"] = r["cache"]["hit_rate"]
    out["engine_decode_window"] = r["hit_rate_decode"]
    out["engine_prefetch_precision"] = r["cache"]["prefetch_precision"]
    out["engine_prefetch_recall"] = r["cache"]["prefetch_recall"]
    out["capacity_experts"] = capacity
    # the floor of a cacheless streaming engine: every active expert read at every step
    out["gb_every_active_expert_decode"] = sum(len(ids) for _, ids in decode) * expert_bytes / 1e9
    out["gb_read_engine_decode"] = r["gb_read_store_decode"]
    out["active_experts_per_layer_step"] = (sum(len(ids) for _, ids in decode) / len(decode)) if decode else 0.0
    return out


# -- reporting ----------------------------------------------------------------------------------------


def spread(runs: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    vals = [r[key] for r in runs if "error" not in r and key in r]
    if not vals:
        return None
    med = statistics.median(vals)
    return {"median": med, "min": min(vals), "max": max(vals), "n": len(vals),
            "max_dev_from_median": max(abs(v - med) / med for v in vals) if med else None}


def summarize_cell(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": [{k: v for k, v in r.items() if k not in ("trace", "local_experts", "prefill_rows")}
                                    for r in runs]}
    for key in ("tokens_per_s", "gb_read_decode_window", "read_gb_s_decode_window", "cgroup_failcnt_delta",
                "peak_rss_bytes", "peak_anon_bytes", "peak_file_bytes"):
        s = spread(runs, key)
        if s is not None:
            out[key] = s
    out["loadavg"] = [r.get("loadavg_during") for r in runs]
    return out


def load_results() -> dict[str, Any]:
    try:
        return json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        return {}


def save_results(result: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, default=str) + "\n")


def section_decode(ckpt: Path, work: Path, budget: int, geo: dict, lengths: list[int], repeats: int,
                   reader: str, sides: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"lengths": {}}
    for tokens in lengths:
        cells: dict[str, list] = {"tessera": [], "accelerate": [], "tessera_no_offload": []}
        for rep in range(repeats):
            for side, key in (("tessera", "tessera"), ("accelerate", "accelerate"),
                              ("tessera-memory", "tessera_no_offload")):
                if side not in sides:
                    continue
                _log(f"decode: {side}, {tokens} tokens, run {rep + 1}/{repeats} (load {loadavg()})")
                cells[key].append(run_side(side, ckpt, budget, work, tokens, reader=reader, tag=f"d{tokens}-{rep}"))
        row = {k: summarize_cell(v) for k, v in cells.items()}
        t, a = row["tessera"].get("tokens_per_s"), row["accelerate"].get("tokens_per_s")
        if t and a:
            row["ratio_median"] = t["median"] / a["median"]
            row["ratio_worst"] = t["min"] / a["max"]
        m = row["tessera_no_offload"].get("tokens_per_s")
        if t and m:
            row["offloaded_over_in_memory"] = t["median"] / m["median"]
        good = [r for r in cells["tessera"] if "error" not in r]
        if good:
            cap = (budget - geo["dense_bytes"]) // geo["expert_bytes"]
            row["expert_cache"] = cache_table(good[0], cap, geo["expert_bytes"])
            row["tessera_within_budget"] = {
                "budget_bytes": budget, "overhead_bytes": OVERHEAD,
                "max_device_peak_bytes": max(r["ranks"][0]["device_peak_bytes"] for r in good),
                "max_peak_rss_bytes": max(r["peak_rss_bytes"] for r in good),
                "max_cgroup_peak_bytes": max(max(r.get("cgroup_peak_usage_bytes") or [0]) for r in good),
            }
        out["lengths"][str(tokens)] = row
    return out


def section_equal_memory(ckpt: Path, work: Path, budget: int, geo: dict, lengths: list[int], repeats: int,
                         reader: str) -> dict[str, Any]:
    """tessera with a budget that fills the same cgroup accelerate fills.

    Both sides get a cgroup of budget + OVERHEAD. accelerate's weights are memory-mapped, so everything
    the cgroup holds beyond its ~0.3 GB of anonymous memory serves as a cache of them; tessera keeps to its
    configured budget and leaves the rest unused. Here tessera's budget is the cgroup limit minus
    ``EQUAL_RUNTIME`` (its runtime: ~0.21 GB anonymous, ~0.1 GB of library pages, measured), so both
    sides use the same memory for weights.
    """
    limit = budget + OVERHEAD
    equal = limit - EQUAL_RUNTIME
    out: dict[str, Any] = {"cgroup_limit_bytes": limit, "tessera_budget_bytes": equal, "lengths": {}}
    for tokens in lengths:
        runs = []
        for rep in range(repeats):
            _log(f"equal memory: tessera, budget {equal / 1e9:.2f} GB, {tokens} tokens, run {rep + 1}/{repeats}")
            runs.append(run_side("tessera", ckpt, equal, work, tokens, reader=reader, tag=f"eq{tokens}-{rep}",
                                 limit=limit))
        out["lengths"][str(tokens)] = summarize_cell(runs)
    return out


def section_io(ckpt: Path, work: Path, geo: dict, repeats: int, reader: str, tokens: int) -> dict[str, Any]:
    budget = geo["dense_bytes"] + IO_CACHE_EXPERTS * geo["expert_bytes"] + (4 << 20)
    flight = reader_in_flight(reader)
    tier = sorted((work / "tiers-ep1").glob("*.tier"))
    runs = []
    for rep in range(repeats):
        before = disk_bound(tier[0], flight["in_flight"], flight["request_bytes"])
        _log(f"io: tessera, {tokens} tokens, run {rep + 1}/{repeats}; bound before {before['gb_s']:.2f} GB/s")
        res = run_side("tessera", ckpt, budget, work, tokens, io=True, reader=reader, tag=f"io-{rep}")
        after = disk_bound(tier[0], flight["in_flight"], flight["request_bytes"])
        if "error" not in res:
            bound = (before["gb_s"] + after["gb_s"]) / 2
            res["bound_before"], res["bound_after"], res["bound_gb_s"] = before, after, bound
            res["fraction_of_bound"] = res["read_gb_s_decode_window"] / bound
            res["useful_fraction_of_bound"] = (res["ranks"][0]["gb_read_store_decode"] / res["decode_s"]) / bound
        runs.append(res)
    out = summarize_cell(runs)
    out.update(budget_bytes=budget, cache_experts=IO_CACHE_EXPERTS, prompt_tokens=len(IO_PROMPT), tokens=tokens,
               reader=flight)
    for key in ("fraction_of_bound", "useful_fraction_of_bound", "bound_gb_s"):
        out[key] = spread(runs, key)
    return out


def section_batch(ckpt: Path, work: Path, budget: int, geo: dict, repeats: int, reader: str,
                  batches: list[int], eps: list[int], sides: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens": BATCH_TOKENS, "cells": {}}
    cache_bytes = budget - geo["dense_bytes"]
    for batch in batches:
        acc = []
        for rep in range(repeats if "accelerate" in sides else 0):
            _log(f"batch: accelerate, batch {batch}, run {rep + 1}/{repeats} (load {loadavg()})")
            acc.append(run_side("accelerate", ckpt, budget, work, BATCH_TOKENS, batch=batch, tag=f"b{batch}-{rep}"))
        out["cells"][f"accelerate-b{batch}"] = summarize_cell(acc)
        for ep in eps:
            rank_budget = geo["dense_bytes"] + cache_bytes // ep  # the same expert-cache bytes in total
            cells: dict[str, list] = {"offloaded": [], "in_memory": []}
            for rep in range(repeats):
                for side, key in (("tessera", "offloaded"), ("tessera-memory", "in_memory")):
                    if side not in sides:
                        continue
                    _log(f"batch: {side}, batch {batch}, ep {ep}, run {rep + 1}/{repeats} (load {loadavg()})")
                    cells[key].append(run_side(side, ckpt, rank_budget, work, BATCH_TOKENS, batch=batch, ep=ep,
                                               reader=reader, tag=f"b{batch}-ep{ep}-{rep}"))
            row = {k: summarize_cell(v) for k, v in cells.items()}
            row["rank_budget_bytes"] = rank_budget
            good = [r for r in cells["offloaded"] if "error" not in r]
            if good:
                cap = (rank_budget - geo["dense_bytes"]) // geo["expert_bytes"]
                row["expert_cache"] = [cache_table(good[0], cap, geo["expert_bytes"], rank=r) for r in range(ep)]
                row["hit_rate_decode"] = spread([{"h": statistics.fmean(x["hit_rate_decode"] for x in r["ranks"])}
                                                 for r in good], "h")
            o, m = row["offloaded"].get("tokens_per_s"), row["in_memory"].get("tokens_per_s")
            a = out["cells"][f"accelerate-b{batch}"].get("tokens_per_s")
            if o and m:
                row["offloaded_over_in_memory"] = o["median"] / m["median"]
            if o and a:
                row["offloaded_over_accelerate"] = o["median"] / a["median"]
            out["cells"][f"tessera-b{batch}-ep{ep}"] = row
    return out


def _fmt(s: dict[str, Any] | None, scale: float = 1.0) -> str:
    if not s:
        return "-"
    return f"{s['median'] * scale:.2f} [{s['min'] * scale:.2f}, {s['max'] * scale:.2f}]"


def print_report(result: dict[str, Any]) -> None:
    d = result.get("decode")
    if d:
        rows = []
        for tokens, row in d["lengths"].items():
            t, a, m = row["tessera"], row["accelerate"], row["tessera_no_offload"]
            rows.append((tokens, _fmt(t.get("tokens_per_s")), _fmt(a.get("tokens_per_s")),
                         _fmt(m.get("tokens_per_s")), f"{row.get('ratio_median', float('nan')):.1f}x",
                         _fmt(t.get("cgroup_failcnt_delta")), _fmt(a.get("cgroup_failcnt_delta")),
                         _fmt(t.get("gb_read_decode_window")), _fmt(a.get("gb_read_decode_window")),
                         _fmt(t.get("peak_anon_bytes"), 1e-9)))
        print_table("decode, batch 1: tok/s median [min, max]", ("tokens", "tessera", "accelerate", "in memory",
                    "ratio", "failcnt t", "failcnt a", "GB read t", "GB read a", "anon GB t"), rows)
    eq = result.get("equal_memory")
    if eq and d:
        rows = []
        for tokens, row in eq["lengths"].items():
            t = row.get("tokens_per_s")
            a = d["lengths"].get(tokens, {}).get("accelerate", {}).get("tokens_per_s")
            rows.append((tokens, _fmt(t), _fmt(a), f"{t['median'] / a['median']:.1f}x" if t and a else "-",
                         _fmt(row.get("cgroup_failcnt_delta")), _fmt(row.get("gb_read_decode_window"))))
        print_table(f"equal memory: tessera budget {eq['tessera_budget_bytes'] / 1e9:.2f} GB in the same "
                    f"{eq['cgroup_limit_bytes'] / 1e9:.2f} GB cgroup", ("tokens", "tessera", "accelerate", "ratio",
                    "failcnt", "GB read"), rows)
    io = result.get("io")
    if io:
        print_table("I/O-bound decode: tessera's read rate over the true disk bound", ("reader", "tessera GB/s",
                    "bound GB/s", "fraction", "useful fraction"),
                    [(io["reader"]["reader"], _fmt(io.get("read_gb_s_decode_window")), _fmt(io.get("bound_gb_s")),
                      _fmt(io.get("fraction_of_bound")), _fmt(io.get("useful_fraction_of_bound")))])
    b = result.get("batch")
    if b:
        rows = []
        for key, row in b["cells"].items():
            if key.startswith("tessera"):
                rows.append((key, _fmt(row["offloaded"].get("tokens_per_s")), _fmt(row["in_memory"].get("tokens_per_s")),
                             _fmt(row.get("hit_rate_decode")), _fmt(row["offloaded"].get("gb_read_decode_window")),
                             f"{sum(c['gb_every_active_expert_decode'] for c in row.get('expert_cache', [])):.2f}"))
            else:
                rows.append((key, _fmt(row.get("tokens_per_s")), "", "", _fmt(row.get("gb_read_decode_window")), ""))
        print_table(f"batch x ep, {b['tokens']} new tokens: tok/s median [min, max]", ("cell", "offloaded", "in memory",
                    "hit rate", "GB read", "GB if every active expert read"), rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small checkpoint (~0.1 GB), to check the script")
    ap.add_argument("--sections", default="decode,equal,io,batch")
    ap.add_argument("--lengths", default="16,64,256")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--eps", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sides", default="tessera,accelerate,tessera-memory", help="which sides to run (development)")
    ap.add_argument("--io-tokens", type=int, default=64)
    ap.add_argument("--reader", default="auto", choices=("auto", "aio", "preadv"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process on both sides (1: see the module docstring)")
    ap.add_argument("--workdir", default=None, help="where the checkpoint, tier files and offload folder go")
    ap.add_argument("--keep", action="store_true", help="keep the multi-GB files (the next run reuses them)")
    for hidden in ("--side", "--ckpt", "--dir", "--out", "--cgroup"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--io", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        _side_main(args)
        return

    global THREADS
    THREADS = args.threads
    sections = [s for s in args.sections.split(",") if s]
    sides = [s for s in args.sides.split(",") if s]
    work = Path(args.workdir or "/work/tmp_bench_offload")
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    need = (0.3 if args.quick else 12) * 2**30  # checkpoint + tier files + accelerate's offload folder
    if free < need:
        raise SystemExit(f"{work} has {free / 2**30:.1f} GiB free; the benchmark needs ~{need / 2**30:.0f} GiB")
    _log("building the checkpoint")
    ckpt = build_checkpoint(work / ("ckpt-quick" if args.quick else "ckpt"), args.quick)
    total = weight_bytes(ckpt)
    budget = total // (2 if args.quick else 4)  # the quick model's dense part is large: half, so ep=2 fits
    geo = geometry(ckpt)
    _log(f"  weights {total / 1e9:.2f} GB, budget {budget / 1e9:.2f} GB (4x over), load {loadavg()}")
    eps = [int(e) for e in args.eps.split(",")]
    for ep in sorted(set(eps) | {1}):
        rank_budget = geo["dense_bytes"] + (budget - geo["dense_bytes"]) // ep
        _log(f"tessera: writing the tier file(s) for ep={ep} (untimed)")
        prep = run_side("tessera", ckpt, rank_budget, work, 4, ep=ep, prepare=True, reader=args.reader, tag="prep")
        if "error" in prep:
            raise SystemExit(f"writing the tier files failed: {prep['error']}")

    result = load_results()
    if result.get("quick") != args.quick:
        result = {}
    result.update({
        "machine": machine(), "quick": args.quick,
        "checkpoint": {"family": "mixtral (random)", "weight_bytes": total, "dtype": "float32", **geo},
        "budget_bytes": budget, "overhead_bytes_in_cgroup": OVERHEAD,
        "reader_in_flight": reader_in_flight(args.reader), "torch_threads_per_process": args.threads,
    })
    if "decode" in sections:
        result["decode"] = section_decode(ckpt, work, budget, geo, [int(x) for x in args.lengths.split(",")],
                                          args.repeats, args.reader, sides)
        result["decode"]["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        save_results(result)
    if "equal" in sections:
        result["equal_memory"] = section_equal_memory(ckpt, work, budget, geo,
                                                      [int(x) for x in args.lengths.split(",")], args.repeats,
                                                      args.reader)
        result["equal_memory"]["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        save_results(result)
    if "io" in sections:
        result["io"] = section_io(ckpt, work, geo, args.repeats, args.reader, args.io_tokens)
        result["io"]["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        save_results(result)
    if "batch" in sections:
        result["batch"] = section_batch(ckpt, work, budget, geo, args.repeats, args.reader,
                                        [int(x) for x in args.batches.split(",")], eps, sides)
        result["batch"]["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        save_results(result)
    print_report(result)
    print(f"\nwrote {RESULTS}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
