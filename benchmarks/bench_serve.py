"""Serving benchmark: tessera serve against ``transformers serve`` (continuous batching), in one run.

Run: ``python -m tessera.benchmarks.bench_serve [--size medium|small] [--rates 0.5,1,2,4] [--requests 16]
[--repeats 3]``.

Both servers serve the same random Qwen3-MoE checkpoint (bf16, ``bench_moe``'s ``medium`` shape with a
tokenizer) on the same 2 cores: tessera with ``--plan`` (default tp=2: two workers, one thread each), and
``transformers serve MODEL --continuous-batching`` in one process with two threads (the fair peer of two
one-thread workers, docs/PLATFORM). Both are up for the whole run and idle while the other is measured; each
(rate, repeat) runs tessera then transformers back to back, so a change in the machine's load hits both.

The load is open-loop and bounded: for each rate, ``--requests`` streamed ``/v1/completions`` requests arrive
at Poisson times (seeded), with mixed prompt lengths (16-192 tokens) and output lengths (16-64 tokens), the
same requests for both servers, greedy. Per request: time to first token (first streamed text), time per output
token ((last - first) / (tokens - 1), tokens from the usage the server reports), errors. Per (system, rate):
output tokens/s over the span from the first arrival to the last completion, TTFT and TPOT p50/p99; across
repeats the median and the spread (min..max). Load averages are recorded before and after every
measurement; figures taken with a 1-minute load above the core count are labelled ``under_load``.

Images (request batching against one-at-a-time and diffusers) are ``bench_serve_images``.

Writes ``benchmarks/results/serve.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tessera.benchmarks._common import print_table, write_result

SIZES = {
    "medium": {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 4, "experts": 16, "top_k": 4,
               "vocab": 32000, "intermediate": 2816, "moe_intermediate": 512, "init_std": 0.02},
    "small": {"hidden": 256, "layers": 4, "heads": 8, "kv_heads": 2, "experts": 8, "top_k": 2,
              "vocab": 4096, "intermediate": 512, "moe_intermediate": 256, "init_std": 0.02},
}
REQUEST_TIMEOUT_S = 600.0


def log(msg: str) -> None:
    print(f"[bench_serve {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def checkpoint(size: str) -> Path:
    """The random checkpoint plus a word-level tokenizer covering its whole vocabulary.

    Why not the tiny BPE tokenizer: trained on a few sentences it has a few hundred tokens, so most ids a
    random 32000-token model samples would decode to nothing and a client could not see them arrive. Here
    every id is one word (``w123``): every generated token is streamed text, and a prompt of n words is n tokens.
    """
    from tessera.launch.demo_moe import cache_dir
    from tessera.models.tiny_moe import build_tiny_moe

    path = build_tiny_moe("qwen3_moe", cache_dir() / f"bench-serve-qwen3-moe-{size}", dtype="bfloat16",
                          **SIZES[size])
    if not (path / "tokenizer_config.json").is_file():
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, SIZES[size]["vocab"])}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.add_special_tokens(["<unk>", "<s>", "</s>"])
        tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>"}))
    return path


def workload(model_dir: Path, rate: float, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` requests: arrival offset (Poisson at ``rate``/s), a prompt of 16-192 tokens, 16-64 new tokens."""
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        length = rng.randint(16, 192)
        out.append({"at": t, "prompt": " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(length)),
                    "prompt_tokens": length, "max_tokens": rng.randint(16, 64)})
        t += rng.expovariate(rate)
    return out


# -- the load generator -------------------------------------------------------------------------------------


async def one_request(http, url: str, model: str, req: dict, start: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, start + req["at"] - time.perf_counter()))
    sent = time.perf_counter()
    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    first = last = None
    chunks, tokens, error = 0, None, None
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S) as resp:
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = str(chunk["error"])[:200]
                        break
                    if chunk.get("usage"):
                        tokens = chunk["usage"].get("completion_tokens", tokens)
                    for choice in chunk.get("choices") or []:
                        if choice.get("text"):
                            now = time.perf_counter()
                            first = first or now
                            last = now
                            chunks += 1
    except Exception as err:  # noqa: BLE001 - an error is a result
        error = f"{type(err).__name__}: {err}"[:200]
    done = time.perf_counter()
    tokens = tokens if tokens is not None else chunks  # a server without usage in streams: one token per chunk
    out: dict[str, Any] = {"sent": sent - start, "done": done - start, "tokens": tokens, "error": error}
    if first is not None and error is None:
        out["ttft_s"] = first - sent
        if tokens > 1 and last > first:
            out["tpot_s"] = (last - first) / (tokens - 1)
    return out


async def run_load(url: str, model: str, requests: list[dict]) -> list[dict[str, Any]]:
    import httpx

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=len(requests) + 4)) as http:
        start = time.perf_counter()
        return list(await asyncio.gather(*(one_request(http, url, model, r, start) for r in requests)))


def summarize_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    from tessera.benchmarks._common import percentile

    ok = [r for r in results if r["error"] is None]
    ttft = [r["ttft_s"] for r in ok if "ttft_s" in r]
    tpot = [r["tpot_s"] for r in ok if "tpot_s" in r]
    span = max((r["done"] for r in results), default=0.0) - min((r["sent"] for r in results), default=0.0)
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(results), "completed": len(ok), "errors": len(results) - len(ok),
        "error_examples": sorted({r["error"] for r in results if r["error"]})[:3],
        "output_tokens": tokens, "span_s": span,
        "throughput_tok_s": tokens / span if span > 0 else 0.0,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
    }


# -- the servers ----------------------------------------------------------------------------------------------


def start_tessera(model_dir: Path, plan: str, port: int):
    import tessera

    handle = tessera.serve(str(model_dir), plan=plan, port=port, served_model_name="bench", max_waiting=1024,
                           engine_options={"max_model_len": 512, "max_num_seqs": 32, "max_prefill_tokens": 256})
    return handle


def start_transformers(model_dir: Path, port: int, threads: int, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(model_dir), "--continuous-batching",
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "bfloat16"]
    out = open(log_path, "wb")
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, model: str, timeout_s: float, proc: subprocess.Popen | None = None) -> float:
    """Poll until one small completion succeeds; returns the seconds it took."""
    import httpx

    started = time.monotonic()
    last = ""
    while time.monotonic() - started < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "w5 w6 w7", "max_tokens": 4,
                                                          "temperature": 0}, timeout=120)
            if r.status_code == 200:
                return time.monotonic() - started
            last = f"HTTP {r.status_code} {r.text[:200]}"
        except httpx.HTTPError as err:
            last = f"{type(err).__name__}"
        time.sleep(1.0)
    raise TimeoutError(f"{url} not ready within {timeout_s:.0f}s: {last}")


def stop_process(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spread(values: list[float]) -> dict[str, float]:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# -- main -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="medium")
    p.add_argument("--plan", default="tp=2", help="tessera's plan (default tp=2: 2 workers x 1 thread)")
    p.add_argument("--threads", type=int, default=2, help="threads of the transformers serve process (default 2)")
    p.add_argument("--rates", default="0.5,1,2,4", help="request rates per second (comma-separated)")
    p.add_argument("--requests", type=int, default=16, help="requests per rate and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--systems", default="tessera,transformers")
    p.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/serve.json)")
    args = p.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    systems = args.systems.split(",")
    cores = os.cpu_count() or 1

    model_dir = checkpoint(args.size)
    log(f"checkpoint {model_dir} ({args.size}); load {loadavg()}")
    servers: dict[str, Any] = {}
    procs: list[subprocess.Popen] = []
    tessera_handle = None
    startup: dict[str, float] = {}
    try:
        if "tessera" in systems:
            t0 = time.monotonic()
            tessera_handle = start_tessera(model_dir, args.plan, free_port())
            startup["tessera_start_s"] = time.monotonic() - t0
            startup["tessera_first_request_s"] = wait_ready(tessera_handle.url, "bench", 600)
            servers["tessera"] = (tessera_handle.url, "bench")
            log(f"tessera serve ready at {tessera_handle.url} ({startup['tessera_start_s']:.1f}s)")
        if "transformers" in systems:
            port = free_port()
            log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-serve-transformers-{port}.log"
            t0 = time.monotonic()
            proc = start_transformers(model_dir, port, args.threads, log_path)
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            startup["transformers_first_request_s"] = wait_ready(url, str(model_dir), 900, proc)
            servers["transformers"] = (url, str(model_dir))
            log(f"transformers serve ready at {url} ({time.monotonic() - t0:.1f}s; log {log_path})")
        runs: dict[str, dict[str, list[dict]]] = {s: {str(r): [] for r in rates} for s in servers}
        for repeat in range(args.repeats):
            for rate in rates:
                reqs = workload(model_dir, rate, args.requests, seed=1000 * repeat + int(rate * 100))
                for name, (url, model) in servers.items():
                    before = loadavg()
                    results = asyncio.run(run_load(url, model, reqs))
                    summary = summarize_run(results)
                    summary.update(repeat=repeat, load_before=before, load_after=loadavg(),
                                   under_load=max(before[0], loadavg()[0]) > cores)
                    runs[name][str(rate)].append(summary)
                    log(f"{name:12s} rate {rate:4g}/s repeat {repeat}: {summary['throughput_tok_s']:7.1f} tok/s, "
                        f"TTFT p50 {summary['ttft_p50_s']:.2f}s p99 {summary['ttft_p99_s']:.2f}s, TPOT p50 "
                        f"{summary['tpot_p50_s'] * 1e3:.0f}ms p99 {summary['tpot_p99_s'] * 1e3:.0f}ms, "
                        f"errors {summary['errors']}, load {before} -> {summary['load_after']}")
    finally:
        for proc in procs:
            stop_process(proc)
        if tessera_handle is not None:
            tessera_handle.shutdown()

    table = []
    per_rate: dict[str, Any] = {}
    for rate in rates:
        entry: dict[str, Any] = {}
        for name in runs:
            rs = runs[name][str(rate)]
            entry[name] = {key: spread([r[key] for r in rs]) for key in
                           ("throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")}
            entry[name]["errors"] = sum(r["errors"] for r in rs)
            entry[name]["under_load"] = any(r["under_load"] for r in rs)
            entry[name]["runs"] = rs
        if "tessera" in entry and "transformers" in entry:
            t, h = entry["tessera"], entry["transformers"]
            entry["ratio_throughput"] = t["throughput_tok_s"]["median"] / max(1e-9, h["throughput_tok_s"]["median"])
            entry["ratio_tpot_p99"] = t["tpot_p99_s"]["median"] / max(1e-9, h["tpot_p99_s"]["median"])
        per_rate[str(rate)] = entry
        for name in runs:
            e = entry[name]
            table.append([f"{rate:g}", name, e["throughput_tok_s"]["median"],
                          f"{e['throughput_tok_s']['min']:.1f}-{e['throughput_tok_s']['max']:.1f}",
                          e["ttft_p50_s"]["median"], e["ttft_p99_s"]["median"], e["tpot_p50_s"]["median"] * 1e3,
                          e["tpot_p99_s"]["median"] * 1e3, e["errors"], "yes" if e["under_load"] else "no"])
    print_table(f"serving, {args.size} Qwen3-MoE, {args.requests} requests per rate, median of {args.repeats}",
                ["req/s", "system", "tok/s", "spread", "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms", "TPOT p99 ms",
                 "errors", "under load"], table)
    payload: dict[str, Any] = {
        "size": args.size, "config": SIZES[args.size], "tessera_plan": args.plan,
        "transformers_threads": args.threads, "rates": rates, "requests_per_rate": args.requests,
        "repeats": args.repeats, "startup": startup, "per_rate": per_rate,
    }
    path = args.out or None
    if path is None:
        write_result("serve", payload)
    else:
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
