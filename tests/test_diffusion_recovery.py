"""Diffusion survives worker faults (issue 12): a kill or a stall mid-denoise restarts the ranks and resumes the
interrupted image from the ranks' last step checkpoint, or reruns it from its seed without checkpoints: the same
latents as without the fault either way; the handle stays usable."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from tessera.config import ParallelPlan, Timeouts
from tessera.memory.placement import Placement
from tessera.models.tiny_diffusion import build_tiny_diffusion
from tessera.options import RecoveryPolicy
from tessera.runtime.controller import Controller
from tessera.runtime.diffusion.engine import DiffusionEngine

pytestmark = pytest.mark.timeout(900)
ARGS = dict(steps=30, height=64, width=64, seed=4, output="latent")


@pytest.fixture(scope="module")
def pixart(session_tmp):
    return build_tiny_diffusion("pixart", session_tmp / "recovery-pixart")


@pytest.fixture
def controller(ray_session):
    ctl = Controller(Placement(ParallelPlan({"sp": 2})), timeouts=Timeouts(call_s=120, worker_start_s=180)).start()
    yield ctl
    pids = [r.pid for r in ctl.describe()]
    ctl.shutdown()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _fault_during(engine, controller, sig: int, after_s: float):
    """Send ``sig`` to rank 1 ``after_s`` into the next request; returns the thread and the victim's pid."""
    victim = controller.describe()[1].pid

    def fire():
        time.sleep(after_s)
        os.kill(victim, sig)

    thread = threading.Thread(target=fire, daemon=True)
    return thread, victim


@pytest.mark.parametrize("fault, checkpoint_s", [("kill", None), ("stall", None), ("kill", 0.0), ("stall", 0.0)],
                         ids=["kill-rerun", "stall-rerun", "kill-resume", "stall-resume"])
def test_a_fault_mid_denoise_reruns_or_resumes_the_image(controller, pixart, fault, checkpoint_s):
    policy = RecoveryPolicy(stall_floor_s=3.0, stall_factor=4.0)
    engine = DiffusionEngine.load(controller, pixart, progress=False, recovery=policy, checkpoint_s=checkpoint_s)
    want = engine.generate_images(["a red square"], **ARGS)[0]
    engine.generate_images(["a red square"], **ARGS)  # a second timed run: the stall deadline has history
    seconds = engine.stats()["last"]["seconds"]
    thread, victim = _fault_during(engine, controller, signal.SIGKILL if fault == "kill" else signal.SIGSTOP,
                                   after_s=seconds / 3)
    thread.start()
    try:
        got = engine.generate_images(["a red square"], **ARGS)[0]
    finally:
        thread.join()
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    records = engine.stats()["recovery"]
    assert records, "the fault landed after the request finished: nothing was recovered (make the request longer)"
    assert records[-1]["kind"] == ("death" if fault == "kill" else "stall")
    assert records[-1]["detect_s"] < policy.stall_floor_s + 10.0  # a stalled rank misses heartbeats: seconds
    if checkpoint_s is None:
        assert records[-1]["resume_step"] == 0  # rerun from the seed
    else:  # a checkpoint after every step, the fault a third of the way in: resumed mid-image
        assert 0 < records[-1]["resume_step"] < ARGS["steps"]
    assert torch.equal(got, want)  # bitwise: the same seed, the same schedule, the same ranks' math
    assert victim not in {r.pid for r in controller.describe()}
    # The handle stays usable.
    assert torch.equal(engine.generate_images(["a red square"], **ARGS)[0], want)
    engine.close()
