"""Architecture name (``config.json`` ``architectures[0]``) -> model family module."""

from __future__ import annotations

import importlib
from types import ModuleType

from tessera.config import ConfigError

_FAMILIES = ("mixtral", "qwen_moe", "deepseek")


def _modules() -> list[ModuleType]:
    return [importlib.import_module(f"tessera.models.{name}") for name in _FAMILIES]


def supported_architectures() -> tuple[str, ...]:
    return tuple(a for m in _modules() for a in m.ARCHITECTURES)


def family_for(architecture: str) -> ModuleType:
    """The family module declaring ``architecture``; a clear error naming the supported ones otherwise."""
    for module in _modules():
        if architecture in module.ARCHITECTURES:
            return module
    raise ConfigError(
        f"architecture {architecture!r} is not supported; tessera's MoE engine supports "
        f"{', '.join(supported_architectures())}"
    )
