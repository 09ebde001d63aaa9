"""Image serving benchmark: request batching in ``tessera serve`` against one-at-a-time and diffusers, in one run.

Run: ``python -m tessera.benchmarks.bench_serve_images [--requests 8] [--size 64] [--steps 4] [--repeats 3]``.

The same tiny PixArt checkpoint on the same 2 cores, ``--requests`` distinct prompts (one image each, seeds
0..n-1), measured as images per second of wall time:

- diffusers in one process with 2 threads (the fair single-process peer): one pipeline call per request, and
  all requests in one call (a batch of ``n`` prompts with one generator per image: what a perfect batcher gets);
- tessera's Python API (plan sp=2, two one-thread workers), one request at a time;
- ``tessera serve`` (same plan) with ``--max-image-batch 1`` (every request alone) at 4 concurrent clients, and
  with the default batching (8, exact: each image with the bits it has alone) at 1, 4 and 8 concurrent clients,
  and with ``--image-batching fast`` (one forward per batch) at 4 and 8. Clients post ``/v1/images/generations``
  over HTTP; a client sends its next request when its last one returns (closed loop).

Each figure is the median of ``--repeats`` runs with the spread (min..max); the load average is recorded before
and after each, and figures taken with a 1-minute load above the core count are labelled ``under_load``.
Writes ``benchmarks/results/serve_images.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import Any, Callable

from tessera.benchmarks._common import print_table, write_result

PROMPTS = ["a red square", "a blue ball on grass", "a cat", "a lighthouse at dusk", "a green tree",
           "a bowl of fruit", "a city street in rain", "a mountain lake", "an old car", "a sailing boat",
           "a snowy forest", "a cup of coffee"]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def prompt(i: int) -> str:
    return f"{PROMPTS[i % len(PROMPTS)]} {i}"


def repeated(fn: Callable[[], float], repeats: int) -> dict[str, Any]:
    """``fn`` returns images/s; the median and spread over ``repeats`` runs, with the load around each."""
    runs = []
    for _ in range(repeats):
        before = loadavg()
        rate = fn()
        after = loadavg()
        runs.append({"images_per_s": rate, "load_before": before, "load_after": after})
    rates = [r["images_per_s"] for r in runs]
    cores = os.cpu_count() or 1
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": runs,
            "under_load": any(max(r["load_before"][0], r["load_after"][0]) > cores for r in runs)}


def diffusers_rates(model_dir: str, n: int, size: int, steps: int, guidance: float, repeats: int) -> dict[str, Any]:
    import torch
    from diffusers import DiffusionPipeline

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pipe = DiffusionPipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        kw = dict(num_inference_steps=steps, height=size, width=size, guidance_scale=guidance,
                  use_resolution_binning=False, output_type="pil", clean_caption=False)
        pipe("warm up", **kw)

        def one_by_one() -> float:
            t0 = time.perf_counter()
            for i in range(n):
                pipe(prompt(i), generator=torch.Generator().manual_seed(i), **kw)
            return n / (time.perf_counter() - t0)

        def one_batch() -> float:
            t0 = time.perf_counter()
            pipe([prompt(i) for i in range(n)], generator=[torch.Generator().manual_seed(i) for i in range(n)], **kw)
            return n / (time.perf_counter() - t0)

        return {"one_by_one": repeated(one_by_one, repeats), "one_batch": repeated(one_batch, repeats)}
    finally:
        torch.set_num_threads(before)


def python_api_rate(model_dir: str, n: int, size: int, steps: int, guidance: float, repeats: int) -> dict[str, Any]:
    import tessera

    with tessera.launch(model_dir, plan={"sp": 2}, engine_options={"progress": False}) as handle:
        handle.generate_images(["warm up"], steps=steps, height=size, width=size, guidance_scale=guidance)

        def one_by_one() -> float:
            t0 = time.perf_counter()
            for i in range(n):
                handle.generate_images([prompt(i)], steps=steps, height=size, width=size, seed=i,
                                       guidance_scale=guidance)
            return n / (time.perf_counter() - t0)

        return repeated(one_by_one, repeats)


def server_rates(model_dir: str, n: int, size: int, steps: int, guidance: float, repeats: int, max_image_batch: int,
                 clients: list[int], image_batching: str = "exact") -> dict[str, Any]:
    import httpx

    import tessera
    from tessera.launch.local_cluster import free_ports

    body = {"size": f"{size}x{size}", "steps": steps, "guidance_scale": guidance}
    server = tessera.serve(model_dir, plan={"sp": 2}, port=free_ports(1)[0], engine_options={"progress": False},
                           max_image_batch=max_image_batch, image_batching=image_batching)
    out: dict[str, Any] = {"max_image_batch": max_image_batch, "image_batching": image_batching}
    try:
        url = f"{server.url}/v1/images/generations"
        httpx.post(url, json={**body, "prompt": "warm up"}, timeout=300).raise_for_status()

        def closed_loop(c: int) -> float:
            async def main() -> float:
                todo = list(range(n))
                async with httpx.AsyncClient(timeout=600) as http:
                    async def client():
                        while todo:
                            i = todo.pop(0)
                            r = await http.post(url, json={**body, "prompt": prompt(i), "seed": i})
                            r.raise_for_status()

                    t0 = time.perf_counter()
                    await asyncio.gather(*(client() for _ in range(c)))
                    return n / (time.perf_counter() - t0)

            return asyncio.run(main())

        before = server.stats()
        for c in clients:
            out[f"{c}_clients"] = repeated(lambda c=c: closed_loop(c), repeats)
        after = server.stats()
        out["batches"] = after["batches"] - before["batches"]
        out["requests"] = after["requests_finished"] - before["requests_finished"]
    finally:
        server.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=8, help="requests (one image each) per measurement")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from tessera.launch.demo_moe import cache_dir
    from tessera.models.tiny_diffusion import build_tiny_diffusion

    model_dir = str(build_tiny_diffusion("pixart", cache_dir() / "bench-serve-pixart"))
    shape = (args.requests, args.size, args.steps, args.guidance, args.repeats)
    print(f"load {loadavg()}: diffusers", flush=True)
    peer = diffusers_rates(model_dir, *shape)
    print(f"load {loadavg()}: tessera Python API", flush=True)
    api = python_api_rate(model_dir, *shape)
    print(f"load {loadavg()}: tessera serve, every request alone", flush=True)
    alone = server_rates(model_dir, *shape, max_image_batch=1, clients=[4])
    print(f"load {loadavg()}: tessera serve, batching", flush=True)
    batched = server_rates(model_dir, *shape, max_image_batch=8, clients=[1, 4, 8])
    print(f"load {loadavg()}: tessera serve, fast batching", flush=True)
    fast = server_rates(model_dir, *shape, max_image_batch=8, clients=[4, 8], image_batching="fast")

    rows = [("diffusers 2 threads, one request per call", peer["one_by_one"]),
            ("diffusers 2 threads, all requests in one call", peer["one_batch"]),
            ("tessera Python API sp=2, one at a time", api),
            ("tessera serve --max-image-batch 1, 4 clients", alone["4_clients"])]
    rows += [(f"tessera serve (exact batching), {c} client{'s' if c > 1 else ''}", batched[f"{c}_clients"])
             for c in (1, 4, 8)]
    rows += [(f"tessera serve --image-batching fast, {c} clients", fast[f"{c}_clients"]) for c in (4, 8)]
    print_table(f"images/s, tiny PixArt {args.size}x{args.size}, {args.steps} steps, {args.requests} requests, "
                f"median of {args.repeats}", ["system", "images/s", "spread", "under load"],
                [[name, r["median"], f"{r['min']:.2f}-{r['max']:.2f}", "yes" if r["under_load"] else "no"]
                 for name, r in rows])
    ratios = {
        "serve_batching_4_clients_vs_serve_alone_4_clients": batched["4_clients"]["median"] / alone["4_clients"]["median"],
        "serve_batching_4_clients_vs_python_api": batched["4_clients"]["median"] / api["median"],
        "serve_batching_8_clients_vs_diffusers_one_by_one": batched["8_clients"]["median"] / peer["one_by_one"]["median"],
        "serve_batching_8_clients_vs_diffusers_one_batch": batched["8_clients"]["median"] / peer["one_batch"]["median"],
        "serve_fast_4_clients_vs_serve_alone_4_clients": fast["4_clients"]["median"] / alone["4_clients"]["median"],
        "serve_fast_8_clients_vs_serve_exact_8_clients": fast["8_clients"]["median"] / batched["8_clients"]["median"],
    }
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    write_result("serve_images", {"model": "tiny pixart", "plan": "sp=2", "size": args.size, "steps": args.steps,
                                  "guidance": args.guidance, "requests": args.requests, "repeats": args.repeats,
                                  "diffusers_2_threads": peer, "python_api": api, "serve_alone": alone,
                                  "serve_batching": batched, "serve_fast_batching": fast, "ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
