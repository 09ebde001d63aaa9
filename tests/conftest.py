"""Shared fixtures: one private Ray instance per test session, cached controllers.

Ray runs on a private temp dir and never attaches to another Ray on the
machine (RAY_ADDRESS is cleared). Workers get the repository root on their
PYTHONPATH so that functions defined in test modules can run on them.
Controllers are cached by plan for the session (starting 4 workers costs
several seconds on 2 cores); a test that breaks its workers must start its
own controller instead of using the cache.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_LIVE_CONTROLLERS = 2

os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def pytest_collection_modifyitems(config, items):  # noqa: D103
    _ship_test_modules_by_value(items)
    # TESSERA_GPU_TESTS_DEVICE=cpu runs the gpu tests' code on the CPU (to check the tests themselves).
    if _has_cuda() or os.environ.get("TESSERA_GPU_TESTS_DEVICE") == "cpu":
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        # The marker, not ``"gpu" in item.keywords``: keywords also hold path parts, so a
        # checkout in a folder named "gpu" would skip every test.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


def _ship_test_modules_by_value(items) -> None:
    """Let functions defined in test modules run on Ray workers.

    The repository root is the ``tessera`` package, so pytest imports test
    modules under a name derived from the checkout's folder (e.g.
    ``main.tests.test_x``) that workers cannot import. Pickling those modules
    by value sends the function itself instead of its import path.
    """
    try:
        from ray import cloudpickle
    except ImportError:  # pragma: no cover
        return
    for module in {getattr(item, "module", None) for item in items} - {None}:
        if module.__name__ in sys.modules:
            cloudpickle.register_pickle_by_value(module)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[object]:
    """One embedded Ray for the whole session: 16 logical CPUs (oversubscribed: cached controllers hold up to 8), private temp dir."""
    import ray

    from tessera.runtime.ray_env import embedded_ray_kwargs

    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    kwargs = embedded_ray_kwargs(
        16,
        "tessera-test-ray-",
        object_store_memory=512 * 1024 * 1024,
        namespace="tessera-tests",
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "TESSERA_LOG_LEVEL": "WARNING"}},
    )
    temp_dir = kwargs["_temp_dir"]
    # The test session's private Ray runs without token auth: tests/test_ray_job.py switches the process's
    # auth mode back and forth to test EmbeddedAuth itself, which would cut an authenticated session off.
    ray.init(**kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def controller_cache(ray_session) -> Iterator["OrderedDict"]:
    cache: OrderedDict = OrderedDict()
    yield cache
    for ctl in cache.values():
        ctl.shutdown()


@pytest.fixture
def make_controller(controller_cache) -> Callable[..., object]:
    """``make_controller({"tp": 2, "ep": 2})`` -> a started, session-cached Controller.

    At most MAX_LIVE_CONTROLLERS stay alive; the least recently used is shut
    down to make room. Do not kill or break workers of a cached controller.
    """
    from tessera.memory.placement import Placement
    from tessera.config import ParallelPlan, Timeouts
    from tessera.runtime.controller import Controller

    def factory(degrees: dict[str, int], device: str = "cpu") -> Controller:
        plan = ParallelPlan(dict(degrees))
        key = (tuple(plan.degrees.items()), device)
        ctl = controller_cache.get(key)
        if ctl is not None and all(s == "alive" for s in ctl.health().values()):
            controller_cache.move_to_end(key)
            return ctl
        if ctl is not None:
            ctl.shutdown()
            del controller_cache[key]
        while len(controller_cache) >= MAX_LIVE_CONTROLLERS:
            _, old = controller_cache.popitem(last=False)
            old.shutdown()
        ctl = Controller(
            Placement(plan, device=device),
            timeouts=Timeouts(placement_group_s=60, worker_start_s=180, process_group_s=120, call_s=600),
        ).start()
        controller_cache[key] = ctl
        return ctl

    return factory


@pytest.fixture(scope="session")
def session_tmp() -> Iterator[Path]:
    """A temp dir shared by the session (tiny checkpoints built once live here)."""
    path = Path(tempfile.mkdtemp(prefix="tessera-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
