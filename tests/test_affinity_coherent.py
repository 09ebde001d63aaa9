"""Context-coherent expert parallel: tokens handled on the rank of their top-1 expert give the same output."""

from __future__ import annotations

import torch


def _dispatch_both_ways(worker, seed: int):
    """Run one MoE dispatch in standard and in coherent mode on the ep group; return outputs and rows moved."""
    from tessera.memory.expert_placement import ExpertPlacement
    from tessera.parallel.expert import ExpertDispatcher

    comm = worker.comm("ep")
    size = comm.size
    gen = torch.Generator().manual_seed(seed)  # same inputs on every rank: activations are replicated
    T, H, E, k = 37, 16, 8, 2
    x = torch.randn(T, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=gen)
    weights = torch.randn(E, H, H, generator=gen)
    compute = lambda rows, expert: torch.einsum("th,thk->tk", rows, weights[expert])  # noqa: E731
    expert_map = [[(3 * e + 1) % size for e in range(E)]]  # a non-contiguous map
    replicas = [[[(3 * e + 2) % size] if e == 5 else [] for e in range(E)]]
    outs = {}
    for name, kwargs in {"standard": {"mode": "all_to_all"}, "coherent": {"coherent": True}}.items():
        for reps in (None, replicas):
            owners = ExpertPlacement.for_model(E, [0], size, expert_map, reps).owner_table(0)
            d = ExpertDispatcher(comm, **kwargs)
            outs[(name, reps is not None)] = (d.exchange(x, ids, w, owners, compute), d.rows_sent)
    reference = torch.zeros(T, H)
    for t in range(T):
        for j in range(k):
            reference[t] += w[t, j] * (x[t] @ weights[ids[t, j]])
    return {key: (out.tolist(), rows) for key, (out, rows) in outs.items()}, reference.tolist()


def test_coherent_dispatch_matches_standard(make_controller):
    ctl = make_controller({"ep": 4})
    results = ctl.collective_rpc(_dispatch_both_ways, args=(3,))
    for outs, reference in results:
        ref = torch.tensor(reference)
        for key in outs:
            torch.testing.assert_close(torch.tensor(outs[key][0]), ref, rtol=1e-5, atol=1e-5)
        for reps in (False, True):
            # Same math, same order of the k-term sums: bitwise equal to the standard mode.
            assert torch.equal(torch.tensor(outs[("coherent", reps)][0]), torch.tensor(outs[("standard", reps)][0]))
    moved = {key: sum(r[0][key][1] for r in results) for key in results[0][0]}
    # The top-1 choice never leaves its rank in coherent mode.
    assert moved[("coherent", False)] < moved[("standard", False)]
