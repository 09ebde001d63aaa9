"""Bad checkpoints, plans and expert maps fail with errors that name the tensor, file or fix,
raised on the driver before workers load anything where possible."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tessera.memory.placement import Placement
from tessera.models.checkpoint import CheckpointError
from tessera.config import ConfigError, ParallelPlan
from tessera.runtime.llm.engine import LLMEngine
from tessera.tests.llm_testing import local_controller, tiny_refs  # noqa: F401


class PlanOnly:
    """A controller with a plan and no workers: load must fail before calling them."""

    def __init__(self, degrees):
        self.placement = Placement(ParallelPlan(degrees))

    def collective_rpc(self, *a, **k):
        raise AssertionError("workers were called although the plan is invalid")


@pytest.fixture
def broken(tiny_refs, tmp_path):  # noqa: F811
    """A writable copy of the tiny Mixtral checkpoint and its tensors."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_refs["mixtral"].path, dst)
    return dst, load_file(dst / "model.safetensors")


def _load(ctl, path, **kw):
    return LLMEngine.load(ctl, path, **{"dtype": "float32", "max_model_len": 32, **kw})


def test_missing_tensor_names_tensor_and_file(local_controller, broken):  # noqa: F811
    path, tensors = broken
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    del tensors[name]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as err:
        _load(local_controller, path)
    assert "model.safetensors" in str(err.value)


def test_misshaped_tensor(local_controller, broken):  # noqa: F811
    path, tensors = broken
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name][:-4].contiguous()
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"q_proj\.weight.*shape \[60, 64\].*\[64, 64\]"):
        _load(local_controller, path)


def test_dtype_mismatch(local_controller, broken):  # noqa: F811
    path, tensors = broken
    name = "model.layers.0.post_attention_layernorm.weight"
    tensors[name] = tensors[name].to(torch.float16)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"post_attention_layernorm.*F16.*float32"):
        _load(local_controller, path)


def test_unsupported_architecture_and_missing_weights(broken, tmp_path):
    path, _ = broken
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="LlamaForCausalLM.*MixtralForCausalLM"):
        _load(PlanOnly({}), path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json not found"):
        _load(PlanOnly({}), empty)
    shutil.copy(path / "config.json", empty / "config.json")
    cfg["architectures"] = ["MixtralForCausalLM"]
    (empty / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        _load(PlanOnly({}), empty)


@pytest.mark.parametrize(
    "degrees, options, message",
    [
        ({"tp": 3}, {}, "4 attention heads cannot be split over tp=3"),
        ({"pp": 4}, {}, "pp=4 stages for 2 layers"),
        ({"ep": 3, "tp": 1}, {"expert_map": [0, 1, 2]}, "has 3 entries"),
        ({"ep": 2}, {"expert_map": [0, 0, 0, 0]}, r"leaves ep rank\(s\) \[1\] without experts"),
        ({"ep": 2}, {"expert_map": [0, 1, 2, 1]}, "names ep rank 2"),
        ({"ep": 2}, {"expert_map": [[0, 1, 0, 1]] * 3}, "3 per-layer lists"),
        ({"ep": 8}, {"expert_map": [0, 1, 2, 3]}, "at least as many experts"),
        ({"ep": 3}, {"unknown_option": 1}, "unknown LLMEngine.load option"),
        ({"dp": 2}, {}, "uses the pp, ep and tp dims"),
        ({}, {"dtype": "int8"}, "dtype 'int8' is not supported"),
    ],
)
def test_bad_plans_fail_before_workers(tiny_refs, degrees, options, message):  # noqa: F811
    with pytest.raises(ConfigError, match=message):
        _load(PlanOnly(degrees), tiny_refs["mixtral"].path, **options)


def test_sliding_window_needs_short_context(broken):
    path, _ = broken
    cfg = json.loads((path / "config.json").read_text())
    cfg["sliding_window"] = 16
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="sliding-window attention.*max_model_len <= 16"):
        _load(PlanOnly({}), path)


def test_ep_larger_than_experts_must_divide(tiny_refs):  # noqa: F811
    with pytest.raises(ConfigError, match="ep must be a multiple"):
        _load(PlanOnly({"ep": 3}), tiny_refs["mixtral_2e"].path)
