"""Every MoE family on one GPU, in-process (no Ray), against transformers on the same GPU.

fp32: prefill logits within 1e-4 of transformers and greedy tokens identical (TF32 off on both).

bf16 (a checkpoint with bf16 weights): two implementations round their arithmetic differently,
and on a random tiny model a router near-tie then picks different experts in one of them, which
moves that token's logits by O(1) and, through attention, the rest of its prompt. So bf16 is
checked against transformers' fp32 run of the same bf16 weights (the truth), with transformers'
own bf16 error as the yardstick, at stated tolerances:

- logits: the median error (max over the vocabulary, per position) is at most 1.5x transformers'
  own bf16 median error + 0.01, and the prompts with a position off by more than ``BF16_TOL``
  (0.125: 8 bf16 ulps at the logits' magnitude of 2-4; a router flip spoils the rest of its
  prompt) are at most transformers' own count + max(2, 1/6 of the prompts); directly, tessera's
  and transformers' bf16 logits differ by at most ``BF16_TOL / 2`` at the median position;
- greedy: identical to transformers' tokens for ``STEPS`` steps, on the prompts (of a fixed seeded
  set) whose greedy choices are decisive in fp32: every step's top-1 vs top-2 margin >= ``MARGIN``.
  The prompts are chosen from transformers' fp32 run alone, never from tessera's output.

Also checked on the device: weights live on the GPU, no oneDNN-packed (CPU-only) weight is used,
prefill attention goes through SDPA, and the one-rank process group has NCCL.
Run with ``pytest -m gpu``; skipped without CUDA (``TESSERA_GPU_TESTS_DEVICE=cpu`` runs the same
code on the CPU, to check the tests themselves).
"""

from __future__ import annotations


import pytest
import torch

from tessera.models.tiny_moe import build_tiny_moe
from tessera.tests.gpu_testing import DEVICE, full_fp32_matmuls, gpu_controller  # noqa: F401 - fixtures

pytestmark = pytest.mark.gpu

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")
PROMPTS = ([5, 7, 9, 11, 13, 17, 19], [3, 1, 4, 1, 5])
STEPS = 4
FP32_TOL = 1e-4
BF16_TOL = 0.125
MARGIN = 0.1  # fp32 top-1 minus top-2 logit: 3-5x the typical bf16 logit error (~0.02-0.03)
OPTS = dict(stop_at_eos=False, max_model_len=64, block_size=4)


def _hf(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(DEVICE).eval()


@torch.no_grad()
def _hf_logits(model, prompt) -> torch.Tensor:
    return model(torch.tensor([prompt], device=DEVICE)).logits[0].float().cpu()


@torch.no_grad()
def _hf_greedy(model, prompt, steps: int = STEPS) -> tuple[list[int], float]:
    """Greedy tokens and the smallest top-1 vs top-2 logit margin over the steps."""
    out = model.generate(torch.tensor([prompt], device=DEVICE), max_new_tokens=steps, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    margins = [float(s[0].float().topk(2).values.diff().abs()) for s in out.logits]
    return out.sequences[0, len(prompt):].tolist(), min(margins)


def _load(ctl, path, dtype):
    from tessera.runtime.llm.engine import LLMEngine

    return LLMEngine.load(ctl, path, dtype=dtype, **OPTS)


def _greedy(engine, prompts, steps: int = STEPS) -> list[list[int]]:
    from tessera.runtime.llm.engine import SamplingParams

    return [r.token_ids for r in engine.generate([list(p) for p in prompts], SamplingParams(max_new_tokens=steps))]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An fp32 and a bf16 checkpoint per family (bf16 weights: the fp32 truth then differs from a bf16 run
    only by how the arithmetic rounds, not by rounded weights)."""
    root = tmp_path_factory.mktemp("gpu-moe")
    return {(f, dt): build_tiny_moe(f, root / f"{f}-{dt}", dtype=dt) for f in FAMILIES for dt in ("float32", "bfloat16")}


def _stage(worker, key):

    return worker.engines[key].stage


def _placement_facts(worker, key):
    """Where the loaded model's tensors are and whether any is oneDNN-packed."""
    stage = _stage(worker, key)
    tensors = [t for p in stage.params.values() for t in p.values()] + list(stage.globals.values())
    for layer in stage.layers:
        for e in stage.experts.local_experts(layer):
            tensors += list(stage.experts.get(layer, [e])[0])
    return {"devices": sorted({t.device.type for t in tensors}), "packed": sum(t.is_mkldnn for t in tensors),
            "kv_device": stage.cache.device.type, "backend": str(torch.distributed.get_backend())}


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_matches_transformers(gpu_controller, checkpoints, family):
    path = checkpoints[(family, "float32")]
    hf = _hf(path, torch.float32)
    engine = _load(gpu_controller, path, "float32")
    try:
        (facts,) = gpu_controller.collective_rpc(_placement_facts, args=(engine.key,))
        assert facts["devices"] == [DEVICE] and facts["kv_device"] == DEVICE and facts["packed"] == 0
        for prompt in PROMPTS:
            diff = (engine.score(prompt) - _hf_logits(hf, prompt)).abs().max().item()
            assert diff <= FP32_TOL, f"{family}: fp32 prefill logits differ from transformers by {diff:.2e}"
        assert _greedy(engine, PROMPTS) == [_hf_greedy(hf, p)[0] for p in PROMPTS]
    finally:
        engine.close()


def _candidate_prompts(n: int = 22, length: int = 8) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(3, 128, (length,), generator=g).tolist() for _ in range(n)] + [list(p) for p in PROMPTS]


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_matches_transformers_within_bf16_tolerance(gpu_controller, checkpoints, family):
    path = checkpoints[(family, "bfloat16")]
    hf32, hf16 = _hf(path, torch.float32), _hf(path, torch.bfloat16)
    engine = _load(gpu_controller, path, "bfloat16")
    try:
        (facts,) = gpu_controller.collective_rpc(_placement_facts, args=(engine.key,))
        assert facts["devices"] == [DEVICE] and (facts["packed"] == 0 or DEVICE == "cpu")  # CPU bf16 packs
        prompts = _candidate_prompts()
        ours, theirs, between = [], [], []
        for prompt in prompts:
            truth, mine, hf_bf16 = _hf_logits(hf32, prompt), engine.score(prompt), _hf_logits(hf16, prompt)
            ours.append((mine - truth).abs().amax(-1))
            theirs.append((hf_bf16 - truth).abs().amax(-1))
            between.append((mine - hf_bf16).abs().amax(-1))
        flipped_ours = sum(bool((e > BF16_TOL).any()) for e in ours)
        flipped_theirs = sum(bool((e > BF16_TOL).any()) for e in theirs)
        assert flipped_ours <= flipped_theirs + max(2, len(prompts) // 6), (
            f"{family}: {flipped_ours} of {len(prompts)} prompts have a position off by more than {BF16_TOL} from fp32, "
            f"transformers' bf16 {flipped_theirs} (worst per prompt: {[round(e.max().item(), 3) for e in ours]}; "
            f"transformers: {[round(e.max().item(), 3) for e in theirs]})")
        ours, theirs, between = torch.cat(ours), torch.cat(theirs), torch.cat(between)
        assert ours.median() <= 1.5 * theirs.median() + 0.01, (
            f"{family}: median bf16 error {ours.median():.4f} vs transformers' {theirs.median():.4f}")
        assert between.median() <= BF16_TOL / 2, (
            f"{family}: tessera's and transformers' bf16 logits differ by {between.median():.4f} (median over positions)")
        decisive = []
        for prompt in prompts:
            tokens, margin = _hf_greedy(hf32, prompt)
            if margin >= MARGIN:
                decisive.append((prompt, tokens))
        assert len(decisive) >= 3, f"{family}: only {len(decisive)} prompts with decisive greedy steps; use more"
        decisive = decisive[:4]
        got = _greedy(engine, [p for p, _ in decisive])
        assert got == [t for _, t in decisive], f"{family}: bf16 greedy tokens differ on decisive prompts"
    finally:
        engine.close()


def test_prefill_attention_runs_through_sdpa(gpu_controller, checkpoints, monkeypatch):
    import torch.nn.functional as F

    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        calls.append((q.device.type, q.dtype, q.shape[-2]))
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    engine = _load(gpu_controller, checkpoints[("qwen3_moe", "bfloat16")], "bfloat16")
    try:
        engine.score(PROMPTS[0])
    finally:
        engine.close()
    layers = 2
    assert calls == [(DEVICE, torch.bfloat16, len(PROMPTS[0]))] * layers


def test_one_rank_group_has_nccl_and_the_mesh_checks_out(gpu_controller):
    from tessera.runtime.diagnostics import check_mesh

    (info,) = gpu_controller.describe()
    assert info.device == ("cuda:0" if DEVICE == "cuda" else "cpu")
    if DEVICE == "cuda":
        assert "nccl" in gpu_controller.backend
    results, failures = check_mesh(gpu_controller, payload_bytes=1 << 16)
    assert failures == [] and list(results[0]["dims"]) == ["dp"]
