"""JobFile: YAML and flags become one validated job, refused at the edge with a clear reason."""

from __future__ import annotations

import pytest

from tessera.launch.jobfile import JobFile
from tessera.config import ConfigError, ParallelPlan
from tessera.options import LLMOptions, OffloadConfig


def write(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_yaml_job_becomes_jobspec(tmp_path):
    path = write(tmp_path, """
task: generate
model: tiny-moe:mixtral
plan: {tp: 2, ep: 2}
prompts: [Hello, World]
sampling: {max_new_tokens: 4, temperature: 0}
offload: {device_budget_bytes: 2GiB, host_budget_bytes: 4294967296}
engine: {max_model_len: 64, decode_steps: 1}
timeouts: {worker_start_s: 30}
""")
    jf = JobFile.from_yaml(path)
    assert jf.name == "job"
    assert jf.task == "generate"
    assert jf.job.plan == ParallelPlan({"ep": 2, "tp": 2})
    assert jf.job.model == "tiny-moe:mixtral"
    assert jf.prompts == ("Hello", "World")
    assert jf.sampling == {"max_new_tokens": 4, "temperature": 0}
    assert jf.job.offload == OffloadConfig(device_budget_bytes=2 << 30, host_budget_bytes=4 << 30)
    assert jf.job.engine == LLMOptions(max_model_len=64, decode_steps=1)
    assert jf.job.timeouts.worker_start_s == 30
    assert JobFile.from_dict(jf.to_dict()) == jf  # what SLURM scripts embed round-trips


def test_plan_string_and_auto(tmp_path):
    assert JobFile.from_dict({"plan": "pp=2,tp=2"}).job.plan.world_size == 4
    auto = JobFile.from_dict({"plan": "auto", "model": "tiny-moe:mixtral"})
    assert auto.plan_auto and auto.job.plan_auto
    explicit = auto.with_overrides(plan="tp=2")
    assert not explicit.plan_auto and not explicit.job.plan_auto


def test_relative_checkpoint_resolves_against_job_file(tmp_path):
    (tmp_path / "ckpt").mkdir()
    path = write(tmp_path, "model: ckpt\nplan: {tp: 2}\nprompts: [a]\n")
    assert JobFile.from_yaml(path).job.model == str((tmp_path / "ckpt").resolve())


@pytest.mark.parametrize(
    "text, message",
    [
        ("plan: {tp: 2}\ntsk: mesh\n", "did you mean 'task'"),
        ("plan: {tq: 2}\n", "unknown mesh dim 'tq'"),
        ("task: mesh\n", "has no plan"),
        ("plan: {tp: 2}\ntask: train\n", "task 'train' is unknown"),
        ("plan: {tp: 2}\ntask: generate\n", "needs a model"),
        ("plan: {tp: 2}\nmodel: tiny-moe:mixtral\nsampling: {max_tokens: 3}\n", "unknown sampling option 'max_tokens'"),
        ("plan: {tp: 2}\nmin_nodes: 0\n", "min_nodes is 0"),
        ("plan: {tp: 2}\ntimeouts: {boot_s: 3}\n", "unknown timeout 'boot_s'"),
        ("plan: [tp, 2]\n", "neither degrees"),
        ("plan: {tp: 2\n", "not valid YAML"),
    ],
)
def test_bad_job_files_name_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        JobFile.from_yaml(write(tmp_path, text))


def test_batch_job_needs_prompts():
    jf = JobFile.from_dict({"plan": "tp=2", "model": "tiny-moe:mixtral", "task": "generate"})
    with pytest.raises(ConfigError, match="needs at least one prompt"):
        jf.check_runnable()
    jf.with_overrides(prompts=("hi",)).check_runnable()


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        JobFile.from_yaml(tmp_path / "nope.yaml")
