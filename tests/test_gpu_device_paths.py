"""CPU checks of the CUDA code paths, where a stand-in can play the GPU (runs in every suite, no GPU needed).

- The ``meta`` device as the second device: a DiT runner whose worker device is ``meta`` fails
  on the first CPU tensor that reaches the model (as CUDA would: "expected all tensors on the
  same device"), so the runner's inputs (timesteps, guidance, PixArt's size conditions) are
  proven to follow the weights.
- oneDNN packing is CPU-only: a weight anywhere else is left as it is and runs through F.linear.
- The device copier's stream-ordered freeing, with events that complete when the test says so.

The numerics on a real GPU are the ``gpu``-marked tests (tests/test_gpu_llm.py, ...).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tessera.models.packed_linear import linear, pack
from tessera.offload.h2d import DeviceCopier
from tessera.offload.tiers import TierBudget


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_dit_runner_inputs_follow_the_weights_to_another_device(family, session_tmp):
    from tessera.models.tiny_diffusion import build_tiny_diffusion
    from tessera.runtime.diffusion.request import DiffusionRequest
    from tessera.parallel.comm import GroupComm
    from tessera.runtime.diffusion.protocol import LoadSpec
    from tessera.runtime.diffusion.worker import DiffusionWorker

    path = build_tiny_diffusion(family, session_tmp / f"device-paths-{family}")
    worker = SimpleNamespace(device=torch.device("meta"), mesh=None, rank=0, world_size=1, plan_degrees={},
                             comm=lambda dim, slot_bytes=None: GroupComm())
    runner = DiffusionWorker(worker, LoadSpec(str(path)))
    assert {p.device.type for p in runner.model.parameters()} == {"meta"}
    req = DiffusionRequest(prompts=("a red fox",), negative_prompts=("",), steps=2, height=32, width=32,
                           guidance_scale=0.0 if family == "flux" else 4.5, seed=0, mode="exact", warmup_steps=1,
                           partial_fraction=0.25, max_sequence_length=16, output="latent", trace=False)
    runner.begin(req)
    for _ in range(req.steps):
        runner.step()  # a CPU input meeting meta weights raises here
    assert runner.latents.device.type == "meta" and runner.latents.shape == (1, 4, 16, 16)


def test_packing_is_cpu_only():
    w = torch.empty(32, 16, dtype=torch.bfloat16, device="meta")
    assert pack(w) is w  # never reordered off the CPU (CUDA runs its own bf16 GEMMs)
    x = torch.empty(3, 16, dtype=torch.bfloat16, device="meta")
    assert linear(x, w).shape == (3, 32)


class _Event:
    def __init__(self) -> None:
        self.done = False
        self.synchronized = 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.synchronized += 1
        self.done = True


class _FakeCudaCopier(DeviceCopier):
    """The copier's CUDA bookkeeping with test-controlled events instead of CUDA ones."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.cuda = True
        self.events: list[_Event] = []

    def _record_event(self, stream=None):
        self.events.append(_Event())
        return self.events[-1]


def test_device_memory_is_refunded_only_after_the_consumer_is_done():
    budget = TierBudget("device", 100)
    copier = _FakeCudaCopier()
    held = []
    for i in range(2):
        budget.reserve(40, f"group {i}")
        tensors = {"w": torch.zeros(10)}
        held.append(tensors)
        copier.retire(tensors, lambda: budget.release(40), 40)
    # released by the consumer, but the (fake) compute stream has not passed their uses yet
    assert budget.used == 80 and copier.retiring_bytes == 80 and held[0]
    assert copier.reap() == 0 and budget.used == 80
    copier.events[0].done = True
    assert copier.reap() == 40 and budget.used == 40 and held[0] == {} and held[1]
    # asked for room that is not there: waits for the oldest retirement, not more
    budget.reserve(40, "group 2")
    copier.retire({"w": torch.zeros(1)}, lambda: budget.release(40), 40)
    assert copier.reap(30, budget.fits) == 40 and copier.events[1].synchronized == 1
    assert copier.events[2].synchronized == 0 and budget.used == 40 and copier.retiring_bytes == 40
    copier.drain()
    assert budget.used == 0 and copier.retiring_bytes == 0 and copier.stats()["waited_retirements"] == 2


def test_cpu_copier_uses_host_tensors_in_place():
    copier = DeviceCopier("cpu")
    host = {"w": torch.ones(4)}
    out, event = copier.copy(host)
    assert event is None and out["w"] is host["w"] and copier.wait(event) is None
    refunded = []
    copier.retire(out, lambda: refunded.append(1), 16)
    assert refunded == [1] and copier.stats()["side_stream"] is False
