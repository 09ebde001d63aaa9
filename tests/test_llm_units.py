"""Unit tests of the engine's pieces that need no workers: sampler, KV blocks and metadata,
scheduler admission, tensor-parallel slices, expert placement."""

from __future__ import annotations

import math

import pytest
import torch

from tessera.memory.kv_cache import BlockAllocator
from tessera.models.paged_attention import PagedKVCache, SeqSlice, build_metadata, paged_attention
from tessera.memory.expert_placement import ExpertPlacement
from tessera.parallel.tensor import kv_head_range, split_range, tp_slice, vocab_range
from tessera.config import ConfigError
from tessera.runtime.llm.engine import SamplingParams
from tessera.runtime.llm.sampler import SampleSpec, sample
from tessera.runtime.llm.scheduler import Request, Scheduler


def test_sampler_greedy_topk_topp_and_seed():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample(logits, [SampleSpec(0.0, 0, 1.0, 0, 0)]) == [1]
    # top_k=2 keeps ids 1 and 3 only
    draws = {sample(logits, [SampleSpec(1.0, 2, 1.0, s, 0)])[0] for s in range(40)}
    assert draws == {1, 3}
    # top_p just above p(1) keeps 1 and the next most likely (3)
    p = logits.softmax(-1)[0]
    draws = {sample(logits, [SampleSpec(1.0, 0, float(p[1]) + 1e-3, s, 0)])[0] for s in range(40)}
    assert draws == {1, 3}
    same = [sample(logits, [SampleSpec(2.0, 0, 1.0, 11, i)])[0] for i in range(10)]
    assert same == [sample(logits, [SampleSpec(2.0, 0, 1.0, 11, i)])[0] for i in range(10)]


def test_block_allocator_and_scheduler_reserve_and_free():
    alloc = BlockAllocator(num_blocks=6, block_size=4)
    sched = Scheduler(alloc, max_num_seqs=2, max_prefill_tokens=100, max_model_len=32)
    reqs = [Request(f"r{i}", [1] * 5, SamplingParams(max_new_tokens=4), 0, frozenset()) for i in range(3)]
    for r in reqs:
        sched.add(r)
    batch = sched.schedule()  # each needs ceil(9/4)=3 blocks: two fit, the third waits (slots and blocks)
    assert [s.request.request_id for s in batch] == ["r0", "r1"] and all(s.is_prefill for s in batch)
    assert alloc.num_free == 0 and len(sched.waiting) == 1
    for s in batch:
        s.request.output.append(7)
        s.request.num_computed = 5
    sched.finish(reqs[0], "stop")
    batch = sched.schedule()
    assert [(s.request.request_id, s.token_ids, s.start) for s in batch] == [("r1", (7,), 5), ("r2", (1,) * 5, 0)]


def test_paged_attention_matches_dense_causal_attention():
    torch.manual_seed(0)
    block, heads, kvh, d = 4, 4, 2, 8
    cache = PagedKVCache([0], num_blocks=8, block_size=block, heads=kvh, k_dim=d, v_dim=d, dtype=torch.float32)
    # seq A: 6 tokens of context already cached, 1 new; seq B: 5-token prefill; non-contiguous blocks
    tables = [(5, 1), (0, 7)]
    ka, va = torch.randn(7, kvh, d), torch.randn(7, kvh, d)
    kb, vb = torch.randn(5, kvh, d), torch.randn(5, kvh, d)
    pre = build_metadata([SeqSlice(0, 6, tables[0])], block)
    cache.write(0, ka[:6], va[:6], pre.slot_mapping)
    meta = build_metadata([SeqSlice(6, 1, tables[0]), SeqSlice(0, 5, tables[1])], block)
    assert meta.positions.tolist() == [6, 0, 1, 2, 3, 4]
    cache.write(0, torch.cat([ka[6:], kb]), torch.cat([va[6:], vb]), meta.slot_mapping)
    q = torch.randn(6, heads, d)
    keys, values = cache.gather(0, meta.key_slots)
    out = paged_attention(q, keys, values, meta, d ** -0.5)

    def dense(qs, k, v, offset):
        k, v = k.repeat_interleave(heads // kvh, 1), v.repeat_interleave(heads // kvh, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, k) * d ** -0.5
        mask = torch.arange(k.shape[0])[None, :] <= (torch.arange(qs.shape[0]) + offset)[:, None]
        return torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, -math.inf).softmax(-1), v)

    torch.testing.assert_close(out[:1], dense(q[:1], ka, va, 6))
    torch.testing.assert_close(out[1:], dense(q[1:], kb, vb, 0))
    # a decode-only step (one query per sequence) takes the fp32 matmul path
    decode = build_metadata([SeqSlice(6, 1, tables[0]), SeqSlice(4, 1, tables[1])], block)
    keys, values = cache.gather(0, decode.key_slots)
    q2 = torch.randn(2, heads, d)
    out2 = paged_attention(q2, keys, values, decode, d ** -0.5)
    torch.testing.assert_close(out2[:1], dense(q2[:1], ka, va, 6))
    torch.testing.assert_close(out2[1:], dense(q2[1:], kb, vb, 4))


def test_tensor_parallel_slices():
    assert [split_range(10, 3, i) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [vocab_range(10, 4, r) for r in range(4)] == [(0, 3, 3), (3, 6, 3), (6, 9, 3), (9, 10, 3)]
    # 8 query heads, 2 kv heads, tp=4: ranks 0,1 use kv head 0; ranks 2,3 kv head 1
    assert [kv_head_range(8, 2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert tp_slice("colwise_kv", (2 * 16, 64), 16, 4, 3, (8, 2)) == (0, 16, 32)
    assert tp_slice("rowwise", (64, 8 * 16), 16, 2, 1) == (1, 64, 128)
    assert tp_slice("replicate", (64,), 1, 2, 1) is None


def test_expert_placement_default_slicing_and_maps():
    p = ExpertPlacement.for_model(4, [1, 2], ep=2)
    assert p.owners(1, tp=2) == ((0, 1), (0, 1), (2, 3), (2, 3))
    assert p.local_experts(1, 3, tp=2) == [(2, 1, 2), (3, 1, 2)]
    sliced = ExpertPlacement.for_model(2, [0], ep=4)  # more ep ranks than experts: each expert sliced in 2
    assert sliced.owners(0) == ((0, 1), (2, 3))
    custom = ExpertPlacement.for_model(4, [0, 1], ep=2, expert_map=[[1, 0, 1, 0], [0, 0, 1, 1]])
    assert custom.ep_map(0) == [1, 0, 1, 0] and custom.ep_map(1) == [0, 0, 1, 1]
    with pytest.raises(ConfigError, match="without experts"):
        ExpertPlacement.for_model(4, [0], ep=2, expert_map=[1, 1, 1, 1])
