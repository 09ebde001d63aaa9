"""Diffusion benchmark: patch-parallel speedup, bytes per step, stale-K/V quality, vs diffusers.

Run: ``python -m tessera.benchmarks.bench_diffusion`` (writes
``benchmarks/results/diffusion.json``). Everything is measured in one run on
one machine with one thread per worker:

1. speedup of sp=2 (exact and displaced) over one worker for a PixArt-shaped
   DiT at a latent size where compute dominates, against the ideal 2.0;
2. bytes handed to ``torch.distributed`` per step (counted at the call
   sites, all ranks summed) for exact, displaced, partial and Ulysses;
3. PSNR of displaced and partial against exact for warmup in {0, 1, 2, 4},
   on the final latents and on the decoded 8-bit images;
4. time per image of the diffusers pipeline in one process with 1 and 2
   threads against tessera sp=2, same steps and size;
5. a Flux transformer at 1024 tokens: seconds per forward of tessera sp=2
   (Ulysses and exact patches) against diffusers in one process (1 and 2
   threads) and diffusers' own context parallelism
   (``ContextParallelConfig(ulysses_degree=2)``, 2 processes, gloo). Both
   sides see the same sequence: 1024 image tokens and ``FLUX_TEXT_TOKENS``
   (64) text tokens (tessera's request sets ``max_sequence_length`` to it;
   left at Flux's default of 512 the tessera side did 5x the text work and
   looked slower than one diffusers process).

What is timed, on each side:

- per step (1. and 5.): tessera's engine runs the whole denoising loop on
  the workers (one rpc per image) and times every step there: transformer
  forward, the sp exchanges, the scheduler update; the slowest rank counts;
  the first step (one-off allocations) is dropped, the median of the rest is
  reported. The diffusers side is the median transformer forward on fixed
  inputs after one warm-up forward (for CP: rank 0's). So tessera's step
  carries a little more (the scheduler update), nothing less;
- per image (4.): wall time of one call on the driver, after one warm-up
  call, on both sides: prompt encoding, all steps, VAE decode and, for
  tessera, the image's trip from rank 0 to the driver.

The model is random (no weights ship on PyPI), so PSNR measures how far the
approximation moves the trajectory, not perceived quality.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tessera.memory.placement import Placement
from tessera.models.tiny_diffusion import build_tiny_diffusion, default_cache_dir
from tessera.config import ParallelPlan, Timeouts
from tessera.runtime.controller import Controller

RESULTS = Path(__file__).resolve().parent / "results" / "diffusion.json"
PROMPT = "a lighthouse on a cliff at dusk"
FLUX_TEXT_TOKENS = 64  # text sequence of the Flux comparison, the same for diffusers and tessera


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float | None = None) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    peak = float(b.max() - b.min()) if peak is None else peak
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


def _median_step(stats: dict, key: str = "step_seconds") -> float:
    steps = stats[key][1:] or stats[key]  # the first step includes one-off work
    return statistics.median(steps)


def _image_tensor(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.float64))


def run_engine(plan: dict, model_dir: Path, jobs: list[dict], timeouts: Timeouts) -> list[dict]:
    from tessera.runtime.diffusion.engine import DiffusionEngine

    out = []
    with Controller(Placement(ParallelPlan(plan)), timeouts=timeouts) as ctl:
        engine = DiffusionEngine.load(ctl, model_dir, progress=False)
        engine.generate_images(PROMPT, **{**jobs[0]["kw"], "steps": 2})  # warm: text encoder, VAE, allocator
        for job in jobs:
            started = time.perf_counter()
            images = engine.generate_images(PROMPT, **job["kw"])
            wall = time.perf_counter() - started
            last = engine.stats()["last"]
            out.append({"name": job["name"], "wall_s": wall, "median_step_s": _median_step(last),
                        "median_step_cpu_s": _median_step(last, "step_cpu_seconds"),
                        "sent_bytes_per_step": last["sent_bytes_per_step"], "latents": engine.last["latents"],
                        "image": _image_tensor(images[0])})
    return out


def diffusers_time(model_dir: Path, threads: int, steps: int, size: int, guidance: float, repeats: int) -> float:
    from diffusers import DiffusionPipeline

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(model_dir))
        pipe.set_progress_bar_config(disable=True)
        kw = dict(num_inference_steps=steps, height=size, width=size, guidance_scale=guidance,
                  use_resolution_binning=False, output_type="np")
        pipe(PROMPT, **{**kw, "num_inference_steps": 2})
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw)
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        torch.set_num_threads(before)


# -- Flux: tessera sp=2 against diffusers' own context parallelism ----------------------------


def _flux_inputs(model_dir: Path, side: int):
    import json as _json

    cfg = _json.loads((model_dir / "transformer" / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, side * side, cfg["in_channels"], generator=g)
    txt = torch.randn(1, FLUX_TEXT_TOKENS, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=g)
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None]
    return dict(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=torch.tensor([0.5]),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(FLUX_TEXT_TOKENS, 3), return_dict=False)


def _time_forwards(model, inputs, repeats: int) -> tuple[float, float]:
    """Median wall and median process CPU seconds of one forward (after one warm-up forward)."""
    times, cpu = [], []
    with torch.no_grad():
        model(**inputs)
        for _ in range(repeats):
            started, cpu_started = time.perf_counter(), time.process_time()
            model(**inputs)
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
    return statistics.median(times), statistics.median(cpu)


def _cp_worker(rank: int, world: int, model_dir: str, side: int, repeats: int, port: int, queue) -> None:
    """One process of diffusers' context-parallel Flux (gloo, 1 thread)."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    torch.accelerator.device_count = lambda: 1  # CPU-only torch reports 0 and diffusers refuses
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from diffusers import ContextParallelConfig, FluxTransformer2DModel

        model = FluxTransformer2DModel.from_pretrained(f"{model_dir}/transformer").eval()
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        seconds = _time_forwards(model, _flux_inputs(Path(model_dir), side), repeats)
        if rank == 0:
            queue.put(seconds)
    finally:
        dist.destroy_process_group()


def diffusers_context_parallel(model_dir: Path, side: int, repeats: int) -> tuple[float, float]:
    """Rank 0's median (wall, CPU) seconds per forward of diffusers' Ulysses context parallelism."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_cp_worker, args=(r, 2, str(model_dir), side, repeats, port, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    import queue as _queue

    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline:
            try:
                return queue.get(timeout=5)
            except _queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError("a diffusers context-parallel process failed; see its traceback above") from None
        raise TimeoutError("diffusers context-parallel run did not finish in 900 s")
    finally:
        for proc in procs:
            proc.join(timeout=60)


def _exchanges_through_gloo(worker) -> None:
    """On a worker: later exchanges of its groups go through gloo, not shared memory."""
    worker.use_backend_collectives()


def flux_comparison(args, timeouts: Timeouts) -> dict:
    """Per-forward time at ``side x side`` tokens: tessera sp=2 (Ulysses, exact) vs diffusers 1/2 threads and CP."""
    from diffusers import FluxTransformer2DModel

    from tessera.runtime.diffusion.engine import DiffusionEngine

    model_dir = build_tiny_diffusion("flux", default_cache_dir() / f"bench-flux-L{args.flux_layers}-D{args.flux_dim}",
                                     layers=args.flux_layers, heads=args.flux_dim // 32, head_dim=32)
    side = args.flux_tokens_side
    model = FluxTransformer2DModel.from_pretrained(str(model_dir / "transformer")).eval()
    params = sum(p.numel() for p in model.parameters())
    inputs = _flux_inputs(model_dir, side)
    out = {"params": params, "image_tokens": side * side}
    before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out[f"diffusers_{threads}thread_s"], out[f"diffusers_{threads}thread_cpu_s"] = _time_forwards(
            model, inputs, args.repeats)
    torch.set_num_threads(before)
    del model
    out["diffusers_cp2_s"], out["diffusers_cp2_cpu_s"] = diffusers_context_parallel(model_dir, side, args.repeats)
    pixels = side * 2 * 2  # 2x2 packing, VAE factor 2
    with Controller(Placement(ParallelPlan({"sp": 2})), timeouts=timeouts) as ctl:
        engine = DiffusionEngine.load(ctl, model_dir, progress=False)
        engine.generate_images(PROMPT, steps=2, height=pixels, width=pixels, guidance_scale=0.0, output="latent",
                               max_sequence_length=FLUX_TEXT_TOKENS)  # warm-up, as diffusers' first forward
        for transport in ("", "_gloo"):  # default (shared memory on one node where available), then gloo only
            if transport:
                ctl.collective_rpc(_exchanges_through_gloo)
            for mode in ("ulysses", "exact"):
                engine.generate_images(PROMPT, steps=args.repeats + 1, height=pixels, width=pixels,
                                       guidance_scale=0.0, mode=mode, output="latent",
                                       max_sequence_length=FLUX_TEXT_TOKENS)
                out[f"tessera_sp2_{mode}{transport}_s"] = _median_step(engine.stats()["last"])
                out[f"tessera_sp2_{mode}{transport}_cpu_s"] = _median_step(engine.stats()["last"], "step_cpu_seconds")
    base = out["diffusers_1thread_s"]
    for key in ("diffusers_2thread_s", "diffusers_cp2_s", "tessera_sp2_ulysses_s", "tessera_sp2_exact_s",
                "tessera_sp2_ulysses_gloo_s", "tessera_sp2_exact_gloo_s"):
        out[key[:-2] + "_speedup"] = base / out[key]
    # CPU seconds of one process (the busiest rank) per forward: the work split, unaffected by other jobs
    # waiting for the cores (a 2-thread process counts both threads, so it is left out). Through gloo a
    # rank that waits for its peer sleeps; through shared memory it spins, so there the wait counts too.
    for key in ("diffusers_cp2_cpu_s", "tessera_sp2_ulysses_cpu_s", "tessera_sp2_exact_cpu_s",
                "tessera_sp2_ulysses_gloo_cpu_s", "tessera_sp2_exact_gloo_cpu_s"):
        out[key[:-2] + "_split"] = out["diffusers_1thread_cpu_s"] / out[key]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (latent = size/2, tokens = (size/4)^2)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flux-layers", type=int, default=6, help="Flux blocks (half double-, half single-stream)")
    ap.add_argument("--flux-dim", type=int, default=512, help="Flux hidden size (heads of 64)")
    ap.add_argument("--flux-tokens-side", type=int, default=32, help="Flux image tokens per side (32 -> 1024)")
    ap.add_argument("--skip-flux", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import os

    import ray

    load_before = os.getloadavg()
    cache = default_cache_dir()
    model_dir = build_tiny_diffusion("pixart", cache / f"bench-pixart-L{args.layers}-H{args.heads}x{args.head_dim}",
                                     layers=args.layers, heads=args.heads, head_dim=args.head_dim)
    tokens = (args.size // 4) ** 2
    base = {"steps": args.steps, "height": args.size, "width": args.size, "guidance_scale": 1.0, "seed": 0}
    timeouts = Timeouts(worker_start_s=300, process_group_s=300, call_s=900)
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(num_cpus=8, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="tessera-bench-"),
                 log_to_driver=False)
    print(f"== diffusion bench: PixArt-shaped DiT, {args.layers} layers, {args.heads}x{args.head_dim} heads, "
          f"{args.size}px ({tokens} image tokens), {args.steps} steps, 1 thread per worker; "
          f"load average {load_before[0]:.1f} (2 cores: above ~2.5 other jobs share them)")
    try:
        single = run_engine({"sp": 1}, model_dir, [{"name": "exact", "kw": {**base, "mode": "exact"}}] * args.repeats,
                            timeouts)
        jobs = [{"name": "exact", "kw": {**base, "mode": "exact"}}] * args.repeats
        jobs += [{"name": "displaced-w1", "kw": {**base, "mode": "displaced", "warmup_steps": 1}}] * args.repeats
        jobs += [{"name": "ulysses", "kw": {**base, "mode": "ulysses"}}]
        for w in (0, 1, 2, 4):
            jobs.append({"name": f"displaced-w{w}", "kw": {**base, "mode": "displaced", "warmup_steps": w}})
            jobs.append({"name": f"partial-w{w}", "kw": {**base, "mode": "partial", "warmup_steps": w,
                                                          "partial_fraction": 0.25}})
        sp2 = run_engine({"sp": 2}, model_dir, jobs, timeouts)
        flux = None if args.skip_flux else flux_comparison(args, timeouts)
    finally:
        if own_ray:
            ray.shutdown()
    one_step = statistics.median(r["median_step_s"] for r in single)
    one_cpu = statistics.median(r["median_step_cpu_s"] for r in single)

    def pick(name):
        return [r for r in sp2 if r["name"] == name]

    exact_step = statistics.median(r["median_step_s"] for r in pick("exact"))
    disp_step = statistics.median(r["median_step_s"] for r in pick("displaced-w1"))
    exact_cpu = statistics.median(r["median_step_cpu_s"] for r in pick("exact"))
    speedup = {"one_worker_step_s": one_step, "sp2_exact_step_s": exact_step, "sp2_displaced_step_s": disp_step,
               "sp2_exact_speedup": one_step / exact_step, "sp2_displaced_speedup": one_step / disp_step, "ideal": 2.0,
               # CPU seconds of the busiest rank per step: how evenly the work splits, whatever else runs
               "one_worker_step_cpu_s": one_cpu, "sp2_exact_step_cpu_s": exact_cpu,
               "sp2_exact_cpu_split": one_cpu / exact_cpu}
    ref = pick("exact")[0]
    assert psnr(single[0]["latents"], ref["latents"]) > 60, "sp=2 exact must equal one worker"
    bytes_per_step = {}
    for name in ("exact", "displaced-w1", "partial-w1", "ulysses"):
        steps = pick(name)[0]["sent_bytes_per_step"]
        stale = steps[1:-1] if name.endswith("w1") else steps  # steady state: after warm-up, before the last step
        bytes_per_step[name] = {"steady_state": statistics.median(stale), "per_step": steps}
    quality = {}
    for w in (0, 1, 2, 4):
        for mode in ("displaced", "partial"):
            r = pick(f"{mode}-w{w}")[0]
            quality[f"{mode}-w{w}"] = {"psnr_latents_db": psnr(r["latents"], ref["latents"]),
                                      "psnr_image_db": psnr(r["image"], ref["image"], peak=255.0),
                                      "sent_bytes_total": sum(r["sent_bytes_per_step"])}
    tessera_image_s = statistics.median(r["wall_s"] for r in pick("exact"))
    baseline = {f"diffusers_{t}thread_s": diffusers_time(model_dir, t, args.steps, args.size, 1.0, args.repeats)
                for t in (1, 2)}
    baseline["tessera_sp2_exact_s"] = tessera_image_s
    baseline["tessera_sp2_displaced_s"] = statistics.median(r["wall_s"] for r in pick("displaced-w1"))
    for t in (1, 2):
        baseline[f"speedup_vs_diffusers_{t}thread"] = baseline[f"diffusers_{t}thread_s"] / tessera_image_s

    print(f"  one worker {one_step * 1e3:.0f} ms/step; sp=2 exact {exact_step * 1e3:.0f} ms/step "
          f"({speedup['sp2_exact_speedup']:.2f}x), displaced {disp_step * 1e3:.0f} ms/step "
          f"({speedup['sp2_displaced_speedup']:.2f}x); ideal 2.00x")
    print(f"  CPU s per step of the busiest rank: one worker {one_cpu * 1e3:.0f} ms, sp=2 exact {exact_cpu * 1e3:.0f} ms "
          f"({speedup['sp2_exact_cpu_split']:.2f}x)")
    print(f"  {'mode':<14} {'KiB/step (all ranks, steady state)':>36}")
    for name, b in bytes_per_step.items():
        print(f"  {name:<14} {b['steady_state'] / 1024:>36.1f}")
    print(f"  {'approx.':<14} {'PSNR latents dB':>16} {'PSNR image dB':>14} {'KiB total':>10}")
    for name, q in quality.items():
        print(f"  {name:<14} {q['psnr_latents_db']:>16.2f} {q['psnr_image_db']:>14.2f} {q['sent_bytes_total'] / 1024:>10.0f}")
    print(f"  time per image: diffusers 1 thread {baseline['diffusers_1thread_s']:.2f}s, 2 threads "
          f"{baseline['diffusers_2thread_s']:.2f}s; tessera sp=2 exact {tessera_image_s:.2f}s "
          f"({baseline['speedup_vs_diffusers_1thread']:.2f}x / {baseline['speedup_vs_diffusers_2thread']:.2f}x)")
    if flux is not None:
        print(f"  Flux {flux['params'] / 1e6:.0f}M params, {flux['image_tokens']} tokens, s per forward (speedup vs "
              f"diffusers 1 thread): diffusers 2 threads {flux['diffusers_2thread_s']:.2f} "
              f"({flux['diffusers_2thread_speedup']:.2f}x), diffusers CP ulysses=2 {flux['diffusers_cp2_s']:.2f} "
              f"({flux['diffusers_cp2_speedup']:.2f}x), tessera sp=2 Ulysses {flux['tessera_sp2_ulysses_s']:.2f} "
              f"({flux['tessera_sp2_ulysses_speedup']:.2f}x), exact patches {flux['tessera_sp2_exact_s']:.2f} "
              f"({flux['tessera_sp2_exact_speedup']:.2f}x)")
        print(f"  Flux CPU s per forward of the busiest process (1-thread diffusers / it): diffusers 1 thread "
              f"{flux['diffusers_1thread_cpu_s']:.2f}, diffusers CP {flux['diffusers_cp2_cpu_s']:.2f} "
              f"({flux['diffusers_cp2_cpu_split']:.2f}x), tessera Ulysses {flux['tessera_sp2_ulysses_cpu_s']:.2f} "
              f"({flux['tessera_sp2_ulysses_cpu_split']:.2f}x), exact {flux['tessera_sp2_exact_cpu_s']:.2f} "
              f"({flux['tessera_sp2_exact_cpu_split']:.2f}x)")
        print(f"  Flux tessera with exchanges through gloo only (no shared memory): Ulysses "
              f"{flux['tessera_sp2_ulysses_gloo_s']:.2f} s ({flux['tessera_sp2_ulysses_gloo_speedup']:.2f}x; CPU "
              f"{flux['tessera_sp2_ulysses_gloo_cpu_s']:.2f}), exact {flux['tessera_sp2_exact_gloo_s']:.2f} s "
              f"({flux['tessera_sp2_exact_gloo_speedup']:.2f}x; CPU {flux['tessera_sp2_exact_gloo_cpu_s']:.2f})")
    result = {
        "machine": "2-core CPU VM, gloo, 1 thread per worker",
        "load_avg_1_5_15": {"start": load_before, "end": os.getloadavg()},  # > ~2.5: other jobs shared the cores
        "model": {"family": "pixart", "layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
                  "image_px": args.size, "image_tokens": tokens, "steps": args.steps},
        "speedup": speedup, "bytes_per_step": bytes_per_step, "quality_vs_exact": quality,
        "vs_diffusers_time_per_image": baseline,
        "flux_vs_diffusers_context_parallel": flux,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"  wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
