"""The cost-model planner: golden plans on declared clusters, explanations, refusals, config-only models, the CLI.

Golden cases (issue 15): a model that fits one device gets no model parallelism; DeepSeek-V3 with FP8
weights fits 2 x 8 H100 with its memory per GPU predicted; Mixtral-8x7B on 1 x 8 H100 gets different
plans for latency and for throughput, each explained; an impossible cluster is refused with the fix.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tessera.config import ConfigError, ParallelPlan
from tessera.launch.cli import main as cli_main
from tessera.memory.cost_model import GroupLayout, Workload, collective_s, estimate, expected_busiest, group_layout
from tessera.memory.footprint import config_model_spec
from tessera.memory.hardware import (GiB, cluster_from_mapping, cluster_to_mapping, load_cluster, local_cpu_cluster)
from tessera.memory.plan_search import describe_search, search_plans, search_to_dict
from tessera.memory.profile import model_profile

REPO = Path(__file__).resolve().parents[1]
RELEASED = REPO / "tests" / "data" / "released" / "llm"
HW = REPO / "clusters" / "hardware"
H100 = HW / "h100-1x8.yaml"
H100_2 = HW / "h100-2x8-ib400.yaml"


@pytest.fixture(scope="module")
def clusters():
    return {p.stem: load_cluster(p) for p in sorted(HW.glob("*.yaml"))}


@pytest.fixture(scope="module")
def deepseek_fp8():
    return model_profile(RELEASED / "DeepSeek-V3", fp8_resident=True)


@pytest.fixture(scope="module")
def mixtral():
    return model_profile(RELEASED / "Mixtral-8x7B-v0.1")


@pytest.fixture(scope="module")
def small_moe(tmp_path_factory):
    """A config-only 0.5 GiB Qwen3-MoE (the benchmarks' medium size): no weights on disk."""
    cfg = json.loads((RELEASED / "Qwen3-30B-A3B" / "config.json").read_text())
    cfg.update(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
               num_experts=16, num_experts_per_tok=4, moe_intermediate_size=512, intermediate_size=2816,
               vocab_size=32000, max_window_layers=8)
    folder = tmp_path_factory.mktemp("small-moe")
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


PIXART_SIGMA = {  # PixArt-Sigma-XL-2-1024-MS transformer/config.json as published (diffusers' generic class name)
    "_class_name": "Transformer2DModel", "_diffusers_version": "0.22.0.dev0", "activation_fn": "gelu-approximate",
    "attention_bias": True, "attention_head_dim": 72, "attention_type": "default", "caption_channels": 4096,
    "cross_attention_dim": 1152, "double_self_attention": False, "dropout": 0.0, "in_channels": 4,
    "interpolation_scale": None, "norm_elementwise_affine": False, "norm_eps": 1e-06, "norm_num_groups": 32,
    "norm_type": "ada_norm_single", "num_attention_heads": 16, "num_embeds_ada_norm": 1000, "num_layers": 28,
    "num_vector_embeds": None, "only_cross_attention": False, "out_channels": 8, "patch_size": 2, "sample_size": 128,
    "upcast_attention": False, "use_additional_conditions": False, "use_linear_projection": False,
}


# -- inputs --------------------------------------------------------------------------------------------------------


def test_cluster_files_load_and_read_back(clusters):
    assert {"h100-1x8", "h100-2x8-ib400", "h200-1x8", "h100-64x8"} <= set(clusters)
    assert clusters["h100-64x8"].total_devices == 512 and clusters["h100-2x8-ib400"].inter_node is not None
    assert clusters["h200-1x8"].device.memory_bytes > 1.7 * clusters["h100-1x8"].device.memory_bytes
    for name, spec in clusters.items():
        again = cluster_from_mapping(cluster_to_mapping(spec), name)
        assert again.device == spec.device and again.intra_node == spec.intra_node and again.node == spec.node


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(gpus=8), r"unknown key 'gpus'"),
    (lambda d: d["device"].pop("compute_tflops"), r"device: missing key 'compute_tflops'"),
    (lambda d: d["device"].update(memory_gib="lots"), r"device.memory_gib is 'lots'"),
    (lambda d: d.update(nodes=2), r"2 nodes need links.inter_node"),
    (lambda d: d["links"]["intra_node"].update(bandwith_gbs=1), r"did you mean 'bandwidth_gbs'"),
])
def test_cluster_file_errors_name_the_key(tmp_path, change, message):
    data = yaml.safe_load(H100.read_text())
    change(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_cluster(path)


def test_workload_parsing_names_the_key(tmp_path):
    assert Workload.parse("batch=8,context=4096") == Workload(batch=8, context=4096)
    (tmp_path / "w.yaml").write_text("batch: 2\nimage_size: 512\n")
    assert Workload.parse(str(tmp_path / "w.yaml")) == Workload(batch=2, image_size=512)
    with pytest.raises(ConfigError, match="unknown workload key 'batchsize'"):
        Workload.parse("batchsize=8")
    with pytest.raises(ConfigError, match="workload batch is 0"):
        Workload.parse("batch=0")


@pytest.mark.parametrize("name", sorted(p.name for p in RELEASED.iterdir() if p.is_dir()))
def test_profile_bytes_equal_the_footprint_from_config_alone(name):
    """The cost model's per-layer bytes add up to what memory.footprint counts for the checkpoint."""
    spec = config_model_spec(RELEASED / name)
    stored = model_profile(RELEASED / name, fp8_resident=True)
    assert stored.weight_bytes == spec.total_bytes
    assert len(stored.layers) == spec.num_layers and stored.num_experts == spec.num_experts
    if spec.quantization:
        assert model_profile(RELEASED / name).weight_bytes == spec.dequantized_bytes
        assert "as stored" in stored.weights and "dequantized" in model_profile(RELEASED / name).weights


def test_pixart_sigma_transformer_config_alone_plans(tmp_path, clusters):
    """A diffusers transformer/config.json whose class is the generic Transformer2DModel plans (PixArt-Sigma)."""
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(PIXART_SIGMA))
    profile = model_profile(tmp_path, dtype="float32")
    assert profile.family == "pixart" and len(profile.layers) == 28
    assert profile.weight_bytes == 610_856_096 * 4  # diffusers' PixArtTransformer2DModel on the meta device counts these
    result = search_plans(profile, clusters["h100-1x8"], Workload(batch=1, image_size=1024, steps=20), "latency")
    assert result.best.feasible and result.best.metrics["s_per_image"] > 0
    assert set(result.best.plan.degrees) <= {"cfg", "sp", "tp", "pp"}
    throughput = search_plans(profile, clusters["h100-1x8"], Workload(batch=16, image_size=1024, steps=20), "throughput")
    assert throughput.best.metrics["images_per_s"] > result.best.metrics["images_per_s"]


def test_a_live_inventory_becomes_a_cluster(tmp_path, monkeypatch):
    """Ray (or this machine) gives counts and memory; GPUs take their preset's rates, CPUs the calibration."""
    from tessera.memory.hardware import cluster_from_inventory
    from tessera.memory.inventory import ClusterInventory, NodeInventory

    gpus = ClusterInventory("cuda", tuple(NodeInventory(f"10.0.0.{i}", 8, 80 * 10**9) for i in range(2)), "ray cluster",
                            "H200")
    spec = cluster_from_inventory(gpus)
    assert spec.nodes == 2 and spec.devices_per_node == 8 and spec.device.model.startswith("H200")
    assert spec.device.memory_bytes == 80 * 10**9 and spec.inter_node is not None and "ray cluster" in spec.source
    monkeypatch.setenv("TESSERA_CALIBRATION", str(tmp_path / "missing.yaml"))
    cpus = cluster_from_inventory(ClusterInventory("cpu", (NodeInventory("local", 4, 4 * GiB),), "local host memory"))
    assert cpus.device.kind == "cpu" and cpus.devices_per_node == 4 and "uncalibrated" in cpus.source


# -- the cost model's parts ------------------------------------------------------------------------------------------


def test_groups_within_a_node_and_across(clusters):
    two = clusters["h100-2x8-ib400"]
    plan = ParallelPlan({"ep": 2, "tp": 8})
    assert group_layout(plan, ("tp",), 8) == GroupLayout(8, 1)  # tp innermost: one node
    assert group_layout(plan, ("ep",), 8) == GroupLayout(2, 2)  # ep across the two nodes
    assert group_layout(plan, ("ep", "tp"), 8) == GroupLayout(16, 2)
    mb = 1 << 20
    inside = collective_s("all_reduce", GroupLayout(8, 1), mb, two)
    across = collective_s("all_reduce", GroupLayout(16, 2), mb, two)
    assert 0 < inside < across  # InfiniBand is slower than NVLink
    assert collective_s("all_reduce", GroupLayout(8, 1), 64 * mb, two) > 10 * inside  # bandwidth-bound when large
    assert collective_s("all_reduce", GroupLayout(1, 1), mb, two) == 0.0


def test_expected_busiest_expert_rank():
    assert expected_busiest(1, 0.25, 8) == pytest.approx(1 - 0.75**8)  # one expert per rank: P(any rank hit)
    assert expected_busiest(4, 0.25, 1) == pytest.approx(1.0)  # one rank: the mean
    assert 1.0 < expected_busiest(4, 0.25, 2) < 2.0  # two experts (top-2) on two ranks of four: 1.46 expected


# -- golden cases ----------------------------------------------------------------------------------------------------


def test_a_model_that_fits_one_device_gets_no_model_parallelism(small_moe, clusters):
    profile = model_profile(small_moe)
    latency = search_plans(profile, clusters["h100-1x8"], Workload(batch=1), "latency")
    assert latency.best.plan == ParallelPlan({}) and latency.best.plan.world_size == 1
    assert any("uses 1 of the 8 devices" in n for n in latency.best.notes)
    throughput = search_plans(profile, clusters["h100-1x8"], Workload(batch=64), "throughput")
    best = throughput.best.plan
    assert best.degree("tp") == best.degree("pp") == 1 and best.world_size == 8  # replicas only (dp and/or ep)
    assert throughput.best.metrics["tokens_per_s"] > 5 * latency.best.metrics["tokens_per_s"]


def test_deepseek_v3_fp8_fits_two_h100_nodes_with_its_memory_per_gpu(deepseek_fp8, clusters):
    result = search_plans(deepseek_fp8, clusters["h100-2x8-ib400"], Workload(batch=8, context=4096, new_tokens=256))
    best = result.best
    mem = best.memory
    assert best.feasible and best.plan.world_size == 16
    assert best.plan.degree("tp") <= 8  # tensor parallelism stays inside a node
    assert mem.total <= mem.budget and mem.host == mem.nvme == 0
    assert deepseek_fp8.weight_bytes / 16 <= mem.weights < 72 * GiB  # 627 GiB of FP8 weights over 16 GPUs
    assert mem.kv_cache > 0 and best.metrics["decode_step_s"] > 0
    text = describe_search(result)
    assert "fp8_e4m3_block128x128 as stored" in text and f"{mem.total / GiB:.1f} GiB of 71.3 GiB usable" in text
    # the same weights dequantized to bf16 (what the loader holds today) need 1.25 TiB: refused, with the fix
    with pytest.raises(ConfigError, match=r"does not fit 16 x H100.*use at least \d+ node\(s\).*--offload"):
        search_plans(model_profile(RELEASED / "DeepSeek-V3"), clusters["h100-2x8-ib400"], Workload(batch=8))


def test_mixtral_latency_and_throughput_choose_different_plans_each_explained(mixtral, clusters):
    h100 = clusters["h100-1x8"]
    latency = search_plans(mixtral, h100, Workload(batch=1, context=1024, new_tokens=256), "latency")
    throughput = search_plans(mixtral, h100, Workload(batch=1024, context=2048, new_tokens=128), "throughput")
    assert latency.best.plan != throughput.best.plan
    assert latency.best.plan == ParallelPlan({"tp": 8})  # memory-bound decode: the most bandwidth, NVLink all-reduces
    assert throughput.best.plan.degree("dp") > 1  # replicas: fewer, smaller all-reduces for a compute-heavy batch
    for result, words in ((latency, "lowest latency"), (throughput, "highest throughput")):
        assert words in result.best.reason and len(result.alternatives) == 3
        for alt in result.alternatives:
            assert alt.lost_because and ("slower" in alt.lost_because or "less throughput" in alt.lost_because
                                         or "within 2%" in alt.lost_because or "does not fit" in alt.lost_because)
    tp8 = next(a for a in throughput.alternatives if a.estimate.plan == ParallelPlan({"tp": 8}))
    assert "less throughput" in tp8.lost_because and "all-reduce" in tp8.lost_because
    assert latency.best.metrics["request_s"] < throughput.best.metrics["request_s"]
    assert throughput.best.metrics["tokens_per_s"] > 10 * latency.best.metrics["tokens_per_s"]


def test_an_impossible_cluster_is_refused_with_the_fix(deepseek_fp8, clusters):
    with pytest.raises(ConfigError) as err:
        search_plans(deepseek_fp8, clusters["h100-1x8"], Workload())
    message = str(err.value)
    assert "does not fit 8 x H100-80GB-SXM" in message and "use at least 2 node(s)" in message
    assert "--offload" in message and "\n" not in message
    # allowing offload makes it work: experts spill to host memory, and the step pays for moving them
    result = search_plans(deepseek_fp8, clusters["h100-1x8"], Workload(), offload=True)
    assert result.best.memory.host > 0 and result.best.step.offload_s > 0


def test_explicit_plans_follow_the_rules(mixtral, clusters):
    h100, two = clusters["h100-1x8"], clusters["h100-2x8-ib400"]
    with pytest.raises(ConfigError, match="tp=16 would cross nodes"):
        estimate(mixtral, two, ParallelPlan({"tp": 16}), Workload())
    with pytest.raises(ConfigError, match="tp=3 does not divide the 32 attention heads"):
        estimate(mixtral, h100, ParallelPlan({"tp": 3}), Workload())
    with pytest.raises(ConfigError, match="ep=3 and 8 experts"):
        estimate(mixtral, h100, ParallelPlan({"ep": 3}), Workload())
    single = estimate(mixtral, h100, ParallelPlan({}), Workload())
    assert not single.feasible and "over the 71.3 GiB usable" in single.reason  # 87 GiB on one 80 GB GPU


def test_cpu_ranks_beyond_the_cores_share_them(small_moe, tmp_path, monkeypatch):
    """On this machine's calibrated cluster, 4 ranks on 2 cores run each rank at half speed."""
    base = yaml.safe_load((HW / "h100-1x8.yaml").read_text())
    base.update(name="test cpu", devices_per_node=2,
                device={"kind": "cpu", "model": "core", "memory_gib": 8, "compute_tflops": {"bfloat16": 0.05},
                        "memory_bandwidth_gbs": {"bfloat16": 5.0}},
                node={"cores": 2, "host_memory_gib": 16, "memory_bandwidth_gbs": 8.0},
                links={"intra_node": {"kind": "shm", "alpha_us": 30, "alpha_per_rank_us": 500, "bandwidth_gbs": 0.5}},
                overheads={"step_us": 1000, "layer_us": 300, "expert_us": 300, "overlaps_compute": False})
    calib = tmp_path / "calibration.yaml"
    calib.write_text(yaml.safe_dump(base))
    monkeypatch.setenv("TESSERA_CALIBRATION", str(calib))
    two, four = local_cpu_cluster(2), local_cpu_cluster(4)
    assert two.devices_per_node == 2 and four.devices_per_node == 4 and "calibrated" in four.source
    assert four.device.memory_bytes == two.device.memory_bytes // 2  # the host memory is shared by the ranks
    profile = model_profile(small_moe)
    ep2 = estimate(profile, two, ParallelPlan({"ep": 2}), Workload())
    ep4 = estimate(profile, four, ParallelPlan({"ep": 4}), Workload())
    assert ep4.step.overhead_s > 1.5 * ep2.step.overhead_s  # Python on a shared core
    assert ep4.step.comm_s > ep2.step.comm_s  # the measured alpha grows with ranks sharing cores


# -- the CLI ---------------------------------------------------------------------------------------------------------


def test_cli_plan_prints_the_plan_memory_time_and_three_alternatives(capsys):
    code = cli_main(["plan", str(RELEASED / "DeepSeek-V3"), "--cluster", str(H100_2),
                     "--workload", "batch=8,context=4096,new_tokens=256"])
    out = capsys.readouterr().out
    assert code == 0
    assert "plan " in out and "per device (most loaded)" in out and "tiers per device" in out
    assert "decode step" in out and "tokens/s" in out and "fp8_e4m3_block128x128 as stored" in out
    assert "  1. " in out and "  2. " in out and "  3. " in out
    code = cli_main(["plan", str(RELEASED / "Mixtral-8x7B-v0.1"), "--cluster", str(H100), "--json",
                     "--objective", "throughput", "--workload", "batch=1024,context=2048,new_tokens=128"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["objective"] == "throughput" and data["chosen"]["fits"]
    chosen = data["chosen"]
    assert set(chosen["memory_per_device"]["tiers"]) == {"device", "host", "nvme"}
    assert chosen["metrics"]["tokens_per_s"] > 0 and chosen["step_s"] > 0 and chosen["prefill_s"] > 0
    assert math.isclose(sum(chosen["step_breakdown_s"].values()), chosen["step_s"], rel_tol=1e-9)
    assert len(data["alternatives"]) == 3 and all(a["lost_because"] for a in data["alternatives"])
    assert data["model"]["weight_bytes"] == 93_405_585_408


def test_cli_costs_one_explicit_plan(capsys):
    code = cli_main(["plan", str(RELEASED / "Mixtral-8x7B-v0.1"), "--cluster", str(H100), "--plan", "ep=2,tp=4",
                     "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["chosen"]["plan"] == {"ep": 2, "tp": 4} and data["alternatives"] == []


def test_cli_refuses_an_impossible_request_in_one_line_exit_2():
    env = {**os.environ, "TESSERA_LOG_LEVEL": "WARNING"}
    proc = subprocess.run([sys.executable, "-m", "tessera.launch.cli", "plan", str(RELEASED / "DeepSeek-V3"),
                           "--cluster", str(H100)], capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "does not fit" in lines[0] and "use at least 2 node(s)" in lines[0]


def test_search_json_round_trips(mixtral, clusters):
    result = search_plans(mixtral, clusters["h100-1x8"], Workload(batch=4))
    data = json.loads(json.dumps(search_to_dict(result)))
    assert data["chosen"]["plan"] == dict(result.best.plan.degrees)
    assert data["considered"] == result.considered >= data["feasible"] == result.feasible > 3


# -- calibration (the fits; the measurement itself runs in benchmarks/bench_planner.py) -------------------------


def test_calibration_fits_recover_known_constants(tmp_path):
    from tessera.launch.calibrate import TINY_MODELS, fit_link, fit_overheads, nvme_read_bps

    alpha, bw = 30e-6, 2e9
    times = {n: alpha + 2 * (4 - 1) / 4 * n / bw for n in (4096, 1 << 20, 8 << 20)}
    got_alpha, got_bw = fit_link(times, 4)
    assert got_alpha == pytest.approx(alpha, rel=1e-6) and got_bw == pytest.approx(bw, rel=1e-6)
    step, layer, expert = 1e-3, 300e-6, 200e-6
    steps = {k: step + v["layers"] * (layer + v["top_k"] * expert) for k, v in TINY_MODELS.items()}
    fitted = fit_overheads(steps, {})
    assert fitted == pytest.approx({"step_s": step, "layer_s": layer, "expert_s": expert})
    assert nvme_read_bps(tmp_path, mib=8) > 0 and not list(tmp_path.glob("tessera-calibrate-*"))
