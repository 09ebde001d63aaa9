"""What a model needs, read from its config and safetensors headers (never its weights).

A :class:`ModelSpec` is the planner's view of a checkpoint: how many bytes are
dense (replicated or tensor-split), how many are routed experts (spread over
``ep``), the largest single weight group (the floor of any offload budget),
and the KV-cache bytes per token. Byte counts come from the tensor shapes and
dtypes in the safetensors headers, so they are exact without reading data, and a
block-FP8 checkpoint is sized at its stored precision (FP8 weights plus their
float32 ``weight_scale_inv``); ``dequantized_bytes`` says what the same weights
take once the loader has dequantized them into the model dtype (what tessera
holds today; see ``models.fp8`` for the FP8-resident seam).

From ``config.json`` alone (no weights), :func:`checkpoint_inventory` lists every
tensor a checkpoint of that config stores (name, shape, stored dtype),
:func:`parameter_count` counts the parameters the way the releases publish them
(multi-token-prediction modules separately), and :func:`config_model_spec` builds
the same :class:`ModelSpec` for a model not downloaded yet.
"""

from __future__ import annotations

import json
import re
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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
    quantization: str = ""  # "" (unquantized) or e.g. "fp8_e4m3_block128x128": bytes above are as stored
    dequantized_bytes: int = 0  # total_bytes once FP8 weights are dequantized into the model dtype (0: unquantized)
    unused_bytes: int = 0  # stored but never loaded (multi-token-prediction modules), not in total_bytes

    @property
    def total_gib(self) -> float:
        return self.total_bytes / 2**30


def _tensor_headers(files: list[Path]) -> Iterator[tuple[str, str, tuple[int, ...], int]]:
    """(name, safetensors dtype, shape, bytes) of every tensor, from the safetensors JSON headers only."""
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
            yield name, meta["dtype"], tuple(meta["shape"]), end - start


def _tensor_sizes(files: list[Path]) -> Iterator[tuple[str, int]]:
    """(name, bytes) of every tensor, from the safetensors JSON headers only."""
    for name, _, _, size in _tensor_headers(files):
        yield name, size


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
    return _lm_model_spec(root, arch, list(_tensor_headers(files)))


def _lm_model_spec(root: Path, arch, tensors: list[tuple[str, str, tuple[int, ...], int]]) -> ModelSpec:
    """The ModelSpec of ``arch`` whose checkpoint holds ``tensors`` (name, stored dtype, shape, bytes)."""
    from tessera.models.fp8 import FP8_DTYPE, SCALE_SUFFIX

    loaded, unused = [], 0
    for name, dtype, shape, size in tensors:
        layer = _LAYER.search(name)
        if layer and int(layer.group(1)) >= arch.num_layers:  # MTP modules after the last layer: never loaded
            unused += size
        else:
            loaded.append((name, dtype, shape, size))
    experts, dense, largest = _group_bytes((name, size) for name, _, _, size in loaded)
    # What the engine caches per token: K and V of every kv head, or for multi-head latent
    # attention one latent plus the shared roped key (replicated over tp): MoEArch.kv_geometry.
    dtype_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}.get(arch.dtype, 4)
    per_token = arch.kv_bytes_per_token(dtype_bytes)
    dequantized = 0
    if arch.quantization is not None:  # FP8 weights grow to the model dtype; their scales are dropped
        dequantized = sum(math.prod(shape) * dtype_bytes if dtype == FP8_DTYPE else
                          0 if name.endswith(SCALE_SUFFIX) else size for name, dtype, shape, size in loaded)
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
        quantization=arch.quantization.name if arch.quantization else "",
        dequantized_bytes=dequantized,
        unused_bytes=unused,
    )


# -- from config.json alone ------------------------------------------------------------------

_ST_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor a checkpoint of a given config stores."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: "BF16", "F32", "F8_E4M3", ...
    kind: str  # tessera weight name ("q", "expert_up", ...); "scale" for an FP8 weight_scale_inv
    mtp: bool = False  # part of a multi-token-prediction module (stored, never loaded)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


def checkpoint_inventory(cfg: dict[str, Any]) -> list[TensorEntry]:
    """Every tensor (name, full shape, stored dtype) of a Hugging Face checkpoint of ``cfg``, from the config alone.

    Names and shapes come from the family's ``CHECKPOINT_NAMES`` and ``models.loader``'s
    ``expected_shape`` / ``layer_param_names`` (what the loader reads); a block-FP8 config stores
    the linear projections (``models.fp8.QUANTIZED_WEIGHTS``) as F8_E4M3 plus a float32
    ``weight_scale_inv`` each, everything else in the config's dtype, except DeepSeek-V3's
    ``e_score_correction_bias``, which its FP8 releases keep in float32. Multi-token-prediction
    modules (DeepSeek ``num_nextn_predict_layers``) follow the last layer, as released.
    """
    from tessera.models.fp8 import FP8_DTYPE, QUANTIZED_WEIGHTS, SCALE_SUFFIX
    from tessera.models.loader import expected_shape, layer_param_names
    from tessera.models.registry import family_for

    family = family_for((cfg.get("architectures") or ["?"])[0])
    arch = family.parse_config(cfg)
    names, quant = family.CHECKPOINT_NAMES, arch.quantization
    floating = _ST_DTYPE.get(arch.dtype, "F32")
    shapes = {kind: expected_shape(arch, kind) for kind in names}
    out: list[TensorEntry] = []
    scale_shapes: dict[tuple[int, ...], tuple[int, int]] = {}

    def add(kind: str, key: str, shape: tuple[int, ...], mtp: bool = False) -> None:
        if quant is not None and kind in QUANTIZED_WEIGHTS:
            out.append(TensorEntry(key, shape, FP8_DTYPE, kind, mtp))
            scales = scale_shapes.get(shape) or scale_shapes.setdefault(shape, quant.scale_shape(shape))
            out.append(TensorEntry(key + SCALE_SUFFIX, scales, "F32", "scale", mtp))
        else:
            dtype = "F32" if quant is not None and kind == "router_bias" else floating
            out.append(TensorEntry(key, shape, dtype, kind, mtp))

    experts = ("expert_gate", "expert_up", "expert_down")

    def add_layer(layer: int, template: int, mtp: bool = False) -> None:
        for kind in layer_param_names(arch, template):
            add(kind, names[kind].format(layer=layer), shapes[kind], mtp)
        if arch.moe_layers[template]:
            for expert in range(arch.num_experts):
                for kind in experts:
                    add(kind, names[kind].format(layer=layer, expert=expert), shapes[kind], mtp)

    add("embed", names["embed"], shapes["embed"])
    for layer in range(arch.num_layers):
        add_layer(layer, layer)
    add("final_norm", names["final_norm"], shapes["final_norm"])
    if not arch.tie_word_embeddings:
        add("lm_head", names["lm_head"], shapes["lm_head"])
    if arch.mtp_layers:  # each MTP module: its own tensors plus one decoder layer shaped like the last MoE layer
        mtp_names, mtp_shapes = family.MTP_NAMES, family.mtp_shapes(arch)
        template = (arch.moe_layer_ids or (arch.num_layers - 1,))[-1]
        for i in range(arch.mtp_layers):
            layer = arch.num_layers + i
            for kind, key in mtp_names.items():
                add(kind, key.format(layer=layer), mtp_shapes[kind], mtp=True)
            add_layer(layer, template, mtp=True)
    return out


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a released checkpoint, counted from its config (FP8 scales are not parameters)."""

    main: int  # embedding, every decoder layer, final norm, LM head: what the engine loads and runs
    mtp: int = 0  # multi-token-prediction modules, with their stored embedding/head copies

    @property
    def total(self) -> int:
        """Everything the checkpoint stores (what the hub's safetensors parameter count shows)."""
        return self.main + self.mtp


def parameter_count(cfg: dict[str, Any]) -> ParameterCount:
    """Parameter count of a checkpoint of ``cfg``, from the config alone (see :func:`checkpoint_inventory`)."""
    main = mtp = 0
    for entry in checkpoint_inventory(cfg):
        if entry.kind == "scale":
            continue
        if entry.mtp:
            mtp += entry.numel
        else:
            main += entry.numel
    return ParameterCount(main, mtp)


def checkpoint_bytes(cfg: dict[str, Any]) -> int:
    """Bytes of tensor data a checkpoint of ``cfg`` stores (``model.safetensors.index.json`` ``metadata.total_size``)."""
    return sum(entry.nbytes for entry in checkpoint_inventory(cfg))


def config_model_spec(path: str | Path) -> ModelSpec:
    """The :class:`ModelSpec` of a causal-LM directory holding only ``config.json`` (sizes at stored precision)."""
    from tessera.models.checkpoint import read_config
    from tessera.models.registry import family_for

    root = Path(path)
    cfg = read_config(root)
    archs = cfg.get("architectures") or []
    if not archs:
        raise ConfigError(f"{root / 'config.json'} names no architectures; it is not a causal-LM checkpoint")
    arch = family_for(archs[0]).parse_config(cfg)
    return _lm_model_spec(root, arch, [(e.name, e.dtype, e.shape, e.nbytes) for e in checkpoint_inventory(cfg)])


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
