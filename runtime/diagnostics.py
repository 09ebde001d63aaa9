"""Collective checks over every named mesh dim, run on the workers.

Used by the demo (to show the mesh works and what it costs) and by the tests
(which compare the raw values against expectations computed from the plan).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from tessera.parallel.comm import all_gather_tensor


def group_ranks(worker: Any, dim: str) -> list[int]:
    """Global ranks of this rank's group along ``dim``, in group order."""
    mesh = worker.mesh
    index = list(mesh.mesh_dim_names).index(dim)
    coords = mesh.get_coordinate()
    view = mesh.mesh
    selector = [c for c in coords]
    selector[index] = slice(None)
    return [int(r) for r in view[tuple(selector)].flatten().tolist()]


def mesh_collectives(worker: Any, payload_bytes: int = 1 << 20, repeats: int = 3) -> dict[str, Any]:
    """Run all_reduce, all_gather_into_tensor and all_to_all_single over each mesh dim.

    Returns, per dim, the raw results of small exact checks (so a caller can
    verify them) and the median time of each collective on ``payload_bytes``.
    """
    rank = dist.get_rank()
    device = worker.device
    out: dict[str, Any] = {"rank": rank, "coords": worker.coordinates(), "dims": {}}
    for dim in worker.mesh.mesh_dim_names:
        group = worker.group(dim)
        size = dist.get_world_size(group)
        # all_reduce of the global rank: the sum of the group's ranks.
        reduced = torch.tensor([float(rank)], device=device)
        dist.all_reduce(reduced, group=group)
        # all_gather_into_tensor of the global rank: the group's ranks in order.
        gathered = torch.empty(size, dtype=torch.int64, device=device)
        all_gather_tensor(gathered, torch.tensor([rank], device=device), group=group)
        # all_to_all_single with uneven splits: to peer j send j+1 copies of
        # (1000 * rank + j); from peer j receive (my index + 1) copies.
        me = list(gathered.tolist()).index(rank)
        send = torch.cat([torch.full((j + 1,), 1000 * rank + j, device=device) for j in range(size)])
        recv = torch.empty(size * (me + 1), dtype=send.dtype, device=device)
        dist.all_to_all_single(
            recv, send, output_split_sizes=[me + 1] * size, input_split_sizes=[j + 1 for j in range(size)], group=group
        )
        out["dims"][dim] = {
            "group_size": size,
            "all_reduce": reduced.item(),
            "all_gather": gathered.tolist(),
            "all_to_all": recv.tolist(),
            "timings_ms": _time_collectives(group, size, payload_bytes, repeats, device),
        }
    return out


def _time_collectives(group: Any, size: int, payload_bytes: int, repeats: int, device: torch.device) -> dict[str, float]:
    numel = max(size, payload_bytes // 4 // size * size)
    x = torch.ones(numel, device=device)
    gathered = torch.empty(numel * size, device=device)
    a2a = torch.empty(numel, device=device)
    timings: dict[str, list[float]] = {"all_reduce": [], "all_gather": [], "all_to_all": []}
    for _ in range(repeats):
        for name, op in (
            ("all_reduce", lambda: dist.all_reduce(x, group=group)),
            ("all_gather", lambda: all_gather_tensor(gathered, x, group=group)),
            ("all_to_all", lambda: dist.all_to_all_single(a2a, x, group=group)),
        ):
            dist.barrier(group=group)
            t0 = time.perf_counter()
            op()
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings[name].append((time.perf_counter() - t0) * 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in timings.items()}


def expected_collectives(plan_coords: dict[int, dict[str, int]], rank: int, dim: str) -> dict[str, Any]:
    """What :func:`mesh_collectives` must return for ``rank`` along ``dim``,
    derived from the plan's coordinates alone (not from the mesh)."""
    mine = plan_coords[rank]
    group = sorted(
        (r for r, c in plan_coords.items() if all(c[d] == mine[d] for d in c if d != dim)),
        key=lambda r: plan_coords[r][dim],
    )
    me = group.index(rank)
    return {
        "group_size": len(group),
        "all_reduce": float(sum(group)),
        "all_gather": group,
        "all_to_all": [1000 * peer + me for peer in group for _ in range(me + 1)],
    }


def check_mesh(controller: Any, payload_bytes: int = 1 << 20) -> tuple[list[dict[str, Any]], list[str]]:
    """Run :func:`mesh_collectives` on every rank and compare with the plan.

    Returns the per-rank results and the failed checks (``"rank R DIM KEY"``; empty when all are right).
    """
    plan = controller.placement.plan
    results = controller.collective_rpc(mesh_collectives, kwargs={"payload_bytes": payload_bytes})
    coords = {r: plan.coordinates(r) for r in range(plan.world_size)}
    failures = []
    for rank, out in enumerate(results):
        for dim, got in out["dims"].items():
            want = expected_collectives(coords, rank, dim)
            failures += [f"rank {rank} {dim} {key}" for key in want if got[key] != want[key]]
    return results, failures
