"""The typed, validated description of one text-to-image request.

Built on the driver (``DiffusionEngine.generate_images``) and sent to every
rank unchanged, so a bad value fails before any worker does work, with a
message that names the argument and what it accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tessera.parallel.patch import PATCH_MODES, PatchConfig

MODES = PATCH_MODES + ("ulysses",)
STALE_KV_MODES = ("displaced", "partial")  # patch-parallel ranks reuse neighbours' K/V from earlier steps


def keeps_stale_kv(mode: str, sp: int) -> bool:
    """Whether ranks carry per-layer state from one step to the next (stale neighbour K/V): then a rank's state
    is more than its latents and scheduler, and the batch's images share it."""
    return sp > 1 and mode in STALE_KV_MODES
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def prompt_tuple(value: Any, name: str) -> tuple[str, ...]:
    """A string or a list/tuple of strings as a tuple; anything else is refused, naming ``name``."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"{name}[{i}] must be a string, got {type(item).__name__}")
    return tuple(value)


@dataclass(frozen=True)
class DiffusionRequest:
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    steps: int = 20
    height: int = 64
    width: int = 64
    guidance_scale: float = 4.5
    seed: int | tuple[int, ...] = 0  # one seed (a batch-shaped draw, as diffusers), or one per prompt
    mode: str = "exact"
    warmup_steps: int = 1
    partial_fraction: float = 0.25
    max_sequence_length: int = 300
    output: str = "image"          # "image" | "latent"
    trace: bool = False            # return per-step model inputs/outputs (tests)
    batch_invariant: bool = False  # each image computed with the shapes it has alone: the same bits as alone

    def __post_init__(self) -> None:
        if not isinstance(self.prompts, tuple) or not self.prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        prompt_tuple(self.prompts, "prompts")
        if not isinstance(self.negative_prompts, tuple):
            raise ValueError("negative_prompts must be a tuple of strings")
        prompt_tuple(self.negative_prompts, "negative_prompt")
        if len(self.negative_prompts) != len(self.prompts):
            raise ValueError(f"{len(self.negative_prompts)} negative prompts for {len(self.prompts)} prompts; "
                             "give one per prompt or a single string")
        if not _is_int(self.steps) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if not _is_int(value) or value < 8:
                raise ValueError(f"{name} must be an integer >= 8 pixels, got {value!r}")
        if not _is_real(self.guidance_scale) or not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r} "
                             "(<= 1 runs without classifier-free guidance)")
        seeds = self.seed if isinstance(self.seed, tuple) else (self.seed,)
        if not seeds or any(not _is_int(s) or not 0 <= s <= MAX_SEED for s in seeds):
            raise ValueError(f"seed must be an integer in [0, 2**64 - 1] (or one per prompt), got {self.seed!r}")
        if isinstance(self.seed, tuple) and len(self.seed) != len(self.prompts):
            raise ValueError(f"{len(self.seed)} seeds for {len(self.prompts)} prompts; give one seed, or one per prompt")
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if not _is_int(self.max_sequence_length) or self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be an integer >= 1 (text tokens), "
                             f"got {self.max_sequence_length!r}")
        if self.output not in ("image", "latent"):
            raise ValueError(f"output must be 'image' or 'latent', got {self.output!r}")
        if not isinstance(self.trace, bool):
            raise ValueError(f"trace must be true or false, got {self.trace!r}")
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"batch_invariant must be true or false, got {self.batch_invariant!r}")
        if not _is_real(self.partial_fraction) or not math.isfinite(self.partial_fraction):
            raise ValueError(f"partial_fraction must be a number in (0, 1], got {self.partial_fraction!r}")
        self.patch_config()  # validates warmup_steps / partial_fraction

    def noise(self, channels: int, height: int, width: int):
        """The initial latents [prompts, channels, height, width] in fp32 on the CPU.

        One seed: one batch-shaped draw (diffusers' ``randn_tensor`` with one CPU generator). One seed per
        prompt: each prompt's row drawn alone from its seed, so a prompt's image does not depend on the
        others it is batched with (what request batching relies on).
        """
        import torch

        if isinstance(self.seed, tuple):
            return torch.cat([torch.randn((1, channels, height, width), dtype=torch.float32,
                                          generator=torch.Generator().manual_seed(s)) for s in self.seed])
        return torch.randn((len(self.prompts), channels, height, width), dtype=torch.float32,
                           generator=torch.Generator().manual_seed(self.seed))

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def patch_config(self) -> PatchConfig:
        mode = "exact" if self.mode == "ulysses" else self.mode
        return PatchConfig(mode=mode, warmup_steps=self.warmup_steps, partial_fraction=self.partial_fraction)
