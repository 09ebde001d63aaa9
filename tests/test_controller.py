"""The controller on a real (embedded) Ray: mesh, collectives, bounded waits, death, shutdown."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tessera.memory.placement import Placement
from tessera.config import ParallelPlan, Timeouts
from tessera.runtime.controller import Controller
from tessera.runtime.diagnostics import expected_collectives, mesh_collectives
from tessera.errors import PlacementError, RankError, WaitTimeout, WorkerDiedError

PLANS_2X2 = [{"pp": 2, "tp": 2}, {"ep": 2, "tp": 2}]


def _alive_actor_ids(ray) -> set[str]:
    from ray._private.state import state

    return {aid for aid, a in state.actor_table(None).items() if a["State"] != "DEAD"}


def _live_placement_groups(ray) -> set[str]:
    from ray.util.placement_group import placement_group_table

    return {pid for pid, pg in placement_group_table().items() if pg["state"] != "REMOVED"}


@pytest.mark.parametrize("degrees", PLANS_2X2, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_2x2_mesh_collectives_over_each_dim(make_controller, degrees):
    ctl = make_controller(degrees)
    plan = ParallelPlan(degrees)
    expected_coords = {r: plan.coordinates(r) for r in range(4)}
    assert [info.coords for info in ctl.describe()] == [expected_coords[r] for r in range(4)]
    assert ctl.collective_rpc("coordinates") == [expected_coords[r] for r in range(4)]
    results = ctl.collective_rpc(mesh_collectives, kwargs={"payload_bytes": 4096, "repeats": 1})
    for rank, out in enumerate(results):
        assert out["rank"] == rank
        assert set(out["dims"]) == set(plan.dim_names)
        for dim, got in out["dims"].items():
            want = expected_collectives(expected_coords, rank, dim)
            for key, value in want.items():
                assert got[key] == value, f"rank {rank} dim {dim} {key}: {got[key]} != {value}"


def test_ranks_are_ordered_by_node_and_report_where_they_are(make_controller):
    ctl = make_controller({"pp": 2, "tp": 2})
    infos = ctl.describe()
    assert [i.rank for i in infos] == [0, 1, 2, 3]
    assert len({i.pid for i in infos}) == 4 and os.getpid() not in {i.pid for i in infos}
    assert all(i.device == "cpu" for i in infos)
    # Ranks that share a node are contiguous (one node here, so trivially one block).
    nodes = [i.node_id for i in infos]
    assert nodes == sorted(nodes, key=nodes.index)


def _raise_on_rank_one(worker):
    if worker.rank == 1:
        raise ValueError("bad input on rank one")
    return worker.rank


def _sleep(worker, seconds):
    time.sleep(seconds)
    return worker.rank


def test_rank_error_names_the_rank_and_the_controller_keeps_working(make_controller):
    ctl = make_controller({"pp": 2, "tp": 2})
    with pytest.raises(RankError, match=r"failed on rank\(s\) \[1\]; rank 1: ValueError: bad input on rank one") as info:
        ctl.collective_rpc(_raise_on_rank_one)
    assert set(info.value.errors) == {1}
    assert ctl.collective_rpc(_sleep, args=(0,)) == [0, 1, 2, 3]


def test_call_timeout_says_what_was_waited_for(make_controller):
    ctl = make_controller({"pp": 2, "tp": 2})
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"call _sleep: rank\(s\) \[0, 1, 2, 3\] did not answer within 1.0s"):
        ctl.collective_rpc(_sleep, args=(3,), timeout_s=1.0)
    assert time.monotonic() - started < 30
    time.sleep(3)  # let the sleeps finish so the cached workers are idle again
    assert ctl.collective_rpc(_sleep, args=(0,), ranks=[2]) == [2]


def test_unsatisfiable_placement_fails_within_timeout_and_cleans_up(ray_session):
    ray = ray_session
    pgs_before = _live_placement_groups(ray)
    ctl = Controller(Placement(ParallelPlan({"tp": 32})), timeouts=Timeouts(placement_group_s=3))
    started = time.monotonic()
    with pytest.raises(PlacementError) as info:
        ctl.start()
    elapsed = time.monotonic() - started
    assert elapsed < 20, f"took {elapsed:.1f}s"
    message = str(info.value)
    assert "within 3s" in message
    assert "asked for 32 bundle(s) of {'CPU': 1.0}" in message and "{'CPU': 32.0} in all" in message
    assert "STRICT_PACK" in message and "the cluster has {'CPU': 16.0" in message
    assert "Fix:" in message
    assert _live_placement_groups(ray) == pgs_before


def test_killed_worker_is_reported_restart_recovers_and_shutdown_releases_everything(ray_session):
    ray = ray_session
    actors_before = _alive_actor_ids(ray)
    pgs_before = _live_placement_groups(ray)
    ctl = Controller(Placement(ParallelPlan({"tp": 2})), timeouts=Timeouts(call_s=60)).start()
    try:
        assert len(_alive_actor_ids(ray) - actors_before) == 2
        victim = ctl.describe()[1]
        os.kill(victim.pid, signal.SIGKILL)
        with pytest.raises(WorkerDiedError) as info:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the death may take a moment to be noticed
                ctl.collective_rpc("ping", timeout_s=10)
                time.sleep(0.2)
        assert info.value.ranks == [1]
        assert f"worker rank 1 on node {victim.node_ip}" in str(info.value)
        assert f"pid {victim.pid}" in str(info.value)
        assert ctl.health()[1] == "dead"
        # Recovery: every rank is replaced, the mesh works again.
        old_pids = {i.pid for i in ctl.describe()}
        ctl.restart()
        assert ctl.health() == {0: "alive", 1: "alive"}
        assert not old_pids & {i.pid for i in ctl.describe()}
        assert ctl.collective_rpc("coordinates") == [{"tp": 0}, {"tp": 1}]
        assert len(_alive_actor_ids(ray) - actors_before) == 2
    finally:
        ctl.shutdown()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (_alive_actor_ids(ray) - actors_before):
        time.sleep(0.2)
    assert _alive_actor_ids(ray) - actors_before == set()
    assert _live_placement_groups(ray) == pgs_before
    ctl.shutdown()  # idempotent


def test_embedded_ray_is_started_and_stopped_by_the_controller(tmp_path):
    """Without a running Ray the controller starts its own, and stops it at shutdown.

    The embedded Ray is sized to hold every CPU rank, so what it can never
    hold is a GPU plan on a machine without GPUs: refused at once.
    """
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal of a GPU plan on a machine without GPUs")
    import subprocess
    import sys

    script = (
        "import ray\n"
        "from tessera.memory.placement import Placement\n"
        "from tessera.config import ParallelPlan, Timeouts\n"
        "from tessera.runtime.controller import Controller\n"
        "from tessera.errors import PlacementError\n"
        "ctl = Controller(Placement(ParallelPlan({'tp': 2}), device='cuda'), timeouts=Timeouts(placement_group_s=60))\n"
        "try:\n"
        "    ctl.start()\n"
        "except PlacementError as e:\n"
        "    print('REFUSED', 'never be satisfied' in str(e), \"'GPU': 0.0\" in str(e))\n"
        "print('RAY_LEFT', ray.is_initialized())\n"
        "with Controller(Placement(ParallelPlan({'dp': 2}))) as ctl:\n"
        "    print('COORDS', ctl.collective_rpc('coordinates'))\n"
        "print('RAY_LEFT', ray.is_initialized())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=420, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED True True" in out.stdout
    assert "COORDS [{'dp': 0}, {'dp': 1}]" in out.stdout
    assert out.stdout.count("RAY_LEFT False") == 2
