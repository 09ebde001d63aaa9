"""The planner: exact footprints from safetensors headers, auto plans that fit, refusals that name the fix."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from tessera.memory.footprint import ModelSpec, read_model_spec
from tessera.memory.inventory import ClusterInventory, NodeInventory
from tessera.memory.planner import choose_plan, describe_placement, per_rank_bytes, plan_job
from tessera.config import ConfigError, JobSpec, ParallelPlan
from tessera.options import PlanningHints

GiB = 2**30


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from tessera.models.tiny_moe import build_tiny_moe

    return build_tiny_moe("qwen3_moe", tmp_path_factory.mktemp("planner") / "qwen3")


def test_footprint_counts_every_byte_of_the_checkpoint_exactly(tiny_qwen):
    spec = read_model_spec(tiny_qwen)
    total = 0
    expert = 0
    for file in tiny_qwen.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
                expert += t.numel() * t.element_size() if ".experts." in name else 0
    assert spec.kind == "moe_lm" and spec.architecture == "Qwen3MoeForCausalLM"
    assert spec.total_bytes == total and spec.expert_bytes == expert and spec.dense_bytes == total - expert
    assert spec.num_experts > 0 and spec.kv_bytes_per_token > 0
    assert 0 < spec.largest_group_bytes < total


def test_diffusion_footprint(tmp_path):
    from tessera.models.tiny_diffusion import build_tiny_diffusion

    spec = read_model_spec(build_tiny_diffusion("pixart", tmp_path / "pixart"))
    assert spec.kind == "diffusion" and spec.expert_bytes == 0 and spec.total_bytes > 0 and spec.num_layers >= 1


def _moe(total_gib: float, expert_fraction: float = 0.9, heads: int = 32) -> ModelSpec:
    total = int(total_gib * GiB)
    experts = int(total * expert_fraction)
    return ModelSpec("m", "moe_lm", "MixtralForCausalLM", total, experts, total - experts, total // 500, 32, heads, 8, 8,
                     kv_bytes_per_token=128 * 1024)


def _gpus(nodes: int, per_node: int, gib: float) -> ClusterInventory:
    return ClusterInventory("cuda", tuple(NodeInventory(f"n{i}", per_node, int(gib * GiB)) for i in range(nodes)), "test")


def test_auto_prefers_expert_parallel_and_small_tp_when_it_fits():
    report = choose_plan(_moe(90), _gpus(1, 8, 80))
    assert report.fits and report.plan == ParallelPlan({"ep": 8})
    assert report.per_rank_bytes == per_rank_bytes(_moe(90), report.plan) <= report.budget_bytes


def test_auto_raises_tp_when_dense_weights_do_not_fit_one_device():
    spec = _moe(300, expert_fraction=0.5)  # 150 GiB dense cannot sit whole on an 80 GiB GPU
    report = choose_plan(spec, _gpus(1, 8, 80))
    assert report.fits and report.plan.degree("tp") > 1 and report.plan.degree("pp") == 1
    assert report.per_rank_bytes <= report.budget_bytes


def test_auto_keeps_tp_within_a_node():
    report = choose_plan(_moe(300, expert_fraction=0.5), _gpus(4, 2, 80))
    assert report.plan.degree("tp") <= 2


def test_too_big_is_refused_with_the_fix_unless_offload_is_on():
    with pytest.raises(ConfigError, match=r"does not fit 2 cuda device\(s\).*enable offload"):
        choose_plan(_moe(1000), _gpus(1, 2, 80))
    report = choose_plan(_moe(1000), _gpus(1, 2, 80), offload=True)
    assert report.offloaded and not report.fits


def test_plan_job_auto_on_a_real_checkpoint(tiny_qwen):
    job = JobSpec(plan=ParallelPlan({}), model=str(tiny_qwen), plan_auto=True, planning=PlanningHints(world_size=4))
    placement = plan_job(job)
    assert placement.world_size == 4 and set(placement.plan.degrees) <= {"pp", "ep", "tp"}
    text = describe_placement(placement)
    assert "Qwen3MoeForCausalLM" in text and "per rank" in text and "rank 3:" in text


def test_explicit_plans_are_checked_against_the_model(tiny_qwen):
    heads = read_model_spec(tiny_qwen).num_heads
    with pytest.raises(ConfigError, match=rf"tp=3 does not divide the {heads} attention heads"):
        plan_job(JobSpec(plan=ParallelPlan({"tp": 3}), model=str(tiny_qwen)))
    with pytest.raises(ConfigError, match=r"does not use mesh dim\(s\) \['sp'\]"):
        plan_job(JobSpec(plan=ParallelPlan({"sp": 2}), model=str(tiny_qwen)))
    assert plan_job(JobSpec(plan=ParallelPlan({"ep": 2, "tp": 2}), model=str(tiny_qwen))).world_size == 4


def test_missing_model_dir_and_non_safetensors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_model_spec(tmp_path / "nope")
    (tmp_path / "config.json").write_text('{"architectures": ["MixtralForCausalLM"]}')
    with pytest.raises(ConfigError, match="no \\*.safetensors weights"):
        read_model_spec(tmp_path)
