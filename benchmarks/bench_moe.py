"""MoE generation benchmark: tessera plans against transformers, and decode against the memory-bandwidth bound.

Run: ``python -m tessera.benchmarks.bench_moe [--size medium|reference|small]``.

In one run, on one random Qwen3-MoE checkpoint (bf16, built with transformers
and cached under ``$TESSERA_CACHE``), it measures at batch 1:

- tessera prefill and decode tokens/s for each plan (best of 2 prefills / 3 decodes, for
  every system alike: load from other jobs only ever slows a run) (Ray workers, 1 thread each);
- transformers ``DistributedConfig(tp_size, ep_size)`` under ``torchrun`` with the
  same number of processes (1 thread each) -> ratio tessera / transformers;
- one-process transformers ``generate`` with 1 and 2 threads;
- the machine's streaming-read bandwidth (``torch.sum`` over a 512 MiB tensor,
  with as many threads as processes), the weight bytes a decoded token reads
  (attention, dense/shared MLPs, routers, top-k experts per MoE layer, LM head)
  and the fraction of the bound reached: bytes/token x tokens/s / bandwidth.

Prints a table and writes ``benchmarks/results/moe.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    # the reference point: hidden 1024, 8 layers, top-4, ~1.8 GB bf16
    "reference": {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 4, "experts": 64, "top_k": 4,
                  "vocab": 32000, "intermediate": 2816, "moe_intermediate": 512, "init_std": 0.02},
    "medium": {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 4, "experts": 16, "top_k": 4,
               "vocab": 32000, "intermediate": 2816, "moe_intermediate": 512, "init_std": 0.02},
    "small": {"hidden": 256, "layers": 4, "heads": 8, "kv_heads": 2, "experts": 8, "top_k": 2,
              "vocab": 4096, "intermediate": 512, "moe_intermediate": 256, "init_std": 0.02},
}
RESULTS = Path(__file__).resolve().parent / "results" / "moe.json"
MARK = "BENCH_JSON "
REPEATS = 3


def log(msg: str) -> None:
    print(f"[bench_moe {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def checkpoint(size: str) -> Path:
    from tessera.launch.demo_moe import cache_dir
    from tessera.models.tiny_moe import build_tiny_moe

    return build_tiny_moe("qwen3_moe", cache_dir() / f"bench-qwen3-moe-{size}", dtype="bfloat16", **SIZES[size])


def prompt_ids(n: int, vocab: int) -> list[int]:
    import torch

    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()


# -- physical bound ------------------------------------------------------------------------


def bandwidth_gbs(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Streaming-read bandwidth: best of ``repeats`` sums over a ``mib`` MiB fp32 tensor."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = torch.ones(mib * (1 << 20) // 4)
        t.sum()
        best = float("inf")
        for _ in range(repeats):
            s = time.perf_counter()
            t.sum()
            best = min(best, time.perf_counter() - s)
        return t.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(old)


def decode_bytes_per_token(arch, bytes_per_param: int = 2) -> int:
    """Weight bytes one decoded token (batch 1) reads: everything dense plus top-k experts per MoE layer."""
    from tessera.models.loader import expected_shape, layer_param_names

    def numel(name):
        n = 1
        for d in expected_shape(arch, name):
            n *= d
        return n

    total = numel("lm_head") + numel("final_norm") + arch.hidden_size  # + one embedding row
    for layer in range(arch.num_layers):
        total += sum(numel(n) for n in layer_param_names(arch, layer))
        if arch.moe_layers[layer]:
            total += arch.top_k * 3 * arch.moe_intermediate * arch.hidden_size
    return total * bytes_per_param


# -- transformers baselines (run in their own processes) ------------------------------------


class _Stamps:
    """A logits processor that only records when generate reaches it (once per forward)."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def __call__(self, input_ids, scores):
        self.t.append(time.perf_counter())
        return scores


def hf_worker(args) -> None:
    """One transformers process (alone, or one rank under torchrun); rank 0 prints the figures.

    Decode rate: tokens after the first over the time between the forward that
    produced the first token and the last one (timestamps from a logits
    processor), so prefill never enters it.
    """
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    torch.set_num_threads(args.threads)
    kwargs = {"dtype": torch.bfloat16}
    if args.tp > 1:
        from transformers import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(tp_size=args.tp, ep_size=args.ep)
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs).eval()
    ids = torch.tensor([prompt_ids(args.prompt_len, model.config.vocab_size)])
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=2, min_new_tokens=2, **gen)  # warm-up
        prefill = float("inf")
        for _ in range(2):
            s = time.perf_counter()
            model(ids)
            prefill = min(prefill, time.perf_counter() - s)
        decode = 0.0
        for _ in range(REPEATS):  # best of REPEATS: other jobs on the machine only ever slow a run down
            stamps = _Stamps()  # one timestamp per forward: the first after prefill, then one per decode step
            model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           logits_processor=LogitsProcessorList([stamps]), **gen)
            decode = max(decode, (len(stamps.t) - 1) / (stamps.t[-1] - stamps.t[0]))
    if int(os.environ.get("RANK", "0")) == 0:
        print(MARK + json.dumps({"prefill_tok_s": args.prompt_len / prefill, "decode_tok_s": decode}), flush=True)


def run_hf(model: Path, procs: int, tp: int, ep: int, threads: int, prompt_len: int, new_tokens: int) -> dict:
    base = ["-m", "tessera.benchmarks.bench_moe", "--hf-worker", "--model", str(model), "--tp", str(tp), "--ep", str(ep),
            "--threads", str(threads), "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens)]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"] + base
    else:
        cmd = [sys.executable] + base
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"transformers baseline {cmd} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")


# -- tessera -----------------------------------------------------------------------------


def run_tessera(model: Path, degrees: dict, prompt_len: int, new_tokens: int) -> dict:
    from tessera.memory.placement import Placement
    from tessera.config import ParallelPlan
    from tessera.runtime.controller import Controller
    from tessera.runtime.llm.engine import LLMEngine, SamplingParams

    with Controller(Placement(ParallelPlan(degrees))) as ctl:
        engine = LLMEngine.load(ctl, model, dtype="bfloat16", stop_at_eos=False, max_model_len=prompt_len + new_tokens + 8,
                                max_num_seqs=1)
        ids = prompt_ids(prompt_len, engine.arch.vocab_size)
        engine.generate(ids[:8], SamplingParams(max_new_tokens=4))  # warm-up
        prefill = float("inf")
        for _ in range(2):
            before = dict(engine.stats())
            engine.generate(ids, SamplingParams(max_new_tokens=1))
            after = engine.stats()
            prefill = min(prefill, after["prefill_s"] - before["prefill_s"])
        decode = 0.0
        for _ in range(REPEATS):  # best of REPEATS, as for transformers
            before = dict(engine.stats())
            engine.generate(ids, SamplingParams(max_new_tokens=new_tokens))
            after = engine.stats()
            decode = max(decode, (after["decode_tokens"] - before["decode_tokens"]) / (after["decode_s"] - before["decode_s"]))
        result = {"prefill_tok_s": prompt_len / prefill, "decode_tok_s": decode,
                  "load_s": engine.load_s, "arch": engine.arch}
        engine.close()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="medium")
    p.add_argument("--plans", default="tp=2;ep=2", help="tessera plans, ';'-separated (e.g. 'tp=2;ep=2;tp=2,ep=2')")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--skip-hf", action="store_true", help="skip the transformers baselines")
    p.add_argument("--out", type=Path, default=None,
                   help="results file (default benchmarks/results/moe.json; moe_<size>.json for other sizes)")
    p.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hf_worker:
        hf_worker(args)
        return 0

    import ray

    from tessera.config import ParallelPlan

    model = checkpoint(args.size)
    log(f"checkpoint {model} ({sum(f.stat().st_size for f in model.glob('*.safetensors')) / 1e9:.2f} GB)")
    bw = {n: bandwidth_gbs(n) for n in (1, 2)}
    log(f"streaming-read bandwidth: 1 thread {bw[1]:.1f} GB/s, 2 threads {bw[2]:.1f} GB/s")
    rows = []
    hf_one = {}
    if not args.skip_hf:
        for threads in (1, 2):
            log(f"transformers one process, {threads} thread(s)")
            hf_one[threads] = run_hf(model, 1, 1, 1, threads, args.prompt_len, args.new_tokens)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        for text in args.plans.split(";"):
            plan = ParallelPlan.parse(text)
            degrees = dict(plan.degrees)
            log(f"tessera {plan} on {plan.world_size} workers x 1 thread")
            ours = run_tessera(model, degrees, args.prompt_len, args.new_tokens)
            arch = ours.pop("arch")
            per_token = decode_bytes_per_token(arch)
            row = {"plan": str(plan), "processes": plan.world_size, "tessera": ours,
                   "decode_bytes_per_token": per_token,
                   "bandwidth_gbs": bw[min(plan.world_size, 2)],
                   "decode_fraction_of_bound": per_token * ours["decode_tok_s"] / (bw[min(plan.world_size, 2)] * 1e9)}
            tp, ep = plan.degree("tp"), plan.degree("ep")
            if not args.skip_hf and plan.degree("pp") == 1 and tp == plan.world_size:
                # DistributedConfig needs ep_size a multiple of tp_size: tp=N, or tp=N with ep=N.
                log(f"transformers DistributedConfig(tp_size={tp}, ep_size={ep}) under torchrun x {plan.world_size}")
                hf = run_hf(model, plan.world_size, tp, ep, 1, args.prompt_len, args.new_tokens)
            elif not args.skip_hf and plan.degree("pp") == 1 and ep == plan.world_size:
                log(f"transformers DistributedConfig(tp_size={ep}, ep_size={ep}) under torchrun x {plan.world_size}")
                hf = run_hf(model, plan.world_size, ep, ep, 1, args.prompt_len, args.new_tokens)
            else:
                hf = None
            if hf:
                row["transformers_distributed"] = hf
                row["ratio_vs_distributed"] = {k: ours[k] / hf[k] for k in ("prefill_tok_s", "decode_tok_s")}
            if hf_one:
                row["ratio_vs_one_process"] = {f"{t}_threads": {k: ours[k] / v[k] for k in ("prefill_tok_s", "decode_tok_s")}
                                               for t, v in hf_one.items()}
            rows.append(row)
    finally:
        ray.shutdown()

    print(f"\n{'plan':<10} {'prefill tok/s':>14} {'decode tok/s':>13} {'HF dist decode':>15} {'ratio':>6} "
          f"{'MB/token':>9} {'of bound':>9}")
    for r in rows:
        hf = r.get("transformers_distributed", {})
        ratio = r.get("ratio_vs_distributed", {}).get("decode_tok_s")
        print(f"{r['plan']:<10} {r['tessera']['prefill_tok_s']:>14.1f} {r['tessera']['decode_tok_s']:>13.1f} "
              f"{hf.get('decode_tok_s', float('nan')):>15.1f} {ratio if ratio else float('nan'):>6.2f} "
              f"{r['decode_bytes_per_token'] / 1e6:>9.1f} {r['decode_fraction_of_bound']:>9.0%}")
    for t, v in hf_one.items():
        print(f"transformers 1 process x {t} thread(s): prefill {v['prefill_tok_s']:.1f} tok/s, decode {v['decode_tok_s']:.1f} tok/s")
    out = {"size": args.size, "config": SIZES[args.size], "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "bandwidth_gbs": bw,
           "transformers_one_process": {f"{t}_threads": v for t, v in hf_one.items()}, "plans": rows,
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = args.out or (RESULTS if args.size == "medium" else RESULTS.with_name(f"moe_{args.size}.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
