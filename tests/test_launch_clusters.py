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


def test_every_template_binds_loopback_with_token_auth_and_private_files():
    """No template opens the dashboard / Jobs API to the network or runs Ray without token auth."""
    templates = sorted((ROOT / "clusters").rglob("*.sbatch")) + sorted((ROOT / "clusters" / "ray").glob("*.yaml"))
    assert len(templates) >= 3
    for path in templates:
        text = path.read_text()
        assert "0.0.0.0" not in text, f"{path.name} binds to every interface"
        assert "RAY_AUTH_MODE=token" in text, f"{path.name} starts Ray without token auth"
        assert "RAY_AUTH_MODE=disabled" not in text
        assert "ray start --head" not in text or "--dashboard-host=" in text, f"{path.name}: Ray's default bind"
    for path in sorted((ROOT / "clusters" / "slurm").glob("*.sbatch")):
        text = path.read_text()
        assert "--dashboard-host=@@DASHBOARD_HOST@@" in text and "umask 077" in text
    for path in sorted((ROOT / "clusters" / "ray").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        head = " ".join(config["head_start_ray_commands"])
        assert "--dashboard-host=127.0.0.1" in head
        if "~/.ray/auth_token" in json.dumps(config.get("file_mounts", {})):
            assert "chmod 600 ~/.ray/auth_token" in " ".join(config["setup_commands"]), "the token file is not 0600"


def test_ray_pin_has_token_auth():
    """Token auth (RAY_AUTH_MODE=token) needs Ray >= 2.52; an older Ray would silently run without it."""
    import tomllib

    from tessera.runtime.ray_env import MIN_RAY

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray")]
    assert ray.replace(" ", "") == f"ray[default]>={MIN_RAY[0]}.{MIN_RAY[1]}"
