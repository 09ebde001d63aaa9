"""Controller, worker actors, process groups and mesh, engines, health."""

from tessera.config import ConfigError, JobSpec, ParallelPlan, Timeouts

__all__ = ["ConfigError", "JobSpec", "ParallelPlan", "Timeouts"]
