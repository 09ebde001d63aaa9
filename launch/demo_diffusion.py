"""Demo section: a tiny random PixArt (or Flux) on 2 CPU workers with patch parallelism, to a PNG.

Builds the pipeline directory once under ``$TESSERA_CACHE`` (default
``~/.cache/tessera``), starts an sp=2 controller, runs the exact and the
displaced (DistriFusion) modes, prints per-step timing and bytes exchanged,
and writes the exact image as a PNG.
"""

from __future__ import annotations

import time
from pathlib import Path

from tessera.memory.placement import Placement
from tessera.models.tiny_diffusion import build_tiny_diffusion, default_cache_dir
from tessera.config import ParallelPlan, Timeouts
from tessera.runtime.controller import Controller


def demo_diffusion(family: str = "pixart", steps: int = 8, height: int = 64, width: int = 64,
                   out_dir: str | Path | None = None, timeouts: Timeouts | None = None) -> dict:
    """Run the section; returns the PNG path and timings (also printed)."""
    from tessera.runtime.diffusion.engine import DiffusionEngine

    cache = default_cache_dir()
    model_dir = build_tiny_diffusion(family, cache / f"tiny-{family}-diffusers")
    out = Path(out_dir) if out_dir is not None else cache / "demo"
    out.mkdir(parents=True, exist_ok=True)
    plan = ParallelPlan({"sp": 2})
    print(f"== diffusion: tiny random {family} ({model_dir}) on {plan.world_size} CPU workers as {plan}")
    with Controller(Placement(plan), timeouts=timeouts) as ctl:
        engine = DiffusionEngine.load(ctl, model_dir)
        guidance = 4.5 if family != "flux" else 0.0
        results = {}
        for mode in ("exact", "displaced"):
            started = time.perf_counter()
            images = engine.generate_images("a tessellated mosaic of a lighthouse", steps=steps, height=height,
                                            width=width, guidance_scale=guidance, mode=mode, warmup_steps=2, seed=0)
            wall = time.perf_counter() - started
            last = engine.stats()["last"]
            per_step = ", ".join(f"{s * 1e3:.0f}" for s in last["step_seconds"])
            kib = [b / 1024 for b in last["sent_bytes_per_step"]]
            print(f"  {mode:<9} {wall:6.2f}s for {steps} steps; per-step ms: {per_step}")
            print(f"  {'':<9} KiB sent per step (all ranks): {', '.join(f'{k:.0f}' for k in kib)}")
            results[mode] = {"seconds": wall, "step_seconds": last["step_seconds"], "image": images[0]}
        png = out / f"{family}-sp2-exact.png"
        results["exact"]["image"].save(png)
        print(f"  wrote {png} ({height}x{width})")
        engine.close()
    return {"png": str(png), **{m: {k: v for k, v in r.items() if k != "image"} for m, r in results.items()}}
