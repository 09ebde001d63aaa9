"""What every diffusion-transformer family file (``pixart.py``, ``sd3.py``, ``flux.py``) declares.

A family file holds everything family-specific, so adding a family is one
file plus one line in the registry (``models/diffusers_loader.py``). It
provides, at module level:

- ``NAME`` and ``DIFFUSERS_CLASSES``: the family's name and the diffusers
  ``_class_name`` values of ``transformer/config.json`` it reads;
- ``parse(config) -> Config``: the config parsed and checked key by key:
  every key is read, or known not to change the
  math, or refused by name (``CONFIG_KEYS``, a :class:`ConfigKeys`);
  ``build(config) -> nn.Module``: the transformer;
- ``TP_PLAN`` (module-name pattern -> split kind, the vocabulary of
  ``parallel/tensor.py``), ``TP_PIECES`` (widths of ``rowwise_pieces``
  inputs) and ``STAGES`` (:class:`StagePlan`): what is parallel, applied by
  ``parallel/dit_tensor.py`` and ``parallel/dit_pipeline.py``. Image-token
  self-attention always goes through the model's pluggable ``self_attn``
  (``models/dit_layers.py``), which ``parallel/patch.py`` / ``ulysses.py``
  replace;
- ``JOINT_TEXT``: whether text tokens are a stream of joint attention
  (sharded with the image under sp) or only cross-attention keys;
- ``defaults(config) -> DiTDefaults``: the request defaults the matching
  diffusers pipeline uses;
- ``Pipeline``: the adapter a denoising loop drives, mirroring the diffusers
  pipeline (prompt encoding with the checkpoint's text encoders, timesteps,
  latent layout, VAE scaling);
- ``tiny_config`` / ``tiny_twin_config`` / ``tiny_pipeline``: random tiny
  diffusers pipelines for tests and demos (``models/tiny_diffusion.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from tessera.errors import ConfigError

# Keys diffusers writes into every config.json that describe the file, not the model.
METADATA_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})


@dataclass(frozen=True)
class DiTDefaults:
    """Request defaults of a family (those of its diffusers pipeline) and the longest text it accepts."""

    guidance_scale: float
    steps: int
    max_sequence_length: int
    max_sequence_limit: int = 512  # T5's positions in the released pipelines; diffusers refuses more


@dataclass(frozen=True)
class StagePlan:
    """Where pipeline stages may cut (read by ``parallel/dit_pipeline.py``).

    ``blocks``: the block lists, in forward order, cut as one sequence;
    ``embed`` / ``head``: top-level modules or parameters only the first /
    last stage holds.
    """

    blocks: tuple[str, ...]
    embed: tuple[str, ...] = ()
    head: tuple[str, ...] = ()


@dataclass
class Conditioning:
    """Text conditioning of one branch (cond or uncond) for a batch of prompts: named tensors."""

    tensors: dict[str, torch.Tensor]

    def cat(self, other: "Conditioning") -> "Conditioning":
        return Conditioning({k: torch.cat([v, other.tensors[k]]) for k, v in self.tensors.items()})

    def select(self, rows: slice | list[int]) -> "Conditioning":
        """Batch rows ``rows``: a slice (a pipeline micro-batch) or a list of row indices (one image's branches)."""
        return Conditioning({k: v[rows] for k, v in self.tensors.items()})

    @staticmethod
    def concat(parts: list["Conditioning"]) -> "Conditioning":
        """The rows of ``parts`` in order (prompts encoded one at a time, then batched)."""
        return Conditioning({k: torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors})


@dataclass(frozen=True)
class ConfigKeys:
    """How a family treats each key of a ``transformer/config.json``: the flag support list.

    ``read``: keys the family parses; ``fixed``: keys tessera implements for the
    listed values only; ``no_effect``: keys that do not change inference (key ->
    why). Any other key is unknown and refused: a released config whose flag
    tessera ignored would give a different image without an error.
    """

    read: frozenset[str]
    fixed: Mapping[str, tuple] = field(default_factory=dict)
    no_effect: Mapping[str, str] = field(default_factory=dict)

    def classify(self, key: str, value: Any) -> str:
        """"metadata", "read", "checked", "no effect" or "refused"."""
        if key in METADATA_KEYS:
            return "metadata"
        if key in self.read:
            return "read"
        if key in self.no_effect:
            return "no effect"
        if key in self.fixed and value in self.fixed[key]:
            return "checked"
        return "refused"

    def check(self, family: str, config: Mapping[str, Any]) -> None:
        """Refuse the first key tessera would silently get wrong, naming it and what is implemented."""
        for key, value in config.items():
            if self.classify(key, value) != "refused":
                continue
            if key in self.fixed:
                raise ConfigError(f"{family}: transformer/config.json sets {key}={value!r}; tessera implements "
                                  f"{key} in {list(self.fixed[key])} only")
            raise ConfigError(f"{family}: transformer/config.json has the key {key!r}, which tessera's {family} "
                              "does not implement; use diffusers for this checkpoint, or remove the key if it does "
                              "not change the model")


def flow_shift_mu(image_seq_len: int, config: Mapping[str, Any]) -> float:
    """The resolution-dependent timestep shift of flow-matching pipelines (linear in the token count)."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters (not buffers: SD3's position table is a buffer) of a module, meta or not."""
    return sum(p.numel() for p in model.parameters())


