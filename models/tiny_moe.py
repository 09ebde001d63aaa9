"""Tiny random MoE checkpoints built with transformers (no download), for tests, demos and benchmarks.

``build_tiny_moe(family, path)`` writes ``config.json`` + ``model.safetensors``
with ``save_pretrained`` (per-expert tensor names on disk), and optionally a
``tokenizer.json`` trained with the ``tokenizers`` library on a fixed text (with a
``tokenizer_config.json`` holding its special tokens and a chat template). A
directory that already holds a complete checkpoint is reused as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")

_TEXT = (
    "tessera runs mixture of experts language models across many workers. "
    "a tessera is one tile of a mosaic: a slice of heads, a stage of layers, a set of experts. "
    "the router sends every token to its top experts and the experts send the answers back. "
    "paged attention keeps the keys and values of every sequence in fixed blocks. "
    "the quick brown fox jumps over the lazy dog while the model writes one token at a time. "
)


def _config(family: str, size: dict[str, Any]):
    from transformers import (
        DeepseekV2Config,
        DeepseekV3Config,
        MixtralConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    H = size.get("hidden", 64)
    common = dict(
        vocab_size=size.get("vocab", 128),
        hidden_size=H,
        num_hidden_layers=size.get("layers", 2),
        num_attention_heads=size.get("heads", 4),
        num_key_value_heads=size.get("kv_heads", 2),
        num_experts_per_tok=size.get("top_k", 2),
        max_position_embeddings=size.get("max_positions", 512),
        initializer_range=size.get("init_std", 0.1),
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if size.get("rope_scaling"):  # e.g. {"type": "yarn", "factor": 4, "original_max_position_embeddings": 16, ...}
        common["rope_scaling"] = dict(size["rope_scaling"])
    E = size.get("experts", 4)
    inter = size.get("intermediate", 2 * H)
    moe_inter = size.get("moe_intermediate", H)
    if family == "mixtral":
        return MixtralConfig(intermediate_size=inter, num_local_experts=E, **common)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(
            intermediate_size=inter, moe_intermediate_size=moe_inter, shared_expert_intermediate_size=inter,
            num_experts=E, norm_topk_prob=False, **common,
        )
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            intermediate_size=inter, moe_intermediate_size=moe_inter, num_experts=E, norm_topk_prob=True,
            head_dim=size.get("head_dim", H // common["num_attention_heads"]), **common,
        )
    if family in ("deepseek_v2", "deepseek_v3"):
        common["num_key_value_heads"] = common["num_attention_heads"]
        mla = dict(
            intermediate_size=inter, moe_intermediate_size=moe_inter, n_routed_experts=E, n_shared_experts=1,
            first_k_dense_replace=1, q_lora_rank=size.get("q_lora_rank", 32), kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1,
        )
        if family == "deepseek_v2":
            return DeepseekV2Config(topk_method="group_limited_greedy", routed_scaling_factor=1.5, **mla, **common)
        return DeepseekV3Config(norm_topk_prob=True, routed_scaling_factor=2.5, **mla, **common)
    raise ValueError(f"unknown tiny MoE family {family!r}; use one of {', '.join(FAMILIES)}")


# The tiny tokenizer's chat template (tokenizer_config.json), for serving tests: jinja2 as transformers renders
# it, only characters of the training text (so it tokenizes without <unk>), and raise_exception for a role it
# does not know (a server answers 400 with the template's message).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('the tiny chat template knows no role ' + message['role']) }}{% endif %}"
    "{{ message['role'] }}: {{ message['content'] }}. {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _write_tokenizer_config(path: Path) -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _build_tokenizer(vocab_size: int, path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([_TEXT] * 4, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    _write_tokenizer_config(path)


def build_tiny_moe(family: str, path: str | Path, *, tokenizer: bool = False, seed: int = 0, dtype: str = "float32",
                   device: str = "cpu", **size: Any) -> Path:
    """Build (or reuse) a tiny random ``family`` checkpoint in ``path``; returns the path.

    ``size`` keys: hidden, layers, heads, kv_heads, experts, top_k, vocab, intermediate,
    moe_intermediate, head_dim, max_positions, rope_scaling, init_std (a larger std than transformers' 0.02 keeps
    logits and router scores well separated, so greedy comparisons are not ties). ``device``: where the
    random weights are drawn (``"cuda"`` builds GPU-sized benchmark checkpoints in seconds; the bytes
    then differ from a CPU build with the same seed).
    """
    path = Path(path)
    marker = path / "tessera_tiny.json"
    wanted = {"family": family, "tokenizer": tokenizer, "seed": seed, "dtype": dtype, **size}
    if device != "cpu":
        wanted["device"] = device
    if marker.is_file() and json.loads(marker.read_text()) == wanted and (path / "model.safetensors").is_file():
        if tokenizer and not (path / "tokenizer_config.json").is_file():  # built before the chat template existed
            _write_tokenizer_config(path)
        return path
    import torch
    from transformers import AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = _config(family, size)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():  # transformers inits some biases to zero; make them count
        for name, param in model.named_parameters():
            if name.endswith("e_score_correction_bias") or name.endswith("proj.bias"):
                param.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer:
        _build_tokenizer(config.vocab_size, path)
    marker.write_text(json.dumps(wanted))
    return path


# -- scaled-down twins of released configs -----------------------------------------------------

# What a twin keeps from the released config.json: every flag (routing, scoring, shared experts and
# their gate, dense prefix / sparse step, qk-norm, q/k/v bias, YaRN, sliding-window settings, MTP,
# tied embeddings, dtype); what it shrinks: widths, depths and counts (below). quantization_config
# and auto_map are dropped: a twin is saved unquantized by transformers (FP8 twins are made from it
# with quantize_checkpoint), and the remote code auto_map points to is not there.
_TWIN_DROP = ("auto_map", "quantization_config")


def released_twin_config(cfg: dict[str, Any], *, hidden: int = 64, moe_intermediate: int = 32,
                         intermediate: int = 96, vocab: int = 128, **overrides: Any) -> dict[str, Any]:
    """A scaled-down copy of a released Hugging Face ``config.json`` (same keys and flags, tiny sizes).

    GQA keeps its grouping (8 query heads, kv heads = 8 / the released group size, at least 1) and a
    head_dim wider than hidden/heads when the release has one (Qwen3-235B); routed experts shrink to
    8-32 with the released top-k and group structure (n_group, topk_group, >= 2 experts per group);
    shared experts keep their size ratio to a routed expert; a dense prefix (first_k_dense_replace)
    shrinks to one layer, followed by two MoE layers; MLA keeps q_lora_rank None or set.
    ``overrides``: config.json keys set last (e.g. wider MLA ranks for FP8 block tests).
    """
    out = _shrink(cfg, hidden, moe_intermediate, intermediate, vocab)
    out.update(overrides)
    return out


def _shrink(cfg: dict[str, Any], hidden: int, moe_intermediate: int, intermediate: int, vocab: int) -> dict[str, Any]:
    out = {k: v for k, v in cfg.items() if k not in _TWIN_DROP}
    arch = cfg["architectures"][0]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    top_k = cfg["num_experts_per_tok"]
    out.update(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, bos_token_id=1, eos_token_id=2,
               initializer_range=0.1)
    if arch.startswith("Deepseek"):
        groups = cfg.get("n_group") or 1
        per_group = max(2, -(-2 * top_k // (cfg.get("topk_group") or 1)))  # kept groups hold 2 x top_k candidates
        experts = max(16, groups * per_group)
        dense = min(cfg.get("first_k_dense_replace") or 0, 1)
        out.update(num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=dense + 2, first_k_dense_replace=dense,
                   n_routed_experts=experts, moe_intermediate_size=moe_intermediate, kv_lora_rank=32,
                   q_lora_rank=None if cfg.get("q_lora_rank") is None else 48, qk_nope_head_dim=16, qk_rope_head_dim=8,
                   v_head_dim=16)
        return out
    group = heads // kv
    out.update(num_attention_heads=8 if group > 1 else 4, num_key_value_heads=max(1, 8 // group) if group > 1 else 4,
               num_hidden_layers=2)
    base_head_dim = cfg["hidden_size"] // heads
    if cfg.get("head_dim") and cfg["head_dim"] != base_head_dim:  # e.g. Qwen3-235B: 64 heads x 128 > hidden 4096
        out["head_dim"] = 2 * hidden // out["num_attention_heads"]
    elif "head_dim" in cfg:
        out["head_dim"] = hidden // out["num_attention_heads"]
    if arch.startswith("Mixtral"):
        out.update(num_local_experts=min(cfg["num_local_experts"], 8), intermediate_size=moe_intermediate * 2)
        return out
    released_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    power_of_two = released_experts & (released_experts - 1) == 0
    out.update(num_experts=min(released_experts, 16 if power_of_two else 12),
               moe_intermediate_size=moe_intermediate)
    if cfg.get("shared_expert_intermediate_size"):
        ratio = cfg["shared_expert_intermediate_size"] // cfg["moe_intermediate_size"]
        out["shared_expert_intermediate_size"] = moe_intermediate * ratio
    if cfg.get("max_window_layers") is not None:
        out["max_window_layers"] = min(cfg["max_window_layers"], out["num_hidden_layers"])
    return out


def build_released_twin(cfg: dict[str, Any], path: str | Path, *, seed: int = 0, dtype: str = "float32",
                        **size: Any) -> Path:
    """Build (or reuse) the twin of a released ``config.json`` with transformers; returns the path.

    Weights are random (``initializer_range`` 0.1, biases too) and saved by ``save_pretrained`` in
    ``dtype``; ``size``: :func:`released_twin_config` keywords;
    the directory's ``config.json`` is then the twin in the *released* format (legacy keys such as
    ``rope_scaling``/``torch_dtype`` as the hub has them), which transformers and tessera both read.
    """
    path = Path(path)
    twin = released_twin_config(cfg, **size)
    marker = path / "tessera_twin.json"
    wanted = {"config": twin, "seed": seed, "dtype": dtype}
    if marker.is_file() and json.loads(marker.read_text()) == wanted and (path / "model.safetensors").is_file():
        return path
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = CONFIG_MAPPING[twin["model_type"]].from_dict(dict(twin))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # transformers inits some biases to zero; make them count
        for name, param in model.named_parameters():
            if name.endswith("e_score_correction_bias") or name.endswith("proj.bias"):
                param.normal_(0.0, 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True)
    (path / "config.json").write_text(json.dumps(twin, indent=2) + "\n")
    marker.write_text(json.dumps(wanted))
    return path


def quantize_checkpoint(src: str | Path, dst: str | Path, block: tuple[int, int] = (128, 128), *,
                        power_of_two: bool = True, dequantized: str | Path | None = None) -> Path:
    """Write a block-FP8 copy of the tiny checkpoint ``src`` to ``dst``, as DeepSeek-V3 ships its weights.

    Every linear projection (``models.fp8.QUANTIZED_WEIGHTS``) becomes ``float8_e4m3fn`` plus a
    float32 ``weight_scale_inv`` per ``block``; the rest keeps its dtype; ``config.json`` gains
    ``quantization_config``. ``power_of_two`` scales make each dequantized value exact in bfloat16.
    ``e_score_correction_bias`` is stored in float32, as the DeepSeek-V3 releases store it.
    ``dequantized``: also write the reference there: ``fp8 * scale_inv`` computed in float32 and cast
    to each source tensor's dtype (DeepSeek's ``fp8_cast_bf16``), the other tensors as in ``dst``,
    with the source's config.
    """
    import re

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tessera.models.fp8 import QUANTIZED_WEIGHTS, SCALE_SUFFIX, dequantize, quantize
    from tessera.models.registry import family_for

    src, dst = Path(src), Path(dst)
    cfg = json.loads((src / "config.json").read_text())
    names = family_for(cfg["architectures"][0]).CHECKPOINT_NAMES
    pattern = re.compile("|".join(
        "(?:" + re.escape(names[k]).replace(r"\{layer\}", r"\d+").replace(r"\{expert\}", r"\d+") + ")$"
        for k in sorted(QUANTIZED_WEIGHTS) if k in names))
    tensors: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            if pattern.match(name):
                data, scale = quantize(tensor, block, power_of_two=power_of_two)
                tensors[name], tensors[name + SCALE_SUFFIX] = data, scale
                reference[name] = dequantize(data, scale, block, tensor.dtype)
            else:
                tensors[name] = tensor.float() if name.endswith("e_score_correction_bias") else tensor
                reference[name] = tensors[name]
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    quantized = dict(cfg, quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                               "weight_block_size": list(block)})
    (dst / "config.json").write_text(json.dumps(quantized, indent=2) + "\n")
    if dequantized is not None:
        ref = Path(dequantized)
        ref.mkdir(parents=True, exist_ok=True)
        save_file(reference, str(ref / "model.safetensors"), metadata={"format": "pt"})
        (ref / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dst
