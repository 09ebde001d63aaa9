"""tessera: a Ray-orchestrated runtime for large MoE and diffusion-transformer inference.

The repository's top-level folders are this package's subpackages:
``tessera.runtime`` (controller, workers, engines), ``tessera.parallel`` (how a
module is split over a mesh dim), ``tessera.memory`` (footprints, planner,
placement), ``tessera.offload`` (tiers), ``tessera.launch`` (API, CLI, Ray job,
SLURM), ``tessera.models`` (one file per model family).
"""

__version__ = "0.1.0"

from tessera import launch  # noqa: E402  (callable: tessera.launch(model=..., plan=...))
from tessera.config import JobSpec, ParallelPlan  # noqa: E402

__all__ = ["JobSpec", "ParallelPlan", "__version__", "launch", "serve"]


def serve(*args, **kwargs):
    """Serve a model over an OpenAI-compatible HTTP API (see :func:`tessera.launch.api.serve`)."""
    from tessera.launch.api import serve as _serve

    return _serve(*args, **kwargs)
