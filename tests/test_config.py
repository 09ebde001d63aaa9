"""ParallelPlan / JobSpec / Placement validation: bad input is refused with a message that names the fix."""

from __future__ import annotations

import pytest

from tessera.memory.placement import Placement
from tessera.config import ConfigError, JobSpec, ParallelPlan, Timeouts


def test_plan_orders_dims_canonically_and_computes_world_size():
    plan = ParallelPlan({"tp": 2, "pp": 2})
    assert plan.dim_names == ("pp", "tp")
    assert plan.mesh_shape == (2, 2)
    assert plan.world_size == 4
    assert plan == ParallelPlan({"pp": 2, "tp": 2})
    assert plan.degree("ep") == 1


def test_plan_coordinates_are_row_major_with_tp_innermost():
    plan = ParallelPlan({"pp": 2, "tp": 2})
    assert [plan.coordinates(r) for r in range(4)] == [
        {"pp": 0, "tp": 0},
        {"pp": 0, "tp": 1},
        {"pp": 1, "tp": 0},
        {"pp": 1, "tp": 1},
    ]


def test_plan_degrees_that_do_not_multiply_to_world_size():
    with pytest.raises(ConfigError, match=r"multiply to 4, not to the world size 8.*add dp=2"):
        ParallelPlan({"tp": 2, "ep": 2}, world_size=8)
    with pytest.raises(ConfigError, match=r"multiply to 4, not to the world size 6; change the degrees"):
        ParallelPlan({"tp": 2, "ep": 2}, world_size=6)


def test_plan_unknown_dim_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown mesh dim 'xp'; use one of: dp .*tp \(tensor parallel"):
        ParallelPlan({"xp": 2})


@pytest.mark.parametrize("degree", [0, -1])
def test_plan_degree_below_one(degree):
    with pytest.raises(ConfigError, match=r"every degree must be >= 1; use 1 \(or leave 'tp' out\)"):
        ParallelPlan({"tp": degree})


def test_plan_non_integer_degree():
    with pytest.raises(ConfigError, match="must be an integer"):
        ParallelPlan({"tp": 2.0})


def test_plan_is_immutable():
    plan = ParallelPlan({"tp": 2})
    with pytest.raises(TypeError, match="immutable"):
        plan.degrees["tp"] = 4  # type: ignore[index]
    with pytest.raises(AttributeError):
        plan.world_size = 3  # type: ignore[misc]


def test_plan_parse_forms():
    assert ParallelPlan.parse("tp=2,ep=2") == ParallelPlan({"ep": 2, "tp": 2})
    assert ParallelPlan.parse("pp=2xtp=2") == ParallelPlan({"pp": 2, "tp": 2})
    with pytest.raises(ConfigError, match="name=degree"):
        ParallelPlan.parse("tp2")
    with pytest.raises(ConfigError, match="not an integer"):
        ParallelPlan.parse("tp=two")


def test_jobspec_validates_device_and_log_level():
    job = JobSpec(plan="tp=2", log_level="debug")
    assert job.plan == ParallelPlan({"tp": 2}) and job.log_level == "DEBUG"
    with pytest.raises(ConfigError, match="device 'tpu' is not supported; use one of cpu, cuda"):
        JobSpec(plan="tp=2", device="tpu")
    with pytest.raises(ConfigError, match="log level"):
        JobSpec(plan="tp=2", log_level="loud")
    with pytest.raises(ConfigError, match="cpus_per_rank"):
        JobSpec(plan="tp=2", cpus_per_rank=0)


def test_timeouts_must_be_positive():
    with pytest.raises(ConfigError, match="placement_group_s"):
        Timeouts(placement_group_s=0)


def test_placement_bundles():
    assert Placement(ParallelPlan({"tp": 2})).bundle() == {"CPU": 1.0}
    assert Placement(ParallelPlan({"tp": 2}), device="cuda", cpus_per_rank=4).bundle() == {"GPU": 1.0, "CPU": 4.0}
    assert Placement.from_job(JobSpec(plan="ep=4")).world_size == 4
