"""Block-quantized FP8 checkpoints (DeepSeek-V3 style): exact dequantization, sliced reads, and a tiny FP8 twin
that generates what its dequantized bf16 reference generates, on 1 rank and on tp=2.

Layout (models.fp8): a linear weight is ``float8_e4m3fn`` (safetensors "F8_E4M3") plus a float32
``<name>_scale_inv`` with one scale per 128x128 block; weight = fp8 * scale, block by block.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tessera.config import ConfigError
from tessera.memory.footprint import checkpoint_inventory, read_model_spec
from tessera.models.checkpoint import CheckpointError, CheckpointReader
from tessera.models.fp8 import FP8Quantization, dequantize, parse_quantization, quantize
from tessera.models.tiny_moe import build_released_twin, quantize_checkpoint
from tessera.parallel.tensor import split_range
from tessera.runtime.llm.engine import LLMEngine
from tessera.tests.llm_testing import _reference, check_against_reference, local_controller  # noqa: F401

RELEASED = Path(__file__).resolve().parent / "data" / "released" / "llm"
BLOCK = (128, 128)
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def reference_dequant(data: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Written independently of models.fp8: block by block, as DeepSeek's weight_dequant kernel does (float32 math)."""
    out = torch.empty(data.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows = slice(i * block[0], (i + 1) * block[0])
            cols = slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = data[rows, cols].to(torch.float32) * scale[i, j].item()
    return out.to(dtype)


def random_fp8(shape: tuple[int, int], block: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every finite float8_e4m3fn bit pattern at random, and random float32 scales (not powers of two)."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x3F  # the two NaN encodings
    scale_shape = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    scale = torch.rand(scale_shape, generator=g) * 1e-2 + 1e-4
    return bits.view(torch.float8_e4m3fn), scale.float()


def write_fp8(path: Path, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]], block=BLOCK) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    flat = {}
    for name, (data, scale) in tensors.items():
        flat[name], flat[name + "_scale_inv"] = data, scale
    save_file(flat, str(path / "model.safetensors"))
    quant = dict(FP8_CONFIG, weight_block_size=list(block))
    (path / "config.json").write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"], "quantization_config": quant}))
    return path


# -- config --------------------------------------------------------------------------------------------------

def test_release_quantization_config_parses():
    cfg = json.loads((RELEASED / "DeepSeek-V3" / "config.json").read_text())
    quant = parse_quantization(cfg)
    assert quant == FP8Quantization(block=(128, 128)) and quant.name == "fp8_e4m3_block128x128"
    assert quant.scale_shape((7168, 18432)) == (56, 144) and quant.scale_shape((576, 7168)) == (5, 56)  # kv_a: 4.5 blocks
    assert parse_quantization({k: v for k, v in cfg.items() if k != "quantization_config"}) is None


@pytest.mark.parametrize("quant, key", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method"),
    ({"quant_method": "compressed-tensors"}, "quant_method"),
    (dict(FP8_CONFIG, fmt="e5m2"), "fmt"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "weight_block_size"),  # per-tensor / per-channel
    (dict(FP8_CONFIG, weight_block_size=[128]), "weight_block_size"),
    (dict(FP8_CONFIG, activation_scheme="static"), "activation_scheme"),
])
def test_unsupported_quantization_is_refused_by_name(quant, key):
    with pytest.raises(ConfigError, match=key):
        parse_quantization({"architectures": ["DeepseekV3ForCausalLM"], "quantization_config": quant})


# -- dequantization ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, block", [((256, 256), BLOCK), ((300, 200), BLOCK), ((129, 1), BLOCK), ((1, 257), BLOCK),
                                          ((576, 384), BLOCK), ((100, 90), (64, 32))])
def test_dequant_equals_independent_reference_exactly(tmp_path, shape, block):
    data, scale = random_fp8(shape, block, seed=sum(shape))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(dequantize(data, scale, block, dtype), reference_dequant(data, scale, block, dtype))
    reader = CheckpointReader(write_fp8(tmp_path, {"w.weight": (data, scale)}, block), expected_dtype="bfloat16")
    assert torch.equal(reader.read("w.weight", shape), reference_dequant(data, scale, block, torch.bfloat16))
    assert torch.equal(reader.read("w.weight", dtype=torch.float32), reference_dequant(data, scale, block, torch.float32))


def test_quantize_round_trip_is_within_e4m3_precision():
    w = torch.randn(300, 200)
    for power_of_two in (False, True):
        data, scale = quantize(w, BLOCK, power_of_two=power_of_two)
        back = dequantize(data, scale, BLOCK)
        per_element = scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
        # e4m3: half an ulp of 3 mantissa bits for normals, half the subnormal step (2**-9 of the scale) below
        assert ((back - w).abs() <= 2 ** -4 * w.abs() + 2 ** -10 * per_element).all()
    data, scale = quantize(w.bfloat16(), BLOCK, power_of_two=True)  # power-of-two scales: exact in bf16
    assert torch.equal(dequantize(data, scale, BLOCK, torch.bfloat16).float(), dequantize(data, scale, BLOCK))


# -- sliced reads --------------------------------------------------------------------------------------------

SLICE_CASES = [  # (rows, cols, dim, tp): some splits on 128-block bounds, some inside a block
    (384, 640, 0, 3), (384, 640, 1, 5), (384, 640, 0, 2), (384, 640, 1, 2), (384, 640, 0, 4), (300, 200, 1, 3),
    (7 * 128, 256, 0, 7),
]


@pytest.mark.parametrize("rows, cols, dim, tp", SLICE_CASES)
def test_sliced_fp8_reads_equal_slices_of_the_full_dequantized_tensor(tmp_path, rows, cols, dim, tp):
    data, scale = random_fp8((rows, cols), BLOCK, seed=rows * tp + dim)
    path = write_fp8(tmp_path, {"w.weight": (data, scale)})
    with open(path / "model.safetensors", "rb") as f:  # stored as the releases store it
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["w.weight"]["dtype"] == "F8_E4M3" and header["w.weight_scale_inv"]["dtype"] == "F32"
    full = reference_dequant(data, scale, BLOCK, torch.bfloat16)
    size = (rows, cols)[dim]
    for rank in range(tp):
        start, stop = split_range(size, tp, rank)
        reader = CheckpointReader(path, expected_dtype="bfloat16")
        part = reader.read("w.weight", (rows, cols), dim=dim, start=start, stop=stop)
        assert torch.equal(part, full.narrow(dim, start, stop - start))
        # a rank reads its rows/columns widened to whole blocks (at most one extra block each side) and the
        # scales of exactly those blocks
        lo, hi = start // 128, -(-stop // 128)
        widened = min(hi * 128, size) - lo * 128
        assert widened <= stop - start + 2 * 127
        assert reader.bytes_read == widened * (rows, cols)[1 - dim] + scale.narrow(dim, lo, hi - lo).numel() * 4
    aligned = [size % tp == 0 and (size // tp) % 128 == 0 for rows, cols, dim, tp in SLICE_CASES
               for size in [(rows, cols)[dim]]]
    assert any(aligned) and not all(aligned)


def test_reader_refuses_fp8_it_cannot_read(tmp_path):
    data, scale = random_fp8((256, 256), BLOCK, seed=1)
    save_file({"w.weight": data}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"], "quantization_config": FP8_CONFIG}))
    with pytest.raises(CheckpointError, match="w.weight_scale_inv"):
        CheckpointReader(tmp_path).read("w.weight")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"]}))
    save_file({"w.weight": data, "w.weight_scale_inv": scale}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no block-FP8 quantization_config"):
        CheckpointReader(tmp_path).read("w.weight")
    save_file({"w.weight": data, "w.weight_scale_inv": scale[:1]}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"needs \[2, 2\]"):
        CheckpointReader(tmp_path, quantization=FP8Quantization(BLOCK)).read("w.weight")


def test_read_fp8_keeps_blocks_for_a_resident_loader(tmp_path):
    """The FP8-resident seam: read_fp8 hands back block-aligned FP8 data and scales, dequantized only on demand."""
    data, scale = random_fp8((384, 256), BLOCK, seed=3)
    reader = CheckpointReader(write_fp8(tmp_path, {"w.weight": (data, scale)}))
    block = reader.read_fp8("w.weight", dim=0, start=128, stop=256)  # aligned: no widening, no trim
    assert block.data.dtype == torch.float8_e4m3fn and torch.equal(block.data.view(torch.uint8), data[128:256].view(torch.uint8))
    assert torch.equal(block.scale_inv, scale[1:2]) and (block.trim_start, block.trim_stop) == (0, 128)
    assert torch.equal(block.dequantize(), reference_dequant(data, scale, BLOCK, torch.float32)[128:256])


# -- a tiny FP8 DeepSeek-V3 twin ------------------------------------------------------------------------------

# Wider than the default twin so that 128x128 blocks tile the weights and tp=2 cuts some of them inside a block:
# q_b 256 rows, routed and shared experts 256 (tp halves on a block bound); kv_b 384 rows, o 192 columns and the
# dense MLP's 384 (halves inside a block); kv_a 176 rows and q_a 192 (partial blocks, replicated). 16 experts in
# 8 groups, 4 groups kept, top-4.
FP8_TWIN = dict(hidden=256, moe_intermediate=256, intermediate=384, kv_lora_rank=160, q_lora_rank=192,
                qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=48, n_routed_experts=16, num_experts_per_tok=4)


@pytest.fixture(scope="module")
def fp8_twin(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    cfg = json.loads((RELEASED / "DeepSeek-V3" / "config.json").read_text())
    bf16 = build_released_twin(cfg, root / "bf16", dtype="bfloat16", **FP8_TWIN)
    fp8 = quantize_checkpoint(bf16, root / "fp8", BLOCK, power_of_two=True, dequantized=root / "dequantized")
    return fp8, _reference(root / "dequantized")


def test_fp8_twin_is_stored_like_the_release(fp8_twin):
    fp8, ref = fp8_twin
    cfg = json.loads((fp8 / "config.json").read_text())
    with open(fp8 / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    inventory = [e for e in checkpoint_inventory(cfg) if not e.mtp]  # transformers builds no MTP module
    assert {e.name: (e.dtype, list(e.shape)) for e in inventory} == {k: (v["dtype"], v["shape"]) for k, v in header.items()}
    assert sum(e.nbytes for e in inventory) == sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
    assert {e.dtype for e in inventory} == {"F8_E4M3", "F32", "BF16"}
    spec = read_model_spec(fp8)  # sized at stored precision; dequantized_bytes is what bf16 weights take
    assert spec.quantization == "fp8_e4m3_block128x128" and spec.total_bytes == sum(e.nbytes for e in inventory)
    assert spec.dequantized_bytes == read_model_spec(ref.path).total_bytes


def test_fp8_twin_single_rank_matches_dequantized_reference(local_controller, fp8_twin):  # noqa: F811
    fp8, ref = fp8_twin
    engine = LLMEngine.load(local_controller, fp8, dtype="float32", stop_at_eos=False, max_model_len=64, block_size=4)
    try:
        check_against_reference(engine, ref)
    finally:
        engine.close()
    # dequantized into bf16 on load, the model computes exactly what the dequantized bf16 checkpoint computes
    logits = []
    for path in (fp8, ref.path):
        engine = LLMEngine.load(local_controller, path, dtype="bfloat16", stop_at_eos=False, max_model_len=64, block_size=4)
        try:
            logits.append(engine.score(ref.prompts[0]))
        finally:
            engine.close()
    assert torch.equal(logits[0], logits[1])


def test_fp8_twin_tp2_matches_dequantized_reference(make_controller, fp8_twin):
    fp8, ref = fp8_twin
    engine = LLMEngine.load(make_controller({"tp": 2}), fp8, dtype="float32", stop_at_eos=False, max_model_len=64,
                            block_size=4)
    try:
        check_against_reference(engine, ref)
        file_bytes = (fp8 / "model.safetensors").stat().st_size
        # each rank reads its own slices (widened to whole blocks where tp cuts inside one), not the checkpoint
        assert all(s.bytes_read < 0.75 * file_bytes for s in engine.shards)
    finally:
        engine.close()
