"""Offload: decode tokens/s of a MoE whose weights are 4x the memory budget, tessera vs HF accelerate disk offload.

Run: ``python -m tessera.benchmarks.bench_offload [--quick] [--tokens N] [--workdir DIR] [--keep]`` (root).
Writes ``benchmarks/results/offload.json`` and prints tables:

1. *disk bound*: O_DIRECT reads of the tier file with 8 threads, page cache dropped (GB/s).
2. *decode*: the same random Mixtral checkpoint (a few GB, fp32) and the same memory budget
   (a quarter of the weights) on both sides, each in its own subprocess inside a cgroup-v1
   memory cgroup limited to budget + runtime overhead, page cache dropped right before the
   timed generation, so offloaded bytes really come from the disk:
   - tessera: ``LLMEngine.load(..., offload=OffloadConfig(device_budget_bytes=budget, nvme_dir=...))``
     (dense weights resident, experts streamed from the tier file through the expert cache);
   - accelerate: ``from_pretrained(device_map="auto", max_memory={"cpu": budget}, offload_folder=...)``.
   Reported: decode tokens/s (batch 1, greedy), GB actually read from the block device
   (``/proc/self/io``) and GB/s over the decode, and the ratio tessera / accelerate.
   - tessera without offload (reference: all weights in memory, no cgroup), to show what offload costs.
3. *expert cache*: hit rates of LRU and LFU (simulated on the recorded routing trace at the
   cache's capacity), the engine's measured hit rate (LRU + affinity/gate prefetch), and
   Belady's optimal offline bound at the same capacity.

All figures come from one run on one machine (a busy 2-core VM here): compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tessera.benchmarks._common import RESULTS_DIR, machine, print_table

RESULTS = RESULTS_DIR / "offload.json"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
OVERHEAD = 768 << 20  # python + torch (+ transformers) runtime, same for both sides
PROMPT = [11, 42, 7, 99, 3, 250, 18, 64]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def join_cgroup(name: str, limit: int) -> bool:
    """Move this process (and its future children) into memory cgroup ``name`` limited to ``limit`` bytes."""
    group = CGROUP_ROOT / name
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit))
        (group / "cgroup.procs").write_text(str(os.getpid()))
        return True
    except OSError as exc:
        _log(f"  (no memory cgroup: {exc}; page cache may serve offloaded bytes)")
        return False


def remove_cgroup(name: str) -> None:
    try:
        (CGROUP_ROOT / name).rmdir()
    except OSError:
        pass


# -- the checkpoint ---------------------------------------------------------------------------


def build_checkpoint(path: Path, quick: bool) -> Path:
    from tessera.models.tiny_moe import build_tiny_moe

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


# -- one side, in a subprocess ---------------------------------------------------------------


class _InProcessController:
    """One rank in this process (the single-rank plan), so the cgroup holds the whole runtime."""

    def __init__(self) -> None:
        from tessera.memory.placement import Placement
        from tessera.config import ParallelPlan
        from tessera.runtime.worker import Worker

        self.worker = Worker(0, 1, "cpu", log_level="WARNING", num_threads=os.cpu_count() or 1)
        self.placement = Placement(ParallelPlan({}))

    def collective_rpc(self, fn, args=(), kwargs=None, timeout_s=None, ranks=None):
        return [fn(self.worker, *args, **(kwargs or {}))]


def run_tessera(ckpt: Path, budget: int, tier_dir: Path, tokens: int, prepare: bool, offload: bool = True) -> dict[str, Any]:
    import torch

    from tessera.options import OffloadConfig
    from tessera.runtime.llm.engine import LLMEngine, SamplingParams

    torch.set_num_threads(os.cpu_count() or 1)
    ctl = _InProcessController()
    cfg = OffloadConfig(device_budget_bytes=budget, nvme_dir=str(tier_dir), reader="auto", predictor="both")
    started = time.perf_counter()
    extra = {"offload": cfg} if offload else {}
    engine = LLMEngine.load(ctl, ckpt, dtype="float32", stop_at_eos=False, max_model_len=256, max_num_seqs=1,
                            record_routing=True, **extra)
    load_s = time.perf_counter() - started
    if prepare:  # first load writes the tier file; the timed run reuses it
        engine.close()
        return {"load_s": load_s}
    dropped = drop_caches()
    before = read_bytes()
    stamps = []
    for _ in engine.stream(PROMPT, SamplingParams(max_new_tokens=tokens)):
        stamps.append(time.perf_counter())
    io = read_bytes() - before
    (stats,) = engine.offload_stats()
    trace = engine.routing_trace()
    engine.close()
    decode_s = stamps[-1] - stamps[0]
    if not offload:
        return {"load_s": load_s, "cache_dropped": dropped, "decode_tokens": len(stamps) - 1, "decode_s": decode_s,
                "tokens_per_s": (len(stamps) - 1) / decode_s, "gb_read_device": io / 1e9}
    return {
        "load_s": load_s,
        "cache_dropped": dropped,
        "decode_tokens": len(stamps) - 1,
        "decode_s": decode_s,
        "tokens_per_s": (len(stamps) - 1) / decode_s,
        "gb_read_device": io / 1e9,
        "gb_read_offload_store": stats["store_bytes_read"] / 1e9,
        "reader": stats["store_reader"],
        "direct_io": stats["store_direct_io"],
        "device_peak_bytes": stats["store_device_peak"],
        "cache": {k[6:]: v for k, v in stats.items() if k.startswith("cache_")},
        "trace": {str(l): a.tolist() for l, a in trace["layers"].items()},
        "prompt_tokens": len(PROMPT),
    }


def run_accelerate(ckpt: Path, budget: int, offload_dir: Path, tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, device_map="auto", max_memory={"cpu": budget}, offload_folder=str(offload_dir),
    ).eval()
    load_s = time.perf_counter() - started
    placement = {}
    for v in getattr(model, "hf_device_map", {}).values():
        placement[str(v)] = placement.get(str(v), 0) + 1
    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    dropped = drop_caches()
    before = read_bytes()
    with torch.no_grad():
        model.generate(torch.tensor([PROMPT]), max_new_tokens=tokens, do_sample=False, eos_token_id=None,
                       pad_token_id=0, stopping_criteria=StoppingCriteriaList([Stamp()]))
    io = read_bytes() - before
    decode_s = stamps[-1] - stamps[0]
    return {
        "load_s": load_s,
        "cache_dropped": dropped,
        "device_map_counts": placement,
        "decode_tokens": len(stamps) - 1,
        "decode_s": decode_s,
        "tokens_per_s": (len(stamps) - 1) / decode_s,
        "gb_read_device": io / 1e9,
    }


def _side_main(args) -> None:
    limit = args.budget + OVERHEAD
    in_cgroup = join_cgroup(args.cgroup, limit) if args.cgroup and args.side != "tessera-memory" else False
    if args.side in ("tessera", "tessera-memory"):
        out = run_tessera(Path(args.ckpt), args.budget, Path(args.dir), args.tokens, args.prepare,
                          offload=args.side == "tessera")
    else:
        out = run_accelerate(Path(args.ckpt), args.budget, Path(args.dir), args.tokens)
    out["cgroup_limit_bytes"] = limit if in_cgroup else None
    Path(args.out).write_text(json.dumps(out))


def run_side(side: str, ckpt: Path, budget: int, work: Path, tokens: int, prepare: bool = False) -> dict[str, Any]:
    out = work / f"{side}{'-prep' if prepare else ''}.json"
    d = work / ("accelerate-offload" if side == "accelerate" else "tiers")
    d.mkdir(exist_ok=True)
    cgroup = f"tessera-bench-{side}-{os.getpid()}"
    cmd = [sys.executable, "-m", "tessera.benchmarks.bench_offload", "--side", side, "--ckpt", str(ckpt),
           "--budget", str(budget), "--dir", str(d), "--tokens", str(tokens), "--out", str(out), "--cgroup", cgroup]
    if prepare:
        cmd.append("--prepare")
    started = time.perf_counter()
    proc = subprocess.run(cmd, timeout=3600)
    remove_cgroup(cgroup)
    if proc.returncode != 0 or not out.is_file():
        return {"error": f"{side} run exited with code {proc.returncode} (an OOM kill in the cgroup shows as -9)",
                "wall_s": time.perf_counter() - started}
    return json.loads(out.read_text())


# -- disk bound and cache policies --------------------------------------------------------------


def disk_bound(path: Path, nbytes: int) -> float:
    """O_DIRECT read GB/s of ``path`` with 8 threads (4 MiB chunks), cold page cache."""
    from tessera.offload.aio import PreadvReader
    from tessera.offload.buffers import aligned_empty

    drop_caches()
    size = min(nbytes, path.stat().st_size) // (64 << 20) * (64 << 20)
    reader = PreadvReader(io_threads=8, chunk_bytes=4 << 20)
    buf = aligned_empty(64 << 20)
    started = time.perf_counter()
    for off in range(0, size, 64 << 20):
        reader.submit(str(path), off, buf).result()
    elapsed = time.perf_counter() - started
    reader.close()
    return size / elapsed / 1e9


def simulate(steps: list[tuple[int, list[int]]], capacity: int, policy: str) -> float:
    """Hit rate of one policy over (layer, expert set) requests, the set of one request pinned."""
    cached: dict[tuple[int, int], float] = {}
    freq: dict[tuple[int, int], int] = {}
    nxt_use: list[dict] = []
    if policy == "belady":
        # next use of every key after request i
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
                if policy == "lru":
                    v = min(victims, key=lambda c: cached[c])
                elif policy == "lfu":
                    v = min(victims, key=lambda c: (freq[c], cached[c]))
                else:
                    v = max(victims, key=lambda c: nxt_use[i].get(c, float("inf")))
                del cached[v]
            cached[k] = clock
    return hits / total if total else 0.0


def cache_table(res: dict[str, Any], capacity: int) -> dict[str, Any]:
    trace = {int(l): rows for l, rows in res["trace"].items()}
    layers = sorted(trace)
    prompt = res["prompt_tokens"]
    steps: list[tuple[int, list[int]]] = []
    n_tokens = len(trace[layers[0]])
    for layer in layers:  # prefill: one request per layer with every prompt token's experts
        steps.append((layer, sorted({e for row in trace[layer][:prompt] for e in row})))
    for t in range(prompt, n_tokens):
        for layer in layers:
            steps.append((layer, sorted(set(trace[layer][t]))))
    out = {p: simulate(steps, capacity, p) for p in ("lru", "lfu", "belady")}
    out["engine_measured_lru_with_prefetch"] = res["cache"]["hit_rate"]
    out["engine_prefetch_precision"] = res["cache"]["prefetch_precision"]
    out["engine_prefetch_recall"] = res["cache"]["prefetch_recall"]
    out["capacity_experts"] = capacity
    return out


# -- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small checkpoint (~0.1 GB), to check the script")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--workdir", default=None, help="where the checkpoint, tier file and offload folder go")
    ap.add_argument("--keep", action="store_true", help="keep the multi-GB files")
    ap.add_argument("--side", choices=("tessera", "tessera-memory", "accelerate"), help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--cgroup", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        _side_main(args)
        return

    work = Path(args.workdir or "/work/tmp_bench_offload")
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    need = (0.3 if args.quick else 9) * 2**30  # checkpoint + tier file + accelerate's offload folder
    if free < need:
        raise SystemExit(f"{work} has {free / 2**30:.1f} GiB free; the benchmark needs ~{need / 2**30:.0f} GiB")
    _log("building the checkpoint")
    ckpt = build_checkpoint(work / ("ckpt-quick" if args.quick else "ckpt"), args.quick)
    total = weight_bytes(ckpt)
    budget = total // 4
    _log(f"  weights {total / 1e9:.2f} GB, budget {budget / 1e9:.2f} GB (4x over)")

    _log("tessera: writing the tier file (untimed)")
    prep = run_side("tessera", ckpt, budget, work, args.tokens, prepare=True)
    tier_files = list((work / "tiers").glob("*.tier"))
    bound = disk_bound(tier_files[0], 2 << 30) if tier_files else float("nan")
    _log(f"  disk bound (O_DIRECT, 8 threads): {bound:.2f} GB/s")
    _log("tessera: timed decode")
    ours = run_side("tessera", ckpt, budget, work, args.tokens)
    _log("accelerate: timed decode")
    theirs = run_side("accelerate", ckpt, budget, work, args.tokens)
    _log("tessera without offload (all weights in memory, no cgroup): timed decode")
    memory = run_side("tessera-memory", ckpt, budget, work, args.tokens)

    result: dict[str, Any] = {
        "machine": machine(),
        "checkpoint": {"family": "mixtral (random)", "weight_bytes": total, "dtype": "float32"},
        "budget_bytes": budget,
        "overhead_bytes_in_cgroup": OVERHEAD,
        "disk_bound_gb_s": bound,
        "tessera_prepare": prep,
        "tessera": {k: v for k, v in ours.items() if k != "trace"},
        "accelerate": theirs,
        "tessera_no_offload": memory,
    }
    if "error" not in ours and "error" not in memory:
        result["offloaded_over_in_memory_tokens_per_s"] = ours["tokens_per_s"] / memory["tokens_per_s"]
    if "error" not in ours and "error" not in theirs:
        result["ratio_tokens_per_s"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
        ours_gbs = ours["gb_read_device"] / ours["decode_s"]
        result["tessera_read_gb_s"] = ours_gbs
        result["tessera_fraction_of_disk_bound"] = ours_gbs / bound if bound == bound else None
        result["accelerate_read_gb_s"] = theirs["gb_read_device"] / theirs["decode_s"]
    if "error" not in ours:
        from tessera.models.checkpoint import read_config

        cfg = read_config(ckpt)
        expert_bytes = 3 * cfg["intermediate_size"] * cfg["hidden_size"] * 4
        dense = total - expert_bytes * cfg["num_local_experts"] * cfg["num_hidden_layers"]
        capacity = max(1, (budget - dense) // expert_bytes)
        result["expert_cache"] = cache_table(ours, capacity)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))

    rows = []
    for name, r in (("tessera", ours), ("accelerate", theirs), ("tessera, no offload", memory)):
        if "error" in r:
            rows.append((name, r["error"], "", "", ""))
        else:
            rows.append((name, r["tokens_per_s"], r["gb_read_device"], r["gb_read_device"] / r["decode_s"], r["load_s"]))
    print_table(f"decode, batch 1, {args.tokens} tokens, budget {budget / 1e9:.2f} GB of {total / 1e9:.2f} GB weights",
                ("side", "tok/s", "GB read", "GB/s", "load s"), rows)
    if "ratio_tokens_per_s" in result:
        print(f"\n  ratio tessera / accelerate: {result['ratio_tokens_per_s']:.2f}x; "
              f"tessera reads at {result['tessera_fraction_of_disk_bound']:.0%} of the disk bound ({bound:.2f} GB/s)")
    if "offloaded_over_in_memory_tokens_per_s" in result:
        print(f"  tessera offloaded / tessera in memory: {result['offloaded_over_in_memory_tokens_per_s']:.2f}x")
    if "expert_cache" in result:
        c = result["expert_cache"]
        print_table(f"expert cache hit rate (capacity {c['capacity_experts']} experts)", ("policy", "hit rate"),
                    [(k, v) for k, v in c.items() if k != "capacity_experts"])
    print(f"\nwrote {RESULTS}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
