"""What one forward of a model costs, per layer, from its config alone: the :class:`ModelProfile`.

The cost model needs more than a :class:`~tessera.memory.footprint.ModelSpec`
(bytes per kind): per layer, which bytes tensor parallelism splits and which it
replicates, one routed expert's bytes and FLOPs, the attention FLOPs per cached
token and the KV bytes a token adds. All of it follows from ``config.json``
(language models: the family's ``TP_PLAN`` and ``models.loader``'s shapes;
diffusion transformers: tessera's own module built on the meta device), so a
model that is not downloaded can be planned.

Bytes are as the weights would sit in device memory: a block-FP8 checkpoint at
its stored size (FP8 plus float32 block scales) when ``fp8_resident``, at the
dequantized size (the model dtype) otherwise, which is what tessera's loader
holds today (``models.fp8``). ``weights`` says which one a profile uses.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from tessera.errors import ConfigError
from tessera.memory.footprint import ModelSpec, config_model_spec, read_model_spec

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1}


@dataclass(frozen=True)
class LayerProfile:
    """One decoder layer (or DiT block): bytes by how tensor parallelism treats them, and FLOP counts.

    ``split_*``: weights cut over ``tp`` (column/row-parallel); ``kv_*``: the
    key/value projections, cut over ``tp`` only down to one kv head per rank
    (GQA replicates kv heads beyond that); ``replicated_*``: every tp rank holds
    them (norms, routers, MLA's down-projections). ``*_params``: matmul
    parameters used by every token (2 FLOPs each). ``expert_*``: one routed
    expert (0 on dense layers). ``attn_flops``: FLOPs per (query, key) pair
    over all heads; ``kv_bytes``: cache bytes one token adds to this layer.
    Diffusion blocks also say which parameters act on image tokens, text
    tokens, both, or once per sample (adaLN modulation).
    """

    split_bytes: int
    replicated_bytes: int
    split_params: int
    replicated_params: int
    kv_bytes_w: int = 0
    kv_params: int = 0
    expert_bytes: int = 0
    expert_params: int = 0
    attn_flops: int = 0
    kv_bytes: int = 0
    text_params: int = 0  # diffusion: parameters applied to text tokens only
    joint_params: int = 0  # diffusion: applied to image and text tokens (Flux single blocks)
    sample_params: int = 0  # diffusion: applied once per sample (adaLN)
    joint_attention: bool = False  # diffusion: one attention over [text, image] (MMDiT) instead of self + cross
    row_parallel: int = 2  # all-reduces per layer under tp (row-parallel outputs over the image / all tokens)
    row_text: int = 0  # diffusion: row-parallel outputs over the text tokens only (MMDiT context stream)

    @property
    def dense_bytes(self) -> int:
        return self.split_bytes + self.replicated_bytes + self.kv_bytes_w


@dataclass(frozen=True)
class ModelProfile:
    """A model as the cost model sees it (see the module docstring)."""

    kind: str  # "moe_lm" | "diffusion"
    architecture: str
    family: str
    spec: ModelSpec
    layers: tuple[LayerProfile, ...]
    first_bytes: int  # the first stage's extra weights (embedding; DiT embedders), split over tp as declared
    last_bytes: int  # the last stage's extra weights (final norm, LM head; DiT final layer)
    last_params: int  # matmul parameters of the head per token
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int = 0
    num_experts: int = 0
    top_k: int = 0
    weight_dtype: str = "bfloat16"  # what matmuls read: "float8" when FP8 stays resident
    act_dtype: str = "bfloat16"
    weights: str = "unquantized"  # "unquantized" | "fp8 as stored" | "fp8 dequantized to <dtype>"
    kv_split_over_tp: bool = True
    experts_sliceable: bool = True
    uses_cfg: bool = True  # diffusion: classifier-free guidance doubles the batch
    patch: int = 2  # diffusion: latent pixels per token side (Flux: 2 by packing)
    vae_scale: int = 8
    text_tokens: int = 0  # diffusion: the prompt's tokens the transformer sees
    others_bytes: int = 0  # diffusion: text encoders and VAE (rank 0 holds them), 0 when only the config is known

    @property
    def act_bytes(self) -> int:
        return DTYPE_BYTES.get(self.act_dtype, 2)

    @property
    def weight_bytes(self) -> int:
        return sum(l.dense_bytes + self.num_experts * l.expert_bytes for l in self.layers) + self.first_bytes + self.last_bytes

    @property
    def moe_layers(self) -> int:
        return sum(1 for l in self.layers if l.expert_bytes)


# -- language models -------------------------------------------------------------------------------------------


def _lm_profile(root: Path, fp8_resident: bool, spec: ModelSpec) -> ModelProfile:
    from tessera.models.checkpoint import read_config
    from tessera.models.fp8 import QUANTIZED_WEIGHTS
    from tessera.models.loader import expected_shape, layer_param_names
    from tessera.models.registry import family_for

    cfg = read_config(root)
    family = family_for((cfg.get("architectures") or ["?"])[0])
    arch = family.parse_config(cfg)
    quant = arch.quantization
    dtype_bytes = DTYPE_BYTES.get(arch.dtype, 4)
    resident = quant is not None and fp8_resident

    def nbytes(kind: str) -> tuple[int, int]:
        """(bytes in device memory, matmul parameters) of one tensor of this kind."""
        shape = expected_shape(arch, kind)
        numel = math.prod(shape)
        params = numel if len(shape) == 2 else 0
        if quant is not None and kind in QUANTIZED_WEIGHTS and resident:
            return numel + math.prod(quant.scale_shape(shape)) * 4, params
        if quant is not None and kind == "router_bias":  # float32 in FP8 releases, kept as stored
            return numel * 4, 0
        return numel * dtype_bytes, params

    plan = family.TP_PLAN
    expert_b = sum(nbytes(k)[0] for k in ("expert_gate", "expert_up", "expert_down"))
    expert_p = sum(nbytes(k)[1] for k in ("expert_gate", "expert_up", "expert_down"))
    heads, kv_heads = arch.num_heads, arch.num_kv_heads
    if arch.attention == "mla":  # absorbed MLA: scores over (latent + rope), values over the latent
        attn_flops = 2 * heads * (2 * arch.kv_lora_rank + arch.rope_dim)
    else:
        attn_flops = 2 * heads * (arch.qk_head_dim + arch.v_head_dim)
    heads_, kdim, vdim = arch.kv_geometry(kv_heads)
    kv_token = heads_ * (kdim + vdim) * dtype_bytes
    layers = []
    for layer, moe in enumerate(arch.moe_layers):
        split_b = rep_b = kv_b = split_p = rep_p = kv_p = 0
        for kind in layer_param_names(arch, layer):
            b, p = nbytes(kind)
            how = plan.get(kind, "replicate")
            if how == "replicate":
                rep_b, rep_p = rep_b + b, rep_p + p
            elif how == "colwise_kv":
                kv_b, kv_p = kv_b + b, kv_p + p
            else:
                split_b, split_p = split_b + b, split_p + p
        layers.append(LayerProfile(split_b, rep_b, split_p, rep_p, kv_b, kv_p, expert_b if moe else 0,
                                   expert_p if moe else 0, attn_flops, kv_token, row_parallel=2))
    embed_b = nbytes("embed")[0]
    head_b, head_p = nbytes("lm_head") if not arch.tie_word_embeddings else (0, math.prod(expected_shape(arch, "embed")))
    last_b = head_b + nbytes("final_norm")[0]
    if quant is None:
        weights = "unquantized"
        weight_dtype = arch.dtype if arch.dtype in DTYPE_BYTES else "float32"
    elif resident:
        weights, weight_dtype = f"{quant.name} as stored (FP8 weights stay resident)", "float8"
    else:
        weights, weight_dtype = f"{quant.name} dequantized to {arch.dtype} on load (what tessera's loader holds today)", arch.dtype
    return ModelProfile(
        kind="moe_lm", architecture=arch.architecture, family=arch.family, spec=spec, layers=tuple(layers),
        first_bytes=embed_b, last_bytes=last_b, last_params=head_p, hidden=arch.hidden_size, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=arch.qk_head_dim, vocab=arch.vocab_size, num_experts=arch.num_experts,
        top_k=arch.top_k if any(arch.moe_layers) else 0, weight_dtype=weight_dtype,
        act_dtype=arch.dtype if arch.dtype in DTYPE_BYTES else "float32", weights=weights,
        kv_split_over_tp=arch.attention != "mla")


# -- diffusion transformers --------------------------------------------------------------------------------------

TEXT_TOKENS = {"pixart": 300, "sd3": 333, "flux": 512}  # T5 (+ CLIP) tokens each pipeline feeds by default


def diffusion_family(cfg: Mapping[str, Any], where: str) -> str:
    """tessera's family of a diffusers ``transformer/config.json`` (the generic ``Transformer2DModel``
    with ``norm_type: ada_norm_single`` is PixArt-alpha/Sigma, as diffusers itself maps it)."""
    from tessera.models.diffusers_loader import ModelDirError, family_of

    try:
        return family_of(cfg).NAME  # the loader's own mapping, generic Transformer2DModel included
    except ModelDirError as err:
        raise ConfigError(f"{where}: {err}") from None


def _token_kind(block_list: str, rel: str) -> str:
    """Which tokens a linear of a DiT block acts on, from tessera's module names."""
    if rel.startswith("norm"):
        return "sample"
    if "add_" in rel or "context" in rel or rel in ("attn2.to_k", "attn2.to_v"):
        return "text"
    return "joint" if block_list.startswith("single") else "image"


def _dit_profile(cfg: Mapping[str, Any], where: str, spec: ModelSpec | None, dtype: str, others: int) -> ModelProfile:
    from tessera.models.diffusers_loader import FAMILIES, build_transformer

    family = diffusion_family(cfg, where)
    plan = FAMILIES[family]  # the family file: TP_PLAN (what tp splits, and how) and STAGES (blocks, head)
    try:
        model = build_transformer(family, cfg)  # meta device: shapes only, no memory
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None
    wbytes = DTYPE_BYTES[dtype]

    def match(name: str, patterns: tuple[str, ...]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)

    split_patterns = tuple(plan.TP_PLAN)  # every kind splits the weight over tp
    row_patterns = tuple(p for p, kind in plan.TP_PLAN.items() if kind in ("rowwise", "rowwise_pieces"))
    layers = []
    joint = family in ("sd3", "flux")
    d = model.config.num_attention_heads * model.config.attention_head_dim
    for list_name in plan.STAGES.blocks:
        for i, block in enumerate(getattr(model, list_name)):
            counts = {"split_b": 0, "rep_b": 0, "image": 0, "text": 0, "joint": 0, "sample": 0, "split_p": 0, "rows": 0,
                      "rows_text": 0}
            for rel, param in block.named_parameters():
                full = f"{list_name}.{i}.{rel}"
                module = full.rsplit(".", 1)[0]
                split = match(module, split_patterns)
                counts["split_b" if split else "rep_b"] += param.numel() * wbytes
                if param.dim() == 2:
                    mrel = rel.rsplit(".", 1)[0]
                    counts[_token_kind(list_name, mrel)] += param.numel()
                    counts["split_p"] += param.numel() if split else 0
                    if match(module, row_patterns):
                        counts["rows_text" if _token_kind(list_name, mrel) == "text" else "rows"] += 1
            layers.append(LayerProfile(
                split_bytes=counts["split_b"], replicated_bytes=counts["rep_b"], split_params=counts["image"],
                replicated_params=0, text_params=counts["text"], joint_params=counts["joint"],
                sample_params=counts["sample"], attn_flops=4 * d, joint_attention=joint,
                row_parallel=counts["rows"], row_text=counts["rows_text"]))
    block_ids = {id(p) for name in plan.STAGES.blocks for p in getattr(model, name).parameters()}
    first = last = last_p = 0
    for name, param in model.named_parameters():
        if id(param) in block_ids:
            continue
        nb = param.numel() * wbytes
        if match(name.rsplit(".", 1)[0], plan.STAGES.head) or match(name, plan.STAGES.head):
            last += nb
            last_p += param.numel() if param.dim() == 2 else 0
        else:
            first += nb
    heads, head_dim = model.config.num_attention_heads, model.config.attention_head_dim
    total = first + last + sum(l.dense_bytes for l in layers)
    if spec is None:
        spec = ModelSpec(path=where, kind="diffusion", architecture=str(cfg.get("_class_name", family)),
                         total_bytes=total, expert_bytes=0, dense_bytes=total,
                         largest_group_bytes=max(l.dense_bytes for l in layers), num_layers=len(layers),
                         num_heads=heads, num_kv_heads=heads)
    return ModelProfile(
        kind="diffusion", architecture=spec.architecture, family=family, spec=spec, layers=tuple(layers),
        first_bytes=first, last_bytes=last, last_params=last_p, hidden=d, num_heads=heads, num_kv_heads=heads,
        head_dim=head_dim, weight_dtype=dtype, act_dtype=dtype, weights=f"{dtype} (as the engine loads it)",
        uses_cfg=family != "flux", patch=2 if family == "flux" else int(cfg.get("patch_size", 2)),
        text_tokens=TEXT_TOKENS[family], others_bytes=others)


# -- the entry point ---------------------------------------------------------------------------------------------


def model_profile(path: str | Path, fp8_resident: bool = False, dtype: str | None = None) -> ModelProfile:
    """The profile of a model directory: a Hugging Face causal LM (``config.json``, with or without weights),
    a diffusers pipeline (``model_index.json`` + ``transformer/``) or a diffusers transformer folder
    (``config.json`` with ``_class_name``, or a folder holding ``transformer/config.json`` only).

    ``fp8_resident``: plan block-FP8 weights at their stored size (see the module docstring).
    ``dtype``: the diffusion engine's weight dtype (default bfloat16, as one would serve it).
    """
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"model directory {root} does not exist; give a folder holding config.json "
                          "(a causal LM, weights optional) or a diffusers transformer/config.json")
    transformer = root / "transformer" / "config.json"
    config = root / "config.json"
    if transformer.is_file() or (config.is_file() and "_class_name" in config.read_text()[:8192]):
        cfg_file = transformer if transformer.is_file() else config
        cfg = json.loads(cfg_file.read_text())
        dtype = dtype or "bfloat16"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype {dtype!r} is not a diffusion engine dtype; use float32, bfloat16 or float16")
        others = 0  # text encoders and VAE as stored, when the pipeline's weights are here
        if (root / "model_index.json").is_file() and list((root / "transformer").glob("*.safetensors")):
            spec = read_model_spec(root)
            others = max(0, spec.total_bytes - _transformer_bytes(spec))
        return _dit_profile(cfg, str(cfg_file), None, dtype, others)
    if not config.is_file():
        raise ConfigError(f"{root} has neither config.json nor transformer/config.json; give a causal-LM or a "
                          "diffusers model folder (weights are optional for planning)")
    spec = read_model_spec(root) if list(root.glob("*.safetensors")) else config_model_spec(root)
    return _lm_profile(root, fp8_resident, spec)


def _transformer_bytes(spec: ModelSpec) -> int:
    from tessera.memory.footprint import _tensor_sizes, _weight_files

    return sum(size for _, size in _tensor_sizes(_weight_files(Path(spec.path) / "transformer")))
