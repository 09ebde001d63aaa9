"""Launch surfaces: the Python API, the CLI, ``ray job`` entry points and SLURM rendering.

Everything the user types becomes one :class:`~tessera.config.JobSpec`
(inside a :class:`~tessera.launch.jobfile.JobFile`) here; nothing else parses
arguments.

``tessera.launch`` is both this subpackage and the launcher function:
``tessera.launch(model=..., plan=...)`` calls :func:`tessera.launch.api.launch`,
while ``import tessera.launch.api`` keeps working. The module's class is a
``ModuleType`` subclass with ``__call__``; everything heavy is imported only
on call, so ``tessera --help`` stays fast.
"""

from __future__ import annotations

import sys
import types
from typing import Any

__all__ = ["launch", "launch_job", "Handle", "JobFile"]


class _LaunchModule(types.ModuleType):
    """The ``tessera.launch`` module, callable as the launcher."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from tessera.launch.api import launch

        return launch(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # lazy re-exports
        if name in ("launch", "launch_job", "Handle"):
            from tessera.launch import api

            return getattr(api, name)
        if name == "JobFile":
            from tessera.launch.jobfile import JobFile

            return JobFile
        raise AttributeError(f"module 'tessera.launch' has no attribute {name!r}")


sys.modules[__name__].__class__ = _LaunchModule
