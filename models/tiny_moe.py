"""Tiny random MoE checkpoints built with transformers (no download), for tests, demos and benchmarks.

``build_tiny_moe(family, path)`` writes ``config.json`` + ``model.safetensors``
with ``save_pretrained`` (per-expert tensor names on disk), and optionally a
``tokenizer.json`` trained with the ``tokenizers`` library on a fixed text. A
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


def _build_tokenizer(vocab_size: int, path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([_TEXT] * 4, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))


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
