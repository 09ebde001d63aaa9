"""Recovery's small parts without a cluster: the per-call deadline and the by-pid kill of a restart."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import psutil

from tessera.config import ParallelPlan
from tessera.memory.placement import Placement
from tessera.options import RecoveryPolicy
from tessera.runtime.controller import Controller
from tessera.runtime.recovery import StepDeadline


def test_deadline_warms_up_then_follows_measured_steps_and_a_cold_start_gets_the_ceiling():
    deadline = StepDeadline(RecoveryPolicy(stall_floor_s=2.0, stall_factor=10.0), ceiling_s=600.0)
    assert deadline.seconds(100) == 600.0  # no history: the ceiling
    deadline.record(1.0, 100)
    deadline.record(0.5, 100)
    assert deadline.seconds(100) == 10.0  # 10 x the slowest 0.01 s per unit
    assert deadline.seconds(1) == 2.0  # never under the floor
    deadline.expect_cold_start()  # restarted workers: lazy imports and loads ahead
    assert deadline.seconds(100) == 600.0
    deadline.record(300.0, 100)  # the slow cold call is not a measure of the work
    assert deadline.seconds(100) == 10.0


def test_restart_kills_its_stopped_workers_by_pid_only_while_the_pid_is_theirs():
    ctl = Controller(Placement(ParallelPlan({}), device="cpu"))
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    try:
        for p in procs:
            p.send_signal(signal.SIGSTOP)  # a stalled rank: it cannot answer anything
        here = socket.gethostname()
        started = [psutil.Process(p.pid).create_time() for p in procs]
        ctl._node_infos = [  # rank 1's pid now belongs to another process (a later start time): left alone
            {"rank": 0, "pid": procs[0].pid, "started": started[0], "hostname": here},
            {"rank": 1, "pid": procs[1].pid, "started": started[1] - 5.0, "hostname": here},
            {"rank": 2, "pid": 1, "started": 0.0, "hostname": "another-host"},
        ]
        stopped, elsewhere = ctl._kill_local_worker_processes()
        assert stopped == [procs[0].pid] and procs[0].wait(timeout=10) == -signal.SIGKILL
        assert procs[1].poll() is None and elsewhere == ["rank 2 pid 1 on another-host"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
