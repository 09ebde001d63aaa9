"""Demo section: a tiny random Qwen3-MoE generating with tp=2 x ep=2 on 4 CPU workers.

The checkpoint is built with transformers on first use (with a ``tokenizers``
tokenizer) and cached under ``$TESSERA_CACHE`` (default ``~/.cache/tessera``).
Prints where every shard landed and the measured prefill/decode tokens/s.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tessera.memory.placement import Placement
from tessera.config import ParallelPlan, Timeouts
from tessera.runtime.controller import Controller

DEMO_MODEL = {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "experts": 8, "top_k": 2, "vocab": 512,
              "intermediate": 256, "moe_intermediate": 128}
PROMPTS = ["the router sends every token", "a tessera is one tile of a mosaic", "paged attention keeps", "the quick brown fox"]


def cache_dir() -> Path:
    return Path(os.environ.get("TESSERA_CACHE", Path.home() / ".cache" / "tessera"))


def demo_moe(plan: ParallelPlan = ParallelPlan({"tp": 2, "ep": 2}), timeouts: Timeouts | None = None,
             max_new_tokens: int = 24) -> dict:
    """Build/cache the tiny Qwen3-MoE, generate on ``plan``, print placement and tokens/s."""
    from tessera.models.tiny_moe import build_tiny_moe
    from tessera.runtime.llm.engine import LLMEngine, SamplingParams

    started = time.perf_counter()
    path = build_tiny_moe("qwen3_moe", cache_dir() / "tiny-qwen3-moe", tokenizer=True, **DEMO_MODEL)
    print(f"== moe: tiny random Qwen3-MoE ({DEMO_MODEL['layers']} layers, {DEMO_MODEL['experts']} experts, "
          f"top-{DEMO_MODEL['top_k']}) at {path} ({time.perf_counter() - started:.1f}s), plan {plan}")
    with Controller(Placement(plan), timeouts=timeouts) as ctl:
        engine = LLMEngine.load(ctl, path, max_model_len=128, stop_at_eos=False)
        nodes = {info.rank: f"node {info.node_ip} pid {info.pid}" for info in ctl.describe()}
        print(f"  workers ready in {ctl.startup_timings.get('total_s', 0.0):.1f}s, model loaded in {engine.load_s:.2f}s")
        for rank, line in enumerate(engine.placement_report()):
            print(f"  {line} ({nodes.get(rank, '')})")
        sampling = [SamplingParams(max_new_tokens=max_new_tokens),
                    SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.9, seed=1)] * 2
        engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))  # warm-up (first-call costs)
        t0 = time.perf_counter()
        results = engine.generate(PROMPTS, sampling)
        wall = time.perf_counter() - t0
        stats = engine.stats()
        generated = sum(len(r.token_ids) for r in results)
        for r, prompt in zip(results[:2], PROMPTS):
            print(f"  {prompt!r} -> {r.text!r} ({len(r.token_ids)} tokens, {r.finish_reason})")
        print(f"  {len(results)} requests, {generated} tokens in {wall:.2f}s = {generated / wall:.1f} tokens/s "
              f"(prefill {stats['prefill_tok_s']:.0f} tok/s, decode {stats['decode_tok_s']:.1f} tok/s at batch "
              f"{len(results)}; random weights, so the text is noise)")
        engine.close()
    return {"tokens": generated, "wall_s": wall, "tokens_per_s": generated / wall,
            "prefill_tok_s": stats["prefill_tok_s"], "decode_tok_s": stats["decode_tok_s"]}


if __name__ == "__main__":
    demo_moe()
