"""The offload option reaches the engines through every launch path (issue 11): the Python launcher,
a job file and ``tessera run`` (``ray job submit`` and SLURM jobs run the same ``tessera run``: see
tests/test_ray_job.py and tests/test_slurm.py, whose job files carry an ``offload`` key too).
Tokens and images equal the same launch without offload; the tiers' counters prove they ran."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import tessera
from tessera.config import Timeouts
from tessera.models.tiny_diffusion import build_tiny_diffusion
from tessera.models.tiny_moe import build_tiny_moe

TIMEOUTS = Timeouts(placement_group_s=60, worker_start_s=180, process_group_s=120, call_s=300)
PROMPTS = [[5, 7, 9, 11, 13], [3, 1, 4, 1, 5, 9]]


@pytest.fixture(scope="module")
def moe(session_tmp):
    return build_tiny_moe("mixtral", session_tmp / "launch-offload-moe", layers=8, experts=8, tokenizer=True)


@pytest.fixture(scope="module")
def pixart(session_tmp):
    return build_tiny_diffusion("pixart", session_tmp / "launch-offload-pixart")


def _weight_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def test_python_launcher_offload_dict_reaches_the_moe_engine(ray_session, moe, tmp_path):
    offload = {"device_budget_bytes": _weight_bytes(moe) // 4, "nvme_dir": str(tmp_path), "reader": "preadv"}
    with tessera.launch(model=str(moe), plan={"ep": 2}, timeouts=TIMEOUTS, engine_options={"stop_at_eos": False}) as h:
        want = [r.token_ids for r in h.generate(PROMPTS, max_new_tokens=6)]
        assert h.offload_stats() == [None, None]
    with tessera.launch(model=str(moe), plan={"ep": 2}, timeouts=TIMEOUTS, offload=offload,
                        engine_options={"stop_at_eos": False}) as h:
        assert [r.token_ids for r in h.generate(PROMPTS, max_new_tokens=6)] == want
        stats = h.offload_stats()
        assert len(stats) == 2 and all(s["cache_misses"] > 0 and s["store_device_peak"] <= offload["device_budget_bytes"]
                                       for s in stats)


def test_python_launcher_offload_reaches_the_diffusion_engine(pixart, tmp_path):
    args = dict(steps=2, height=32, width=32, seed=3, output="latent")
    with tessera.launch(model=str(pixart), plan={}, cluster="inprocess", engine_options={"progress": False}) as h:
        want = h.generate_images(["a red square"], **args)[0]
    offload = {"device_budget_bytes": "1MiB", "nvme_dir": str(tmp_path), "reader": "preadv"}
    with tessera.launch(model=str(pixart), plan={}, cluster="inprocess", offload=offload,
                        engine_options={"progress": False}) as h:
        assert torch.equal(h.generate_images(["a red square"], **args)[0], want)
        (stats,) = h.offload_stats()
        assert stats["reads"] > 0 and stats["device_peak"] <= 1 << 20


def _tessera_run(job: str, cwd) -> dict:
    (cwd / "job.yaml").write_text(job)
    proc = subprocess.run([sys.executable, "-m", "tessera.launch.cli", "--log-level", "WARNING", "run", "job.yaml"],
                          cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("result: ")][-1]
    return json.loads(line[len("result: "):])


def test_job_file_offload_key_through_tessera_run(moe, pixart, tmp_path):
    """LLM and DiT job files run in process (cluster: inprocess) with and without their offload key."""
    base = (f"task: generate\nmodel: {moe}\nplan: {{}}\ncluster: inprocess\nprompts: [hello]\n"
            f"engine: {{stop_at_eos: false}}\nsampling: {{max_new_tokens: 6}}\n")
    (tmp_path / "tiers").mkdir()
    plain = _tessera_run(base, tmp_path)
    offloaded = _tessera_run(base + f"offload: {{device_budget_bytes: {_weight_bytes(moe) // 4}, "
                                    f"nvme_dir: {tmp_path / 'tiers'}, reader: preadv}}\n", tmp_path)
    assert "offload" not in plain
    assert offloaded["generations"][0]["token_ids"] == plain["generations"][0]["token_ids"]
    (stats,) = offloaded["offload"]
    assert stats["cache_misses"] > 0 and stats["store_reads"] > 0
    images = (f"task: images\nmodel: {pixart}\nplan: {{}}\ncluster: inprocess\nprompts: [a red square]\n"
              f"images: {{steps: 2, height: 32, width: 32, seed: 3, output_dir: plain}}\n")
    plain = _tessera_run(images, tmp_path)
    offloaded = _tessera_run(images.replace("output_dir: plain", "output_dir: offloaded")
                             + f"offload: {{device_budget_bytes: 1MiB, nvme_dir: {tmp_path / 'tiers'}}}\n", tmp_path)
    (stats,) = offloaded["offload"]
    assert stats["reads"] > 0
    from PIL import Image

    a = Image.open(plain["images"][0]["path"])
    b = Image.open(offloaded["images"][0]["path"])
    assert list(a.getdata()) == list(b.getdata())
