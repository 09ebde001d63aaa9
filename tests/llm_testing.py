"""Shared helpers for the MoE / LLM tests: tiny checkpoints, transformers references, the one-rank controller.

Not a test module (no ``test_`` prefix); test modules import the fixtures from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tessera.memory.placement import Placement
from tessera.models.tiny_moe import build_tiny_moe
from tessera.config import ParallelPlan

PROMPTS = ([5, 7, 9, 11, 13, 17, 19], [3, 1, 4, 1, 5])
NEW_TOKENS = 6
# name -> (family, size overrides)
MODELS = {
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "deepseek_v2": ("deepseek_v2", {}),
    "deepseek_v3": ("deepseek_v3", {}),
    "qwen3_kv1": ("qwen3_moe", {"kv_heads": 1}),  # fewer kv heads than tp ranks
    "mixtral_2e": ("mixtral", {"experts": 2, "layers": 3}),  # fewer experts than ep ranks: slicing
}


@dataclass
class Reference:
    path: Path
    logits: torch.Tensor  # [len(prompts[0]), vocab]
    greedy: list[list[int]]  # per prompt, NEW_TOKENS tokens
    prompts: tuple[list[int], ...] = PROMPTS


def _reference(path: Path, prompts: tuple[list[int], ...] = PROMPTS) -> Reference:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0]])).logits[0].float()
        greedy = []
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            greedy.append(out[0, len(prompt):].tolist())
    return Reference(path, logits, greedy, prompts)


@pytest.fixture(scope="session")
def tiny_refs(session_tmp) -> dict[str, Reference]:
    """Every tiny model, built once per session, with its transformers reference outputs."""
    refs = {}
    for name, (family, size) in MODELS.items():
        path = build_tiny_moe(family, session_tmp / "moe" / name, **size)
        refs[name] = _reference(path)
    return refs


def check_against_reference(engine, ref: Reference, tol: float = 1e-4) -> None:
    """Prefill logits within ``tol`` and greedy tokens identical (both prompts in one batch)."""
    from tessera.runtime.llm.engine import SamplingParams

    logits = engine.score(ref.prompts[0])
    diff = (logits - ref.logits).abs().max().item()
    assert diff <= tol, f"prefill logits differ from transformers by {diff:.3e} (> {tol})"
    results = engine.generate(list(ref.prompts), SamplingParams(max_new_tokens=NEW_TOKENS))
    assert [r.token_ids for r in results] == ref.greedy
    assert all(r.finish_reason == "length" for r in results)


@pytest.fixture(scope="session")
def local_controller():
    """The runtime's one-rank in-process controller (no Ray) on the CPU, shared by the session.

    Lets the single-rank plan (tp = ep = pp = 1) and the engine's request handling be
    tested cheaply; every multi-rank test uses real workers from ``make_controller``.
    """
    from tessera.runtime.inprocess import InProcessController

    threads = torch.get_num_threads()
    ctl = InProcessController(Placement(ParallelPlan({}), device="cpu"), log_level="WARNING").start()
    torch.set_num_threads(threads)
    try:
        yield ctl
    finally:
        ctl.shutdown()
