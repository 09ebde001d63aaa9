"""Architecture name (``config.json`` ``architectures[0]``) -> model family module.

``FAMILIES`` is the registry of language-model families (documented, fixed
at import): adding a family is one file in ``models/`` plus its entry here.
"""

from __future__ import annotations

from types import ModuleType

from tessera.errors import ConfigError
from tessera.models import deepseek, mixtral, qwen_moe

FAMILIES: tuple[ModuleType, ...] = (mixtral, qwen_moe, deepseek)


def supported_architectures() -> tuple[str, ...]:
    return tuple(a for m in FAMILIES for a in m.ARCHITECTURES)


def family_for(architecture: str) -> ModuleType:
    """The family module declaring ``architecture``; a clear error naming the supported ones otherwise."""
    for module in FAMILIES:
        if architecture in module.ARCHITECTURES:
            return module
    raise ConfigError(
        f"architecture {architecture!r} is not supported; tessera's MoE engine supports "
        f"{', '.join(supported_architectures())}"
    )
