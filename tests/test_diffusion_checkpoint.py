"""Step checkpoints of the diffusion engine (issue 12, recovery): a rank's latents and scheduler state after a
chunk of steps resume the image with the same bits as the uninterrupted run, for every family's scheduler
(PixArt's multistep DPM-Solver keeps its last model outputs; SD3/Flux's flow-matching Euler does not), after a
round trip through pickle (how Ray carries them to the driver and back to a restarted rank)."""

from __future__ import annotations

import pickle

import pytest
import torch

from tessera.models.tiny_diffusion import build_tiny_diffusion
from tessera.runtime.diffusion.checkpoint import host_scheduler, restore_scheduler
from tessera.runtime.diffusion.request import keeps_stale_kv
from tessera.runtime.diffusion.engine import ENGINE_ID, DiffusionEngine
from tessera.runtime.diffusion.worker import DiffusionWorker, run_steps
from tessera.runtime.inprocess import InProcessController

pytestmark = pytest.mark.timeout(600)
STEPS = 9


@pytest.fixture(scope="module")
def controller():
    with InProcessController(log_level="WARNING") as ctl:
        yield ctl


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_resuming_from_a_checkpoint_gives_the_uninterrupted_latents(controller, session_tmp, family):
    model = build_tiny_diffusion(family, session_tmp / f"checkpoint-{family}")
    engine = DiffusionEngine.load(controller, model, progress=False, checkpoint_s=None)
    args = dict(steps=STEPS, height=64, width=64, seed=4, output="latent", trace=True)
    want = engine.generate_images(["a red square"], **args)[0]
    want_trace = engine.last["trace"]
    req = engine._request(["a red square"], STEPS, 64, 64, None, 4, "exact", 1, 0.25, "", None, "latent", True)

    controller.collective_rpc("call", args=(ENGINE_ID, DiffusionWorker.begin, req, None))
    (chunk,) = controller.collective_rpc("call", args=(ENGINE_ID, run_steps, 4, True))
    assert chunk.checkpoint.step == 4 and len(chunk.steps) == 4
    saved = pickle.loads(pickle.dumps((chunk.checkpoint,)))  # as Ray carries it
    (lost,) = controller.collective_rpc("call", args=(ENGINE_ID, run_steps, 3, False))  # work the fault loses
    assert lost.checkpoint is None
    controller.collective_rpc("call", args=(ENGINE_ID, DiffusionWorker.begin, req, saved))  # a restarted rank resumes
    (rest,) = controller.collective_rpc("call", args=(ENGINE_ID, run_steps, 100, True))
    assert [s.step for s in rest.steps] == list(range(4, STEPS)) and rest.checkpoint is None  # done: none kept
    (result,) = controller.collective_rpc("call", args=(ENGINE_ID, DiffusionWorker.end))
    assert torch.equal(result.latents, want)
    assert [s.t for s in result.trace] == [s["t"] for s in want_trace]
    assert all(torch.equal(a.latents, b["latents"]) for a, b in zip(result.trace, want_trace))

    # The engine's chunked path (a checkpoint every step) gives the same latents as one rpc per image.
    chunked = DiffusionEngine.load(controller, model, progress=False, checkpoint_s=0.0)
    chunked.generate_images(["a red square"], **args)  # timed: later images are chunked
    assert torch.equal(chunked.generate_images(["a red square"], **args)[0], want)
    engine.close()


def test_a_checkpoint_is_a_copy_on_the_host():
    from diffusers import DPMSolverMultistepScheduler

    live = DPMSolverMultistepScheduler()
    live.set_timesteps(10)
    live.model_outputs = [None, torch.ones(2)]
    state = host_scheduler(live)
    live.model_outputs[1].add_(1)  # the live loop keeps running; the checkpoint does not move
    restored = restore_scheduler(state, "cpu")
    assert torch.equal(restored.model_outputs[1], torch.ones(2)) and restored.model_outputs[0] is None
    assert state.on_device == frozenset()  # nothing was on a device: nothing goes back to one
    restored.model_outputs[1].add_(5)
    assert torch.equal(state.scheduler.model_outputs[1], torch.ones(2))  # each restore is its own copy


def test_stale_kv_modes_are_not_resumable():
    assert not keeps_stale_kv("exact", 2) and not keeps_stale_kv("ulysses", 4)
    assert keeps_stale_kv("displaced", 2) and keeps_stale_kv("partial", 2)
    assert not keeps_stale_kv("displaced", 1)  # one rank keeps no neighbour K/V


def test_checkpoint_s_reaches_the_engine_through_launch(session_tmp):
    """The job's ``engine: {checkpoint_s: ...}`` (here through ``tessera.launch``) sets the engine's chunking:
    every step checkpointed gives the latents of one rpc per image."""
    import tessera

    model = str(build_tiny_diffusion("pixart", session_tmp / "checkpoint-pixart"))
    args = dict(steps=5, height=32, width=32, seed=2, output="latent")
    got = {}
    for every in (None, 0.0):
        with tessera.launch(model, plan={}, cluster="inprocess",
                            engine_options={"progress": False, "checkpoint_s": every}) as handle:
            assert handle.engine.options.checkpoint_s == every
            handle.generate_images(["a cat"], **args)  # timed: the next image is chunked when every == 0.0
            got[every] = handle.generate_images(["a cat"], **args)[0]
    assert torch.equal(got[None], got[0.0])
