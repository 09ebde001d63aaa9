"""Shared-memory collectives (parallel/shm_comm.py) give the same results as gloo, on real workers."""

from __future__ import annotations

import torch
import torch.distributed as dist

MESH = {"ep": 2, "tp": 2}


def _compare_with_gloo(worker):
    results = {}
    for dim in ("tp", "ep"):
        group = worker.group(dim)
        comm = worker.comm(dim)
        shm = comm.shm
        assert shm is not None and worker.comm(dim) is comm  # attached once per worker
        rank = dist.get_rank(group)
        gen = torch.Generator().manual_seed(100 * worker.rank)
        for dtype in (torch.float32, torch.bfloat16, torch.int64):
            x = (torch.randn(3, 257, generator=gen) * 100).to(dtype)
            ref = x.clone()
            dist.all_reduce(ref, group=group)
            got = comm.all_reduce(x.clone())
            tol = 0 if dtype != torch.bfloat16 else 1e-2 * ref.float().abs().max().item()
            results[(dim, str(dtype), "all_reduce")] = (got.float() - ref.float()).abs().max().item() <= tol
        big = torch.ones(shm.slot_bytes // 4 + 1)  # larger than a slot: gloo path, same answer
        calls = shm.calls
        comm.all_reduce(big)
        results[(dim, "big", "fallback")] = bool((big == dist.get_world_size(group)).all()) and shm.calls == calls
        part = torch.full((2, 3), float(rank)) + torch.arange(3.0)
        gathered = comm.all_gather_cat(part, dim=1)
        expected = torch.cat([torch.full((2, 3), float(r)) + torch.arange(3.0) for r in range(dist.get_world_size(group))], 1)
        results[(dim, "gather", "all_gather_cat")] = torch.equal(gathered, expected)
        # all_to_all along rows with uneven splits (rank r sends r + j + 1 rows to rank j), against gloo.
        n = dist.get_world_size(group)
        in_splits = [rank + j + 1 for j in range(n)]
        out_splits = [j + rank + 1 for j in range(n)]
        inp = torch.randn(sum(in_splits), 2, 3, generator=gen)
        ref = inp.new_empty((sum(out_splits), 2, 3))
        dist.all_to_all_single(ref, inp, out_splits, in_splits, group=group)
        calls = shm.calls
        got = comm.all_to_all_rows(inp, in_splits, out_splits)
        results[(dim, "a2a", "all_to_all_rows")] = shm.calls == calls + 1 and torch.equal(got, ref)
        # one rank's rows larger than its slot: every rank is told to use gloo
        rows = shm.slot_bytes // (4 * 6) + 1 if rank == 0 else 1
        big_in = torch.zeros(rows * n, 2, 3)
        results[(dim, "a2a", "fallback")] = shm.all_to_all_rows(big_in, [rows] * n, [0] * n) is None
        calls = shm.calls
        out = torch.empty(n * 4, 3)
        ok = comm.all_gather_into(out, torch.full((4, 3), float(rank))) is None and shm.calls == calls + 1
        results[(dim, "gather", "all_gather_into")] = ok and torch.equal(out, torch.arange(n).float().repeat_interleave(4)[:, None].expand(-1, 3))
        # Many back-to-back steps exercise both buffers and the step counters.
        acc = torch.zeros(8)
        for i in range(200):
            acc += comm.all_reduce(torch.full((8,), float(i + rank)))
        n = dist.get_world_size(group)
        results[(dim, "loop", "all_reduce")] = torch.allclose(acc, torch.full((8,), float(sum(n * i + n * (n - 1) / 2 for i in range(200)))))
    return results


def test_shm_collectives_match_gloo(make_controller):
    ctl = make_controller(MESH)
    for rank, res in enumerate(ctl.collective_rpc(_compare_with_gloo)):
        bad = [k for k, ok in res.items() if not ok]
        assert not bad, f"rank {rank}: {bad}"


def _late_peer(worker):
    """Rank 1 never joins: rank 0's wait ends with an error naming it (a private group, so the
    shared ones keep their step counters in step)."""
    from tessera.parallel.comm import GroupComm

    group = dist.new_group([0, 1])  # collective over the world: every rank of the mesh calls it
    if worker.rank > 1:
        return None
    comm = GroupComm.attach(group, timeout_s=0.5)  # collective over the pair
    if worker.rank == 1:
        return "skipped"
    try:
        comm.all_reduce(torch.ones(4))
    except RuntimeError as err:
        return str(err)
    return "no error"


def test_a_missing_peer_times_out_with_its_rank_named(make_controller):
    ctl = make_controller(MESH)
    message = ctl.collective_rpc(_late_peer)[0]
    assert "rank(s) [1]" in message and "did not arrive" in message and "TESSERA_SHM_COMM=0" in message
