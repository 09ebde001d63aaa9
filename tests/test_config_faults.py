"""Every config fault a new user can make fails with a clear error, and the handle keeps working.

Table-driven: each row breaks one thing (a checkpoint's config.json, its
safetensors, its index, a diffusers folder, a job file, an options key, a tier
file) and asserts the message names the file and the key or tensor, and the
fix. Checkpoint faults are raised on the driver before any worker is called
(a counting controller proves it) unless the row says otherwise; after each
one the same controller loads the good checkpoint and serves a request.

The controller here is the in-process one-rank controller (a
real ``Worker``, no Ray), so the table stays cheap; the one fault raised on
the workers (a misshaped tensor) is also run on real Ray workers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from tessera.config import ConfigError, JobSpec, ParallelPlan, Timeouts
from tessera.launch.jobfile import IMAGE_MODES, JobFile
from tessera.models.checkpoint import CheckpointError
from tessera.models.diffusers_loader import DiffusersDir, ModelDirError
from tessera.models.tiny_diffusion import build_tiny_diffusion
from tessera.offload.errors import CorruptTierFileError, DiskSpaceError
from tessera.offload.store import group_spec
from tessera.offload.tier_file import TierFile, TierFileWriter, write_tier_file
from tessera.options import (DiffusionOptions, LLMOptions, OffloadConfig, PlanningHints, RecoveryPolicy,
                             from_mapping)
from tessera.runtime.diffusion.engine import DiffusionEngine
from tessera.runtime.llm.engine import LLMEngine, SamplingParams
from tessera.tests.llm_testing import NEW_TOKENS, local_controller, tiny_refs  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(900)


class Counting:
    """A controller wrapper that counts calls to the workers (0 calls = refused on the driver)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.placement = inner.placement
        self.calls = 0

    def collective_rpc(self, *args, **kwargs):
        self.calls += 1
        return self.inner.collective_rpc(*args, **kwargs)


# -- MoE checkpoints ---------------------------------------------------------------------------


def _edit_config(path: Path, change: Callable[[dict], None]) -> None:
    cfg = json.loads((path / "config.json").read_text())
    change(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _shard(path: Path, second_file: str = "model-00002-of-00002.safetensors", write_second: bool = True,
           move: int = 1) -> tuple[str, torch.Tensor]:
    """Split model.safetensors into two shards plus an index (HF layout); returns a tensor of the second shard."""
    tensors = load_file(path / "model.safetensors")
    names = sorted(tensors)
    second = names[:move]
    save_file({n: tensors[n] for n in names if n not in second}, path / "model-00001-of-00002.safetensors")
    if write_second:
        save_file({n: tensors[n] for n in second}, path / "model-00002-of-00002.safetensors")
    (path / "model.safetensors").unlink()
    weight_map = {n: ("model-00001-of-00002.safetensors" if n not in second else second_file) for n in names}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return second[0], tensors[second[0]]


def _outside_index(path: Path) -> None:
    """An index entry ``../outside.safetensors`` that exists, with the right tensor, outside the model dir."""
    name, tensor = _shard(path, second_file="../outside.safetensors", write_second=False)
    save_file({name: tensor}, path.parent / "outside.safetensors")


def _absolute_index(path: Path) -> None:
    outside = path.parent / "abs.safetensors"
    name, tensor = _shard(path, second_file=str(outside), write_second=False)
    save_file({name: tensor}, outside)


def _truncate(file: Path, keep: int) -> None:
    """Keep the first ``keep`` bytes (``keep < 0``: drop the last ``-keep``)."""
    data = file.read_bytes()
    file.write_bytes(data[:keep])


def _misshape(path: Path) -> None:
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name][:-4].contiguous()
    save_file(tensors, path / "model.safetensors")


def _wrong_dtype(path: Path) -> None:
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.0.post_attention_layernorm.weight"
    tensors[name] = tensors[name].to(torch.float16)
    save_file(tensors, path / "model.safetensors")


# (id, break the copy, error type, regex the message must match, raised before the workers)
LLM_FAULTS = [
    ("config-missing-field", lambda p: _edit_config(p, lambda c: c.pop("num_attention_heads")), CheckpointError,
     r"config\.json has no field 'num_attention_heads'.*re-save it", True),
    ("config-missing-experts", lambda p: _edit_config(p, lambda c: c.pop("num_local_experts")), CheckpointError,
     r"config\.json has no field 'num_local_experts'", True),
    ("config-invalid-json", lambda p: (p / "config.json").write_text('{"architectures": ["MixtralForCausalLM"],'),
     CheckpointError, r"config\.json is not valid JSON \(Expecting .* at line 1, column \d+\); fix the file", True),
    ("config-not-an-object", lambda p: (p / "config.json").write_text("[1, 2]"), CheckpointError,
     r"config\.json holds a JSON list, not an object", True),
    ("config-wrong-type", lambda p: _edit_config(p, lambda c: c.update(num_attention_heads="4")), CheckpointError,
     r"config\.json: field 'num_attention_heads' is '4', but it must be an integer >= 1", True),
    ("config-architectures-type", lambda p: _edit_config(p, lambda c: c.update(architectures="Mixtral")),
     CheckpointError, r"field 'architectures' is 'Mixtral'; it must be a list", True),
    ("safetensors-truncated-data", lambda p: _truncate(p / "model.safetensors", -100), CheckpointError,
     r"model\.safetensors is not a readable safetensors file \(.*incomplete metadata.*\); it is truncated or corrupt",
     True),
    ("safetensors-truncated-header", lambda p: _truncate(p / "model.safetensors", 50), CheckpointError,
     r"model\.safetensors is not a readable safetensors file .*truncated or corrupt", True),
    ("index-missing-shard", lambda p: _shard(p, write_second=False), CheckpointError,
     r"model\.safetensors\.index\.json maps 1 tensor\(s\) .* to 'model-00002-of-00002\.safetensors', which does not "
     r"exist.*download the missing shard", True),
    ("index-invalid-json", lambda p: (_shard(p), (p / "model.safetensors.index.json").write_text("{")),
     CheckpointError, r"checkpoint index .*model\.safetensors\.index\.json is not valid JSON", True),
    ("index-no-weight-map", lambda p: (_shard(p), (p / "model.safetensors.index.json").write_text('{"metadata": {}}')),
     CheckpointError, r"has no 'weight_map' object", True),
    ("index-tensor-not-in-shard", lambda p: _shard(p, second_file="model-00001-of-00002.safetensors"),
     CheckpointError, r"maps tensor .* to .*model-00001-of-00002\.safetensors, which does not hold it", True),
    ("index-escapes-dir", _outside_index, CheckpointError,
     r"names '\.\./outside\.safetensors', which lies outside the model directory", True),
    ("index-absolute-path", _absolute_index, CheckpointError, r"abs\.safetensors', which lies outside the model", True),
    ("tensor-misshaped", _misshape, CheckpointError, r"q_proj\.weight.*shape \[60, 64\].*\[64, 64\]", False),
    ("tensor-wrong-dtype", _wrong_dtype, CheckpointError, r"post_attention_layernorm.*F16.*float32", False),
]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _generate_good(ctl, ref) -> None:
    engine = LLMEngine.load(ctl, ref.path, dtype="float32", max_model_len=32)
    try:
        (res,) = engine.generate([ref.prompts[0]], SamplingParams(max_new_tokens=NEW_TOKENS))
        assert res.token_ids == ref.greedy[0] and res.finish_reason == "length"
    finally:
        engine.close()


@pytest.mark.parametrize("fault, brk, error, message, before_workers", LLM_FAULTS, ids=[f[0] for f in LLM_FAULTS])
def test_llm_checkpoint_fault(tiny_refs, local_controller, tmp_path, fault, brk, error, message,  # noqa: F811
                              before_workers):
    ref = tiny_refs["mixtral"]
    bad = _copy(ref.path, tmp_path / "ckpt")
    brk(bad)
    ctl = Counting(local_controller)
    with pytest.raises(error, match=message):
        LLMEngine.load(ctl, bad, dtype="float32", max_model_len=32)
    if before_workers:
        assert ctl.calls == 0, f"{fault}: the workers were called before the fault was found"
    _generate_good(ctl, ref)  # the same controller serves the good checkpoint next


def test_planner_reads_the_same_clear_errors(tiny_refs, tmp_path):  # noqa: F811
    """`tessera plan` reads config.json through the same reader: no KeyError there either."""
    from tessera.memory.footprint import read_model_spec

    bad = _copy(tiny_refs["mixtral"].path, tmp_path / "ckpt")
    _edit_config(bad, lambda c: c.pop("hidden_size"))
    with pytest.raises(CheckpointError, match=r"config\.json has no field 'hidden_size'"):
        read_model_spec(bad)


def test_worker_side_fault_leaves_ray_workers_serving(tiny_refs, make_controller, tmp_path):  # noqa: F811
    """A fault only the workers can see (a misshaped tensor, read as a slice) fails the load; the same
    Ray workers then load the good checkpoint and generate the reference tokens."""
    ref = tiny_refs["mixtral"]
    bad = _copy(ref.path, tmp_path / "ckpt")
    _misshape(bad)
    ctl = make_controller({"ep": 2})
    with pytest.raises(Exception, match=r"q_proj\.weight.*shape \[60, 64\].*\[64, 64\]"):
        LLMEngine.load(ctl, bad, dtype="float32", max_model_len=32)
    _generate_good(ctl, ref)


# -- diffusers pipelines ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pixart_dir(tmp_path_factory) -> Path:
    return build_tiny_diffusion("pixart", tmp_path_factory.mktemp("pixart") / "tiny-pixart")


def _json_edit(file: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def _diffusion_outside_index(path: Path) -> None:
    folder = path / "transformer"
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[1:]}, folder / "part-1.safetensors")
    save_file({names[0]: tensors[names[0]]}, path.parent / "stolen.safetensors")  # exists, outside the pipeline
    weights.unlink()
    index = {"weight_map": {n: ("../../stolen.safetensors" if n == names[0] else "part-1.safetensors") for n in names}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


def _diffusion_missing_shard(path: Path) -> None:
    folder = path / "transformer"
    weights = folder / "diffusion_pytorch_model.safetensors"
    names = sorted(load_file(weights))
    os.rename(weights, folder / "part-1.safetensors")
    index = {"weight_map": {n: ("part-2.safetensors" if n == names[0] else "part-1.safetensors") for n in names}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


# (id, break the copy, load options, regex)
DIFFUSION_FAULTS = [
    ("vae-config-missing", lambda p: (p / "vae" / "config.json").unlink(), {},
     r"vae/config\.json is missing; the vae component needs it"),
    ("vae-config-invalid-json", lambda p: (p / "vae" / "config.json").write_text("{nope"), {},
     r"vae/config\.json is not valid JSON"),
    ("vae-folder-missing", lambda p: shutil.rmtree(p / "vae"), {}, r"vae/config\.json is missing"),
    ("scheduler-config-missing", lambda p: (p / "scheduler" / "scheduler_config.json").unlink(), {},
     r"scheduler/scheduler_config\.json is missing"),
    ("transformer-config-missing", lambda p: (p / "transformer" / "config.json").unlink(), {},
     r"transformer/config\.json is missing"),
    ("transformer-config-invalid-json", lambda p: (p / "transformer" / "config.json").write_text('{"a": 1,,}'), {},
     r"transformer/config\.json is not valid JSON \(.* at line 1, column \d+\)"),
    ("transformer-config-wrong-type",
     lambda p: _json_edit(p / "transformer" / "config.json", lambda c: c.update(num_attention_heads="twelve")), {},
     r"transformer/config\.json does not describe a buildable pixart transformer"),
    ("transformer-config-disagrees-with-weights",
     lambda p: _json_edit(p / "transformer" / "config.json", lambda c: c.update(attention_head_dim=8)), {},
     r"tensor '.*' in .*diffusion_pytorch_model\.safetensors has shape \[.*\] but .*transformer/config\.json "
     r"implies \[.*\]"),
    ("unsupported-class",
     lambda p: _json_edit(p / "transformer" / "config.json", lambda c: c.update(_class_name="UNet2DModel")), {},
     r"transformer class 'UNet2DModel' is not supported"),
    ("model-index-invalid-json", lambda p: (p / "model_index.json").write_text("{"), {},
     r"model_index\.json is not valid JSON"),
    ("model-index-component-escapes",
     lambda p: _json_edit(p / "model_index.json", lambda c: c.update({"../vae": ["diffusers", "AutoencoderKL"]})), {},
     r"component '\.\./vae'.*lies outside"),
    ("weights-truncated", lambda p: _truncate(p / "transformer" / "diffusion_pytorch_model.safetensors", -64), {},
     r"diffusion_pytorch_model\.safetensors is not a readable safetensors file .*truncated or corrupt"),
    ("index-escapes-dir", _diffusion_outside_index, {}, r"'\.\./\.\./stolen\.safetensors', which lies outside"),
    ("index-missing-shard", _diffusion_missing_shard, {}, r"maps tensors to 'part-2\.safetensors', which does not exist"),
    ("dtype-int8", lambda p: None, {"dtype": "int8"}, r"dtype 'int8' is not supported; use one of float32"),
    ("unknown-option", lambda p: None, {"steps": 4}, r"unknown DiffusionEngine\.load option 'steps'"),
]


@pytest.fixture(scope="module")
def diffusion_ctl(tiny_pixart_dir, local_controller):
    """The in-process controller, warmed with one good image (text encoder and VAE loaded once)."""
    ctl = local_controller
    engine = DiffusionEngine.load(ctl, tiny_pixart_dir, progress=False)
    engine.generate_images("warm up", steps=1, height=32, width=32)
    engine.close()
    return ctl


@pytest.mark.parametrize("fault, brk, options, message", DIFFUSION_FAULTS, ids=[f[0] for f in DIFFUSION_FAULTS])
def test_diffusion_pipeline_fault(tiny_pixart_dir, diffusion_ctl, tmp_path, fault, brk, options, message):
    bad = _copy(tiny_pixart_dir, tmp_path / "pipe")
    brk(bad)
    ctl = Counting(diffusion_ctl)
    with pytest.raises(ConfigError, match=message):
        DiffusionEngine.load(ctl, bad, progress=False, **options)
    assert ctl.calls == 0, f"{fault}: the workers were called before the fault was found"
    engine = DiffusionEngine.load(ctl, tiny_pixart_dir, progress=False)  # the same controller, the good pipeline
    try:
        (image,) = engine.generate_images("a red square", steps=2, height=32, width=32, seed=3)
        assert image.size == (32, 32)
    finally:
        engine.close()


def test_model_dir_error_is_a_config_error():
    assert issubclass(ModelDirError, ConfigError) and issubclass(CheckpointError, ConfigError)


# -- job files ---------------------------------------------------------------------------------------

BASE_JOB = "task: generate\nmodel: tiny-moe:mixtral\nplan: {ep: 2}\nprompts: [hi]\n"
IMAGES_JOB = "task: images\nmodel: tiny-diffusion:pixart\nplan: {sp: 2}\nprompts: [a cat]\n"

# (id, YAML appended to a valid job, regex): every top-level key, and every key of the typed options
JOB_FAULTS = [
    ("timeouts-call-s-text", BASE_JOB + "timeouts: {call_s: abc}\n",
     r"timeouts: timeout call_s is 'abc'; every timeout must be a finite number of seconds > 0"),
    ("timeouts-infinite", BASE_JOB + "timeouts: {worker_start_s: .inf}\n", r"timeout worker_start_s is inf"),
    ("timeouts-unknown", BASE_JOB + "timeouts: {call: 3}\n", r"unknown timeout 'call'"),
    ("timeouts-not-mapping", BASE_JOB + "timeouts: 5\n", r"timeouts must be a mapping"),
    ("offload-size-unit", BASE_JOB + "offload: {device_budget_bytes: 12XB}\n",
     r"offload: device_budget_bytes is '12XB'; give a byte count such as 805306368 or '768MiB'"),
    ("offload-host-size", BASE_JOB + "offload: {device_budget_bytes: 1GiB, host_budget_bytes: lots}\n",
     r"offload: host_budget_bytes is 'lots'"),
    ("offload-unknown-key", BASE_JOB + "offload: {device_budget_bytes: 1GiB, nvme: /x}\n",
     r"unknown offload option 'nvme' \(did you mean 'nvme_dir'\?\)"),
    ("offload-missing-budget", BASE_JOB + "offload: {nvme_dir: /tmp}\n",
     r"offload: device_budget_bytes is required; add it"),
    ("engine-unknown-key", BASE_JOB + "engine: {max_len: 8}\n", r"unknown engine option 'max_len'"),
    ("engine-wrong-type", BASE_JOB + "engine: {max_num_seqs: eight}\n", r"engine: max_num_seqs is 'eight'"),
    ("engine-for-mesh", "task: mesh\nplan: {tp: 2}\nengine: {dtype: float32}\n", r"task 'mesh' loads no engine"),
    ("diffusion-engine-dtype", IMAGES_JOB + "engine: {dtype: int8}\n", r"engine: dtype 'int8' is not supported"),
    ("unknown-top-level-key", BASE_JOB + "promtps: [x]\n", r"unknown job key 'promtps' \(did you mean 'prompts'"),
    ("name-escapes", BASE_JOB + "name: ../../../x\n", r"job name '\.\./\.\./\.\./x' is not allowed"),
    ("name-with-slash", BASE_JOB + "name: a/b\n", r"job name 'a/b' is not allowed"),
    ("name-not-text", BASE_JOB + "name: [1]\n", r"job name \[1\] is not allowed"),
    ("task-not-text", "task: [generate]\nplan: {tp: 2}\n", r"task is \['generate'\]; it must be a string"),
    ("model-not-text", "model: 5\nplan: {tp: 2}\n", r"model is 5; it must be a string"),
    ("plan-wrong-type", "plan: 5\n", r"plan 5 is neither degrees"),
    ("plan-degree-text", "plan: {tp: two}\n", r"degree of 'tp' must be an integer, got 'two'"),
    ("device-not-text", "plan: {tp: 2}\ndevice: 1\n", r"device is 1; it must be a string"),
    ("device-unknown", "plan: {tp: 2}\ndevice: tpu\n", r"device 'tpu' is not supported; use one of cpu, cuda"),
    ("cluster-not-text", "plan: {tp: 2}\ncluster: 6379\n", r"cluster is 6379; give local, auto or a Ray address"),
    ("cpus-text", "plan: {tp: 2}\ncpus_per_rank: one\n", r"cpus_per_rank is 'one'; it must be a finite number"),
    ("cpus-nan", "plan: {tp: 2}\ncpus_per_rank: .nan\n", r"cpus_per_rank is nan"),
    ("log-level", "plan: {tp: 2}\nlog_level: loud\n", r"log level 'loud' is not one of"),
    ("prompts-not-list", BASE_JOB.replace("prompts: [hi]", "prompts: 5"), r"prompts is 5; give a list of strings"),
    ("prompts-not-text", BASE_JOB.replace("prompts: [hi]", "prompts: [1, 2]"), r"prompts must be a list of strings"),
    ("sampling-not-mapping", BASE_JOB + "sampling: 5\n", r"sampling must be a mapping"),
    ("sampling-wrong-type", BASE_JOB + "sampling: {temperature: hot}\n", r"sampling\.temperature is 'hot'"),
    ("sampling-unknown", BASE_JOB + "sampling: {temp: 1}\n", r"unknown sampling option 'temp'"),
    ("stream-text", BASE_JOB + "stream: maybe\n", r"stream is 'maybe'; it must be true or false"),
    ("images-steps-text", IMAGES_JOB + "images: {steps: four}\n", r"images\.steps is 'four'"),
    ("images-guidance-nan", IMAGES_JOB + "images: {guidance_scale: .nan}\n",
     r"images\.guidance_scale is nan; it must be a finite number >= 0"),
    ("images-mode", IMAGES_JOB + "images: {mode: fast}\n", r"images\.mode is 'fast'; use one of exact"),
    ("images-seed", IMAGES_JOB + "images: {seed: -1}\n", r"images\.seed is -1"),
    ("images-unknown", IMAGES_JOB + "images: {size: 32}\n", r"unknown images option 'size'"),
    ("images-output-dir-escapes", IMAGES_JOB + "images: {output_dir: ../../elsewhere}\n",
     r"images\.output_dir '\.\./\.\./elsewhere' resolves to .*, outside the output root"),
    ("mesh-payload-text", "task: mesh\nplan: {tp: 2}\nmesh: {payload_bytes: big}\n",
     r"mesh\.payload_bytes is 'big'; it must be an integer >= 4"),
    ("min-nodes-text", "plan: {tp: 2}\nmin_nodes: two\n", r"min_nodes is 'two'"),
    ("wait-nodes-inf", "plan: {tp: 2}\nwait_nodes_s: .inf\n", r"wait_nodes_s is inf; it must be a finite number"),
    ("output-escapes", BASE_JOB + "output: ../../../../etc/cron.d/x\n",
     r"output '\.\./\.\./\.\./\.\./etc/cron\.d/x' resolves to /etc/cron\.d/x, outside the output root .*"
     r"TESSERA_OUTPUT_ROOT"),
    ("output-absolute", BASE_JOB + "output: /root/.bashrc\n", r"output '/root/\.bashrc' resolves to .*outside"),
    ("output-not-text", BASE_JOB + "output: 5\n", r"output is 5; give a path"),
    ("not-a-mapping", "- a\n- b\n", r"must hold a mapping of keys"),
    ("not-yaml", "plan: {tp: 2\n", r"is not valid YAML"),
]


@pytest.mark.parametrize("fault, text, message", JOB_FAULTS, ids=[f[0] for f in JOB_FAULTS])
def test_job_file_fault(tmp_path, monkeypatch, fault, text, message):
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        JobFile.from_yaml(job)
    assert str(job) in str(err.value), f"{fault}: the error does not name the file"


def test_job_file_outputs_inside_the_root_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text(IMAGES_JOB + "output: out/r.json\nimages: {output_dir: pics}\n")
    jf = JobFile.from_yaml(job)
    assert jf.output == str(tmp_path / "out" / "r.json") and jf.images.output_dir == str(tmp_path / "pics")
    # a symlink inside the root that points outside is refused too
    (tmp_path / "link").symlink_to("/etc")
    job.write_text(BASE_JOB + "output: link/x.json\n")
    with pytest.raises(ConfigError, match=r"resolves to /etc/x\.json, outside the output root"):
        JobFile.from_yaml(job)
    # the user may name another root explicitly
    elsewhere = tmp_path.parent / f"elsewhere-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("TESSERA_OUTPUT_ROOT", str(elsewhere))
    job.write_text(BASE_JOB + f"output: {elsewhere}/r.json\n")
    assert JobFile.from_yaml(job).output == str(elsewhere / "r.json")


def test_python_api_values_still_pass(tmp_path, monkeypatch):
    """What the Python API hands over (a Path model, a ParallelPlan) is not mistaken for a wrong type."""
    monkeypatch.chdir(tmp_path)
    jf = JobFile.from_dict({"model": tmp_path, "plan": ParallelPlan({"tp": 2}), "name": "api job"})
    assert jf.job.model == str(tmp_path) and jf.name == "api job"


def test_job_name_from_an_odd_file_name_is_made_safe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "my job (copy).yaml"
    job.write_text(BASE_JOB)
    assert JobFile.from_yaml(job).name == "my job -copy-"
    hidden = tmp_path / "..hidden.yaml"
    hidden.write_text(BASE_JOB)
    assert JobFile.from_yaml(hidden).name == "hidden"


def test_image_modes_match_the_engine():
    from tessera.runtime.diffusion.request import MODES

    assert tuple(IMAGE_MODES) == tuple(MODES)


# -- every key of the typed options, with a wrong type or value ---------------------------------------

BAD_VALUES = {
    LLMOptions: {"dtype": 5, "max_model_len": "8", "block_size": 0.5, "num_kv_blocks": -1, "max_num_seqs": "x",
                 "max_prefill_tokens": True, "record_routing": "yes", "stop_at_eos": 1, "step_timeout_s": "abc",
                 "moe_dispatch": "fast", "decode_steps": 0, "expert_parallel_mode": 3, "expert_map": "abc",
                 "expert_replicas": 5, "placement_file": 5, "recovery": {"max_restarts": 0}},
    DiffusionOptions: {"dtype": "int8", "progress": "no", "recovery": {"stall_floor_s": "soon"}, "checkpoint_s": -1},
    RecoveryPolicy: {"max_restarts": 0, "window_s": -1, "backoff_s": float("nan"), "max_backoff_s": "long",
                     "poison_faults": 0, "stall_floor_s": 0, "stall_factor": 0.5},
    OffloadConfig: {"device_budget_bytes": "12XB", "host_budget_bytes": -5, "nvme_dir": 5, "reader": "fast",
                    "io_threads": 0, "queue_depth": "deep", "block_size": 1000, "chunk_bytes": 4095,
                    "cache_policy": "fifo", "predictor": "oracle", "predict_top_k": -1, "prefetch_depth": 0,
                    "verify_reads": "yes", "on_corrupt": "ignore", "min_free_bytes": "a lot"},
    Timeouts: {"placement_group_s": 0, "worker_start_s": "abc", "process_group_s": float("nan"),
               "call_s": float("inf")},
    PlanningHints: {"world_size": 0, "device_memory_gib": float("inf"), "kv_tokens": "many"},
}
REQUIRED = {OffloadConfig: {"device_budget_bytes": 1 << 20}}
OPTION_CASES = [(cls, key, value) for cls, table in BAD_VALUES.items() for key, value in table.items()]


def test_bad_value_table_covers_every_field():
    for cls, table in BAD_VALUES.items():
        assert set(table) == {f.name for f in fields(cls)}, f"{cls.__name__}: a field has no bad-value row"


@pytest.mark.parametrize("cls, key, value", OPTION_CASES, ids=[f"{c.__name__}.{k}" for c, k, _ in OPTION_CASES])
def test_every_option_key_rejects_a_wrong_value(cls, key, value):
    where = cls.__name__.lower()
    with pytest.raises(ConfigError) as err:
        from_mapping(cls, {**REQUIRED.get(cls, {}), key: value}, where)
    text = str(err.value)
    if isinstance(value, dict):  # a nested options object (recovery): its own key and value are named
        (inner, bad), = value.items()
        assert text.startswith(f"{where}: {key}: ") and inner in text and repr(bad) in text, text
    else:
        assert text.startswith(f"{where}: ") and key in text and repr(value) in text, text


def test_jobspec_fields_are_typed():
    with pytest.raises(ConfigError, match=r"JobSpec\.model is 5"):
        JobSpec(plan=ParallelPlan({}), model=5)
    with pytest.raises(ConfigError, match=r"JobSpec\.cluster is \['a'\]"):
        JobSpec(plan=ParallelPlan({}), cluster=["a"])
    with pytest.raises(ConfigError, match=r"cpus_per_rank is inf"):
        JobSpec(plan=ParallelPlan({}), cpus_per_rank=float("inf"))
    with pytest.raises(ConfigError, match=r"JobSpec\.engine must be a LLMOptions or DiffusionOptions"):
        JobSpec(plan=ParallelPlan({}), engine={"dtype": "float32"})


# -- tier files ---------------------------------------------------------------------------------------


def _groups() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {"layers.0.dense": {"w": torch.randn(33, 17, generator=g), "b": torch.randn(17, generator=g)},
            "layers.0.experts.1": {"w1": torch.randn(40, 24, generator=g)}}


@pytest.mark.parametrize("edit, what", [
    (lambda t: t.update(shape=list(reversed(t["shape"]))), "shape"),  # would return a transposed tensor
    (lambda t: t.update(dtype="int32"), "dtype"),
    (lambda t: t.update(offset=t["offset"] + 64), "offset"),
    (lambda t: t.update(name="w_renamed"), "name"),
], ids=["shape", "dtype", "offset", "name"])
def test_edited_tier_manifest_is_refused_or_rebuilt(tmp_path, edit, what, caplog):
    from tessera.options import Tier
    from tessera.offload.store import TieredStore

    groups = _groups()
    specs = [group_spec(n, t) for n, t in groups.items()]
    tiers = {s.name: Tier.NVME for s in specs}
    refuse = OffloadConfig(device_budget_bytes=1 << 20, nvme_dir=str(tmp_path), reader="preadv", on_corrupt="refuse")
    TieredStore(refuse, specs, tiers).close()
    manifest_path = tmp_path / "weights.manifest.json"
    manifest = json.loads(manifest_path.read_text())
    edit(manifest["groups"][0]["tensors"][0])
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptTierFileError, match=r"weights\.manifest\.json fails its own checksum \(sha256\): its "
                                                   r"names, shapes, dtypes or offsets were edited.*delete both files"):
        TieredStore(refuse, specs, tiers)
    rebuild = OffloadConfig(device_budget_bytes=1 << 20, nvme_dir=str(tmp_path), reader="preadv")
    store = TieredStore(rebuild, specs, tiers)  # logged and rebuilt from the source tensors
    try:
        with store.fetch("layers.0.dense") as h:
            assert torch.equal(h.tensors["w"], groups["layers.0.dense"]["w"])
            assert h.tensors["w"].shape == (33, 17)
    finally:
        store.close()
    assert "fails its own checksum" in caplog.text
    assert TierFile.open(tmp_path, "weights", on_corrupt="refuse") is not None  # the rebuilt manifest is intact


def test_tier_manifest_with_a_consistent_digest_but_impossible_layout_is_refused(tmp_path):
    """Even a manifest whose digest was recomputed cannot view bytes past its extent."""
    from tessera.offload.errors import TierFileError
    from tessera.offload.tier_file import DIGEST_KEY, manifest_digest

    groups = _groups()
    total = sum(group_spec(n, t).nbytes for n, t in groups.items())
    write_tier_file(tmp_path, "w", groups.items(), "fp", total)
    path = tmp_path / "w.manifest.json"
    manifest = json.loads(path.read_text())
    manifest["groups"][0]["tensors"][0]["shape"] = [4096, 4096]
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(TierFileError, match=r"tensor 'w' \(float32 \[4096, 4096\].*does not fit its extent"):
        TierFile.open(tmp_path, "w")


@pytest.fixture
def tiny_fs(tmp_path):
    """A real, tiny (64 KiB) filesystem: a tmpfs mounted for this test and unmounted after it."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tiny tmpfs is not permitted here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)


def test_full_disk_during_a_tier_write_names_file_bytes_and_fix(tiny_fs):
    big = {"g0": {"w": torch.zeros(8192)}, "g1": {"w": torch.zeros(12288)}}  # 32 + 48 KiB: more than the disk
    # The writer was told 32 KiB (one group), which fits; the second group runs the disk full.
    writer = TierFileWriter(tiny_fs, "w", "fp", total_bytes=32768)
    writer.add("g0", big["g0"])
    with pytest.raises(DiskSpaceError) as err:
        writer.add("g1", big["g1"])
        writer.finish()
    text = str(err.value)
    assert f"no space left writing tier file {tiny_fs / 'w.tier'}" in text
    assert "it needs 81920 bytes" in text and "bytes are free now" in text and "point nvme_dir at a larger" in text
    assert not list(tiny_fs.iterdir()), "a failed write left files behind"


def test_tier_space_is_reserved_before_writing(tiny_fs):
    """posix_fallocate reserves the whole data file first: a disk that fills up afterwards cannot fail its write."""
    groups = {"g0": {"w": torch.zeros(4096)}, "g1": {"w": torch.zeros(4096)}}  # 16 KiB each
    writer = TierFileWriter(tiny_fs, "w", "fp", total_bytes=32768)
    filler = tiny_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # another process takes every byte left but one page (for the manifest, written at the end)
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - 4096))
    finally:
        os.close(fd)
    for name, tensors in groups.items():
        writer.add(name, tensors)
    tier = writer.finish()
    assert torch.equal(tier.read_group("g1")["w"], groups["g1"]["w"])


def test_tier_dir_too_small_names_bytes(tiny_fs):
    with pytest.raises(DiskSpaceError, match=r"has 0\.00 GiB free \(\d+ bytes\) but the tier file needs 0\.00 GiB "
                                             r"\(1048576 bytes"):
        TierFileWriter(tiny_fs, "w", "fp", total_bytes=1 << 20)
