"""The in-process one-rank controller (tessera.runtime.inprocess): the Controller interface without Ray.

The engines' own numerics on one in-process rank are covered by every test that uses the
``local_controller`` fixture (test_moe_single.py, test_llm_engine.py, test_offload_*.py); here:
the interface itself, the launcher's ``cluster="inprocess"``, and a process where Ray cannot be
imported at all (the lent GPU machine has no Ray).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tessera.config import ParallelPlan, Timeouts
from tessera.errors import ConfigError, WaitTimeout
from tessera.memory.placement import Placement
from tessera.runtime.inprocess import DefaultGroup, InProcessController
from tessera.tests.llm_testing import NEW_TOKENS, check_against_reference, tiny_refs  # noqa: F401 - fixture


def _rank_and_thread(worker, extra=0):
    return worker.rank + extra, threading.current_thread().name


def _fail(worker):
    raise KeyError("model 'x' is not loaded on rank 0")


class _Marker:
    """A worker-side engine that holds nothing (restart must drop it)."""

    def __init__(self, worker) -> None:
        self.worker = worker

    def describe(self) -> str:
        return "marker"

    def close(self) -> None:
        pass


def _sleep(worker, seconds):
    time.sleep(seconds)
    return seconds


def test_interface_calls_errors_timeouts_restart_and_shutdown():
    import torch.distributed as dist

    users = DefaultGroup.users()
    ctl = InProcessController(timeouts=Timeouts(call_s=30)).start()
    try:
        assert ctl.placement.plan.degrees == {"dp": 1} and ctl.world_size == 1
        (info,) = ctl.describe()
        assert (info.rank, info.pid, info.device, info.coords) == (0, os.getpid(), "cpu", {"dp": 0})
        assert dist.is_initialized() and dist.get_world_size() == 1 and DefaultGroup.users() == users + 1
        (rank, thread), = ctl.collective_rpc(_rank_and_thread, args=(5,))
        assert rank == 5 and thread != threading.current_thread().name  # calls run on the worker's own thread
        assert ctl.collective_rpc("coordinates") == [{"dp": 0}]
        assert ctl.collective_rpc("ping", ranks=[]) == []
        with pytest.raises(ValueError, match="rank 0 only"):
            ctl.collective_rpc("ping", ranks=[1])
        with pytest.raises(KeyError, match="not loaded on rank 0"):  # the call's own exception, as raised
            ctl.collective_rpc(_fail)
        assert ctl.health() == {0: "alive"}
        with pytest.raises(WaitTimeout, match=r"call _sleep: the in-process rank 0 did not answer within 0\.2s"):
            ctl.collective_rpc(_sleep, args=(1.5,), timeout_s=0.2)
        assert ctl.health(timeout_s=0.2) == {0: "unresponsive"}
        assert ctl.health(timeout_s=5.0) == {0: "alive"}  # the overrunning call returned
        ctl.collective_rpc("attach", args=("marker", _Marker))
        ctl.restart()
        assert "marker" not in ctl.worker.engines and ctl.health() == {0: "alive"}
        assert ctl.collective_rpc(_sleep, args=(0.0,)) == [0.0]
    finally:
        ctl.shutdown()
    assert ctl.health() == {0: "dead"} and DefaultGroup.users() == users
    with pytest.raises(RuntimeError, match="not running"):
        ctl.collective_rpc("ping")
    ctl.shutdown()  # twice is fine


def test_more_than_one_rank_is_refused():
    with pytest.raises(ConfigError, match=r"tp=2 has 2 ranks, but an in-process controller runs exactly one"):
        InProcessController(Placement(ParallelPlan({"tp": 2})))
    with pytest.raises(ConfigError, match="disagrees"):
        InProcessController(Placement(ParallelPlan({})), device="cuda")


def test_cuda_without_a_gpu_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA device"):
        InProcessController(device="cuda").start()


def test_launch_inprocess_plans_one_rank_and_matches_transformers(tiny_refs):  # noqa: F811
    import tessera

    ref = tiny_refs["qwen3_moe"]
    opts = {"dtype": "float32", "stop_at_eos": False, "max_model_len": 64, "block_size": 4}
    with tessera.launch(model=str(ref.path), plan="auto", cluster="inprocess", engine_options=opts,
                        log_level="WARNING") as handle:
        assert handle.uses_ray is False and handle.placement.world_size == 1
        assert [r.node_id for r in handle.ranks] == ["inprocess"]
        assert handle.check_mesh()["correct"]
        check_against_reference(handle.engine, ref)
        assert handle.stats()["health"] == {0: "alive"}
    with pytest.raises(ConfigError, match=r"cluster 'inprocess' runs exactly one rank .* plan ep=2 has 2 ranks"):
        tessera.launch(model=str(ref.path), plan={"ep": 2}, cluster="inprocess")
    with pytest.raises(ConfigError, match="min_nodes=2 needs a Ray cluster"):
        tessera.launch(plan={"dp": 1}, cluster="inprocess", min_nodes=2)


# A process where ``import ray`` fails as if Ray were not installed: ``sys.modules["ray"] = None``
# makes every ``import ray``/``import ray.x`` raise ModuleNotFoundError and ``find_spec("ray")`` return
# None (what libraries probe), set by a sitecustomize before anything else is imported.
_NO_RAY_SITE = 'import sys\nsys.modules["ray"] = None\n'

_NO_RAY_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    try:
        import ray  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker did not work: ray imported")
    assert importlib.util.find_spec("ray") is None
    import torch
    import tessera
    from tessera.runtime.inprocess import InProcessController
    from tessera.runtime.llm.engine import LLMEngine, SamplingParams
    from tessera.runtime.diffusion.engine import DiffusionEngine
    from tessera.models.tiny_moe import build_tiny_moe
    from tessera.models.tiny_diffusion import build_tiny_diffusion

    args = json.loads(sys.argv[1])
    out = {}
    with InProcessController() as ctl:
        engine = LLMEngine.load(ctl, args["moe"], dtype="float32", stop_at_eos=False, max_model_len=64, block_size=4)
        res = engine.generate(args["prompts"], SamplingParams(max_new_tokens=args["new_tokens"]))
        out["greedy"] = [r.token_ids for r in res]
        engine.close()
        pixart = build_tiny_diffusion("pixart", os.path.join(args["tmp"], "pixart"))
        dit = DiffusionEngine.load(ctl, str(pixart), progress=False)
        (latents,) = dit.generate_images("a red fox", steps=2, height=32, width=32, output="latent")
        out["latents_shape"] = list(latents.shape)
        out["latents_finite"] = bool(torch.isfinite(latents).all())
        dit.close()
    os.environ["TESSERA_CACHE"] = os.path.join(args["tmp"], "cache")
    with tessera.launch(model="tiny-moe:mixtral", plan="auto", cluster="inprocess", log_level="WARNING") as handle:
        out["launch_tokens"] = len(handle.generate("the quick brown fox", max_new_tokens=3)[0].token_ids)
    out["ray_loaded"] = sys.modules.get("ray") is not None
    print("RESULT " + json.dumps(out))
    """
)


def test_engines_run_in_process_where_ray_cannot_be_imported(tiny_refs, tmp_path):  # noqa: F811
    ref = tiny_refs["mixtral"]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_NO_RAY_SITE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p),
           "TESSERA_LOG_LEVEL": "WARNING"}
    args = {"moe": str(ref.path), "prompts": [list(p) for p in ref.prompts], "new_tokens": NEW_TOKENS, "tmp": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", _NO_RAY_SCRIPT, json.dumps(args)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    assert out["greedy"] == ref.greedy  # same tokens as transformers
    assert out["latents_shape"] == [1, 4, 16, 16] and out["latents_finite"]
    assert out["launch_tokens"] == 3
    assert out["ray_loaded"] is False
