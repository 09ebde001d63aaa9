"""The typed, validated description of one text-to-image request.

Built on the driver (``DiffusionEngine.generate_images``) and sent to every
rank unchanged, so a bad value fails before any worker does work.
"""

from __future__ import annotations

from dataclasses import dataclass

from tessera.parallel.patch import PATCH_MODES, PatchConfig

MODES = PATCH_MODES + ("ulysses",)


@dataclass(frozen=True)
class DiffusionRequest:
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    steps: int = 20
    height: int = 64
    width: int = 64
    guidance_scale: float = 4.5
    seed: int = 0
    mode: str = "exact"
    warmup_steps: int = 1
    partial_fraction: float = 0.25
    max_sequence_length: int = 300
    output: str = "image"          # "image" | "latent"
    trace: bool = False            # return per-step model inputs/outputs (tests)

    def __post_init__(self) -> None:
        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        if len(self.negative_prompts) != len(self.prompts):
            raise ValueError(f"{len(self.negative_prompts)} negative prompts for {len(self.prompts)} prompts; "
                             "give one per prompt or a single string")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 8:
                raise ValueError(f"{name} must be an integer >= 8 pixels, got {value!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if self.output not in ("image", "latent"):
            raise ValueError(f"output must be 'image' or 'latent', got {self.output!r}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        self.patch_config()  # validates warmup_steps / partial_fraction

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def patch_config(self) -> PatchConfig:
        mode = "exact" if self.mode == "ulysses" else self.mode
        return PatchConfig(mode=mode, warmup_steps=self.warmup_steps, partial_fraction=self.partial_fraction)
