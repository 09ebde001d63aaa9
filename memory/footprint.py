"""What a model needs, read from its config and safetensors headers (never its weights).

A :class:`ModelSpec` is the planner's view of a checkpoint: how many bytes are
dense (replicated or tensor-split), how many are routed experts (spread over
``ep``), the largest single weight group (the floor of any offload budget),
and the KV-cache bytes per token. Byte counts come from the tensor shapes and
dtypes in the safetensors headers, so they are exact without reading data.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tessera.config import ConfigError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
_EXPERT = re.compile(r"\.layers\.(\d+)\..*\.experts\.(\d+)\.")
_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.")


@dataclass(frozen=True)
class ModelSpec:
    """Sizes and shape facts of one checkpoint, enough to plan a placement."""

    path: str
    kind: str  # "moe_lm" | "diffusion"
    architecture: str
    total_bytes: int
    expert_bytes: int  # routed experts, all layers
    dense_bytes: int  # everything else (attention, norms, embeddings, dense MLPs, shared experts)
    largest_group_bytes: int  # one expert, or one layer's dense weights: the smallest unit that moves
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int = 0
    kv_bytes_per_token: int = 0
    kv_split_over_tp: bool = True  # False: every tp rank caches all of it (MLA latents)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / 2**30


def _tensor_sizes(files: list[Path]) -> Iterator[tuple[str, int]]:
    """(name, bytes) of every tensor, from the safetensors JSON headers only."""
    for file in files:
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len < 1 << 30:
                raise ConfigError(f"{file} is not a safetensors file (bad header length {header_len})")
            header = json.loads(f.read(header_len))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            yield name, end - start


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"no *.safetensors weights in {folder}; tessera loads only safetensors "
            "(convert .bin/.pt checkpoints with transformers' save_pretrained(safe_serialization=True))"
        )
    return files


def _group_bytes(sizes: Iterator[tuple[str, int]]) -> tuple[int, int, int]:
    """(expert bytes, dense bytes, largest group bytes)."""
    experts: dict[tuple[int, int], int] = {}
    layers: dict[int, int] = {}
    other = 0
    for name, size in sizes:
        expert = _EXPERT.search(name)
        if expert:
            key = (int(expert.group(1)), int(expert.group(2)))
            experts[key] = experts.get(key, 0) + size
            continue
        layer = _LAYER.search(name)
        if layer:
            layers[int(layer.group(1))] = layers.get(int(layer.group(1)), 0) + size
        else:
            other += size
    expert_bytes = sum(experts.values())
    dense = sum(layers.values()) + other
    largest = max([*experts.values(), *layers.values(), other, 1])
    return expert_bytes, dense, largest


def read_model_spec(path: str | Path) -> ModelSpec:
    """Read a Hugging Face causal-LM or diffusers directory into a :class:`ModelSpec`."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"model directory {root} does not exist; give a local Hugging Face or diffusers directory")
    if (root / "model_index.json").exists():
        return _diffusion_spec(root)
    if (root / "config.json").exists():
        return _lm_spec(root)
    raise ConfigError(
        f"{root} has neither config.json (a language model) nor model_index.json (a diffusers pipeline)"
    )


def _lm_spec(root: Path) -> ModelSpec:
    from tessera.models.checkpoint import read_config
    from tessera.models.registry import family_for

    cfg = read_config(root)
    archs = cfg.get("architectures") or []
    if not archs:
        raise ConfigError(f"{root / 'config.json'} names no architectures; it is not a causal-LM checkpoint")
    files = _weight_files(root)
    arch = family_for(archs[0]).parse_config(cfg)  # the engine's own reading of the config
    experts, dense, largest = _group_bytes(_tensor_sizes(files))
    # What the engine caches per token: K and V of every kv head, or for multi-head latent
    # attention one latent plus the shared roped key (replicated over tp): MoEArch.kv_geometry.
    per_token = arch.kv_bytes_per_token({"float32": 4, "float16": 2, "bfloat16": 2}.get(arch.dtype, 4))
    return ModelSpec(
        path=str(root),
        kind="moe_lm",
        architecture=arch.architecture,
        total_bytes=experts + dense,
        expert_bytes=experts,
        dense_bytes=dense,
        largest_group_bytes=largest,
        num_layers=arch.num_layers,
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads,
        num_experts=arch.num_experts,
        kv_bytes_per_token=per_token,
        kv_split_over_tp=arch.attention != "mla",
    )


def _diffusion_spec(root: Path) -> ModelSpec:
    index = json.loads((root / "model_index.json").read_text())
    transformer = root / "transformer"
    if not (transformer / "config.json").exists():
        raise ConfigError(f"{root} has no transformer/config.json; tessera runs diffusion transformers (DiT, MMDiT)")
    cfg = json.loads((transformer / "config.json").read_text())
    _, dense, largest = _group_bytes(_tensor_sizes(_weight_files(transformer)))
    others = 0
    for component in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        folder = root / component
        if folder.is_dir() and list(folder.glob("*.safetensors")):
            others += sum(size for _, size in _tensor_sizes(_weight_files(folder)))
    heads = int(cfg.get("num_attention_heads", 1))
    layers = int(cfg.get("num_layers", 0)) + int(cfg.get("num_single_layers", 0))
    return ModelSpec(
        path=str(root),
        kind="diffusion",
        architecture=str(index.get("_class_name", cfg.get("_class_name", "unknown"))),
        total_bytes=dense + others,
        expert_bytes=0,
        dense_bytes=dense + others,
        largest_group_bytes=largest,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
    )
