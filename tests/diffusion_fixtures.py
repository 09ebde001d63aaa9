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
