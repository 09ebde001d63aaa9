"""clusters/ configs are valid as shipped, and the README's launch section names real things."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tessera.launch.cli import build_parser
from tessera.launch.jobfile import JobFile
from tessera.launch.slurm import TEMPLATE_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_local_job_is_runnable():
    jf = JobFile.from_yaml(ROOT / "clusters" / "local.yaml")
    jf.check_runnable()
    assert jf.task == "generate" and jf.job.plan.world_size == 4 and jf.job.cluster is None


def test_ray_cluster_yaml_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema checks Ray's cluster-launcher schema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    for path in sorted((ROOT / "clusters" / "ray").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        jsonschema.validate(config, schema)
        starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
        assert "RAY_AUTH_MODE=token" in starts and "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0" in starts


def test_slurm_templates_are_where_render_looks():
    assert {p.name for p in TEMPLATE_DIR.glob("*.sbatch")} == {"single_node.sbatch", "multi_node.sbatch"}


def test_readme_launch_section_uses_real_commands_and_files():
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- section:launch -->")[1].split("<!-- /section:launch -->")[0]
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    used = set(re.findall(r"^tessera (\w+)", section, flags=re.M))
    assert {"run", "plan", "submit", "slurm", "bench"} <= used
    assert used <= set(sub.choices), f"README uses unknown subcommands {used - set(sub.choices)}"
    for path in re.findall(r"(clusters/[\w./-]+\.(?:yaml|sbatch))", section):
        assert (ROOT / path).is_file(), f"README names {path}, which does not exist"
    # every job-file flag the README passes to `tessera run` exists
    run_flags = {f for a in sub.choices["run"]._actions for f in a.option_strings}
    for line in re.findall(r"^tessera run .*$", section, flags=re.M):
        for flag in re.findall(r"(--[\w-]+)", line.split("#")[0]):
            assert flag in run_flags, f"README: tessera run has no {flag}"
