"""Session-wide tiny diffusion checkpoints and engines shared by the tests/test_diffusion_*.py files."""

from __future__ import annotations

import pytest

from tessera.models.tiny_diffusion import build_tiny_diffusion


@pytest.fixture(scope="session")
def tiny_pixart(session_tmp):
    return str(build_tiny_diffusion("pixart", session_tmp / "tiny-pixart"))


def engine_on(make_controller, degrees: dict, model_dir: str):
    """A DiffusionEngine on the session-cached controller for ``degrees`` (load is cached per worker)."""
    from tessera.runtime.diffusion.engine import DiffusionEngine

    return DiffusionEngine.load(make_controller(degrees), model_dir, progress=False)


@pytest.fixture(scope="session")
def tiny_flux3(session_tmp):
    """Flux with one double-stream and two single-stream blocks: pp=2 cuts inside the single list."""
    return str(build_tiny_diffusion("flux", session_tmp / "tiny-flux-3", layers=3))


@pytest.fixture(scope="session")
def tiny_sd3(session_tmp):
    return str(build_tiny_diffusion("sd3", session_tmp / "tiny-sd3"))


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def tp_split_bytes(model_dir: str) -> tuple[int, int]:
    """(all parameter bytes, bytes tp splits: column-split weights+biases (gathered too), row-split weights)."""
    import fnmatch

    from torch import nn

    from tessera.models.diffusers_loader import DiffusersDir, load_transformer

    model_path = DiffusersDir.open(model_dir)
    model = load_transformer(model_path)
    plan = model_path.module.TP_PLAN
    split = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        kind = next((k for p, k in plan.items() if fnmatch.fnmatchcase(name, p)), None)
        if kind in ("colwise", "colwise_gather"):
            split += param_bytes(mod)
        elif kind in ("rowwise", "rowwise_pieces"):
            split += mod.weight.numel() * mod.weight.element_size()
    return param_bytes(model), split


class NoWorkers:
    """A controller stand-in: the plan is there, but any call to a worker fails the test."""

    def __init__(self, degrees):
        from tessera.config import ParallelPlan
        from tessera.memory.placement import Placement

        self.placement = Placement(ParallelPlan(degrees), device="cpu")

    def collective_rpc(self, *args, **kwargs):
        raise AssertionError("a bad plan or request reached the workers")
